"""The long-tailed toy task (toy.py) is as designed and deterministic; its benchmark pipeline runs end to end."""
import hashlib
import inspect
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import data
import toy
from conftest import REPO
from models import DataError

sys.path.insert(0, str(REPO / "bench"))
import toy_longtail  # noqa: E402
import toy_segmenter  # noqa: E402


def presence(domain, n):
    """Share of the first n training images that show each class of the domain."""
    names = list(toy.TOY_LT_SOURCE if domain == "source" else toy.TOY_LT_TARGET)
    count = np.zeros(len(names) + 1)
    for i in range(n):
        lab, _ = toy.toy_lt_item(domain, "train", i)
        count[np.unique(lab)] += 1
    assert count[0] == 0  # every pixel is a class
    return dict(zip(names, count[1:] / n))


def test_target_frequencies_are_long_tailed_as_designed():
    spec = toy.TOY_LT_TARGET
    assert len(spec) == 20
    freq = presence("target", 500)  # the whole training split
    for name, (role, p, _) in spec.items():
        if name == "lawn":  # also drawn whenever no other ground class is
            assert p <= freq[name] <= p + 0.15, (name, freq[name])
        else:
            assert abs(freq[name] - p) < 0.05, (name, p, freq[name])
    tail = {n for n, f in freq.items() if f < 0.10}
    assert tail == {n for n, (_, p, _) in spec.items() if p < 0.10}
    assert len(tail) == 10  # half of the target classes in fewer than 10% of the images
    assert {n for n, f in freq.items() if f > 0.5} == {"heaven", "lawn", "house"}  # a few classes in most images
    blends = [n for n, (_, _, twin) in spec.items() if isinstance(twin, tuple)]
    assert len(blends) == 4 and all(set(spec[n][2]) <= set(toy.TOY_LT_SOURCE) for n in blends)
    assert all(isinstance(t, tuple) or t in toy.TOY_LT_SOURCE for _, _, t in spec.values())


def test_source_shows_every_class_often():
    spec = toy.TOY_LT_SOURCE
    assert len(spec) == 30
    freq = presence("source", 300)
    for name, (role, p, *_) in spec.items():
        assert freq[name] >= 0.08, (name, freq[name])
        if role != "sky":  # sky classes are drawn by weight, one per image
            assert abs(freq[name] - p) < 0.08, (name, p, freq[name])
    textures = [(s[2], s[3]) for s in spec.values()]
    assert len(set(textures)) == 30  # every class has its own look


def test_generator_is_deterministic_by_seed(tmp_path):
    a = toy.toy_lt_item("target", "val", 7, seed=3)
    b = toy.toy_lt_item("target", "val", 7, seed=3)
    c = toy.toy_lt_item("target", "val", 7, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    splits = {"source": {"train": 3, "val": 1}, "target": {"train": 2, "val": 2}}
    for out in ("x", "y"):
        toy.write_toy_longtail(tmp_path / out, size=64, seed=3, splits=splits)
    files = sorted(p.relative_to(tmp_path / "x") for p in (tmp_path / "x").rglob("*") if p.is_file())
    assert len(files) == 2 + 2 * (4 + 4)
    assert all((tmp_path / "x" / f).read_bytes() == (tmp_path / "y" / f).read_bytes() for f in files)
    assert (tmp_path / "x" / "target" / "classes.txt").read_text().split() == list(toy.TOY_LT_TARGET)
    ds = data.open_dataset("toy-lt-target", root=tmp_path / "x" / "target", split="val")
    assert len(ds) == 2 and ds.n_channels == 21 and ds[0]["image"].shape == (3, 64, 64)


def test_benchmark_pipeline_two_steps(tmp_path):
    out = tmp_path / "lt"
    rows = ["random-init", "free-random", "cat-random-hard"]
    cmd = [sys.executable, "bench/toy_longtail.py", "--preset", "tiny", "--device", "cpu", "--seeds", "0", "--ns", "25",
           "--jobs", "2", "--rows", *rows, "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    assert set(summary) == {f"{row} n=25" for row in rows} | {"source model"}
    assert summary.pop("source model") == {"seed": 0, "collapsed": None}  # tiny preset: not judged, the first seed
    for cell in summary.values():
        assert len(cell["miou"]) == 1 and 0 <= cell["miou"][0] <= 1 and cell["fid"][0] >= 0
    run = out / "n25" / "seed0" / "run_cat-random-hard"
    assert len((run / "subset.txt").read_text().split()) == 25
    assert json.loads((run.parent / "eval_cat-random-hard" / "results.json").read_text())["per_class_iou"]
    table = (out / "table.md").read_text()
    assert "| CAT finetuned, random (hard) |" in table and "rare mIoU" in table and "Orderings" in table
    assert (out / "figure.png").stat().st_size > 0 and (out / "plot.png").stat().st_size > 0
    evalnets = json.loads((out / "evalnets" / "evalnets.json").read_text())  # protocol v3: the separate pool
    assert evalnets["class_balanced"] and evalnets["pool_seed"] == toy_longtail.POOL_SEED and evalnets["train_images"] == 16
    # a second run redoes only what an interruption left unfinished (a run folder without its checkpoint)
    (run / "checkpoint.pt").unlink()
    (run.parent / "eval_cat-random-hard" / "results.json").unlink()
    r2 = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    redone = [line for line in r2.stdout.splitlines() if line.startswith("$ ")]
    assert len(redone) == 2 and "run_cat-random-hard" in redone[0] and "eval_cat-random-hard" in redone[1]
    assert (run / "checkpoint.pt").is_file()
    # the source model trained again since (its checkpoint newer than everything) and the driver killed after it
    # redid the CAT run: the next run redoes the rest of what was made from the source model (the evaluations of the
    # training-free row and of the CAT run), not the random-init row, the evaluation nets or the random affinity
    now = time.time()
    for f in out.rglob("*"):
        if f.is_file():
            os.utime(f, (now - 100, now - 100))
    os.utime(out / "source" / "checkpoint.pt", (now - 50, now - 50))
    os.utime(run / "checkpoint.pt", (now - 40, now - 40))
    r3 = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r3.returncode == 0, r3.stdout[-3000:] + r3.stderr[-3000:]
    redone = [line for line in r3.stdout.splitlines() if line.startswith("$ ")]
    assert len(redone) == 2 and all(line.startswith("$ python evaluate.py") for line in redone), redone
    assert any("eval_free-random" in line for line in redone) and any("eval_cat-random-hard" in line for line in redone)


def test_learned_affinity_checkpoint_loads():
    # the cGANTransfer row's generator (softmax affinity rows) is a CAT generator: evaluate.py must load it
    from models.oasis import Generator, check_state_dict
    kw = dict(semantic_nc=31, z_dim=8, channels=4, spade_hidden=8, crop_size=64, cat_nc=21, cat_residual=False,
              cat_affinity="learned")
    sd = Generator(**kw).state_dict()
    assert not any(k.startswith("fc_cat.weight") for k in sd)
    check_state_dict(Generator(**kw), sd, "cgantransfer.pt")


def _sha(image):
    return hashlib.sha256(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).hexdigest()


def test_evaluator_pool_never_overlaps_the_benchmark_images():
    # by seed and index: a pool item is toy_lt_item(target, train, i, seed=POOL_SEED); the task's items (its
    # training split, hence every n-shot subset, and its validation split) are those of the task's seed
    task_seed = inspect.signature(toy.write_toy_longtail).parameters["seed"].default
    assert toy_longtail.POOL_SEED != task_seed
    # by content: the pixels of a sample of the pool against every image the benchmark uses
    root = toy.ensure("toy-lt-target")
    used = {}
    for split in ("train", "val"):
        for img, _ in data.open_dataset("toy-lt-target", split=split).files:
            used[_sha(np.asarray(Image.open(img).convert("RGB")))] = img
    subsets = [data.open_dataset("toy-lt-target", n=n, subset_seed=s) for n in (25, 100) for s in (0, 1, 2)]
    assert all(_sha(np.asarray(Image.open(img).convert("RGB"))) in used for ds in subsets for img, _ in ds.files)
    sample = range(0, toy_longtail.POOL, 8)  # 1000 of the 8000 (the script itself checks all of them)
    hits = []
    for i in sample:
        _, im = toy.toy_lt_item("target", "train", i, 64, toy_longtail.POOL_SEED)
        if _sha(im) in used:
            hits.append((i, used[_sha(im)]))
    assert not hits
    # and the script's own guard refuses a pool that is the task's images (seed 0 = the task's seed)
    _, same = toy_segmenter.lt_pool(3, task_seed)
    with pytest.raises(DataError, match="pool item 0 has the same pixels"):
        toy_segmenter.check_pool_disjoint(same, "folder", root, task_seed)
    _, pool = toy_segmenter.lt_pool(3, toy_longtail.POOL_SEED)
    toy_segmenter.check_pool_disjoint(pool, "folder", root, toy_longtail.POOL_SEED)  # passes


def test_class_balanced_sampling_shows_the_tail_often():
    labels, _ = toy_segmenter.lt_pool(600, toy_longtail.POOL_SEED)
    names = list(toy.TOY_LT_TARGET)
    tail = [names.index(n) + 1 for n, (_, p, _) in toy.TOY_LT_TARGET.items() if p < 0.10]
    w = toy_segmenter.balanced_weights(labels, len(names) + 1)
    shows = np.array([[k in np.unique(lab) for k in tail] for lab in labels])
    plain, balanced = shows.mean(0), (w[:, None] * shows).sum(0) / w.sum()
    assert (plain < 0.15).all()  # the pool is as long-tailed as the task
    assert (balanced > 1.3 * plain).all() and balanced.min() > 0.09, (plain, balanced)  # 10-13% of the draws each


def test_plot_on_synthetic_results(tmp_path):
    import types
    rows = ["finetune", "transfergan", "freezed", "cat", "free-text", "cat-text-hard", "cat-combination-soft"]
    args = types.SimpleNamespace(rows=rows, ns=[25, 100], seeds=[0, 1, 2])
    rng = np.random.default_rng(0)
    res = {}
    for k, r in enumerate(rows):
        for n in args.ns:
            res[r, n] = {"miou": list(0.70 + 0.01 * k + rng.normal(0, 0.01, 3)), "rare": [0.5, None, 0.55],
                         "miou_real": [0.9] * 3, "rare_real": [0.8] * 3, "fid": [1.0] * 3}
    res["transfergan", 25], res["transfergan", 100] = res["finetune", 25], res["finetune", 100]
    toy_longtail.plot(res, args, tmp_path / "plot.png")
    im = np.asarray(Image.open(tmp_path / "plot.png").convert("RGB"))
    assert im.shape[1] == 800
    for colour in toy_longtail.LINE_COLOURS[:3]:  # panel 1: finetune (= TransferGAN, one line), FreezeD, CAT
        assert (im == colour).all(-1).any(), colour
    # the axes zoom to the data (0.68..0.90 here), and the end labels never collide
    lo, hi, step = toy_longtail._nice_range(0.68, 0.90)
    assert 0.6 <= lo <= 0.68 and 0.90 <= hi <= 0.95 and (hi - lo) / step <= 7
    # a ceiling far above the rows (the v3 table: rows 0.0-0.46, real images 0.98) is drawn off the scale instead
    assert toy_longtail._axis([0.68, 0.90], [0.9])[3] is False
    lo, hi, step, off = toy_longtail._axis([0.01, 0.46], [0.98])
    assert off and lo == 0.0 and 0.46 <= hi <= 0.5
    ys = toy_longtail._spread([100, 101, 102, 103, 300], 20, 400, 13)
    assert all(abs(a - b) >= 13 for i, a in enumerate(ys) for b in ys[i + 1:]) and min(ys) >= 20 and ys[4] == 300
