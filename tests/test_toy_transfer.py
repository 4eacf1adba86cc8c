"""The README's first command, shortened: the whole toy pipeline (estimate -> finetune -> evaluate) runs."""
import json
import os
import subprocess
import sys
import time

from conftest import REPO


def test_quick_pipeline_writes_grid_and_results(tmp_path):
    out = tmp_path / "quick"
    cmd = [sys.executable, "bench/toy_transfer.py", "--quick", "--out", str(out), "--device", "cpu",
           "--seg-epochs", "1", "--source-steps", "4", "--steps", "4"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = json.loads((out / "results.json").read_text())
    assert set(summary) == {"CAT training-free, combination", "CAT finetuned, combination (hard)", "source model"}
    # the source model used (4 steps: too short for the collapse check, so the first seed) is recorded
    assert summary["source model"] == {"seed": 0, "collapsed": None}
    # the quick preset is checked (the SMALL widths, batch 8): the try is recorded for a rerun
    assert json.loads((out / "logs" / "source_tries.json").read_text()) == [{"seed": 0, "collapsed": None}]
    assert "source pretrained 4 steps, source model seed 0)" in (out / "table.md").read_text()
    ev = out / "seed0" / "eval_cat_finetuned_combination_hard"
    res = json.loads((ev / "results.json").read_text())
    assert res["fid"] >= 0 and 0 <= res["miou"] <= 1
    assert (ev / "grid.png").stat().st_size > 0 and (out / "figure.png").exists()
    assert str(ev / "grid.png") in r.stdout  # the demo says where the grid is
    # the affinity used was estimated from the 100-shot subset, and the finetune run wrote its subset
    assert len((out / "seed0" / "run_cat_finetuned_combination_hard" / "subset.txt").read_text().split()) == 100
    # every stage is echoed as a command to paste, with the log that shows its progress
    assert f"$ python bench/toy_segmenter.py --out {out / 'evalnets'}" in r.stdout
    assert f"log: {out / 'logs' / 'source.log'}" in r.stdout


def test_interrupted_finetune_stage_resumes_not_skipped(tmp_path, capsys, monkeypatch):
    """A finetuning stage whose run folder holds a checkpoint of an earlier step (killed after an intermediate
    save) is continued with --resume, not taken as finished; one killed before its first save starts over."""
    sys.path.insert(0, str(REPO / "bench"))
    from pipeline import run_finetune
    run_dir, log = tmp_path / "run", tmp_path / "logs" / "run.log"
    tiny = ["finetune_oasis.py", "--init", "scratch", "--data", "toy-source", "--channels", "4", "--z-dim", "8",
            "--spade-hidden", "8", "--d-channels", "3,8,8,16,16,16,16", "--d-last", "8", "--batch", "2", "--n", "4",
            "--bn-batches", "2", "--grid-n", "1", "--device", "cpu", "--log-every", "1", "--eval-every", "2",
            "--stage1-steps", "0", "--out", run_dir]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # the state a run of 4 steps leaves when killed after its step-2 checkpoint
    assert run_finetune(tiny + ["--stage2-steps", "2"], log, run_dir, 2)
    assert run_finetune(tiny + ["--stage2-steps", "4"], log, run_dir, 4)  # resumed ...
    assert "interrupted at step 2 of 4, resuming" in capsys.readouterr().out
    steps = [json.loads(s)["step"] for s in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == [1, 2, 2, 3, 4, 4]  # ... to the end: each step's loss and grid lines once
    assert not run_finetune(tiny + ["--stage2-steps", "4"], log, run_dir, 4)  # finished: skipped
    # killed before its first checkpoint: the folder holds the run's subset only; the stage starts over
    (run_dir / "checkpoint.pt").unlink()
    assert run_finetune(tiny + ["--stage2-steps", "4"], log, run_dir, 4)
    assert "before its first checkpoint, starting over" in capsys.readouterr().out
    assert (run_dir / "checkpoint.pt").is_file()
    # finished, but older than what it was made from (a source model trained again since): made anew
    made_from = tmp_path / "source_checkpoint.pt"
    made_from.write_bytes(b"")
    os.utime(run_dir / "checkpoint.pt", (time.time() - 100,) * 2)
    assert run_finetune(tiny + ["--stage2-steps", "4"], log, run_dir, 4, made_from=made_from)
    assert "to be made anew, starting over" in capsys.readouterr().out
    assert not run_finetune(tiny + ["--stage2-steps", "4"], log, run_dir, 4, made_from=made_from)  # now current


def test_progress_line_is_the_logs_last_redraw(tmp_path):
    """What the demo prints every minute for a running stage: the last tqdm redraw of its log (carriage returns)."""
    sys.path.insert(0, str(REPO / "bench"))
    from pipeline import progress
    log = tmp_path / "stage.log"
    assert progress(log) == ""  # not started yet
    log.write_text("scratch: toy-source\n  0%|  | 0/6 [00:00<?]\r 17%|#  | 1/6 [00:01<00:08]\r 33%|## | 2/6 [00:02<00:05]")
    assert progress(log) == "33%|## | 2/6 [00:02<00:05]"
    log.write_text("x" * 10000 + "\nresuming from step 4 of 6\n")
    assert progress(log) == "resuming from step 4 of 6"
