"""models/curves.py on synthetic log.jsonl files: what the picture marks (stage boundary, best.pt's step), that it
is drawn where it says, and the TensorBoard events (when the package is installed)."""
import importlib
import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

from models import DataError, curves

HAVE_TB = importlib.util.find_spec("tensorboard") is not None


def write_log(path, entries, torn=False):
    text = "".join(json.dumps(e) + "\n" for e in entries)
    path.write_text(text + ('{"step": 9' if torn else ""))


def oasis_log(stage1=40, total=100, fids=(9.0, 7.0, 5.0, 6.0, 7.5)):
    rng = np.random.default_rng(0)
    entries = [{"step": 0, "recipe": "cat", "flags": {}}, {"step": 0, "grid": "samples/000000.png"}]
    evals = dict(zip(range(20, total + 1, 20), fids))
    for s in range(2, total + 1, 2):
        entries.append({"step": s, "stage": 1 if s <= stage1 else 2, "loss_G": float(3 + rng.normal()),
                        "loss_D": float(2 + rng.normal()), "sec": s / 10})
        if s in evals:
            entries.append({"step": s, "grid": f"samples/{s:06d}.png", "fid": evals[s]})
    return entries


def pixels(img, colour):
    """(x, y) of the pixels of exactly `colour`."""
    ys, xs = np.nonzero((np.asarray(img.convert("RGB")) == colour).all(-1))
    return xs, ys


def test_summary_marks_stage_boundary_and_best_step():
    s = curves.summary(oasis_log())
    assert s["stage2"] == 40 and s["best"] == (60, 5.0) and s["last"] == 100
    assert set(s["losses"]) == {"loss_G", "loss_D"} and s["val"]["fid"] == ([20, 40, 60, 80, 100], [9, 7, 5, 6, 7.5])
    # one stage (or no stage 2 reached yet): no boundary; a tie keeps the first step (best.pt improves strictly)
    one = curves.summary(oasis_log(stage1=1000, fids=(4.0, 3.0, 3.0)))
    assert one["stage2"] is None and one["best"] == (40, 3.0)
    assert curves.summary(oasis_log(fids=()))["best"] is None


def test_picture_draws_the_marks_where_the_steps_are(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_log(run / "log.jsonl", oasis_log(), torn=True)  # a torn last line (killed while writing) is left out
    curves.update(run)
    img = Image.open(run / "curves.png")
    assert img.format == "PNG" and img.size[0] >= 800
    # the best.pt line (green, solid) and the stage line (grey, dashed) are vertical, at x of steps 60 and 40 of
    # the shared axis that runs from LEFT (step 0) to W - RIGHT (step 100)
    x = lambda step: curves.LEFT + (curves.W - curves.RIGHT - curves.LEFT) * step / 100
    xs, ys = pixels(img, curves.BEST)
    assert len(xs) > 300 and abs(np.median(xs) - x(60)) <= 1.5
    xs, _ = pixels(img, curves.STAGE)
    assert len(xs) > 100 and abs(np.median(xs) - x(40)) <= 1.5
    # three panels (G, D, FID): the picture grows with the panels a log holds
    no_fid = tmp_path / "no_fid"
    no_fid.mkdir()
    write_log(no_fid / "log.jsonl", oasis_log(fids=()))
    curves.update(no_fid)
    assert Image.open(no_fid / "curves.png").size[1] == img.size[1] - curves.PANEL_H
    assert len(pixels(Image.open(no_fid / "curves.png"), curves.BEST)[0]) == 0  # no FID: no best.pt mark


def test_piti_terms_and_empty_log(tmp_path):
    entries = [{"step": 0, "grid": "samples/000000.png"}] + [
        {"step": s, "loss": 0.1 + 1 / s, "base_loss": 0.1 + 1 / s, "base_mse": 0.09 + 1 / s, "base_vb": 0.01,
         "sec_per_step": 1.0} for s in range(1, 31)]
    s = curves.summary(entries)
    assert set(s["losses"]) == {"loss", "base_loss", "base_mse", "base_vb"} and s["stage2"] is None
    write_log(tmp_path / "log.jsonl", entries)
    curves.update(tmp_path)
    with_terms = Image.open(tmp_path / "curves.png").size[1]
    # the training-free run (step 0 only) and a missing log still give a picture saying nothing was logged
    write_log(tmp_path / "log.jsonl", entries[:1])
    curves.update(tmp_path)
    assert Image.open(tmp_path / "curves.png").size[1] == with_terms - curves.PANEL_H  # loss + terms: two panels
    (tmp_path / "log.jsonl").unlink()
    curves.update(tmp_path)
    assert Image.open(tmp_path / "curves.png").size[0] >= 800


def test_a_bad_line_inside_the_log_is_one_line(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 2, "loss": 1}\n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        curves.update(tmp_path)


@pytest.mark.skipif(HAVE_TB, reason="tensorboard is installed: the missing-package message cannot be seen")
@pytest.mark.parametrize("script", ["finetune_oasis", "finetune_piti", "pretrain_piti"])
def test_tensorboard_flag_without_the_package_says_how_to_install(script, tmp_path):
    extra = ["--init", "scratch", "--data", "toy-source"] if script == "finetune_oasis" else []
    with pytest.raises(DataError, match="pip install tensorboard"):
        importlib.import_module(script).get_args(["--out", str(tmp_path / "x"), *extra, "--device", "cpu",
                                                  "--tensorboard"])
    assert not (tmp_path / "x").exists()  # said before any file is written


@pytest.mark.skipif(not HAVE_TB, reason="tensorboard is not installed (pip install tensorboard)")
def test_tensorboard_events_mirror_the_log_and_purge_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    (tmp_path / "samples").mkdir()
    for s in (0, 20, 40, 60, 80, 100):
        Image.new("RGB", (40, 20), (s, 0, 0)).save(tmp_path / "samples" / f"{s:06d}.png")
    entries = oasis_log()
    write_log(tmp_path / "log.jsonl", [e for e in entries if e["step"] <= 60])
    board = curves.Board(tmp_path, 0)
    curves.update(tmp_path, board)
    board.writer.close()
    # a run resumed from its step-40 checkpoint: the log truncated to step 40, the events past it purged
    write_log(tmp_path / "log.jsonl", [e for e in entries if e["step"] <= 40])
    board = curves.Board(tmp_path, 40)
    write_log(tmp_path / "log.jsonl", entries)
    curves.update(tmp_path, board)
    board.writer.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    g = acc.Scalars("train/loss_G")
    assert [e.step for e in g] == list(range(2, 101, 2))  # each step once
    assert [e.value for e in g] == pytest.approx([e["loss_G"] for e in entries if "loss_G" in e], rel=1e-6)
    assert [(e.step, e.value) for e in acc.Scalars("val/fid")] == [(20, 9), (40, 7), (60, 5), (80, 6), (100, 7.5)]
    assert [e.step for e in acc.Images("samples")] == [0, 20, 40, 60, 80, 100]
