"""bench/pipeline.py: the collapse rule of a toy source model on recorded logs (tests/data/collapse_logs: loss_G
every 10 steps of 400-step finetune_oasis.py --init scratch runs of the README demo's source, 2026-12-06), the
retry with the next seed (a stub in place of the training step) and the scheduler's making anew of what was made
from a retrained source."""
import json
import math
import random
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from pipeline import COLLAPSE_SD, collapsed, schedule, train_source  # noqa: E402

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
    with pytest.raises(RuntimeError, match=r"nope.jsonl: cannot read it"):
        collapsed(tmp_path / "nope.jsonl", 400)
    (tmp_path / "bad.jsonl").write_text('{"step": 0}\nnot json\n')
    with pytest.raises(RuntimeError, match=r"bad.jsonl: line 2 is not JSON"):
        collapsed(tmp_path / "bad.jsonl", 400)


class StubTraining:
    """In place of finetune_oasis.py: a 'run' of seed k writes a log of 40 loss values (flat for the seeds in
    `collapsing`, moving otherwise) and, finished, a checkpoint holding its seed; it skips a run finished in the
    folder unless `again`, as the drivers' training steps do. Records its calls."""

    def __init__(self, run_dir, collapsing):
        self.run_dir, self.collapsing, self.calls = run_dir, set(collapsing), []

    def __call__(self, k, again):
        self.calls.append((k, again))
        ckpt = self.run_dir / "checkpoint.pt"
        if ckpt.is_file() and not again:
            return False
        rng = random.Random(k)
        values = [3.1 + rng.gauss(0, 0.01) if k in self.collapsing else 2.0 + rng.gauss(0, 0.3) for _ in range(40)]
        self.run_dir.mkdir(exist_ok=True)
        write_log(self.run_dir / "log.jsonl", values)
        from models import run
        run.save({"kind": "oasis-cat", "format": run.FORMAT, "step": 400, "args": {"seed": k}}, ckpt)
        return True


def test_collapsed_source_is_trained_again_with_the_next_seed(tmp_path, capsys):
    run_dir = tmp_path / "source"
    train = StubTraining(run_dir, collapsing={0})
    assert train_source(train, run_dir, 400) == (1, None, True)
    assert train.calls == [(0, False), (1, True)]
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and "seed 0 collapsed (loss_G stopped moving: sd" in said[0]
    assert "training it again with --seed 1 (try 2 of 3)" in said[0]
    # run again (the demo after an interruption): the finished seed-1 source is checked, kept, nothing retrained
    train.calls.clear()
    assert train_source(train, run_dir, 400) == (1, None, False)
    assert train.calls == [(1, False)] and capsys.readouterr().out == ""


def test_healthy_source_is_trained_once(tmp_path, capsys):
    train = StubTraining(tmp_path / "source", collapsing=set())
    assert train_source(train, tmp_path / "source", 400, seed=5) == (5, None, True)
    assert train.calls == [(5, False)] and capsys.readouterr().out == ""


def test_three_collapses_go_on_with_the_last_seed(tmp_path, capsys):
    run_dir = tmp_path / "source"
    train = StubTraining(run_dir, collapsing={0, 1, 2, 3})
    seed, why, ran = train_source(train, run_dir, 400)
    assert (seed, ran) == (2, True) and why.startswith("loss_G stopped moving")
    assert train.calls == [(0, False), (1, True), (2, True)]  # 3 tries in all: seed 3 never trained
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 3 and "going on with it after 3 tries (seeds 0-2)" in said[-1]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["args"]["seed"] == 2


def test_rerun_continues_from_the_seed_in_the_folder(tmp_path):
    # a run folder holding the finished run of a later try (the earlier ones collapsed) continues with it ...
    run_dir = tmp_path / "source"
    StubTraining(run_dir, collapsing={1})(1, False)
    train = StubTraining(run_dir, collapsing={0, 1})
    assert train_source(train, run_dir, 400) == (2, None, True)
    assert train.calls == [(1, False), (2, True)]
    # ... and one holding a finished collapsed first try retrains the next seed, as the first time did
    run_dir = tmp_path / "source2"
    StubTraining(run_dir, collapsing={0})(0, False)
    train = StubTraining(run_dir, collapsing={0})
    assert train_source(train, run_dir, 400) == (1, None, True)
    assert train.calls == [(0, False), (1, True)]


def test_schedule_makes_again_what_a_retrained_source_fed():
    """fn(again): again when a dependency's fn returned True in this run; a step made again passes it on."""
    seen = {}

    def step(key, result):
        def fn(again):
            seen[key] = again
            return result if result is not None else again
        return fn
    tasks = {"evalnets": ([], step("evalnets", False)), "source": ([], step("source", True)),
             "aff": (["source"], step("aff", None)), "run": (["aff"], step("run", None)),
             "eval": (["evalnets", "run"], step("eval", None)), "text": ([], step("text", None)),
             "eval_text": (["evalnets", "text"], step("eval_text", None))}
    schedule(tasks, 2)
    assert seen == {"evalnets": False, "source": False, "aff": True, "run": True, "eval": True, "text": False,
                    "eval_text": False}
    tasks["source"] = ([], step("source", False))  # a source model kept: nothing is made again
    schedule(tasks, 1)
    assert not any(seen.values())


def test_a_broken_checkpoint_in_the_source_folder_is_one_line(tmp_path):
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "checkpoint.pt").write_bytes(b"not a torch file")
    with pytest.raises(RuntimeError, match=r"^--resume .*checkpoint.pt: "):
        train_source(StubTraining(tmp_path / "source", collapsing=set()), tmp_path / "source", 400)
