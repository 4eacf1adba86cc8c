"""What the toy benchmarks share: the small OASIS widths of their CPU runs, and one pipeline step (one of the
project's scripts run as a subprocess, skipped when its output exists)."""
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--channels", "4", "--z-dim", "16", "--spade-hidden", "16", "--d-channels", "3,16,16,32,32,64,64", "--d-last", "16"]
# The toy tables in BENCHMARKS.md were measured before finetune_oasis.py took the supplement's stage-2 set and the
# official lr_D as defaults (2026-12-06). Their runs keep the settings they were measured with, written out, so that
# their commands reproduce them: stage 2 = every SPADE-block layer (TWO_STAGE_AS_RECORDED, for the two-stage rows),
# lr_D = 4 x lr_G (lr_opt).
TWO_STAGE_AS_RECORDED = ["--g-train", "blocks"]


def lr_opt(lr):
    """--lr LR --lr-d 4*LR: the learning rates of the recorded toy runs."""
    return ["--lr", lr, "--lr-d", repr(4 * float(lr))]


def run_step(cmd, log, done=None, threads=None):
    """Run one step (skipped when `done` exists), its output into the file `log`; raises RuntimeError with the
    log's last lines on failure. `threads` sets OMP/MKL threads for the step (default: inherited)."""
    if done is not None and Path(done).exists():
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log, "w") as f:
        r = subprocess.run([sys.executable] + [str(c) for c in cmd], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        tail = Path(log).read_text().splitlines()[-5:]
        raise RuntimeError(f"step failed (exit {r.returncode}), see {log}:\n" + "\n".join(tail))
    print(f"  done in {time.time() - t0:.0f}s" + (f": {Path(done).parent.name}" if done is not None else ""), flush=True)
