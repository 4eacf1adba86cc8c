"""What the benchmark drivers share: the small OASIS widths of their CPU runs, one pipeline step (one of the
project's scripts run as a subprocess, skipped when its output exists and is not older than what it was made from;
a finetuning step only when it finished), the toy source model's training (with finetune_oasis.py --seed 1, then 2
while it collapsed) and the scheduler of many steps."""
import json
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
if str(REPO) not in sys.path:  # `models` is imported where it is used (in the functions below): torch loads only then
    sys.path.insert(0, str(REPO))
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


def current(done, made_from=None):
    """Whether the step whose output is the file `done` is finished and up to date (make's rule, on modification
    times): `done` exists and is not older than `made_from`, the file it was made from that a run of the driver
    may make anew (the toy source model's checkpoint.pt, a run's checkpoint for its evaluation; None: nothing).
    So a source model trained again leaves every step made from the one before stale, also when the driver was
    stopped part-way through redoing them: the next run redoes the rest."""
    done = Path(done)
    if not done.exists():
        return False
    if made_from is None or not Path(made_from).exists():
        return True
    return done.stat().st_mtime_ns >= Path(made_from).stat().st_mtime_ns


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
    from models import run
    return int(run.load(ckpt, "--resume", kinds=("oasis-cat",), mmap=True)["step"])


def run_finetune(cmd, log, run_dir, steps, threads=None, made_from=None, again=False):
    """One finetune_oasis.py step: finished only when <run_dir>/checkpoint.pt holds step `steps` (a run
    interrupted after an intermediate save has a checkpoint too) and is not older than `made_from` (`current`:
    the source model's checkpoint.pt of a run made from it). An interrupted run continues with --resume from its
    last checkpoint, or starts over with --overwrite when it was stopped before the first one; a checkpoint older
    than `made_from` (made from an earlier source model), or `again` (trained again with another seed), starts
    over in any case. True when it ran, False when it had finished already."""
    run_dir, ckpt = Path(run_dir), Path(run_dir) / "checkpoint.pt"
    again = again or (ckpt.is_file() and not current(ckpt, made_from))
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
# It was measured on 400-step runs at the SMALL widths, batch 8, and is applied to such source models only (`judged`).
COLLAPSE_SD = 0.08  # loss_G's sample standard deviation over the last quarter of the run below this: collapsed
COLLAPSE_POINTS = 10  # at least this many logged loss_G values judged (fewer in the whole log: not judged)
SOURCE_TRIES = 3  # a collapsed source model is trained again with the next finetune_oasis.py --seed, this many in all
# The drivers' results.json holds one entry per row and, under this key (not a row), the source model used:
# {"seed": its finetune_oasis.py --seed, "collapsed": why it still collapsed after the last try, or null}
SOURCE_KEY = "source model"


def judged(width, batch):
    """Whether the collapse rule applies to a toy source model of these width flags and batch size: the SMALL
    widths at batch 8, where it was measured (not the wider gpu presets, batch 16)."""
    return [str(w) for w in width] == SMALL and int(batch) == 8


def collapsed(log_jsonl, n_steps):
    """Why the finetune_oasis.py run of `n_steps` steps whose log.jsonl is `log_jsonl` collapsed, as a short
    reason, or None. The rule (fixed before any run used it): over the last quarter of the run's logged steps
    (steps after 3/4 of `n_steps`; the last COLLAPSE_POINTS logged values when that quarter holds fewer), the
    sample standard deviation of loss_G is below COLLAPSE_SD. A log with fewer than COLLAPSE_POINTS loss_G values
    (a run of a few steps) is not judged: None. The log is read by models.curves.read_log (a torn last line is
    left out); a missing or unreadable log raises RuntimeError naming it."""
    log_jsonl = Path(log_jsonl)
    from models import DataError
    from models.curves import read_log
    if not log_jsonl.is_file():
        raise RuntimeError(f"{log_jsonl}: no such file; expected the log.jsonl of a finished finetune_oasis.py run")
    try:
        entries = read_log(log_jsonl)
    except DataError as e:
        raise RuntimeError(str(e)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise RuntimeError(f"{log_jsonl}: cannot read it ({getattr(e, 'strerror', None) or e}); expected the "
                           f"log.jsonl of a finished finetune_oasis.py run") from None
    points = [(int(e["step"]), float(e["loss_G"])) for e in entries  # (step, loss_G)
              if isinstance(e, dict) and "loss_G" in e and "step" in e and e["step"] <= n_steps]
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
    from models import DataError, run
    try:
        return int(run.load(ckpt, "--resume", kinds=("oasis-cat",), mmap=True)["args"]["seed"])
    except DataError as e:
        raise RuntimeError(str(e)) from None


def read_tries(path):
    """{seed: why it collapsed, or None} of the source model's tries recorded in `path` (train_source's record:
    a JSON list of {"seed", "collapsed"}); {} when there is none. A malformed record raises RuntimeError."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        tries = json.loads(path.read_text())
        return {int(t["seed"]): (None if t["collapsed"] is None else str(t["collapsed"])) for t in tries}
    except (ValueError, TypeError, KeyError, AttributeError):
        raise RuntimeError(f"{path}: expected the driver's record of source model tries (a JSON list of "
                           f'{{"seed", "collapsed"}}); move it away to train the source model from its first seed') from None


def write_tries(path, tries):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps([{"seed": k, "collapsed": why} for k, why in sorted(tries.items())], indent=1))
    os.replace(tmp, path)


def train_source(train, run_dir, n_steps, record, seed=0, tries=SOURCE_TRIES, judge=True):
    """A source model trained from scratch into `run_dir`, and trained again with the next finetune_oasis.py
    --seed (seed, seed + 1, ...: the source's own seed, not a driver's --seeds) while it collapsed (`collapsed`),
    `tries` seeds in all; `judge` False (a preset the rule was not measured on, see `judged`): trained once with
    `seed`, not checked.

    train(k, again) trains it with --seed k, or skips (or resumes) a run of seed k in `run_dir`; again: the folder
    holds the run of another seed, to be started over (--overwrite: its recorded files go). Each finished try is
    checked and written to `record` (the driver's own file, e.g. <out>/logs/source_tries.json: the seeds tried and
    why they collapsed), so that a driver stopped during a retry goes on with the first seed not yet found
    collapsed, and the same source model comes out (a record beside a `run_dir` that is gone is not used; a
    `run_dir` holding the run of a later seed than the record's next one, from before the record, goes on with
    that seed). Each collapse is said in one line (seed, reason). Returns (the seed used, why it still collapsed
    after the last try or None)."""
    run_dir, last = Path(run_dir), seed + tries - 1
    ckpt = run_dir / "checkpoint.pt"
    if not judge:
        at = run_seed(ckpt)
        train(seed, at is not None and at != seed)
        return seed, None
    tried = read_tries(record) if run_dir.is_dir() else {}
    k = next((s for s in range(seed, last) if tried.get(s) is None), last)
    at = run_seed(ckpt)
    if at is not None and k < at <= last:
        k = at
    while True:
        at = run_seed(ckpt)
        train(k, at is not None and at != k)
        why = collapsed(run_dir / "log.jsonl", n_steps)
        tried[k] = why
        write_tries(record, tried)
        if why is None:
            return k, None
        if k == last:
            print(f"{run_dir.name}: the source model of seed {k} collapsed too ({why}); going on with it after "
                  f"{tries} tries (seeds {seed}-{last})", flush=True)
            return k, why
        print(f"{run_dir.name}: the source model of seed {k} collapsed ({why}); training it again with "
              f"finetune_oasis.py --seed {k + 1} (try {k + 2 - seed} of {tries})", flush=True)
        k += 1


def source_note(source_model, judge=True):
    """The tables' words for the source model used ({seed, collapsed}, train_source's seed and reason; `judge`
    False: a preset the collapse rule is not applied to)."""
    why = source_model.get("collapsed")
    return (f"source model seed {source_model['seed']}" + (f" (it collapsed in every try: {why})" if why else "")
            + ("" if judge else " (not checked for collapse: the rule holds for the SMALL widths at batch 8)"))


def schedule(tasks, jobs):
    """Run {key: (dependency keys, fn)} with at most `jobs` at a time, each fn() as soon as its dependencies are
    done, in the given order otherwise. A step decides itself whether it is finished (`current`: what it was made
    from may have been made anew). A failed step does not stop the others; its dependants are skipped, and the
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
