"""Dataset layouts, id conventions, preprocessing and the toy task, on tiny fixtures built here."""
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import time
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import data
import toy
from models import DataError
from conftest import REPO


def _save(path, array, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, fmt)


def _rand_image(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---------------------------------------------------------------- class tables

def test_class_tables():
    coco, ade, city = data.class_table("coco"), data.class_table("ade20k"), data.class_table("cityscapes")
    assert (len(coco), coco.n_channels, coco.channels[0], coco.channels[-1]) == (182, 183, 1, 182)
    assert coco.names[0] == "person" and coco.display[coco.names.index("building-other")] == "building"
    assert (len(ade), ade.n_channels, ade.ids[0], ade.channels[-1]) == (150, 151, 1, 150)
    assert ade.names[8] == "windowpane;window" and ade.display[8] == "windowpane"
    assert (len(city), city.n_channels, city.ids[0], city.ids[-1]) == (33, 35, 1, 33)
    assert city.names[city.ids.index(7)] == "road"
    assert len(city.eval_channels) == 19 and 7 in city.eval_channels and 1 not in city.eval_channels
    assert coco.eval_channels == coco.channels


def test_affinity_to_channels_hard_matches_mapped_onehot(rng):
    tgt, src = data.class_table("ade20k"), data.class_table("coco")
    A = np.zeros((150, 182), np.float32)
    A[np.arange(150), rng.integers(0, 182, 150)] = 1
    M = data.affinity_to_channels(A, tgt, src)
    label = torch.from_numpy(rng.integers(0, 151, (2, 5, 7)))
    mapped_ids = torch.tensor([0] + [src.channels[int(np.argmax(A[t]))] for t in range(150)])[label]
    y = torch.einsum("bthw,ts->bshw", data.onehot(label, 151), M)
    assert torch.equal(y, data.onehot(mapped_ids, 183))
    with pytest.raises(DataError, match=r"shape \(150, 181\), expected \(150, 182\)"):
        data.affinity_to_channels(A[:, :181], tgt, src)
    A[3, 3] = np.nan
    with pytest.raises(DataError, match="NaN"):
        data.affinity_to_channels(A, tgt, src)


def _folder(root, labels, classes="sky\ngrass\n", image_mode=None):
    """A flat folder dataset: one image per label array (names 0, 1, ...)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text(classes)
    for i, lab in enumerate(labels):
        _save(root / "images" / f"{i}.png", np.zeros(lab.shape + (3,), np.uint8))
        Image.fromarray(lab).save(root / "labels" / f"{i}.png")
    return root


def test_check_labels_rejects_out_of_range_once_per_dataset(tmp_path, monkeypatch):
    lab = np.zeros((8, 8), np.uint8)
    ds = data.SegDataset("folder", _folder(tmp_path / "d", [lab, lab + 5]), size=8)
    with pytest.raises(DataError, match=r"1.png: label value 5 outside 0\.\.2"):
        data.check_labels(ds)
    # the batches are not checked again: onehot reads ids without a GPU->CPU sync (no .min()/.max())
    monkeypatch.setattr(torch.Tensor, "max", lambda *a, **k: pytest.fail("onehot synced on label.max()"))
    assert data.onehot(torch.tensor([[[0, 1]]]), 3)[0, :, 0, 1].tolist() == [0, 1, 0]


# ---------------------------------------------------------------- layouts and id conventions

def _ade(root, rng, n=3, h=200, w=300):
    for split in ("training", "validation"):
        for i in range(n):
            _save(root / "images" / split / f"ADE_{i}.jpg", _rand_image(rng, h, w), "JPEG")
            _save(root / "annotations" / split / f"ADE_{i}.png", rng.integers(0, 151, (h, w), dtype=np.uint8))
    return root


def test_ade20k_layout_and_ids(tmp_path, rng):
    root = _ade(tmp_path / "ADEChallengeData2016", rng)
    ds = data.SegDataset("ade20k", root, "val")
    item = ds[0]
    assert len(ds) == 3 and item["image"].shape == (3, 256, 256) and item["label"].shape == (256, 256)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    raw = np.asarray(Image.open(root / "annotations/validation/ADE_0.png").resize((256, 256), Image.NEAREST))
    assert torch.equal(item["label"], torch.from_numpy(raw.astype(np.int64)))  # ADE: value = channel, 0 = other


def test_coco_layout_and_ids(tmp_path, rng):
    root = tmp_path / "cocostuff"
    lab = rng.integers(0, 182, (256, 256), dtype=np.uint8)
    lab[:10] = 255
    _save(root / "val_img" / "000000000139.jpg", _rand_image(rng, 256, 256), "JPEG")
    _save(root / "val_label" / "000000000139.png", lab)
    item = data.SegDataset("coco", root, "val")[0]
    assert (item["label"][:10] == 0).all()  # 255 (unlabeled) -> dontcare channel 0
    assert torch.equal(item["label"][10:], torch.from_numpy(lab[10:].astype(np.int64) + 1))  # value + 1


def test_cityscapes_layout_ids_and_size(tmp_path, rng):
    root = tmp_path / "cityscapes"
    for split in ("train", "val"):
        for city in ("aachen", "bremen"):
            stem = f"{city}_000000_000019"
            _save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", _rand_image(rng, 128, 256))
            _save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", rng.integers(0, 34, (128, 256), dtype=np.uint8))
            _save(root / "gtFine" / split / city / f"{stem}_gtFine_color.png", _rand_image(rng, 128, 256))
    ds = data.SegDataset("cityscapes", root, "train", augment=True)
    assert len(ds) == 2 and ds[0]["image"].shape == (3, 256, 512)
    ds = data.SegDataset("cityscapes", root, "val")
    raw = np.asarray(Image.open(ds.files[0][1]).resize((512, 256), Image.NEAREST)).astype(np.int64)
    assert torch.equal(ds[0]["label"], torch.from_numpy(raw))  # labelIds are channels


def test_folder_layout_with_and_without_splits(tmp_path, rng):
    flat = tmp_path / "flat"
    (flat).mkdir()
    (flat / "classes.txt").write_text("cat\ndog\n")
    for i in range(4):
        _save(flat / "images" / f"{i}.jpg", _rand_image(rng, 40, 50), "JPEG")
        _save(flat / "labels" / f"{i}.png", rng.integers(0, 3, (40, 50), dtype=np.uint8))
    ds = data.SegDataset("folder", flat, "train", size=32)
    assert len(ds) == 4 and ds.n_channels == 3 and ds[1]["image"].shape == (3, 32, 32)
    assert data.class_table("folder", flat).names == ["cat", "dog"]


# ---------------------------------------------------------------- preprocessing

def test_train_crop_is_a_window_of_the_286_resize(tmp_path, rng):
    root = _ade(tmp_path / "ade", rng, n=1, h=120, w=150)
    ds = data.SegDataset("ade20k", root, "train", augment=True)
    img_path, _ = ds.files[0]
    resized = np.asarray(Image.open(img_path).convert("RGB").resize((286, 286), Image.BICUBIC))
    seen_flip = set()
    for seed in range(12):
        random.seed(seed)
        out = ((ds[0]["image"].permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255).round().astype(np.uint8)
        random.seed(seed)
        x, y, flip = random.randint(0, 30), random.randint(0, 30), random.random() < 0.5
        window = resized[y:y + 256, x:x + 256]
        assert np.array_equal(out, window[:, ::-1] if flip else window)
        seen_flip.add(flip)
    assert seen_flip == {True, False}


def test_flip_keeps_image_and_label_aligned(tmp_path):
    root = tmp_path / "ade"
    lab = np.ones((100, 100), np.uint8)
    lab[:, 30:] = 2
    img = np.zeros((100, 100, 3), np.uint8)
    img[lab == 1] = (255, 0, 0)
    img[lab == 2] = (0, 0, 255)
    for split in ("training", "validation"):
        _save(root / "images" / split / "a.jpg", img, "JPEG")
        _save(root / "annotations" / split / "a.png", lab)
    ds = data.SegDataset("ade20k", root, "train", augment=True)
    for seed in range(6):
        random.seed(seed)
        item = ds[0]
        red_minus_blue = item["image"][0] - item["image"][2]
        for cls, sign in ((1, 1), (2, -1)):
            mask = Image.fromarray((item["label"] == cls).numpy().astype(np.uint8))
            inner = torch.from_numpy(np.asarray(mask.filter(ImageFilter.MinFilter(9))).astype(bool))  # away from the edge
            assert inner.any() and (sign * red_minus_blue[inner] > 1).all()


# ---------------------------------------------------------------- n-shot subsets

def test_subsets_are_reproducible_and_reusable(tmp_path, rng):
    root = tmp_path / "f"
    root.mkdir()
    (root / "classes.txt").write_text("a\nb\n")
    for i in range(10):
        _save(root / "images" / f"{i:02d}.png", _rand_image(rng, 8, 8))
        _save(root / "labels" / f"{i:02d}.png", rng.integers(0, 3, (8, 8), dtype=np.uint8))
    a = data.open_dataset("folder", root, n=4, subset_seed=3, out_dir=tmp_path / "run1", size=8)
    b = data.open_dataset("folder", root, n=4, subset_seed=3, size=8)
    c = data.open_dataset("folder", root, n=4, subset_seed=4, size=8)
    assert a.files == b.files != c.files and len(a) == 4
    d = data.open_dataset("folder", root, subset_file=tmp_path / "run1" / "subset.txt", size=8)
    assert d.files == a.files
    with pytest.raises(DataError, match="--n 11 is larger than the 10"):
        data.open_dataset("folder", root, n=11)


# ---------------------------------------------------------------- bad input

def test_bad_inputs_give_one_line_errors(tmp_path, rng):
    root = tmp_path / "f"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match="no images"):
        data.SegDataset("folder", root)
    _save(root / "images" / "x.png", _rand_image(rng, 8, 8))
    with pytest.raises(DataError, match="without a label"):
        data.SegDataset("folder", root)
    _save(root / "labels" / "x.png", np.full((8, 8), 7, np.uint8))
    _save(root / "labels" / "y.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match="without an image"):
        data.SegDataset("folder", root)
    (root / "labels" / "y.png").unlink()
    with pytest.raises(DataError, match=r"label value 7 outside 0\.\.2"):
        data.SegDataset("folder", root)[0]
    (root / "images" / "x.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="unreadable"):
        data.SegDataset("folder", root)[0]
    with pytest.raises(DataError, match="no such folder"):
        data.SegDataset("ade20k", tmp_path / "nowhere")
    coco = tmp_path / "coco"
    _save(coco / "val_img" / "a.jpg", _rand_image(rng, 8, 8), "JPEG")
    _save(coco / "val_label" / "a.png", np.full((8, 8), 200, np.uint8))
    with pytest.raises(DataError, match="label value 200 outside COCO-Stuff"):
        data.SegDataset("coco", coco, "val")[0]
    r = subprocess.run([sys.executable, "data.py", "info", "--data", "folder", "--data-root", str(tmp_path / "nowhere")],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "no such folder" in r.stderr


# ---------------------------------------------------------------- toy task

SMALL = {"source": {"train": 6, "val": 2}, "target": {"train": 6, "val": 2}}


def test_toy_is_deterministic(tmp_path):
    a = toy.write_toy(tmp_path / "a", size=64, seed=5, splits=SMALL)
    b = toy.write_toy(tmp_path / "b", size=64, seed=5, splits=SMALL)
    c = toy.write_toy(tmp_path / "c", size=64, seed=6, splits=SMALL)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 2 * (2 * 8 + 1)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files if f.suffix == ".png")


def _expected_colour(name, domain):
    base = np.array(toy.toy_look(name, domain)[0], np.float32)
    return base @ toy.TOY_GRADE.T + toy.TOY_GRADE_BIAS if domain == "target" else base


@pytest.mark.parametrize("domain", ["source", "target"])
def test_toy_labels_match_images(tmp_path, domain):
    root = toy.write_toy(tmp_path, size=96, seed=1, splits={"source": {"train": 12}, "target": {"train": 12}})
    classes = (root / domain / "classes.txt").read_text().split()
    expected = np.stack([_expected_colour(c, domain) for c in classes])
    checked = 0
    for i in range(12):
        img = np.asarray(Image.open(root / domain / "train" / "images" / f"{i:05d}.png")).astype(np.float32)
        lab = np.asarray(Image.open(root / domain / "train" / "labels" / f"{i:05d}.png"))
        assert lab.min() >= 1 and lab.max() <= len(classes)
        for k in np.unique(lab):
            m = lab == k
            if m.sum() < 40:
                continue
            mean = img[m].mean(0)  # a region's mean colour is nearest to its own class's colour
            assert np.argmin(((expected - mean) ** 2).sum(1)) == k - 1, (i, classes[k - 1])
            checked += 1
    assert checked > 30


def test_toy_datasets_load_through_the_data_layer(tmp_path):
    root = toy.write_toy(tmp_path, size=64, seed=0, splits=SMALL)
    ds = data.open_dataset("toy-target", root / "target", split="train", augment=True, n=3)
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and ds.n_channels == 10
    assert data.class_table("toy-source", root / "source").names[:3] == ["sky", "grass", "water"]


@pytest.fixture
def toy_roots(tmp_path, monkeypatch):
    """toy.py's default task folders pointed at an empty temporary folder."""
    monkeypatch.setattr(toy, "TOY_ROOT", tmp_path / "toy")
    monkeypatch.setattr(toy, "TOY_LT_ROOT", tmp_path / "toy_lt")
    return tmp_path


def test_class_tables_of_toy_tasks_write_nothing(toy_roots):
    for task in toy.TASKS:
        table = data.class_table(task)
        assert table.names == toy.class_names(task) and table.n_channels == len(table.names) + 1
        assert table.ids == list(range(1, len(table.names) + 1))
    assert list(toy_roots.iterdir()) == []  # not a folder, not a file
    assert data.class_table("toy-target").names[-1] == "lava" and len(data.class_table("toy-lt-source")) == 30


def test_class_table_in_a_fresh_copy_writes_no_file(tmp_path):
    # the check as written: `import data; data.class_table('toy-target')` in a clone without data/
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("data.py", "toy.py"):
        shutil.copy(REPO / name, clone / name)
    shutil.copytree(REPO / "classes", clone / "classes")
    shutil.copytree(REPO / "models", clone / "models", ignore=shutil.ignore_patterns("__pycache__"))
    before = sorted(p.relative_to(clone) for p in clone.rglob("*"))
    r = subprocess.run([sys.executable, "-c", "import data; print(data.class_table('toy-target').names)"],
                       cwd=clone, capture_output=True, text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "'lava'" in r.stdout
    assert sorted(p.relative_to(clone) for p in clone.rglob("*")) == before


def test_opening_a_toy_dataset_generates_it_once(toy_roots, monkeypatch, capsys):
    monkeypatch.setattr(toy, "TOY_SPLITS", SMALL)
    ds = data.open_dataset("toy-target", split="val")
    assert len(ds) == 2 and ds.root == toy_roots / "toy" / "target" and ds[0]["image"].shape == (3, 64, 64)
    assert (toy_roots / "toy" / "source" / "classes.txt").read_text().split() == toy.class_names("toy-source")
    stamp = (toy_roots / "toy" / "target" / "val" / "images" / "00000.png").stat().st_mtime_ns
    assert len(data.open_dataset("toy-source", split="train")) == 6
    assert (toy_roots / "toy" / "target" / "val" / "images" / "00000.png").stat().st_mtime_ns == stamp
    assert capsys.readouterr().out.count("generating the toy transfer task") == 1
    assert not (toy_roots / "toy_lt").exists()  # only the family asked for


def test_a_toy_folder_of_other_classes_is_refused(toy_roots):
    root = toy_roots / "old" / "target"
    _save(root / "train" / "images" / "0.png", np.zeros((8, 8, 3), np.uint8))
    _save(root / "train" / "labels" / "0.png", np.zeros((8, 8), np.uint8))
    (root / "classes.txt").write_text("sky\nmeadow\n")
    with pytest.raises(DataError, match=r"classes.txt: lists 2 classes .*expected the 9 of toy-target.*delete"):
        data.open_dataset("toy-target", root)


# Two processes opening the default toy task of a fresh clone at once (two pytest-xdist workers, or
# bench/paper.py --jobs 2): each is released at the same moment, asks for one domain of the family, and checks
# the moment ensure returns that its domain is all there (every split's images and labels, the last PNG readable).
_ENSURE_AT_ONCE = """
import sys, time
from pathlib import Path
from PIL import Image
sys.path.insert(0, sys.argv[1])
import toy
tmp, task = Path(sys.argv[2]), sys.argv[3]
toy.TOY_ROOT = tmp / "toy"
(tmp / ("ready-" + task)).touch()
deadline = time.time() + 120
while not (tmp / "go").exists() and time.time() < deadline:
    time.sleep(0.001)
base = toy.ensure(task)
domain = toy.TASKS[task][1]
for split, count in toy.TOY_SPLITS[domain].items():
    for sub in ("images", "labels"):
        files = sorted((base / split / sub).iterdir())
        Image.open(files[-1]).load()
        print("found", split, sub, len(files))
"""


def test_two_processes_ensuring_a_toy_task_at_once_both_get_it_whole(tmp_path):
    # the whole default task (3,800 PNGs, about 3 s to write): long enough for the two to meet at the lock
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _ENSURE_AT_ONCE, str(REPO), str(tmp_path), task], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for task in ("toy-source", "toy-target")]
    try:
        while not all((tmp_path / f"ready-{t}").exists() for t in ("toy-source", "toy-target")):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.01)
        (tmp_path / "go").touch()
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    for (out, _), domain in zip(outs, ("source", "target")):
        expected = {f"found {split} {sub} {n}" for split, n in toy.TOY_SPLITS[domain].items()
                    for sub in ("images", "labels")}
        assert set(re.findall(r"found \w+ \w+ \d+", out)) == expected, out
    assert sum(out.count("generating the toy transfer task") for out, _ in outs) == 1  # one wrote, one waited
    family = tmp_path / "toy"
    assert sorted(p.name for p in family.iterdir()) == ["source", "target"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("ready-")) == ["go", "toy", "toy.lock"]
    assert [(family / d / "classes.txt").read_text().split() for d in ("source", "target")] == \
        [toy.class_names("toy-source"), toy.class_names("toy-target")]


def test_a_half_written_toy_folder_is_refused_not_overwritten(toy_roots):
    # what an interrupted generation by an older version left: images, no classes.txt
    half = toy_roots / "toy" / "target" / "train" / "images" / "00000.png"
    _save(half, np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"toy/target: a toy task folder without classes.txt .*delete it"):
        data.open_dataset("toy-target")
    assert [p.name for p in (toy_roots / "toy").iterdir()] == ["target"] and half.is_file()
    assert sorted(p.name for p in toy_roots.iterdir()) == ["toy", "toy.lock"]  # no partial folder left behind


def test_readme_step_3_example_then_info(tmp_path):
    # README step 3 as written: toy.py example writes a folder dataset that data.py info reads
    run = lambda *cmd: subprocess.run([sys.executable, *cmd], cwd=tmp_path, capture_output=True, text=True)  # noqa: E731
    made = run(str(REPO / "toy.py"), "example", "my_data")
    assert made.returncode == 0, made.stderr[-2000:]
    assert "120 train + 40 val pairs, 64x64, 9 classes" in made.stdout
    assert len(list((tmp_path / "my_data" / "val" / "images").glob("*.jpg"))) == 40
    info = run(str(REPO / "data.py"), "info", "--data", "folder", "--data-root", "my_data", "--size", "64")
    assert info.returncode == 0, info.stderr[-2000:]
    assert "my_data (train): 120 pairs, 9 classes; images 64x64" in info.stdout and " lava " in info.stdout
    again = run(str(REPO / "toy.py"), "example", "my_data")
    assert again.returncode == 1 and again.stderr.strip() == ("error: my_data: already holds a dataset (classes.txt); "
                                                              "choose another folder")


# ---------------------------------------------------------------- real-world files (issue 31 section 4)

def test_text_inputs_read_bom_and_crlf_and_name_other_encodings(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfsky\r\ngrass\r\n")
    assert data.read_lines(tmp_path / "a.txt", "--x") == ["sky", "grass"]
    (tmp_path / "b.txt").write_bytes("sky\ngr\xe4ss\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"--x .*b\.txt: not UTF-8 text \(byte 0xe4 at offset 6; it looks like Latin-1"):
        data.read_lines(tmp_path / "b.txt", "--x")
    (tmp_path / "c.txt").write_text("sky\n", encoding="utf-16")
    with pytest.raises(DataError, match=r"c\.txt: is UTF-16 text; expected UTF-8"):
        data.read_lines(tmp_path / "c.txt", "--x")
    # a classes.txt from a Windows editor: BOM + CRLF, the names as written
    root = _folder(tmp_path / "win", [np.ones((8, 8), np.uint8)])
    (root / "classes.txt").write_bytes(b"\xef\xbb\xbfsky\r\ngrass\r\n")
    assert data.class_table("folder", root).names == ["sky", "grass"]


@pytest.mark.parametrize("text, names", [
    ("1\tsky\n2\tgrass\n", ["sky", "grass"]),
    ("id,name\n1,sky\n2,grass\n", ["sky", "grass"]),
    ("0\tunlabeled\n1\tsky\n2\tgrass\n", ["sky", "grass"]),
    ("sky\ngrass\n", ["sky", "grass"]),
    ("1\tsky\n3\tgrass\n", "id 3 where 2 was expected"),
    ("0,road\n1,sky\n", "id 0 is 'road'"),
    ("id,name\n1,sky\ngrass\n", "header 'id,name' but line 3"),
], ids=["tab", "csv-header", "zero-unlabeled", "plain", "gap", "zero-class", "csv-broken"])
def test_numbered_classes_txt_is_parsed_or_refused(tmp_path, text, names):
    root = _folder(tmp_path / "d", [np.ones((8, 8), np.uint8)], classes=text)
    if isinstance(names, list):
        assert data.class_table("folder", root).names == names  # never '1\tsky' as a name: no shift by one
    else:
        with pytest.raises(DataError, match="classes.txt: .*" + re.escape(names)):
            data.class_table("folder", root)


def test_nested_folders_pair_by_relative_path_and_unicode_forms(tmp_path):
    root = tmp_path / "nested"
    (root / "classes.txt").parent.mkdir()
    (root / "classes.txt").write_text("sky\ngrass\n")
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    for part, name in (("part1", "a"), ("part2", "a"), ("part2", nfc)):
        _save(root / "images" / part / f"{name}.jpg", np.zeros((8, 8, 3), np.uint8), "JPEG")
    for part, name in (("part1", "a"), ("part2", "a"), ("part2", nfd)):  # the labels copied from a Mac: NFD names
        _save(root / "labels" / part / f"{name}.png", np.ones((8, 8), np.uint8))
    (root / "images" / ".DS_Store").write_bytes(b"\0")
    ds = data.open_dataset("folder", root, size=8)
    rel = sorted(str(i.relative_to(root / "images")) for i, _ in ds.files)
    assert rel == sorted(["part1/a.jpg", "part2/a.jpg", f"part2/{nfc}.jpg"]) and len(ds) == 3
    assert all(Path(i).parent.name == Path(l).parent.name for i, l in ds.files)  # paired within their subfolder
    (root / "labels" / "part1" / "a.png").unlink()
    with pytest.raises(DataError, match=r"1 image\(s\) without a label .* e\.g\. 'part1/a'"):
        data.open_dataset("folder", root, size=8)


def test_one_bit_and_sixteen_bit_labels_read_as_ids(tmp_path):
    root = _folder(tmp_path / "d", [np.zeros((8, 8), np.uint8)] * 2)
    mask = np.zeros((8, 8), bool)
    mask[:4] = True
    Image.fromarray(mask).convert("1").save(root / "labels" / "0.png")  # a 1-bit mask: 1 = sky
    Image.fromarray((mask * 2).astype(np.uint16)).save(root / "labels" / "1.png")  # 16-bit: 2 = grass
    ds = data.SegDataset("folder", root, size=8)
    assert Image.open(ds.files[0][1]).mode == "1"
    data.check_labels(ds)
    assert ds[0]["label"].unique().tolist() == [0, 1] and ds[1]["label"].unique().tolist() == [0, 2]


def _regions(h=64, w=64):
    """Flat regions of ids 0, 4 and 8 with a curved edge (JPEG rings along edges that cross its 8x8 blocks)."""
    yy, xx = np.mgrid[:h, :w]
    lab = np.zeros((h, w), np.uint8)
    lab[: h // 2 - 3] = 4
    lab[(yy - 44) ** 2 + (xx - 40) ** 2 < 200] = 8
    return lab


TWELVE = "".join(f"class{k}\n" for k in range(1, 13))


def test_jpeg_damaged_labels_are_refused(tmp_path):
    clean = _folder(tmp_path / "clean", [_regions()] * 3, TWELVE)
    data.check_labels(data.SegDataset("folder", clean, size=64))  # flat regions, sharp edges: accepted
    ringing = _folder(tmp_path / "ringing", [_regions()] * 3, TWELVE)
    for i in range(3):  # decoded from a JPEG and saved again as PNG: ringing baked into the ids
        path = ringing / "labels" / f"{i}.png"
        Image.open(path).save(tmp_path / "x.jpg", quality=70)
        Image.open(tmp_path / "x.jpg").save(path)
    with pytest.raises(DataError, match=r"0\.png: label ids .* occur only as thin lines .* JPEG compression"):
        data.check_labels(data.SegDataset("folder", ringing, size=64))
    disguised = _folder(tmp_path / "disguised", [_regions()], TWELVE)
    Image.open(disguised / "labels" / "0.png").save(disguised / "labels" / "0.png", format="JPEG")
    with pytest.raises(DataError, match=r"0\.png: is JPEG data under a \.png name"):
        data.check_labels(data.SegDataset("folder", disguised, size=64))


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    root = _folder(tmp_path / "d", [np.ones((8, 8), np.uint8)])
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(root / "images" / "0.png")  # mid grey in 16 bits
    x = data.SegDataset("folder", root, size=8)[0]["image"]
    assert torch.allclose(x, torch.full_like(x, (128 / 255 - 0.5) / 0.5), atol=1e-6)  # not white (1.0)
    # a 48-bit RGB PNG (PIL writes none: its chunks by hand), mid grey too
    rows = b"".join(b"\0" + np.full((8, 3), 32768, ">u2").tobytes() for _ in range(8))
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    (root / "images" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 16, 2, 0, 0, 0))
                                            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    x = data.SegDataset("folder", root, size=8)[0]["image"]
    assert torch.allclose(x, torch.full_like(x, (128 / 255 - 0.5) / 0.5), atol=1e-6)


def test_decompression_bomb_is_one_line(tmp_path, monkeypatch):
    root = _folder(tmp_path / "d", [np.ones((64, 64), np.uint8)])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 > 2 * 1000: PIL's bomb error
    with pytest.raises(DataError, match=r"0\.png: an image of 4096 pixels .* decompression-bomb limit of 2000"):
        data.check_labels(data.SegDataset("folder", root, size=8))


@pytest.mark.parametrize("given, words", [
    (["sky", "grass", "sea"], "b has 3 classes, a 2: class 3 is '(none)' in a, 'sea' in b"),
    (["grass", "sky"], "b has the classes of a in another order: class 1 is 'sky' in a, 'grass' in b"),
    (["sky", "lawn"], "b has other classes than a: class 2 is 'grass' in a, 'lawn' in b"),
])
def test_compare_classes_names_the_first_difference(given, words):
    data.compare_classes(["sky", "grass"], ["Sky", "grass"], "a", "b")  # case is not a difference
    with pytest.raises(DataError, match=re.escape(words)):
        data.compare_classes(["sky", "grass"], given, "a", "b")


def test_info_without_data_is_one_line_naming_the_toy():
    r = subprocess.run([sys.executable, "data.py", "info"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--data is required" in r.stderr
    assert "--data toy-target" in r.stderr
    help_text = subprocess.run([sys.executable, "data.py", "info", "--help"], cwd=REPO, capture_output=True,
                               text=True).stdout
    assert "(default: train)" in help_text and "(default: 0)" in help_text and "e.g.  python data.py info" in help_text


def test_subset_file_from_a_windows_editor_is_read_as_written(tmp_path):
    root = _folder(tmp_path / "d", [np.ones((8, 8), np.uint8)] * 3)
    (tmp_path / "subset.txt").write_bytes(b"\xef\xbb\xbfimages/2.png\r\nimages/0.png\r\n")
    ds = data.open_dataset("folder", root, subset_file=tmp_path / "subset.txt", size=8)
    assert [p.name for p, _ in ds.files] == ["2.png", "0.png"]
    assert len(data.open_dataset("folder", root, n=2, subset_file=tmp_path / "subset.txt", size=8)) == 2  # agree
