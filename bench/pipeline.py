"""What the benchmark drivers share: the small OASIS widths of their CPU runs, one pipeline step (one of the
project's scripts run as a subprocess, skipped when its output exists; a finetuning step only when it finished)
and the scheduler of many steps."""
import os
import re
import shlex
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
# Every toy run in BENCHMARKS.md and the README demo were measured with the EMA warm-up, finetune_oasis.py's default
# until 2026-12-06 (now official OASIS's fixed decay unless --ema-warmup): a few-hundred-step run needs it, or its EMA
# keeps a large share of the model it started from.
EMA_AS_RECORDED = ["--ema-warmup"]


def lr_opt(lr):
    """--lr LR --lr-d 4*LR: the learning rates of the recorded toy runs."""
    return ["--lr", lr, "--lr-d", repr(4 * float(lr))]


def command_line(cmd):
    """The step as a command to paste (from the repository root)."""
    return "python " + shlex.join(str(c) for c in cmd)


def progress(log):
    """The last progress line of a step's log (tqdm redraws its bar with carriage returns), or ''."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    parts = [p.strip() for p in re.split(r"[\r\n]", tail) if p.strip()]
    return parts[-1][:110] if parts else ""


def run_step(cmd, log, done=None, threads=None, env=None, every=60):
    """Run one step (skipped when `done` exists), its output into the file `log`; raises RuntimeError with the
    log's last lines on failure. Prints the command (runnable from the repository root), the log's path, the
    step's latest progress line every `every` seconds while it runs, and its time. `threads` sets OMP/MKL
    threads for the step (default: inherited); `env`: more variables (e.g. CUDA_VISIBLE_DEVICES)."""
    if done is not None and Path(done).exists():
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print("$ " + command_line(cmd), flush=True)
    print(f"  log: {log}", flush=True)
    extra_env, env = env, {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(extra_env or {})
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable] + [str(c) for c in cmd], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                env=env)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=every)
                    break
                except subprocess.TimeoutExpired:
                    print(f"  {Path(log).stem}, {time.time() - t0:.0f}s: {progress(log) or 'running'}", flush=True)
        except BaseException:  # Ctrl-C reaches the step too: let it stop (its log says where), else end it
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    if rc != 0:
        tail = Path(log).read_text().splitlines()[-5:]
        raise RuntimeError(f"step failed (exit {rc}), see {log}:\n" + "\n".join(tail))
    print(f"  done in {time.time() - t0:.0f}s: {Path(log).stem}", flush=True)


def saved_step(ckpt):
    """The training step a finetune_oasis.py checkpoint.pt was saved at (read by the project's one loader)."""
    sys.path.insert(0, str(REPO))
    from models import run
    return int(run.load(ckpt, "--resume", kinds=("oasis-cat",), mmap=True)["step"])


def run_finetune(cmd, log, run_dir, steps, threads=None, again=False):
    """One finetune_oasis.py step: finished only when <run_dir>/checkpoint.pt holds step `steps` (a run
    interrupted after an intermediate save has a checkpoint too). An interrupted run continues with --resume
    from its last checkpoint, or starts over with --overwrite when it was stopped before the first one; `again`:
    starts over in any case (its inputs were made anew). True when it ran (what was computed from the run before
    is stale), False when it had finished already."""
    run_dir, ckpt = Path(run_dir), Path(run_dir) / "checkpoint.pt"
    if ckpt.is_file() and not again:
        at = saved_step(ckpt)
        if at >= steps:
            return False
        print(f"{run_dir.name}: interrupted at step {at} of {steps}, resuming", flush=True)
        cmd = [*cmd, "--resume"]
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        print(f"{run_dir.name}: " + ("its inputs were made anew" if again else "interrupted before its first checkpoint")
              + ", starting over", flush=True)
        cmd = [*cmd, "--overwrite"]
    run_step(cmd, log, None, threads)
    return True


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
