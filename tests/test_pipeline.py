"""bench/pipeline.py: the collapse rule of a toy source model on recorded logs (tests/data/collapse_logs: loss_G
every 10 steps of 400-step finetune_oasis.py --init scratch runs of the README demo's source, 2026-12-06), the
retry with the next seed and its record (a stub in place of the training step), and make's rule: what was made from
a retrained source is made again, also after an interrupted redo."""
import json
import math
import os
import random
import sys
import time

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from pipeline import COLLAPSE_SD, SMALL, collapsed, current, judged, read_tries, schedule, train_source  # noqa: E402

LOGS = REPO / "tests" / "data" / "collapse_logs"


def loss_sd(name, lo, hi):
    """loss_G's sample standard deviation over the logged steps lo..hi of a recorded log (computed here)."""
    vals = [e["loss_G"] for e in map(json.loads, (LOGS / name).read_text().splitlines())
            if "loss_G" in e and lo <= e["step"] <= hi]
    m = sum(vals) / len(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)), m


@pytest.mark.parametrize("name", ["collapsed_head_seed1.jsonl", "collapsed_head_seed2.jsonl", "collapsed_old_seed2.jsonl"])
def test_recorded_collapses_are_caught(name):
    why = collapsed(LOGS / name, 400)
    sd, mean = loss_sd(name, 301, 400)
    assert why == f"loss_G stopped moving: sd {sd:.3f} over steps 301-400, mean {mean:.2f}"


@pytest.mark.parametrize("name", ["healthy_old_seed0.jsonl", "healthy_old_seed1.jsonl", "spike_head_seed0.jsonl"])
def test_recorded_healthy_runs_pass(name):
    # the spike run had a loss spike early on and recovered: it learns, and is not taken as collapsed
    assert collapsed(LOGS / name, 400) is None
    assert loss_sd(name, 301, 400)[0] > 2 * COLLAPSE_SD  # the logs are what the names say (not near the line)


def write_log(path, values, every=10):
    lines = [{"step": 0, "recipe": "cat"}] + [{"step": every * (i + 1), "stage": 2, "loss_G": v, "loss_D": 4.0}
                                              for i, v in enumerate(values)]
    path.write_text("".join(json.dumps(e) + "\n" for e in lines))
    return path


def test_rule_judges_the_last_quarter_only(tmp_path):
    rng = random.Random(0)
    moving = [2.0 + rng.gauss(0, 0.3) for _ in range(30)]
    flat = [3.1 + rng.gauss(0, 0.01) for _ in range(10)]
    # flat only over the last quarter (steps 301-400): collapsed, whatever came before
    assert collapsed(write_log(tmp_path / "a.jsonl", moving + flat), 400).endswith("over steps 301-400, mean 3.10")
    # flat until step 300, moving after it: not collapsed
    assert collapsed(write_log(tmp_path / "b.jsonl", flat * 3 + moving[:10]), 400) is None
    # a quarter holding fewer than 10 logged values: the last 10 are judged (here steps 201-400, every 20 steps)
    why = collapsed(write_log(tmp_path / "c.jsonl", moving[:10] + flat, every=20), 400)
    assert "over steps 201-400" in why
    # a short run (fewer than 10 loss values in all) is not judged, however flat
    assert collapsed(write_log(tmp_path / "d.jsonl", [3.0] * 9), 90) is None
    assert collapsed(write_log(tmp_path / "e.jsonl", [3.0] * 10), 100).startswith("loss_G stopped moving: sd 0.000")


def test_missing_or_broken_log_is_one_line(tmp_path):
    with pytest.raises(RuntimeError, match=r"nope.jsonl: no such file"):
        collapsed(tmp_path / "nope.jsonl", 400)
    (tmp_path / "bad.jsonl").write_text('{"step": 0}\nnot json\n{"step": 10, "loss_G": 3.0}\n')
    with pytest.raises(RuntimeError, match=r"bad.jsonl: line 2 is not JSON"):
        collapsed(tmp_path / "bad.jsonl", 400)
    # a torn last line (a run killed while writing it) is left out, as by every reader of log.jsonl
    log = write_log(tmp_path / "torn.jsonl", [3.0] * 10)
    with open(log, "a") as f:
        f.write('{"step": 110, "loss_')
    assert collapsed(log, 100).startswith("loss_G stopped moving: sd 0.000 over steps 1-100")


class StubTraining:
    """In place of finetune_oasis.py: a 'run' of seed k writes a log of 40 loss values (flat for the seeds in
    `collapsing`, moving otherwise) and, finished, a checkpoint holding its seed; it skips a run finished in the
    folder unless `again`, as the drivers' training steps do. Records its calls; `kill_at`: the seed whose run is
    killed before it writes its checkpoint (KeyboardInterrupt), as a driver stopped during that try."""

    def __init__(self, run_dir, collapsing, kill_at=None):
        self.run_dir, self.collapsing, self.kill_at, self.calls = run_dir, set(collapsing), kill_at, []

    def __call__(self, k, again):
        self.calls.append((k, again))
        ckpt = self.run_dir / "checkpoint.pt"
        if ckpt.is_file() and not again:
            return
        self.run_dir.mkdir(exist_ok=True)
        ckpt.unlink(missing_ok=True)  # --overwrite: the run's recorded files go
        rng = random.Random(k)
        values = [3.1 + rng.gauss(0, 0.01) if k in self.collapsing else 2.0 + rng.gauss(0, 0.3) for _ in range(40)]
        write_log(self.run_dir / "log.jsonl", values[:20] if k == self.kill_at else values)
        if k == self.kill_at:
            raise KeyboardInterrupt
        from models import run
        run.save({"kind": "oasis-cat", "format": run.FORMAT, "step": 400, "args": {"seed": k}}, ckpt)


def test_collapsed_source_is_trained_again_with_the_next_seed(tmp_path, capsys):
    run_dir, record = tmp_path / "source", tmp_path / "logs" / "source_tries.json"
    train = StubTraining(run_dir, collapsing={0})
    assert train_source(train, run_dir, 400, record) == (1, None)
    assert train.calls == [(0, False), (1, True)]
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and "seed 0 collapsed (loss_G stopped moving: sd" in said[0]
    assert "training it again with finetune_oasis.py --seed 1 (try 2 of 3)" in said[0]
    tried = read_tries(record)
    assert list(tried) == [0, 1] and tried[0].startswith("loss_G stopped moving") and tried[1] is None
    # run again (the demo after an interruption): the finished seed-1 source is checked, kept, nothing retrained
    train.calls.clear()
    assert train_source(train, run_dir, 400, record) == (1, None)
    assert train.calls == [(1, False)] and capsys.readouterr().out == ""


def test_healthy_source_is_trained_once(tmp_path, capsys):
    train = StubTraining(tmp_path / "source", collapsing=set())
    assert train_source(train, tmp_path / "source", 400, tmp_path / "tries.json", seed=5) == (5, None)
    assert train.calls == [(5, False)] and capsys.readouterr().out == ""


def test_three_collapses_go_on_with_the_last_seed(tmp_path, capsys):
    run_dir, record = tmp_path / "source", tmp_path / "tries.json"
    train = StubTraining(run_dir, collapsing={0, 1, 2, 3})
    seed, why = train_source(train, run_dir, 400, record)
    assert seed == 2 and why.startswith("loss_G stopped moving")
    assert train.calls == [(0, False), (1, True), (2, True)]  # 3 tries in all: seed 3 never trained
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 3 and "going on with it after 3 tries (seeds 0-2)" in said[-1]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["args"]["seed"] == 2
    train.calls.clear()  # run again: the last try is kept, not trained again
    assert train_source(train, run_dir, 400, record) == (2, why) and train.calls == [(2, False)]


def test_an_interrupted_retry_goes_on_with_the_seed_it_was_trying(tmp_path, capsys):
    # seed 0 collapsed; the driver is killed during the seed-1 try, whose run had removed seed 0's checkpoint
    # (--overwrite) and writes its own only at the end: the rerun trains seed 1, not seed 0 again
    run_dir, record = tmp_path / "source", tmp_path / "tries.json"
    with pytest.raises(KeyboardInterrupt):
        train_source(StubTraining(run_dir, collapsing={0}, kill_at=1), run_dir, 400, record)
    assert not (run_dir / "checkpoint.pt").exists() and list(read_tries(record)) == [0]
    train = StubTraining(run_dir, collapsing={0})
    assert train_source(train, run_dir, 400, record) == (1, None)
    assert train.calls == [(1, False)]
    # a record beside a source folder that is gone is not used: the source is trained from its first seed
    run_dir2 = tmp_path / "gone"
    train = StubTraining(run_dir2, collapsing=set())
    assert train_source(train, run_dir2, 400, record) == (0, None) and train.calls == [(0, False)]
    # a malformed record is one line naming it
    record.write_text('{"seed": 0}')
    with pytest.raises(RuntimeError, match=r"tries.json: expected the driver's record of source model tries"):
        train_source(StubTraining(run_dir, collapsing=set()), run_dir, 400, record)


def test_rerun_continues_from_the_seed_in_the_folder(tmp_path):
    # a run folder holding the finished run of a later try (from before the record) continues with it ...
    run_dir = tmp_path / "source"
    StubTraining(run_dir, collapsing={1})(1, False)
    train = StubTraining(run_dir, collapsing={0, 1})
    assert train_source(train, run_dir, 400, tmp_path / "tries.json") == (2, None)
    assert train.calls == [(1, False), (2, True)]
    # ... and one holding a finished collapsed first try retrains the next seed, as the first time did
    run_dir = tmp_path / "source2"
    StubTraining(run_dir, collapsing={0})(0, False)
    train = StubTraining(run_dir, collapsing={0})
    assert train_source(train, run_dir, 400, tmp_path / "tries2.json") == (1, None)
    assert train.calls == [(0, False), (1, True)]


def test_rule_applies_to_the_presets_it_was_measured_on(tmp_path):
    assert judged(SMALL, 8) and judged(SMALL, "8")
    assert not judged(SMALL, 16) and not judged(["--channels", "16", *SMALL[2:]], 8)
    # not judged: trained once with its seed, collapsed or not, and no record of tries
    run_dir, record = tmp_path / "source", tmp_path / "tries.json"
    train = StubTraining(run_dir, collapsing={0})
    assert train_source(train, run_dir, 400, record, judge=False) == (0, None)
    assert train.calls == [(0, False)] and not record.exists()


def test_an_interrupted_redo_is_finished_by_the_next_run(tmp_path):
    """Make's rule (`current`): a step is done when its output is not older than what it was made from. The source
    model trained again, the driver killed after redoing part of what was made from it: the next run, which does
    not train the source again, redoes the rest, and nothing that was not made from the source."""
    made, killed = [], set()

    def step(name, made_from=None):
        def fn():
            if current(tmp_path / name, made_from and tmp_path / made_from):
                return
            if name in killed:
                raise RuntimeError(f"{name}: killed")
            made.append(name)
            (tmp_path / name).write_text(name)
        return fn
    tasks = {"evalnets": ([], step("evalnets")), "source": ([], step("source")),
             "aff": (["source"], step("aff", "source")), "run": (["aff"], step("run", "source")),
             "eval": (["evalnets", "run"], step("eval", "run")), "scratch": ([], step("scratch")),
             "eval_scratch": (["evalnets", "scratch"], step("eval_scratch", "scratch"))}
    schedule(tasks, 1)
    assert len(made) == 7
    now = time.time()
    for name in tasks:  # everything made a while ago, the source trained again after it
        os.utime(tmp_path / name, (now - 100, now - 100))
    os.utime(tmp_path / "source", (now - 50, now - 50))
    made.clear()
    killed.add("eval")
    with pytest.raises(RuntimeError, match="1 step.s. failed"):
        schedule(tasks, 1)
    assert made == ["aff", "run"]
    made.clear()
    killed.clear()
    schedule(tasks, 2)
    assert made == ["eval"]
    schedule(tasks, 2)
    assert made == ["eval"]  # all done: nothing more


def test_current_compares_modification_times(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert not current(a) and not current(a, b)
    a.write_text("a")
    assert current(a) and current(a, b)  # nothing to compare with
    b.write_text("b")
    os.utime(a, (1000, 1000))
    assert not current(a, b)
    os.utime(a, (time.time() + 10,) * 2)
    assert current(a, b)


def test_a_broken_checkpoint_in_the_source_folder_is_one_line(tmp_path):
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "checkpoint.pt").write_bytes(b"not a torch file")
    with pytest.raises(RuntimeError, match=r"^--resume .*checkpoint.pt: "):
        train_source(StubTraining(tmp_path / "source", collapsing=set()), tmp_path / "source", 400,
                     tmp_path / "tries.json")
