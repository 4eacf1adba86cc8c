"""Datasets, class tables and the toy transfer task, shared by every stage.

Label convention (the one the official OASIS models were trained with, classes/README.md):
a label map holds *channel ids*; channel 0 is "dontcare" and every real class owns one channel.
  coco        PNG value v in 0..181 -> channel v+1, 255 -> 0         183 channels
  ade20k      PNG value v in 0..150 -> channel v (0 = "other")         151 channels
  cityscapes  labelId v in 0..33    -> channel v (0 = "unlabeled")    35 channels (34 is never set)
  folder/toy  PNG value v in 0..N   -> channel v (line v of classes.txt, 0 = unlabelled)  N+1 channels

An affinity matrix A (target real classes x source real classes, rows summing to 1) lives in the
id order of the class tables; `affinity_to_channels` turns it into the channel-space matrix that
the models use.

    python data.py toy --out data/toy                 # writes the toy transfer task (a few seconds)
    python data.py info --data ade20k --data-root ADEChallengeData2016   # checks a dataset
"""
import argparse
import csv
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

# bad input: one DataError line, raised here, printed by the scripts' entry points (cli)
from models import ArgumentParser, DataError, checkpoint, cli, no_file

REPO = Path(__file__).resolve().parent
CLASS_DIR = REPO / "classes"
TOY_ROOT = REPO / "data" / "toy"
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
DATASETS = ("coco", "ade20k", "cityscapes", "folder", "toy-source", "toy-target", "toy-lt-source", "toy-lt-target")




# ----------------------------------------------------------------------------------------------
# Class tables


@dataclass
class ClassTable:
    dataset: str
    ids: list  # label-PNG values of the real classes, in table order
    names: list  # raw names (ADE20K: synonyms joined by ';')
    display: list  # cleaned names for text encoders
    channels: list  # OASIS one-hot channel of each real class
    n_channels: int  # = OASIS semantic_nc; channel 0 is dontcare
    eval_channels: list = None  # channels scored by mIoU (Cityscapes: its 19 evaluation classes); default all

    def __post_init__(self):
        if self.eval_channels is None:
            self.eval_channels = list(self.channels)

    def __len__(self):
        return len(self.ids)


def _read_tsv(name):
    with open(CLASS_DIR / name, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


_WARNED = set()  # what a warning was printed for already: once per run
NOT_A_CLASS = ("background", "unlabeled", "unlabelled", "void", "ignore", "ignored", "dontcare", "don't care", "none",
               "other", "others", "unknown")


def _read_classes_txt(root):
    path = Path(root) / "classes.txt"
    if not path.is_file():
        raise DataError(f"{path}: missing; a folder dataset needs classes.txt (one class name a line, line k = PNG value k)")
    try:  # utf-8-sig: a byte-order mark (Windows editors) is not part of the first class name
        names = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); expected one class name a line") from None
    while names and not names[-1].strip():
        names.pop()
    if not names:
        raise DataError(f"{path}: empty; expected one class name a line")
    seen = {}
    for k, name in enumerate(names, 1):
        if not name.strip():
            raise DataError(f"{path}: line {k} is empty; expected a class name")
        if name.strip().lower() in seen:
            raise DataError(f"{path}: line {k} '{name.strip()}' repeats line {seen[name.strip().lower()]}; "
                            "expected each class once")
        seen[name.strip().lower()] = k
    if names[0].strip().lower() in NOT_A_CLASS and path.resolve() not in _WARNED:
        _WARNED.add(path.resolve())
        print(f"warning: {path}: line 1 '{names[0].strip()}' is read as class 1 (label value 1); value 0 is "
              "unlabelled and has no line: if your labels use 0 for it, drop this line, else every class shifts by one")
    return [n.strip() for n in names]


def class_table(dataset, root=None):
    """The real classes of a dataset, in id order (see the module docstring)."""
    if dataset == "coco":
        rows = _read_tsv("coco_stuff.tsv")
        ids = [int(r["id"]) for r in rows]
        return ClassTable("coco", ids, [r["name"] for r in rows], [r["display"] for r in rows], [i + 1 for i in ids], 183)
    if dataset == "ade20k":
        rows = _read_tsv("ade20k.tsv")
        ids = [int(r["id"]) for r in rows]
        return ClassTable("ade20k", ids, [r["name"] for r in rows], [r["display"] for r in rows], ids, 151)
    if dataset == "cityscapes":
        rows = [r for r in _read_tsv("cityscapes.tsv") if int(r["id"]) != 0]  # labelId 0 is the dontcare channel
        ids = [int(r["id"]) for r in rows]
        scored = [int(r["id"]) for r in rows if r["train_id"] != "255"]  # the 19 classes of the benchmark
        return ClassTable("cityscapes", ids, [r["name"] for r in rows], [r["display"] for r in rows], ids, 35, scored)
    if dataset == "folder" or dataset in TOY_TASKS:
        root = dataset_root(dataset, root)
        names = _read_classes_txt(root)
        ids = list(range(1, len(names) + 1))
        return ClassTable(dataset, ids, names, names, ids, len(names) + 1)
    raise DataError(f"unknown dataset '{dataset}'; expected one of {', '.join(DATASETS)}")


def dataset_root(dataset, root=None):
    """The dataset's root folder; the toy task is generated on first use."""
    if dataset in TOY_TASKS:
        base = Path(root) if root else TOY_TASKS[dataset]
        if not (base / "classes.txt").is_file():
            print(f"generating the toy transfer task in {base.parent} (once)")
            (write_toy_longtail if dataset.startswith("toy-lt") else write_toy)(base.parent)
        return base
    if root is None:
        raise DataError(f"--data {dataset} needs --data-root (the dataset's folder)")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (--data-root for {dataset})")
    return root


def extend_affinity(A):
    """(T, S) -> (T+1, S+1) with the unlabelled channel 0 first, mapped to the source's unlabelled channel."""
    E = np.zeros((A.shape[0] + 1, A.shape[1] + 1), np.float32)
    E[0, 0], E[1:, 1:] = 1.0, A
    return E


def affinity_to_channels(A, target, source):
    """(target real x source real) affinity -> (target.n_channels x source.n_channels) channel matrix.

    A (T, S) matrix maps dontcare to dontcare; an extended (T+1, S+1) one (see extend_affinity) also says where
    the unlabelled channel 0 goes and which classes go to it. A target one-hot y maps to source space as
    einsum('bthw,ts->bshw', y, M).
    """
    A = torch.as_tensor(np.asarray(A), dtype=torch.float32)
    extended = A.shape == (len(target) + 1, len(source) + 1)
    if A.shape != (len(target), len(source)) and not extended:
        raise DataError(
            f"affinity has shape {tuple(A.shape)}, expected ({len(target)}, {len(source)}) = "
            f"({target.dataset} classes, {source.dataset} classes), or one more of each with the unlabelled channel")
    if not torch.isfinite(A).all() or (A < 0).any():
        raise DataError("affinity has NaN, infinite or negative entries; expected non-negative rows summing to 1")
    M = torch.zeros(target.n_channels, source.n_channels)
    t_ch, s_ch = torch.tensor(target.channels), torch.tensor(source.channels)
    if extended:
        t_ch, s_ch = torch.cat([torch.zeros(1, dtype=torch.long), t_ch]), torch.cat([torch.zeros(1, dtype=torch.long), s_ch])
    else:
        M[0, 0] = 1.0
    M[t_ch[:, None], s_ch[None, :]] = A
    return M


def load_affinity(path, target, source, flag="--affinity"):
    """The one reader of affinity.npy: -> (A (T, S) float32 array, channel-space matrix M).

    Checks what a wrong file would otherwise slip through: not a plain .npy (pickled, corrupt), the shape
    against the two class tables, NaN/negative entries, rows not summing to 1, and, when estimate_affinity.py's
    affinity.json lies beside it, the class names it was estimated for."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{flag} {path}: {no_file(path)}; estimate_affinity.py writes affinity.npy")
    with open(path, "rb") as f:
        head = f.read(6)
    if head != b"\x93NUMPY":
        raise DataError(f"{flag} {path}: not a .npy file (it starts with {head!r}); estimate_affinity.py writes affinity.npy")
    try:
        A = np.load(path, allow_pickle=False)
    except ValueError as e:
        why = "holds Python objects, not numbers" if "allow_pickle" in str(e) else str(e).splitlines()[0][:100]
        raise DataError(f"{flag} {path}: not a plain .npy array ({why})") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{flag} {path}: truncated or unreadable .npy ({str(e).splitlines()[0][:100]})") from None
    if A.ndim != 2 or A.dtype.kind not in "fiu":  # complex, bool, strings: not an affinity
        raise DataError(f"{flag} {path}: holds a {A.dtype} array of shape {A.shape}, expected a ({len(target)}, "
                        f"{len(source)}) real float matrix = ({target.dataset} classes, {source.dataset} classes)")
    try:
        M = affinity_to_channels(A, target, source)
    except DataError as e:
        raise DataError(f"{flag} {path}: {e}")
    sums = A.sum(1)
    if not np.allclose(sums, 1, atol=1e-3):
        k = int(np.argmax(np.abs(sums - 1)))
        name = (["unlabelled"] + list(target.display))[k] if len(A) == len(target) + 1 else target.display[k]
        raise DataError(f"{flag} {path}: row {k} ({name}) sums to {sums[k]:.4f}; expected rows summing to 1")
    meta = path.with_name("affinity.json")
    if meta.is_file():
        try:
            names = json.loads(meta.read_text())
            names = {side: names[side]["names"] for side in ("target", "source")}
        except (ValueError, KeyError, TypeError):
            names = None  # not estimate_affinity.py's file: nothing to compare
        for side, table in (("target", target), ("source", source)) if names else ():
            if [n.lower() for n in names[side]] != [n.lower() for n in table.names]:
                raise DataError(f"{flag} {path}: {meta.name} says it was estimated for other {side} classes "
                                f"({len(names[side])} classes, first '{names[side][0] if names[side] else ''}') than "
                                f"{table.dataset} ({len(table)} classes, first '{table.names[0]}')")
    return A.astype(np.float32), M


# ----------------------------------------------------------------------------------------------
# Mapping files 'target class -> source class' (estimate_affinity.py --method hand and --override)


UNLABELLED = ("unlabeled", "unlabelled", "dontcare")  # names of channel 0 in mapping files


def find_class(table, name, where, unlabelled=False):
    """Row of a class named by its display name, raw name or any synonym (case-insensitive); with
    `unlabelled`, -1 for the unlabelled channel 0 (a name in UNLABELLED that is not a class of the table)."""
    key = name.strip().lower()
    if unlabelled and key in UNLABELLED and not any(key == n.lower() for n in table.names):
        return -1
    for field in (table.names, table.display):
        hits = [i for i, n in enumerate(field) if n.lower() == key]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise DataError(f"{where}: class '{name}' is ambiguous in {table.dataset} ({', '.join(table.names[i] for i in hits)}); use the raw name")
    hits = [i for i, n in enumerate(table.names) if key in (s.strip().lower() for s in n.split(";"))]
    if not hits:
        raise DataError(f"{where}: unknown class '{name}' (not among the {len(table)} classes of {table.dataset}, "
             f"e.g. {', '.join(table.display[:4])})")
    return hits[0]


def read_mapping(path, target, source):
    """Lines 'target -> source' or 'target -> a: 0.7, b: 0.3' ('#' comments) -> {target index: source distribution}
    over the extended class lists [unlabelled, *classes]: index 0 / column 0 is channel 0, which a dataset whose
    generator sees its unlabelled pixels (Cityscapes 'unlabeled' -> COCO-Stuff 'sky-other' in the CAT supplement)
    can map from and to; class k of a table is index k + 1."""
    if not Path(path).is_file():
        raise DataError(f"{path}: {no_file(path)}; expected a mapping file (lines 'target class -> source class')")
    rows, first = {}, {}
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            line, where = line.split("#")[0].strip(), f"{path}:{ln}"
            if not line:
                continue
            if "->" not in line:
                raise DataError(f"{where}: expected 'target -> source', found '{line}'")
            t, s = (x.strip() for x in line.split("->", 1))
            row = np.zeros(len(source) + 1, np.float32)
            for part in s.split(","):
                name, _, w = part.partition(":")
                try:
                    weight = float(w) if w.strip() else 1.0
                except ValueError:
                    raise DataError(f"{where}: weight '{w.strip()}' of '{name.strip()}' is not a number")
                row[find_class(source, name, where, unlabelled=True) + 1] += weight
            if row.sum() <= 0 or (row < 0).any():
                raise DataError(f"{where}: weights must be non-negative with a positive sum, found '{s}'")
            k = find_class(target, t, where, unlabelled=True) + 1
            if k in first:
                raise DataError(f"{where}: target class '{t}' is mapped again (first on line {first[k]}); "
                                "keep one line per target class")
            rows[k], first[k] = row / row.sum(), ln
    return rows


def onehot(label, n_channels):
    """(B,H,W) long channel ids -> (B,C,H,W) float one-hot, as OASIS's preprocess_input."""
    if label.numel() and (int(label.min()) < 0 or int(label.max()) >= n_channels):
        raise DataError(f"label ids span {int(label.min())}..{int(label.max())}, expected 0..{n_channels - 1}")
    y = torch.zeros(label.shape[0], n_channels, *label.shape[1:], device=label.device)
    return y.scatter_(1, label.unsqueeze(1), 1.0)


# ----------------------------------------------------------------------------------------------
# Files


def _pairs_by_stem(img_dir, lbl_dir, image_suffix="", label_suffix=""):
    """Match images and labels by file stem (less the given suffixes); fail on empty folders and unpaired files."""
    for d in (img_dir, lbl_dir):
        if not d.is_dir():
            raise DataError(f"{d}: no such folder")

    def by_key(folder, suffix, exts):
        found = {}
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in exts and p.stem.endswith(suffix):
                key = p.stem[: len(p.stem) - len(suffix)]
                if key in found:
                    raise DataError(f"{folder}: '{found[key].name}' and '{p.name}' share the name '{key}'; "
                                    "expected one file per stem (which one pairs with the label?)")
                found[key] = p
        return found

    images, labels = by_key(img_dir, image_suffix, IMAGE_EXTS), by_key(lbl_dir, label_suffix, (".png",))
    read = f"(read: images {'/'.join(IMAGE_EXTS)}, labels .png)"
    if not images:
        raise DataError(f"{img_dir}: no images found {read}")
    missing_l = sorted(set(images) - set(labels))
    missing_i = sorted(set(labels) - set(images))
    if missing_l:
        raise DataError(f"{img_dir}: {len(missing_l)} image(s) without a label in {lbl_dir}, e.g. '{missing_l[0]}' "
                        + read)
    if missing_i:
        raise DataError(f"{lbl_dir}: {len(missing_i)} label(s) without an image in {img_dir}, e.g. '{missing_i[0]}' "
                        + read)
    return [(images[k], labels[k]) for k in sorted(images)]


def list_files(dataset, root, split):
    """[(image path, label path)] in the official layouts."""
    if split not in ("train", "val"):
        raise DataError(f"split '{split}' unknown; expected train or val")
    if dataset == "ade20k":
        sub = {"train": "training", "val": "validation"}[split]
        return _pairs_by_stem(root / "images" / sub, root / "annotations" / sub)
    if dataset == "coco":
        return _pairs_by_stem(root / f"{split}_img", root / f"{split}_label")
    if dataset == "cityscapes":
        img_root, lbl_root = root / "leftImg8bit" / split, root / "gtFine" / split
        if not img_root.is_dir():
            raise DataError(f"{img_root}: no such folder (Cityscapes layout leftImg8bit/<split>/<city>)")
        pairs = []
        for city in sorted(p.name for p in img_root.iterdir() if p.is_dir()):
            # aachen_000000_000019_leftImg8bit.png <-> aachen_000000_000019_gtFine_labelIds.png
            pairs += _pairs_by_stem(img_root / city, lbl_root / city, "_leftImg8bit", "_gtFine_labelIds")
        if not pairs:
            raise DataError(f"{img_root}: no images found")
        return pairs
    # folder / toy: <root>/<split>/{images,labels} when split folders exist, else <root>/{images,labels}
    if (root / split / "images").is_dir():
        return _pairs_by_stem(root / split / "images", root / split / "labels")
    other = "val" if split == "train" else "train"
    if (root / other / "images").is_dir():
        raise DataError(f"--data-root {root} has {other}/ but no {split}/ ({split}/images, {split}/labels); "
                        f"expected both splits, or one images/ + labels/ pair without splits")
    pairs = _pairs_by_stem(root / "images", root / "labels")
    if split == "val" and root.resolve() not in _WARNED and os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 says it
        _WARNED.add(root.resolve())
        print(f"warning: --data-root {root} has no train/ and val/ subfolders: the val split is the training "
              "images, so its FID (and best.pt) is measured on the images trained on; split them for a held-out score")
    return pairs


def label_channels(label, dataset, n_channels, path=""):
    """Raw label-PNG values (H,W uint8) -> channel ids (H,W int64), with a range check."""
    label = label.astype(np.int64)
    if dataset == "coco":
        bad = (label > 181) & (label != 255)
        if bad.any():
            raise DataError(f"{path}: label value {int(label[bad][0])} outside COCO-Stuff's 0..181 and 255")
        return np.where(label == 255, 0, label + 1)
    top = 33 if dataset == "cityscapes" else n_channels - 1
    if label.max(initial=0) > top:
        raise DataError(f"{path}: label value {int(label.max())} outside 0..{top} for {dataset}")
    return label


# ----------------------------------------------------------------------------------------------
# Dataset


def _open(path, decode=True):
    """A PIL image as viewers show it: turned upright by its EXIF orientation (phone photos); such an image
    says so in .exif_turned (the orientation tag)."""
    try:
        im = Image.open(path)
        if decode:
            im.load()
        # the tag from what is read so far: a PNG's own getexif() would decode the whole image first
        orientation = Image.Image.getexif(im).get(0x0112, 1)
        if orientation != 1:
            im = ImageOps.exif_transpose(im)
            im.exif_turned = orientation
        return im
    except OSError as e:
        raise DataError(f"{path}: unreadable image ({e})") from None


def open_pair(img_path, lbl_path, decode=True):
    """(image, label) PIL images, checked: a single-channel label of the image's own size (else one line)."""
    image, label = _open(img_path, decode), _open(lbl_path, decode)
    if label.mode in ("RGB", "RGBA", "CMYK", "LA", "PA"):
        raise DataError(f"{lbl_path}: is an {label.mode} image; expected a single-channel PNG of class ids (mode L or P)")
    if label.mode not in ("L", "P", "I;16", "I"):
        raise DataError(f"{lbl_path}: label mode {label.mode}; expected a single-channel PNG of class ids (mode L or P)")
    if image.size != label.size:
        turned = [f"{what} turned by its EXIF orientation {im.exif_turned}"
                  for what, im in (("image", image), ("label", label)) if getattr(im, "exif_turned", None)]
        raise DataError(f"{lbl_path}: label is {label.size[0]}x{label.size[1]}, its image {img_path} is "
                        f"{image.size[0]}x{image.size[1]}{' (' + ', '.join(turned) + ')' if turned else ''}; "
                        "expected the same size (they would be resized apart)")
    return image, label


def check_files(ds):
    """Read every pair of a dataset once (sizes, modes, label values), so that a bad file fails here in one
    line rather than later inside a DataLoader worker. Returns the images' sizes {(W, H): count}."""
    sizes = {}
    for img_path, lbl_path in ds.files:
        image, label = open_pair(img_path, lbl_path, decode=False)
        sizes[image.size] = sizes.get(image.size, 0) + 1
        try:
            values = np.asarray(label)
        except OSError as e:
            raise DataError(f"{lbl_path}: unreadable image ({e})") from None
        label_channels(values, ds.dataset, ds.n_channels, lbl_path)
    return sizes


class SegDataset(torch.utils.data.Dataset):
    """Image + channel-id label pairs with the official OASIS preprocessing.

    ade20k/coco: train resize 286x286 -> random 256 crop -> flip; val 256x256.
    cityscapes: 256x512, flip when training. folder/toy: like ADE20K at side `size`
    (load = size*286//256), toy default 64.
    """

    def __init__(self, dataset, root=None, split="train", augment=False, size=None, files=None):
        root = dataset_root(dataset, root)
        self.dataset, self.root, self.split, self.augment = dataset, root, split, augment
        self.classes = class_table(dataset, root)
        self.n_channels = self.classes.n_channels
        self.files = files if files is not None else list_files(dataset, root, split)
        if dataset == "cityscapes":
            self.size, self.load = (256, 512), (256, 512)
        else:
            if size is not None and size < 1:
                raise DataError(f"--size {size}: expected a positive image side in pixels")
            side = size or (64 if dataset.startswith("toy") else 256)
            load = side * 286 // 256 if augment else side
            self.size, self.load = (side, side), (load, load)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img_path, lbl_path = self.files[i]
        image, label = open_pair(img_path, lbl_path)
        image = image.convert("RGB")
        lh, lw = self.load
        image = image.resize((lw, lh), Image.BICUBIC)
        label = label.resize((lw, lh), Image.NEAREST)
        if self.augment:
            h, w = self.size
            x = random.randint(0, max(0, lw - w))  # same draw order as the official loaders: x, then y, then flip
            y = random.randint(0, max(0, lh - h))
            image = image.crop((x, y, x + w, y + h))
            label = label.crop((x, y, x + w, y + h))
            if random.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
                label = label.transpose(Image.FLIP_LEFT_RIGHT)
        image = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
        label = label_channels(np.asarray(label), self.dataset, self.n_channels, lbl_path)
        return {"image": image, "label": torch.from_numpy(label), "path": str(img_path)}


def table_info(t):
    """The class table as a checkpoint records it."""
    return {"dataset": t.dataset, "names": list(t.names), "n_channels": t.n_channels}


def check_labels(ds, what):
    """Read every label file once so that a bad id fails here, in one line, not inside a loader worker."""
    check_files(ds)
    if ds.size[0] % 64 or ds.size[1] % 64:
        raise DataError(f"{what} images are {ds.size[0]}x{ds.size[1]}; OASIS's discriminator needs multiples of 64 (--size)")


def open_dataset(dataset, root=None, split="train", augment=False, n=None, subset_seed=0, subset_file=None,
                 out_dir=None, size=None):
    """A SegDataset, optionally an n-shot subset (reproducible from the seed, or read from a file)."""
    ds = SegDataset(dataset, root, split, augment, size)
    rel = [str(Path(img).relative_to(ds.root)) for img, _ in ds.files]
    if subset_file:
        path = Path(subset_file)
        if not path.is_file():
            raise DataError(f"--subset-file {path}: {no_file(path)} (the subset.txt of an earlier run)")
        wanted = [s.strip() for s in path.read_text().splitlines() if s.strip()]
        index = {r: i for i, r in enumerate(rel)}
        unknown = [w for w in wanted if w not in index]
        if unknown:
            raise DataError(f"--subset-file {path}: {len(unknown)} entries not in {ds.root} ({split}), e.g. '{unknown[0]}'")
        keep = [index[w] for w in wanted]
    elif n is not None:
        if n > len(ds):
            raise DataError(f"--n {n} is larger than the {len(ds)} {split} images of {ds.root}")
        if n < 1:
            raise DataError(f"--n {n}: expected at least 1")
        keep = sorted(random.Random(subset_seed).sample(range(len(ds)), n))
    else:
        return ds
    ds.files = [ds.files[i] for i in keep]
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "subset.txt").write_text("".join(rel[i] + "\n" for i in keep))
    return ds


def add_data_args(parser, default="toy-target"):
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=default, choices=DATASETS, help="dataset layout (toy-* are generated on first use)")
    g.add_argument("--data-root", default=None, help="dataset folder (ADEChallengeData2016, cityscapes, cocostuff, or a folder dataset)")
    g.add_argument("--n", type=int, default=None, help="n-shot: use a reproducible subset of n training images")
    g.add_argument("--subset-seed", type=int, default=0, help="seed of the n-shot subset")
    g.add_argument("--subset-file", default=None, help="reuse a subset.txt written by an earlier run")
    g.add_argument("--size", type=int, default=None, help="image side for folder/toy data (toy default 64, folder 256)")
    return g


def int_list(text):
    """argparse type: '3,128,128' -> [3, 128, 128]."""
    try:
        return [int(c) for c in str(text).split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': expected comma-separated integers, e.g. 3,128,128,256")


def positive_int(text):
    """argparse type: an integer >= 1."""
    v = int(text) if str(text).lstrip("-").isdigit() else None
    if v is None or v < 1:
        raise argparse.ArgumentTypeError(f"'{text}': expected an integer >= 1")
    return v


def nonneg_int(text):
    """argparse type: an integer >= 0."""
    v = int(text) if str(text).lstrip("-").isdigit() else None
    if v is None or v < 0:
        raise argparse.ArgumentTypeError(f"'{text}': expected an integer >= 0")
    return v


def finite_float(text):
    """argparse type: a finite number (not nan, not inf)."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"'{text}': expected a finite number")
    return v


def positive_float(text):
    """argparse type: a finite number > 0."""
    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"'{text}': expected a number > 0")
    return v


def unit_float(text):
    """argparse type: a number in [0, 1] (a probability, a decay)."""
    v = finite_float(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"'{text}': expected a number in [0, 1]")
    return v


def dataset_from_args(args, split="train", augment=False, out_dir=None):
    few_shot = split == "train"
    return open_dataset(args.data, args.data_root, split, augment,
                        n=args.n if few_shot else None, subset_seed=args.subset_seed,
                        subset_file=args.subset_file if few_shot else None, out_dir=out_dir, size=args.size)


# ----------------------------------------------------------------------------------------------
# Training order: every batch is a pure function of (seed, epoch, position), so a resumed run replays nothing.


class Seeded(torch.utils.data.Dataset):
    """Each item's augmentation (Python `random`, as the official loaders) is seeded from its key."""

    def __init__(self, ds, seed):
        self.ds, self.seed = ds, seed

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        salt, i = key
        state = random.getstate()
        random.seed(f"{self.seed}/{salt}/{i}")
        item = self.ds[i]
        random.setstate(state)
        return item


def epoch_batches(n_items, batch, seed, salt, rank, world):
    """This rank's share of one shuffled epoch (drop_last, as the official train loader)."""
    perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(hash_seed(seed, salt))).tolist()
    return [[(salt, i) for i in perm[k * batch:(k + 1) * batch][rank::world]] for k in range(n_items // batch)]


def hash_seed(*parts):
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


class Batches:
    """Endless batches from iteration `start` on: epoch e is epoch_batches(..., salt=e), as if never stopped."""

    def __init__(self, n_items, batch, seed, rank, world, start):
        self.n_items, self.batch, self.seed, self.rank, self.world, self.start = n_items, batch, seed, rank, world, start

    def __iter__(self):
        epoch, k = divmod(self.start, self.n_items // self.batch)
        while True:
            yield from epoch_batches(self.n_items, self.batch, self.seed, epoch, self.rank, self.world)[k:]
            epoch, k = epoch + 1, 0


# ----------------------------------------------------------------------------------------------
# The toy transfer task: procedural scenes whose classes are textures a small generator can learn.
# Target classes are palette-shifted versions of source classes, except lava which has no counterpart.

# name: (base RGB, pattern, pattern amplitude)
TOY_SOURCE = {
    "sky": ((110, 165, 235), "gradient", 40),
    "grass": ((60, 150, 50), "vstripes", 35),
    "water": ((35, 85, 185), "waves", 35),
    "road": ((85, 85, 90), "speckle", 25),
    "building": ((175, 120, 95), "bricks", 45),
    "tree": ((25, 95, 40), "dots", 40),
    "sand": ((225, 200, 140), "speckle", 30),
    "snow": ((240, 242, 250), "flat", 8),
    "rock": ((125, 115, 105), "checker", 40),
    "car": ((205, 30, 35), "hband", 60),
    "person": ((175, 60, 200), "flat", 15),
    "fence": ((150, 105, 55), "vslats", 60),
}
# target name: (source look-alike or None, own base RGB for new classes, pattern, amplitude)
TOY_TARGET = {
    "sky": "sky", "lawn": "grass", "sea": "water", "street": "road", "house": "building",
    "bush": "tree", "beach": "sand", "boat": "car", "lava": None,
}
TOY_LAVA = ((240, 80, 10), "cracks", 90)
# The target domain's style shift: a warm, lower-contrast colour grade applied to every pixel.
TOY_GRADE = np.array([[0.80, 0.15, 0.05], [0.10, 0.75, 0.10], [0.05, 0.15, 0.60]], dtype=np.float32)
TOY_GRADE_BIAS = np.array([30.0, 20.0, 10.0], dtype=np.float32)


def _pattern(kind, h, w, rng):
    """A pattern in [-1, 1] of shape (h, w)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "flat":
        return rng.uniform(-1, 1, (h, w)).astype(np.float32) * 0.3
    if kind == "gradient":
        return (1 - 2 * yy / max(h - 1, 1)) * -0.8 + rng.uniform(-0.2, 0.2, (h, w)).astype(np.float32)
    if kind == "vstripes":
        return np.sign(np.sin(xx * 2 * np.pi / 4 + phase)) * 0.7 + rng.uniform(-0.3, 0.3, (h, w)).astype(np.float32)
    if kind == "waves":
        return np.sin(yy * 2 * np.pi / 6 + np.sin(xx / 5 + phase) * 2).astype(np.float32)
    if kind == "speckle":
        return rng.uniform(-1, 1, (h, w)).astype(np.float32)
    if kind == "bricks":
        row = (yy // 4).astype(int)
        mortar = (yy % 4 == 0) | (((xx + 4 * (row % 2)) % 8) == 0)
        return np.where(mortar, -1.0, 0.5).astype(np.float32)
    if kind == "dots":
        return np.sign(np.sin(xx * 1.3 + phase) * np.sin(yy * 1.3)).astype(np.float32) * 0.8
    if kind == "checker":
        return np.where(((xx // 4) + (yy // 4)) % 2 == 0, 0.8, -0.8).astype(np.float32)
    if kind == "hband":
        return np.where(yy % 6 < 2, -1.0, 0.4).astype(np.float32)
    if kind == "vslats":
        return np.where(xx % 5 < 2, 0.8, -1.0).astype(np.float32)
    if kind == "cracks":
        v = np.abs(np.sin(xx * 0.45 + np.sin(yy * 0.3 + phase) * 3)) < 0.25
        return np.where(v, -1.0, 0.3).astype(np.float32)
    raise ValueError(kind)


def _toy_layout(h, w, rng, classes):
    """A label map (PNG values, 1-based over `classes`) for one scene."""
    c = {name: k + 1 for k, name in enumerate(classes)}
    target = "lawn" in c
    yy, xx = np.mgrid[0:h, 0:w]
    lab = np.full((h, w), c["sky"], np.uint8)
    horizon = rng.uniform(0.3, 0.5) * h + np.sin(xx / w * 2 * np.pi * rng.uniform(0.5, 1.5) + rng.uniform(0, 6)) * h * 0.04
    ground = (["lawn", "sea", "street", "beach", "lava"] if target
              else ["grass", "water", "road", "sand", "snow", "rock"])
    n_bands = rng.integers(1, 4)
    bands = rng.choice(ground, n_bands, replace=False)
    edges = np.sort(rng.uniform(0, 1, n_bands - 1))
    depth = (yy - horizon) / np.maximum(h - horizon, 1)
    wobble = np.sin(xx / w * 2 * np.pi * rng.uniform(0.5, 2) + rng.uniform(0, 6)) * 0.06
    band_idx = np.searchsorted(edges, depth + wobble)
    for k, name in enumerate(bands):
        lab[(yy >= horizon) & (band_idx == k)] = c[name]
    # objects standing on the horizon or the ground
    objects = (["house", "bush", "boat"] if target else ["building", "tree", "car", "person", "fence"])
    for _ in range(rng.integers(1, 5)):
        name = rng.choice(objects)
        cx = rng.uniform(0, w)
        if name in ("building", "house"):
            bw, bh = rng.uniform(0.15, 0.3) * w, rng.uniform(0.2, 0.4) * h
            base = np.interp(cx, np.arange(w), horizon[0]) + 0.05 * h
            m = (np.abs(xx - cx) < bw / 2) & (yy < base) & (yy > base - bh)
        elif name in ("tree", "bush"):
            r = rng.uniform(0.08, 0.16) * w
            cy = np.interp(cx, np.arange(w), horizon[0]) + rng.uniform(-0.05, 0.2) * h
            m = (xx - cx) ** 2 + ((yy - cy) * 1.2) ** 2 < r ** 2
        elif name == "fence":
            y0 = rng.uniform(0.6, 0.8) * h
            m = (yy > y0) & (yy < y0 + 0.08 * h) & (np.abs(xx - cx) < 0.3 * w)
        else:  # car, boat, person: small shapes on the ground
            cy = rng.uniform(0.65, 0.9) * h
            if name == "person":
                m = ((xx - cx) * 2.5) ** 2 + (yy - cy) ** 2 < (0.09 * h) ** 2
            else:
                m = (np.abs(xx - cx) < 0.12 * w) & (np.abs(yy - cy) < 0.05 * h)
                if name == "boat":  # a hull narrowing downwards
                    m &= np.abs(xx - cx) < 0.12 * w - (yy - cy + 0.05 * h) * 0.8
        lab[m] = c[name]
    return lab


def toy_look(name, domain):
    """(base RGB, pattern, amplitude) of a toy class in a domain ('source' or 'target')."""
    if domain == "source":
        return TOY_SOURCE[name]
    twin = TOY_TARGET[name]
    return TOY_LAVA if twin is None else TOY_SOURCE[twin]


def render_toy(lab, classes, domain, rng):
    """RGB uint8 image of a label map: each class its texture; the target domain gets its colour grade."""
    h, w = lab.shape
    img = np.zeros((h, w, 3), np.float32)
    for k, name in enumerate(classes, 1):
        m = lab == k
        if not m.any():
            continue
        base, kind, amp = toy_look(name, domain)
        tint = np.array(base, np.float32) + rng.uniform(-12, 12, 3)  # per-image colour jitter
        tex = _pattern(kind, h, w, rng)[m][:, None] * amp
        img[m] = tint + tex
    return _toy_finish(img, domain, rng)


def _toy_finish(img, domain, rng):
    """Sensor noise, then the target domain's colour grade, then uint8 RGB (both toy tasks)."""
    img += rng.normal(0, 3, img.shape).astype(np.float32)
    if domain == "target":
        img = img @ TOY_GRADE.T + TOY_GRADE_BIAS
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _write_split(root, split, pairs, stem="{:05d}", image_ext=".png", **image_kw):
    """Save (label map, image) pairs as root/split/images/<stem><image_ext> and root/split/labels/<stem>.png."""
    for sub in ("images", "labels"):
        (root / split / sub).mkdir(parents=True, exist_ok=True)
    for i, (lab, img) in enumerate(pairs):
        Image.fromarray(img).save(root / split / "images" / (stem.format(i) + image_ext), **image_kw)
        Image.fromarray(lab).save(root / split / "labels" / (stem.format(i) + ".png"))


def _toy_pair(rng, classes, domain, size):
    lab = _toy_layout(size, size, rng, classes)
    return lab, render_toy(lab, classes, domain, rng)


TOY_SPLITS = {"source": {"train": 1000, "val": 200}, "target": {"train": 500, "val": 200}}


def write_toy(out, size=64, seed=0, splits=None):
    """Write the toy task in the folder layout: out/{source,target}/{classes.txt, train/, val/}."""
    out = Path(out)
    splits = splits or TOY_SPLITS
    for d, domain in enumerate(("source", "target")):
        classes = list(TOY_SOURCE if domain == "source" else TOY_TARGET)
        root = out / domain
        for s, (split, count) in enumerate(splits[domain].items()):
            _write_split(root, split, (_toy_pair(np.random.default_rng([seed, d, s, i]), classes, domain, size)
                                       for i in range(count)))
        # classes.txt last: its presence marks a complete dataset
        (root / "classes.txt").write_text("".join(c + "\n" for c in classes))
    return out


def write_example(out, size=64, n_train=120, n_val=40, seed=1):
    """An example folder dataset 'of your own': target-domain toy scenes (other draws than the toy task's) as
    JPEG images + PNG class-id labels + classes.txt, split into train/ and val/ (the README walk-through)."""
    out = Path(out)
    if (out / "classes.txt").exists():
        raise DataError(f"{out}: already holds a dataset (classes.txt); choose another folder")
    classes = list(TOY_TARGET)
    for s, (split, count) in enumerate((("train", n_train), ("val", n_val))):
        _write_split(out, split, (_toy_pair(np.random.default_rng([seed, 7, s, i]), classes, "target", size)
                                  for i in range(count)), stem="img{:04d}", image_ext=".jpg", quality=95)
    (out / "classes.txt").write_text("".join(c + "\n" for c in classes))
    return out


# ----------------------------------------------------------------------------------------------
# The long-tailed toy task (toy-lt-source / toy-lt-target): 30 source classes, 20 target classes with a
# long-tailed frequency, so that few-shot is really few-shot. Every class has its own texture and (objects)
# its own shape. Target classes are renamed versions of source classes in the target colour grade, or blends
# of two source classes (mean colour and mean texture). Roles: "sky" (one per image, drawn by weight),
# "ground" (bands below the horizon, each present with its probability; the first ground class when none is),
# "object" (each present with its probability; drawn largest first so small ones stay visible).

TOY_LT_ROOT = REPO / "data" / "toy_lt"
TOY_TASKS = {"toy-source": TOY_ROOT / "source", "toy-target": TOY_ROOT / "target",
             "toy-lt-source": TOY_LT_ROOT / "source", "toy-lt-target": TOY_LT_ROOT / "target"}
# source name: (role, probability per image (sky: weight), base RGB, (texture, period, amplitude), object shape)
TOY_LT_SOURCE = {
    "sky": ("sky", 0.60, (110, 165, 235), ("gradient", 1, 40), None),
    "clouds": ("sky", 0.25, (200, 205, 215), ("speckle", 6, 30), None),
    "fog": ("sky", 0.15, (170, 175, 180), ("flat", 1, 8), None),
    "grass": ("ground", 0.45, (60, 150, 50), ("vstripes", 4, 35), None),
    "water": ("ground", 0.35, (35, 85, 185), ("waves", 6, 35), None),
    "road": ("ground", 0.35, (85, 85, 90), ("speckle", 1, 25), None),
    "sand": ("ground", 0.30, (225, 200, 140), ("speckle", 2, 30), None),
    "snow": ("ground", 0.20, (240, 242, 250), ("flat", 1, 8), None),
    "rock": ("ground", 0.25, (125, 115, 105), ("checker", 4, 40), None),
    "dirt": ("ground", 0.25, (120, 80, 45), ("dots", 5, 30), None),
    "gravel": ("ground", 0.20, (150, 150, 140), ("speckle", 3, 45), None),
    "field": ("ground", 0.25, (200, 180, 60), ("hstripes", 3, 40), None),
    "building": ("object", 0.30, (175, 120, 95), ("bricks", 4, 45), ("box", 0.25, 0.35)),
    "tree": ("object", 0.30, (25, 95, 40), ("dots", 3, 40), ("ellipse", 0.26, 0.30)),
    "car": ("object", 0.25, (205, 30, 35), ("hstripes", 6, 60), ("box", 0.22, 0.10)),
    "person": ("object", 0.20, (175, 60, 200), ("flat", 1, 15), ("ellipse", 0.08, 0.22)),
    "fence": ("object", 0.20, (150, 105, 55), ("vstripes", 5, 60), ("box", 0.50, 0.09)),
    "boat": ("object", 0.15, (240, 240, 235), ("hstripes", 4, 40), ("tri", 0.24, 0.10)),
    "bush": ("object", 0.25, (70, 120, 30), ("speckle", 2, 40), ("ellipse", 0.16, 0.14)),
    "flower": ("object", 0.20, (230, 90, 160), ("dots", 2, 50), ("ellipse", 0.12, 0.12)),
    "sign": ("object", 0.15, (230, 200, 20), ("checker", 2, 50), ("box", 0.12, 0.12)),
    "pole": ("object", 0.20, (60, 60, 70), ("flat", 1, 10), ("box", 0.06, 0.38)),
    "bridge": ("object", 0.15, (140, 100, 90), ("grid", 6, 50), ("box", 0.60, 0.10)),
    "wall": ("object", 0.20, (190, 180, 160), ("bricks", 6, 30), ("box", 0.35, 0.18)),
    "tent": ("object", 0.15, (230, 130, 40), ("dstripes", 4, 40), ("tri", 0.22, 0.20)),
    "bench": ("object", 0.15, (110, 70, 40), ("hstripes", 2, 40), ("box", 0.16, 0.07)),
    "horse": ("object", 0.15, (130, 80, 50), ("speckle", 4, 20), ("ellipse", 0.18, 0.11)),
    "bird": ("object", 0.15, (40, 40, 40), ("flat", 1, 10), ("fly", 0.10, 0.06)),
    "truck": ("object", 0.15, (40, 90, 160), ("vstripes", 3, 40), ("box", 0.30, 0.16)),
    "bicycle": ("object", 0.15, (20, 160, 160), ("rings", 3, 50), ("ellipse", 0.14, 0.09)),
}
# target name: (role, probability per image, source class or (source a, source b) for a blend); half the
# classes (p < 0.1) form the long tail, three (heaven, lawn, house) are in most images
TOY_LT_TARGET = {
    "heaven": ("sky", 1.0, "sky"),
    "lawn": ("ground", 0.70, "grass"),
    "sea": ("ground", 0.30, "water"),
    "street": ("ground", 0.35, "road"),
    "mudflat": ("ground", 0.20, ("dirt", "water")),
    "beach": ("ground", 0.07, "sand"),
    "cliff": ("ground", 0.06, "rock"),
    "snowfield": ("ground", 0.05, "snow"),
    "swamp": ("ground", 0.06, ("water", "grass")),
    "house": ("object", 0.55, "building"),
    "hedge": ("object", 0.30, "bush"),
    "automobile": ("object", 0.30, "car"),
    "pedestrian": ("object", 0.25, "person"),
    "orchard": ("object", 0.20, ("tree", "flower")),
    "ship": ("object", 0.06, "boat"),
    "lamppost": ("object", 0.08, "pole"),
    "signboard": ("object", 0.06, "sign"),
    "pony": ("object", 0.05, "horse"),
    "railing": ("object", 0.07, "fence"),
    "hut": ("object", 0.05, ("tent", "building")),
}
TOY_LT_SPLITS = {"source": {"train": 1000, "val": 100}, "target": {"train": 500, "val": 300}}


def _lt_texture(kind, period, h, w, rng):
    """A texture in about [-1, 1] of shape (h, w); `period` in pixels."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ph = rng.uniform(0, 2 * np.pi)
    wave = lambda t: np.sign(np.sin(t * np.pi / period + ph))  # noqa: E731  (a square wave of this period)
    if kind == "flat":
        return rng.uniform(-0.3, 0.3, (h, w)).astype(np.float32)
    if kind == "gradient":
        return 0.8 * (2 * yy / max(h - 1, 1) - 1) + rng.uniform(-0.2, 0.2, (h, w)).astype(np.float32)
    if kind == "speckle":  # blocky noise of grain `period`
        g = rng.uniform(-1, 1, (h // period + 1, w // period + 1)).astype(np.float32)
        return np.kron(g, np.ones((period, period), np.float32))[:h, :w]
    if kind in ("hstripes", "vstripes", "dstripes"):
        return {"hstripes": wave(yy), "vstripes": wave(xx), "dstripes": wave((xx + yy) / 1.4)}[kind].astype(np.float32)
    if kind == "waves":
        return np.sin(yy * 2 * np.pi / period + np.sin(xx / 5 + ph) * 2).astype(np.float32)
    if kind == "checker":
        return np.where(((xx // period) + (yy // period)) % 2 == 0, 0.8, -0.8).astype(np.float32)
    if kind == "dots":
        return (wave(xx) * wave(yy) * 0.8).astype(np.float32)
    if kind == "bricks":
        row = (yy // period).astype(int)
        mortar = (yy % period == 0) | (((xx + period * (row % 2)) % (2 * period)) == 0)
        return np.where(mortar, -1.0, 0.5).astype(np.float32)
    if kind == "grid":
        return np.where((xx % period == 0) | (yy % period == 0), -1.0, 0.5).astype(np.float32)
    if kind == "rings":
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        return np.sign(np.sin(np.hypot(yy - cy, xx - cx) * np.pi / period)).astype(np.float32)
    raise ValueError(kind)


def _lt_spec(domain):
    return TOY_LT_SOURCE if domain == "source" else TOY_LT_TARGET


def _lt_parts(name, domain):
    """The source classes a class is drawn from: itself (source), its twin, or the two of a blend."""
    if domain == "source":
        return [name]
    twin = TOY_LT_TARGET[name][2]
    return list(twin) if isinstance(twin, tuple) else [twin]


def toy_lt_layout(h, w, rng, domain):
    """A label map (PNG values, 1-based over the domain's classes) of one long-tailed scene."""
    spec = _lt_spec(domain)
    names = list(spec)
    yy, xx = np.mgrid[0:h, 0:w]
    skies = [n for n in names if spec[n][0] == "sky"]
    weights = np.array([spec[n][1] for n in skies])
    lab = np.full((h, w), names.index(skies[rng.choice(len(skies), p=weights / weights.sum())]) + 1, np.uint8)
    horizon = rng.uniform(0.25, 0.45) * h + np.sin(xx[0] / w * 2 * np.pi * rng.uniform(0.5, 1.5) + rng.uniform(0, 6)) * h * 0.04
    grounds = [n for n in names if spec[n][0] == "ground" and rng.random() < spec[n][1]]
    grounds = grounds or [next(n for n in names if spec[n][0] == "ground")]
    bands = [grounds[k] for k in rng.permutation(len(grounds))]
    k = len(bands)  # bands of similar depth, so that every present ground class is visible
    edges = (np.arange(1, k) + rng.uniform(-0.3, 0.3, k - 1)) / k
    depth = (yy - horizon[None]) / np.maximum(h - horizon[None], 1)
    band = np.searchsorted(edges, depth + np.sin(xx / w * 2 * np.pi * rng.uniform(0.5, 2) + rng.uniform(0, 6)) * 0.03)
    for b, name in enumerate(bands):
        lab[(yy >= horizon[None]) & (band == b)] = names.index(name) + 1
    objects = [n for n in names if spec[n][0] == "object" and rng.random() < spec[n][1]]
    shape_of = {n: TOY_LT_SOURCE[_lt_parts(n, domain)[0]][4] for n in objects}
    for name in sorted(objects, key=lambda n: -shape_of[n][1] * shape_of[n][2]):  # largest first
        kind, sw, sh = shape_of[name]
        bw, bh = sw * w * rng.uniform(0.8, 1.2), sh * h * rng.uniform(0.8, 1.2)
        cx = rng.uniform(bw / 4, w - bw / 4)
        hz = horizon[int(np.clip(cx, 0, w - 1))]
        bottom = rng.uniform(0.15, 0.8) * hz if kind == "fly" else rng.uniform(hz + 0.08 * h, h + 0.02 * h)
        dx, dy = (xx - cx) / (bw / 2), (yy - (bottom - bh / 2)) / (bh / 2)  # both in [-1, 1] inside the box
        if kind == "box":
            m = (np.abs(dx) <= 1) & (np.abs(dy) <= 1)
        elif kind == "tri":  # wide at the top (boat hull) or at the bottom (tent)
            m = (np.abs(dy) <= 1) & (np.abs(dx) <= ((1 - dy) / 2 if name in ("boat", "ship") else (1 + dy) / 2))
        else:  # ellipse, fly
            m = dx ** 2 + dy ** 2 <= 1
        lab[m] = names.index(name) + 1
    return lab


def render_toy_lt(lab, domain, rng):
    """RGB uint8 image of a long-tailed label map: each class its texture (blends: the mean of two looks);
    the target domain gets the toy task's colour grade."""
    h, w = lab.shape
    img = np.zeros((h, w, 3), np.float32)
    for k, name in enumerate(_lt_spec(domain), 1):
        m = lab == k
        if not m.any():
            continue
        parts = _lt_parts(name, domain)
        for part in parts:
            _, _, base, (kind, period, amp), _ = TOY_LT_SOURCE[part]
            tint = np.array(base, np.float32) + rng.uniform(-12, 12, 3)
            img[m] += (tint + _lt_texture(kind, period, h, w, rng)[m][:, None] * amp) / len(parts)
    return _toy_finish(img, domain, rng)


def toy_lt_item(domain, split, i, size=64, seed=0):
    """(label map, image) of item i: a pure function of (seed, domain, split, i)."""
    rng = np.random.default_rng([seed, 100 + ("source", "target").index(domain), ("train", "val").index(split), i])
    lab = toy_lt_layout(size, size, rng, domain)
    return lab, render_toy_lt(lab, domain, rng)


def write_toy_longtail(out, size=64, seed=0, splits=None):
    """Write the long-tailed toy task in the folder layout: out/{source,target}/{classes.txt, train/, val/}."""
    out = Path(out)
    for domain in ("source", "target"):
        root = out / domain
        for split, count in (splits or TOY_LT_SPLITS)[domain].items():
            _write_split(root, split, (toy_lt_item(domain, split, i, size, seed) for i in range(count)))
        (root / "classes.txt").write_text("".join(c + "\n" for c in _lt_spec(domain)))  # last: marks it complete
    return out


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{toy,example,info}")
    t = sub.add_parser("toy", help="write the toy transfer task (source + target domains)")
    t.add_argument("--out", default=str(TOY_ROOT), help="output folder")
    t.add_argument("--size", type=int, default=64, help="image side in pixels (64-256)")
    t.add_argument("--seed", type=nonneg_int, default=0)
    e = sub.add_parser("example", help="write an example folder dataset (toy target scenes) to try the walk-through")
    e.add_argument("out", help="folder to create (images/, labels/, classes.txt in train/ and val/)")
    i = sub.add_parser("info", help="check a dataset: counts, image size, class histogram")
    add_data_args(i)
    i.add_argument("--split", default="train", choices=["train", "val"])
    args = p.parse_args(argv)
    if args.cmd == "example":
        write_example(checkpoint.out_dir(args.out, "example OUT"))
        print(f"wrote an example folder dataset to {args.out}: 120 train + 40 val pairs, 64x64, "
              f"{len(TOY_TARGET)} classes (classes.txt)")
    elif args.cmd == "toy":
        if not 16 <= args.size <= 512:
            raise DataError(f"--size {args.size}: expected 16..512")
        write_toy(checkpoint.out_dir(args.out), args.size, args.seed)
        print(f"wrote the toy task to {args.out}: source {TOY_SPLITS['source']}, target {TOY_SPLITS['target']}, {args.size}px")
    else:
        ds = dataset_from_args(args, args.split)
        sizes = check_files(ds)
        hist = np.zeros(ds.n_channels, np.int64)
        for k in range(len(ds)):
            hist += np.bincount(ds[k]["label"].flatten().numpy(), minlength=ds.n_channels)
        (w0, h0), (w1, h1) = min(sizes, key=lambda s: s[0] * s[1]), max(sizes, key=lambda s: s[0] * s[1])
        own = f"{w0}x{h0}" if len(sizes) == 1 else f"{len(sizes)} sizes from {w0}x{h0} to {w1}x{h1}"
        print(f"{ds.root} ({args.split}): {len(ds)} pairs, {len(ds.classes)} classes; images {own} (width x height), "
              f"resized to {ds.load[1]}x{ds.load[0]}")
        names = dict(zip(ds.classes.channels, ds.classes.display))
        for ch in np.argsort(-hist):
            if hist[ch]:
                print(f"  {names.get(int(ch), 'dontcare'):<24s} {hist[ch] / hist.sum():7.2%}")


if __name__ == "__main__":
    cli(main)
