"""The toy transfer tasks: procedural scenes whose classes are textures a small generator can learn.

  toy-source / toy-target        12 source classes; 9 target classes, palette-shifted versions of source
                                 classes (lava has no counterpart), in a warmer colour grade (data/toy/)
  toy-lt-source / toy-lt-target  30 source classes; 20 long-tailed target classes (data/toy_lt/)

Each task is written in the folder layout (<root>/{source,target}/{classes.txt, train/, val/}), deterministic
by seed. A task's class names are the constants below: `class_names` reads no file and writes none. The
images are written by `ensure`, which data.py calls where a dataset is opened, once (classes.txt, written
last, marks a complete task).

Import direction: data.py imports this module (names, roots, ensure); this module imports numpy, PIL and
`models` only, never data.py.

    python toy.py write                          # the toy transfer task into data/toy (a few seconds)
    python toy.py write --task toy-lt            # the long-tailed one into data/toy_lt
    python toy.py example my_data                # an example folder dataset to try the README walk-through
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from models import ArgumentParser, DataError, cli, nonneg_int, run

REPO = Path(__file__).resolve().parent
TOY_ROOT = REPO / "data" / "toy"  # read at call time: tests point these at a temporary folder
TOY_LT_ROOT = REPO / "data" / "toy_lt"
TASKS = {"toy-source": ("toy", "source"), "toy-target": ("toy", "target"),
         "toy-lt-source": ("toy-lt", "source"), "toy-lt-target": ("toy-lt", "target")}  # task: (family, domain)


def task_root(task):
    """The folder a toy task is generated into by default (its classes.txt, train/, val/)."""
    family, domain = TASKS[task]
    return (TOY_ROOT if family == "toy" else TOY_LT_ROOT) / domain


def class_names(task):
    """The class names of a toy task, line k = PNG value k, from the constants: no file is read or written."""
    family, domain = TASKS[task]
    if family == "toy":
        return list(TOY_SOURCE if domain == "source" else TOY_TARGET)
    return list(_lt_spec(domain))


def ensure(task, root=None):
    """The folder of a toy task (`root`, else task_root), generated first when its classes.txt is missing (the
    whole family, source and target, into the folder above it). A classes.txt that lists other classes than
    this version's (an older generator's task) is refused rather than used."""
    base = Path(root) if root else task_root(task)
    listed = base / "classes.txt"
    if not listed.is_file():
        print(f"generating the toy transfer task in {base.parent} (once)")
        (write_toy if TASKS[task][0] == "toy" else write_toy_longtail)(base.parent)
    names = [n.strip() for n in listed.read_text(encoding="utf-8").splitlines() if n.strip()]
    if names != class_names(task):
        raise DataError(f"{listed}: lists {len(names)} classes (first '{names[0] if names else ''}'), expected the "
                        f"{len(class_names(task))} of {task} ('{class_names(task)[0]}', ...); a toy task written "
                        f"by another version: delete {base.parent} to have it generated again")
    return base


# ----------------------------------------------------------------------------------------------
# The toy transfer task (toy-source / toy-target). Target classes are palette-shifted versions of source
# classes, except lava which has no counterpart.

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
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{write,example}")
    t = sub.add_parser("write", help="write a toy task (source + target domains)")
    t.add_argument("--task", default="toy", choices=["toy", "toy-lt"],
                   help="toy: the toy transfer task (toy-source/toy-target); toy-lt: the long-tailed one")
    t.add_argument("--out", default=None, help="output folder (default data/toy or data/toy_lt, where --data toy-* reads)")
    t.add_argument("--size", type=int, default=64, help="image side in pixels (16-512)")
    t.add_argument("--seed", type=nonneg_int, default=0)
    e = sub.add_parser("example", help="write an example folder dataset (toy target scenes) to try the walk-through")
    e.add_argument("out", help="folder to create (images/, labels/, classes.txt in train/ and val/)")
    args = p.parse_args(argv)
    if args.cmd == "example":
        write_example(run.out_dir(args.out, "example OUT"))
        print(f"wrote an example folder dataset to {args.out}: 120 train + 40 val pairs, 64x64, "
              f"{len(TOY_TARGET)} classes (classes.txt)")
        return
    if not 16 <= args.size <= 512:
        raise DataError(f"--size {args.size}: expected 16..512")
    lt = args.task == "toy-lt"
    out = run.out_dir(args.out or (TOY_LT_ROOT if lt else TOY_ROOT))
    (write_toy_longtail if lt else write_toy)(out, args.size, args.seed)
    splits = TOY_LT_SPLITS if lt else TOY_SPLITS
    print(f"wrote the {args.task} task to {out}: source {splits['source']}, target {splits['target']}, {args.size}px")


if __name__ == "__main__":
    cli(main)
