"""How many torch threads the toy pipeline (README step 1) should use on a small CPU machine, idle and busy.

The tests pin one torch thread for tiny models because two threads spin on a shared 2-core box; the demo's source
model (a tiny OASIS, 400 steps) once took 55 minutes while 4-6 other jobs ran. This measures the demo's slowest
stage, the source model's training, with OMP_NUM_THREADS=1 and =2, A/B interleaved (1, 2, 2, 1, 1, 2, ...) so
that a drift of the machine's load hits both alike, on the idle machine and beside `--load K` busy processes
(each a Python loop spinning on one core for as long as the runs last).

Design, fixed before the first run: the demo takes the thread count whose median time is lower beside the load
(the case that went wrong), unless that count is more than 20% slower than the other on the idle machine; the
numbers are written to BENCHMARKS.md by hand with the command, date and machine.

    python bench/threads_check.py --steps 100 --reps 3 --load 2
"""
import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import SMALL  # noqa: E402


def spin(stop_at):
    while time.time() < stop_at:
        pass


def source_run(threads, steps, out):
    """The demo's source-model stage (bench/toy_transfer.py --quick's widths, batch and learning rates), timed."""
    cmd = [sys.executable, "finetune_oasis.py", "--init", "scratch", "--data", "toy-source", *SMALL, "--batch", "8",
           "--stage1-steps", "0", "--stage2-steps", str(steps), "--lr", "1e-3", "--lr-d", "4e-3", "--ema-decay", "0.99",
           "--eval-every", str(steps), "--device", "cpu", "--overwrite", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - t0


def measure(steps, reps, load, tmp):
    """{threads: [seconds, ...]} with `load` spinning processes beside the runs."""
    hogs = [mp.Process(target=spin, args=(time.time() + 24 * 3600,), daemon=True) for _ in range(load)]
    for h in hogs:
        h.start()
    try:
        times = {1: [], 2: []}
        for r in range(reps):
            for threads in ((1, 2) if r % 2 == 0 else (2, 1)):
                times[threads].append(source_run(threads, steps, Path(tmp) / f"t{threads}"))
                print(f"  load {load}, {threads} thread(s): {times[threads][-1]:.1f} s", flush=True)
        return times
    finally:
        for h in hogs:
            h.terminate()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="source-model training steps per run (the demo trains 400)")
    p.add_argument("--reps", type=int, default=3, help="runs per thread count and condition, interleaved")
    p.add_argument("--load", type=int, default=2, help="busy processes beside the runs in the busy condition")
    args = p.parse_args()
    subprocess.run([sys.executable, "-c", "import toy; toy.ensure('toy-source')"], cwd=REPO, check=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for load in (0, args.load):
            times = measure(args.steps, args.reps, load, tmp)
            rows.append((load, {k: statistics.median(v) for k, v in times.items()}, times))
    print("\n| condition | 1 thread (median s) | 2 threads (median s) | runs |\n|---|---|---|---|")
    for load, med, times in rows:
        print(f"| {'idle' if load == 0 else f'{load} busy processes'} | {med[1]:.1f} | {med[2]:.1f} | "
              f"{', '.join(f'{t:.0f}' for t in times[1])} / {', '.join(f'{t:.0f}' for t in times[2])} |")
    idle, busy = rows[0][1], rows[1][1]
    pick = min(busy, key=busy.get)
    other = 3 - pick
    if idle[pick] > 1.2 * idle[other]:
        pick = other
    print(f"\nchoice by the design rule: {pick} thread(s)")


if __name__ == "__main__":
    main()
