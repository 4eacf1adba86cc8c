"""What the benchmark drivers share: the small OASIS widths of their CPU runs, one pipeline step (one of the
project's scripts run as a subprocess, skipped when its output exists) and the scheduler of many steps."""
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
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


def run_step(cmd, log, done=None, threads=None, env=None):
    """Run one step (skipped when `done` exists), its output into the file `log`; raises RuntimeError with the
    log's last lines on failure. `threads` sets OMP/MKL threads for the step (default: inherited); `env`: more
    variables (e.g. CUDA_VISIBLE_DEVICES)."""
    if done is not None and Path(done).exists():
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    extra_env, env = env, {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(extra_env or {})
    with open(log, "w") as f:
        r = subprocess.run([sys.executable] + [str(c) for c in cmd], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        tail = Path(log).read_text().splitlines()[-5:]
        raise RuntimeError(f"step failed (exit {r.returncode}), see {log}:\n" + "\n".join(tail))
    print(f"  done in {time.time() - t0:.0f}s" + (f": {Path(done).parent.name}" if done is not None else ""), flush=True)


def schedule(tasks, jobs):
    """Run {key: (dependency keys, fn)} with at most `jobs` at a time, each as soon as its dependencies are done,
    in the given order otherwise. A failed step does not stop the others; its dependants are skipped, and the
    failures are raised together at the end."""
    pending, running, done, failed = list(tasks), {}, set(), []
    with ThreadPoolExecutor(jobs) as ex:
        while pending or running:
            ready = [k for k in pending if set(tasks[k][0]) <= done][: jobs - len(running)]
            for k in ready:
                pending.remove(k)
                running[ex.submit(tasks[k][1])] = k
            if not running:
                break  # what is left depends on a failed step
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                key = running.pop(f)
                if f.exception() is None:
                    done.add(key)
                else:
                    failed.append(str(f.exception()))
                    print(failed[-1], flush=True)
    if failed or pending:
        raise RuntimeError(f"{len(failed)} step(s) failed, {len(pending)} skipped:\n" + "\n".join(failed))
