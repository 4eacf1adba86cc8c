"""What the benchmark drivers share: the small OASIS widths of their CPU runs, one pipeline step (one of the
project's scripts run as a subprocess, skipped when its output exists; a finetuning step only when it finished),
the toy source model's training (again with the next seed while it collapsed) and the scheduler of many steps."""
import json
import math
import os
import re
import shlex
import statistics
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
    starts over in any case (its inputs were made anew, or it is trained again with another seed). True when it
    ran (what was computed from the run before is stale), False when it had finished already."""
    run_dir, ckpt = Path(run_dir), Path(run_dir) / "checkpoint.pt"
    if ckpt.is_file() and not again:
        at = saved_step(ckpt)
        if at >= steps:
            return False
        print(f"{run_dir.name}: interrupted at step {at} of {steps}, resuming", flush=True)
        cmd = [*cmd, "--resume"]
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        print(f"{run_dir.name}: " + ("to be made anew" if again else "interrupted before its first checkpoint")
              + ", starting over", flush=True)
        cmd = [*cmd, "--overwrite"]
    run_step(cmd, log, None, threads)
    return True


# A toy source model trained from scratch at the small widths sometimes collapses in its first ~60 steps (one D step
# makes D's logits explode; both losses then creep smoothly and nothing is learned): BENCHMARKS.md "A collapsing toy
# source model (2026-12-06)". The rule below was fixed on that day before any run used it; do not tune it to results.
COLLAPSE_SD = 0.08  # loss_G's sample standard deviation over the last quarter of the run below this: collapsed
COLLAPSE_POINTS = 10  # at least this many logged loss_G values judged (fewer in the whole log: not judged)
SOURCE_TRIES = 3  # a collapsed source model is trained again with the next seed, this many tries in all
SOURCE_KEY = "source model"  # the drivers' results.json: {row: numbers, ..., SOURCE_KEY: {seed, collapsed}}


def collapsed(log_jsonl, n_steps):
    """Why the finetune_oasis.py run of `n_steps` steps whose log.jsonl is `log_jsonl` collapsed, as a short
    reason, or None. The rule (fixed before any run used it): over the last quarter of the run's logged steps
    (steps after 3/4 of `n_steps`; the last COLLAPSE_POINTS logged values when that quarter holds fewer), the
    sample standard deviation of loss_G is below COLLAPSE_SD. A log with fewer than COLLAPSE_POINTS loss_G values
    (a run of a few steps) is not judged: None. A missing or unreadable log raises RuntimeError naming it."""
    log_jsonl = Path(log_jsonl)
    try:
        lines = log_jsonl.read_text().splitlines()
    except OSError as e:
        raise RuntimeError(f"{log_jsonl}: cannot read it ({e.strerror or e}); expected the log.jsonl of a finished "
                           f"finetune_oasis.py run") from None
    points = []  # (step, loss_G)
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise RuntimeError(f"{log_jsonl}: line {i} is not JSON; expected finetune_oasis.py's log.jsonl") from None
        if isinstance(entry, dict) and "loss_G" in entry and entry.get("step", math.inf) <= n_steps:
            points.append((int(entry["step"]), float(entry["loss_G"])))
    if len(points) < COLLAPSE_POINTS:
        return None
    first = next(i for i, (step, _) in enumerate(points) if step > n_steps * 3 / 4 or i == len(points) - 1)
    window = points[min(first, len(points) - COLLAPSE_POINTS):]
    values = [v for _, v in window]
    sd = statistics.stdev(values)
    if not sd < COLLAPSE_SD:  # NaN is not judged collapsed by this rule
        return None
    before = points[len(points) - len(window) - 1][0] if len(window) < len(points) else 0
    return (f"loss_G stopped moving: sd {sd:.3f} over steps {before + 1}-{window[-1][0]}, "
            f"mean {statistics.fmean(values):.2f}")


def run_seed(ckpt):
    """The --seed of the finetune_oasis.py run whose checkpoint.pt is `ckpt` (read by the project's one loader),
    or None when there is no such file. A file that is not such a checkpoint raises RuntimeError (one line)."""
    if not Path(ckpt).is_file():
        return None
    sys.path.insert(0, str(REPO))
    from models import DataError, run
    try:
        return int(run.load(ckpt, "--resume", kinds=("oasis-cat",), mmap=True)["args"]["seed"])
    except DataError as e:
        raise RuntimeError(str(e)) from None


def train_source(train, run_dir, n_steps, seed=0, tries=SOURCE_TRIES):
    """A source model trained from scratch into `run_dir`, and trained again with the next seed (--overwrite: its
    recorded files go) while it collapsed (`collapsed`), `tries` seeds in all (seed, seed + 1, ...).

    train(k, again) trains it with --seed k (again: starting over in any case), or skips a run already finished in
    `run_dir`; it returns True when it trained. The check runs on the finished run each time, so a rerun after an
    interruption comes to the same source: a `run_dir` whose checkpoint holds the run of a later seed of the tries
    continues with that seed (the ones before it collapsed, or it would not have been trained). Each collapse is
    said in one line (seed, reason). Returns (the seed used, why it still collapsed after the last try or None,
    True when a training ran here: what was computed from the source before is stale)."""
    run_dir, last = Path(run_dir), seed + tries - 1
    at = run_seed(run_dir / "checkpoint.pt")
    k = at if at is not None and seed < at <= last else seed
    ran, again = False, False
    while True:
        ran = train(k, again) or ran
        why = collapsed(run_dir / "log.jsonl", n_steps)
        if why is None:
            return k, None, ran
        if k == last:
            print(f"{run_dir.name}: the source model of seed {k} collapsed too ({why}); going on with it after "
                  f"{tries} tries (seeds {seed}-{last})", flush=True)
            return k, why, ran
        print(f"{run_dir.name}: the source model of seed {k} collapsed ({why}); training it again with --seed {k + 1} "
              f"(try {k + 2 - seed} of {tries})", flush=True)
        k, again = k + 1, True


def source_note(source_model):
    """The tables' words for the source model used ({seed, collapsed}, train_source's seed and reason)."""
    why = source_model.get("collapsed")
    return f"source model seed {source_model['seed']}" + (f" (it collapsed in every try: {why})" if why else "")


def schedule(tasks, jobs):
    """Run {key: (dependency keys, fn)} with at most `jobs` at a time, each as soon as its dependencies are done,
    in the given order otherwise. fn(again) is called with again=True when the fn of one of its dependencies
    returned True: that one was made anew in this run (a source model trained here), so what the step made from it
    before is stale and is to be made again, not skipped; a step made again returns True in turn. A failed step
    does not stop the others; its dependants are skipped, and the failures are raised together at the end."""
    pending, running, done, anew, failed = list(tasks), {}, set(), set(), []
    with ThreadPoolExecutor(jobs) as ex:
        while pending or running:
            ready = [k for k in pending if set(tasks[k][0]) <= done][: jobs - len(running)]
            for k in ready:
                pending.remove(k)
                running[ex.submit(tasks[k][1], bool(set(tasks[k][0]) & anew))] = k
            if not running:
                break  # what is left depends on a failed step
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                key = running.pop(f)
                if f.exception() is None:
                    done.add(key)
                    if f.result():
                        anew.add(key)
                else:
                    failed.append(str(f.exception()))
                    print(failed[-1], flush=True)
    if failed or pending:
        raise RuntimeError(f"{len(failed)} step(s) failed, {len(pending)} skipped:\n" + "\n".join(failed))
