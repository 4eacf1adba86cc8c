"""Bad input never passes silently, never ends in a traceback: every case below is refused with ONE line that
names the offending file or flag.

A few cases per script run through the real command line (subprocess: exit code, no "Traceback", at most two
lines of stderr); the rest call the script's main(argv) in-process and expect one DataError line, which the
subprocess cases show the entry point prints as is. The last tests kill finetune_oasis.py with SIGKILL after its
first checkpoint and resume it: the log must hold every step once."""
import argparse
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import estimate_affinity
import evaluate
import finetune_oasis
import finetune_piti
import pretrain_piti
import toy
import models.run  # the run toolkit (`run` names a helper below)
from models import DataError, cli

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--channels", "4", "--z-dim", "8", "--spade-hidden", "8", "--d-channels", "3,8,8,16,16,16,16",
        "--d-last", "8", "--batch", "2", "--bn-batches", "2", "--grid-n", "2", "--device", "cpu"]
UNWRITABLE = "/sys/cat_bad_input_test"  # sysfs refuses new folders, even to root


def make_ds(root, n=4, size=(64, 64), label_size=None, classes="sky\ngrass\n", value=None, label_mode="L",
            image_ext=".png"):
    """A folder dataset: n images (W, H) = size, labels of values 0..2 (or `value`) in `label_mode`."""
    root = Path(root)
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if classes is not None:
        (root / "classes.txt").write_bytes(classes if isinstance(classes, bytes) else classes.encode())
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / "images" / f"{i}{image_ext}")
        w, h = label_size or size
        lab = np.full((h, w), i % 3 if value is None else value, np.uint8)
        lab[: h // 2] = 1
        im = Image.fromarray(lab)
        if label_mode == "RGB":  # a colour-coded label: what an annotation tool's preview looks like
            im = Image.fromarray(np.stack([lab * 115, lab * 30, lab * 200], -1).astype(np.uint8))
        im.save(root / "labels" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def W(tmp_path_factory):
    """The bad inputs, made once: datasets, torch files, affinities, mapping files, a good tiny checkpoint."""
    w = tmp_path_factory.mktemp("bad")
    ns = argparse.Namespace(root=w)
    ns.ok = make_ds(w / "ok")
    ns.bom = make_ds(w / "bom", classes=b"\xef\xbb\xbfsky\ngrass\n")
    ns.dup = make_ds(w / "dup", classes="sky\ngrass\nSky\n")
    ns.blank = make_ds(w / "blank", classes="sky\n\ngrass\n")
    ns.latin1 = make_ds(w / "latin1", classes="sky\ngr\xe4ss\n".encode("latin-1"))
    ns.empty_classes = make_ds(w / "empty_classes", classes="\n\n")
    ns.no_classes = make_ds(w / "no_classes", classes=None)
    ns.rgb = make_ds(w / "rgb", label_mode="RGB")
    ns.size = make_ds(w / "size", label_size=(64, 48))
    ns.range = make_ds(w / "range", value=5)
    ns.jpgpng = make_ds(w / "jpgpng")
    Image.new("RGB", (64, 64)).save(ns.jpgpng / "images" / "0.jpg")
    ns.unpaired_img = make_ds(w / "unpaired_img")
    Image.new("RGB", (64, 64)).save(ns.unpaired_img / "images" / "extra.png")
    ns.unpaired_lbl = make_ds(w / "unpaired_lbl")
    Image.new("L", (64, 64)).save(ns.unpaired_lbl / "labels" / "extra.png")
    ns.corrupt = make_ds(w / "corrupt")
    (ns.corrupt / "images" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    ns.no_images = make_ds(w / "no_images", n=0)
    ns.three = make_ds(w / "three", classes="sky\ngrass\nsea\n")
    # torch files
    torch.save({"a": torch.zeros(1000)}, w / "good.pt")
    whole = (w / "good.pt").read_bytes()
    (w / "trunc.pt").write_bytes(whole[: len(whole) // 2])
    (w / "empty.pt").write_bytes(b"")
    (w / "text.pt").write_text("this is not a torch file\n")
    torch.save({"args": argparse.Namespace(x=1)}, w / "pickled.pt")
    torch.save({"kind": "piti-cat", "format": 2, "args": {}}, w / "piti_kind.pt")
    # affinities (target: sky, grass; source: three classes)
    np.save(w / "aff_shape.npy", np.full((4, 4), 1 / 4, np.float32))
    np.save(w / "aff_rows.npy", np.full((2, 3), 0.5, np.float32))
    (w / "aff.txt").write_text("0.5 0.5\n")
    np.save(w / "aff_object.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    # mapping files
    (w / "map_noarrow.txt").write_text("sky = sky\n")
    (w / "map_unknown.txt").write_text("sky -> unicorn\n")
    (w / "map_weight.txt").write_text("sky -> sky: lots\n")
    (w / "map_partial.txt").write_text("sky -> sky\n")
    (w / "a_file").write_text("")
    (w / "nonempty").mkdir()
    (w / "nonempty" / "notes.txt").write_text("keep me")
    # two image folders (one PNG cut short) and a stand-in TorchScript feature net for folder mode
    ns.real, ns.fake = make_ds(w / "real", n=3).joinpath("images"), make_ds(w / "fake", n=3).joinpath("images")
    (ns.real / "1.png").write_bytes((ns.real / "1.png").read_bytes()[:300])
    with warnings.catch_warnings():  # torch.jit.script is deprecated, but TorchScript is the format we load
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())).save(str(w / "feat.pt"))
    # a good tiny OASIS checkpoint of the 2-class folder dataset (0 steps: the model as built)
    finetune_oasis.main(["--init", "scratch", "--data", "folder", "--data-root", str(ns.ok), "--size", "64",
                         "--out", str(w / "run"), "--stage1-steps", "0", "--stage2-steps", "0", *TINY])
    ns.ckpt = w / "run" / "checkpoint.pt"
    return ns


def run(script, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=300)


def refused(r, *words):
    """A real command line's refusal: non-zero exit, no traceback, at most 2 lines, the words named."""
    lines = [s for s in r.stderr.splitlines() if s.strip()]
    assert r.returncode != 0, r.stdout[-2000:]
    assert "Traceback" not in r.stderr and len(lines) <= 2, r.stderr[-3000:]
    for w in words:
        assert w in r.stderr, r.stderr


def one_line(fn, *words):
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def refused_row(row, ns):
    """A table row (main, args, words): main(args) raises one DataError line with every word; {names} in args and
    words are filled from the fixture namespace `ns`."""
    main, args, words = row
    one_line(lambda: main([a.format(**vars(ns)) for a in args]), *[w.format(**vars(ns)) for w in words])


# ---------------------------------------------------------------------------------------------- subprocess
# (script, args with {names} filled from the fixture, words the one line must contain)

SUBPROCESS = {
    "info-duplicate-class": ("data.py", ["info", "--data", "folder", "--data-root", "{dup}"],
                             ["classes.txt", "line 3 'Sky' repeats line 1"]),
    "info-rgb-label": ("data.py", ["info", "--data", "folder", "--data-root", "{rgb}"],
                       ["0.png", "is an RGB image; expected a single-channel PNG of class ids (mode L or P)"]),
    "info-size-mismatch": ("data.py", ["info", "--data", "folder", "--data-root", "{size}"],
                           ["0.png", "64x48", "64x64"]),
    "info-jpg-and-png": ("data.py", ["info", "--data", "folder", "--data-root", "{jpgpng}"], ["0.jpg", "0.png"]),
    "info-no-root": ("data.py", ["info", "--data", "folder"], ["--data-root"]),
    "estimate-no-dino": ("estimate_affinity.py", ["--source", "coco", "--target", "ade20k", "--method",
                                                  "self-supervised", "--out", "{root}/e1"], ["--dino-weights"]),
    "estimate-out-is-file": ("estimate_affinity.py", ["--source", "coco", "--target", "ade20k", "--method", "random",
                                                      "--out", "{root}/a_file"], ["--out", "a_file", "is a file"]),
    "estimate-out-unwritable": ("estimate_affinity.py", ["--source", "coco", "--target", "ade20k", "--method",
                                                         "random", "--out", UNWRITABLE], ["--out", "cannot write"]),
    "finetune-bad-int-list": ("finetune_oasis.py", ["--out", "{root}/f1", "--init", "scratch", "--d-channels",
                                                    "3,16,abc"], ["--d-channels", "3,16,abc"]),
    "finetune-resume-truncated": ("finetune_oasis.py", ["--out", "{root}/trunc_run", "--resume"],
                                  ["--resume", "checkpoint.pt", "truncated"]),
    "finetune-out-is-file": ("finetune_oasis.py", ["--init", "scratch", "--data", "folder", "--data-root", "{ok}",
                                                   "--size", "64", "--out", "{root}/a_file", *TINY],
                             ["--out", "a_file", "is a file"]),
    "finetune-rgb-label": ("finetune_oasis.py", ["--init", "scratch", "--data", "folder", "--data-root", "{rgb}",
                                                 "--size", "64", "--out", "{root}/f2", *TINY], ["0.png", "RGB"]),
    "piti-resume-truncated": ("finetune_piti.py", ["--out", "{root}/trunc_run", "--resume"],
                              ["--resume", "checkpoint.pt", "truncated"]),
    "evaluate-truncated-ckpt": ("evaluate.py", ["--ckpt", "{root}/trunc.pt", "--data", "folder", "--data-root",
                                                "{ok}", "--size", "64", "--out", "{root}/v1"],
                                ["--ckpt", "trunc.pt", "truncated"]),
    "evaluate-out-unwritable": ("evaluate.py", ["--real-dir", "{ok}/images", "--fake-dir", "{ok}/images",
                                                "--out", UNWRITABLE], ["--out", "cannot write"]),
    "evaluate-label-in-worker": ("evaluate.py", ["--ckpt", "{ckpt}", "--data", "folder", "--data-root", "{range}",
                                                 "--size", "64", "--no-fid", "--workers", "1", "--out", "{root}/v2"],
                                 ["0.png", "label value 5 outside 0..2"]),
    "evaluate-truncated-image-in-worker": ("evaluate.py", ["--real-dir", "{real}", "--fake-dir", "{fake}", "--fid-features",
                                                           "{root}/feat.pt", "--workers", "1", "--out", "{root}/v3"],
                                           ["1.png", "unreadable image", "truncated"]),
    "evaluate-missing-flag-value": ("evaluate.py", ["--out"], ["--out", "expected one argument"]),
}


@pytest.mark.parametrize("case", sorted(SUBPROCESS))
def test_command_line_refuses_in_one_line(W, case):
    script, args, words = SUBPROCESS[case]
    if "resume-truncated" in case:
        (W.root / "trunc_run").mkdir(exist_ok=True)
        (W.root / "trunc_run" / "checkpoint.pt").write_bytes((W.root / "trunc.pt").read_bytes())
    refused(run(script, *[a.format(**vars(W)) for a in args]), *words)


# ---------------------------------------------------------------------------------------------- in-process
# (main, args, words): main(args) must raise one DataError line containing the words

INFO = ["info", "--data", "folder", "--data-root"]
EST = ["--source", "coco", "--target", "ade20k", "--out", "{root}/est"]
# a short run, should a case ever pass its checks
SCRATCH = ["--init", "scratch", "--data", "folder", "--size", "64", "--stage1-steps", "0", "--stage2-steps", "1", *TINY,
           "--data-root"]
CAT = ["--source", "folder", "--source-root", "{three}", "--source-ckpt", "{ckpt}", "--data", "folder",
       "--data-root", "{ok}", "--size", "64", "--stage1-steps", "0", "--stage2-steps", "1", *TINY, "--out", "{root}/cat"]
PITI = ["--data", "folder", "--data-root", "{ok}", "--size", "64", "--steps", "0", "--base", "b.pt", "--upsampler",
        "u.pt", "--affinity", "a.npy", "--out", "{root}/p"]
PRE = ["--data", "folder", "--data-root", "{ok}", "--size", "64", "--steps", "0", "--glide-ckpt", "g.pt", "--out",
       "{root}/pre"]
EVAL = ["--ckpt", "{ckpt}", "--data", "folder", "--data-root", "{ok}", "--size", "64", "--no-fid", "--out", "{root}/ev"]

IN_PROCESS = {
    # data.py info: datasets, classes.txt, labels, flags; toy.py write / example
    "info-label-range": (data.main, INFO + ["{range}"], ["0.png", "label value 5 outside 0..2"]),
    "info-empty-classes": (data.main, INFO + ["{empty_classes}"], ["classes.txt", "empty"]),
    "info-missing-classes": (data.main, INFO + ["{no_classes}"], ["classes.txt", "missing"]),
    "info-blank-class-line": (data.main, INFO + ["{blank}"], ["classes.txt", "line 2 is empty"]),
    "info-classes-not-utf8": (data.main, INFO + ["{latin1}"], ["classes.txt", "not UTF-8"]),
    "info-unpaired-image": (data.main, INFO + ["{unpaired_img}"], ["images", "without a label", "extra"]),
    "info-unpaired-label": (data.main, INFO + ["{unpaired_lbl}"], ["labels", "without an image", "extra"]),
    "info-corrupt-image": (data.main, INFO + ["{corrupt}"], ["1.png", "unreadable image"]),
    "info-no-images": (data.main, INFO + ["{no_images}"], ["images", "no images"]),
    "info-no-such-root": (data.main, INFO + ["{root}/nowhere"], ["nowhere", "no such folder"]),
    "info-size-not-positive": (data.main, INFO + ["{ok}", "--size", "0"], ["--size", "'0'", ">= 1"]),
    "info-size-not-int": (data.main, INFO + ["{ok}", "--size", "abc"], ["--size", "abc"]),
    "info-unknown-dataset": (data.main, ["info", "--data", "imagenet"], ["--data", "imagenet"]),
    "info-n-zero": (data.main, INFO + ["{ok}", "--n", "0"], ["--n", "'0'", ">= 1"]),
    "info-n-too-large": (data.main, INFO + ["{ok}", "--n", "100"], ["--n 100", "4"]),
    "info-subset-file-missing": (data.main, INFO + ["{ok}", "--subset-file", "{root}/nope.txt"],
                                 ["--subset-file", "nope.txt", "not found"]),
    "info-subset-file-unknown": (data.main, INFO + ["{ok}", "--subset-file", "{root}/map_partial.txt"],
                                 ["--subset-file", "map_partial.txt", "not in"]),
    "info-bad-split": (data.main, INFO + ["{ok}", "--split", "test"], ["--split", "test"]),
    "info-no-command": (data.main, [], ["required", "{{info}}"]),
    "toy-no-command": (toy.main, [], ["required", "{{write,example}}"]),
    "toy-size-too-small": (toy.main, ["write", "--size", "8", "--out", "{root}/toy"], ["--size 8"]),
    "toy-out-is-file": (toy.main, ["write", "--out", "{root}/a_file"], ["--out", "a_file", "is a file"]),
    "example-out-in-file": (toy.main, ["example", "{root}/a_file/x"], ["a_file", "cannot write"]),
    "info-ade20k-layout": (data.main, ["info", "--data", "ade20k", "--data-root", "{ok}"], ["training", "no such folder"]),
    "info-cityscapes-layout": (data.main, ["info", "--data", "cityscapes", "--data-root", "{ok}"], ["leftImg8bit"]),
    # estimate_affinity.py
    "est-unknown-source": (estimate_affinity.main, ["--source", "imagenet", "--target", "ade20k", "--out", "{root}/e"],
                           ["--source imagenet"]),
    "est-missing-source": (estimate_affinity.main, ["--target", "ade20k", "--out", "{root}/e"], ["--source", "required"]),
    "est-temperature": (estimate_affinity.main, EST + ["--temperature", "0"], ["--temperature", "'0'", "> 0"]),
    "est-batch-size": (estimate_affinity.main, EST + ["--batch", "0"], ["--batch", "'0'", ">= 1"]),
    "est-weights-number": (estimate_affinity.main, EST + ["--weights", "text=abc"], ["--weights", "abc"]),
    "est-weights-method": (estimate_affinity.main, EST + ["--weights", "colour=1"], ["--weights", "colour"]),
    "est-weights-none-left": (estimate_affinity.main, EST + ["--weights", "text=0"], ["--weights", "no method left"]),
    "est-hand-missing-flag": (estimate_affinity.main, EST + ["--method", "hand"], ["--hand"]),
    "est-hand-missing-file": (estimate_affinity.main, EST + ["--method", "hand", "--hand", "{root}/nope.txt"],
                              ["nope.txt", "not found"]),
    "est-hand-no-arrow": (estimate_affinity.main, EST + ["--method", "hand", "--hand", "{root}/map_noarrow.txt"],
                          ["map_noarrow.txt:1", "target -> source"]),
    "est-hand-unknown-class": (estimate_affinity.main, EST + ["--method", "hand", "--hand", "{root}/map_unknown.txt"],
                               ["map_unknown.txt:1", "unicorn"]),
    "est-override-weight": (estimate_affinity.main, EST + ["--method", "random", "--override", "{root}/map_weight.txt"],
                            ["map_weight.txt:1", "lots"]),
    "est-dino-truncated": (estimate_affinity.main, EST + ["--method", "self-supervised", "--source-root", "{ok}",
                                                          "--dino-weights",
                                                          "{root}/trunc.pt"], ["--dino-weights", "truncated"]),
    "est-dino-empty": (estimate_affinity.main, EST + ["--method", "self-supervised", "--source-root", "{ok}",
                                                          "--dino-weights",
                                                      "{root}/empty.pt"], ["--dino-weights", "empty"]),
    "est-dino-not-dino": (estimate_affinity.main, EST + ["--method", "self-supervised", "--source-root", "{ok}",
                                                          "--dino-weights",
                                                         "{root}/good.pt"], ["--dino-weights", "not a DINO"]),
    "est-supervised-nothing": (estimate_affinity.main, ["--source", "{three}", "--target", "{ok}", "--out", "{root}/e",
                                                        "--method", "supervised"], ["--source-ckpt"]),
    "est-segmenter-missing": (estimate_affinity.main, EST + ["--method", "supervised", "--segmenter",
                                                             "{root}/nope.pt"], ["--segmenter", "nope.pt", "not found"]),
    "est-segmenter-not-script": (estimate_affinity.main, EST + ["--method", "supervised", "--segmenter",
                                                                "{root}/good.pt"], ["--segmenter", "TorchScript"]),
    "est-source-ckpt-truncated": (estimate_affinity.main, EST + ["--method", "supervised", "--source-ckpt",
                                                                 "{root}/trunc.pt"], ["--source-ckpt", "truncated"]),
    "est-source-ckpt-pickled": (estimate_affinity.main, EST + ["--method", "supervised", "--source-ckpt",
                                                               "{root}/pickled.pt"], ["--source-ckpt", "pickled"]),
    "est-target-duplicate-classes": (estimate_affinity.main, ["--source", "coco", "--target", "{dup}", "--method",
                                                              "random", "--out", "{root}/e"], ["classes.txt", "repeats"]),
    # finetune_oasis.py
    "ft-resume-nothing": (finetune_oasis.main, ["--out", "{root}/nothing", "--resume"], ["--resume", "checkpoint.pt", "file not found"]),
    "ft-resume-pickled": (finetune_oasis.main, ["--out", "{root}/pickled_run", "--resume"], ["--resume", "pickled"]),
    "ft-resume-wrong-kind": (finetune_oasis.main, ["--out", "{root}/piti_run", "--resume"], ["--resume", "piti-cat"]),
    "ft-resume-changed-flag": (finetune_oasis.main, ["--out", "{root}/run", "--resume", "--channels", "8"],
                               ["--channels", "cannot change"]),
    "ft-out-not-empty": (finetune_oasis.main, SCRATCH + ["{ok}", "--out", "{root}/nonempty"], ["--out", "not empty"]),
    "ft-source-missing": (finetune_oasis.main, ["--out", "{root}/f"], ["--source"]),
    "ft-scratch-with-affinity": (finetune_oasis.main, SCRATCH + ["{ok}", "--out", "{root}/f", "--affinity", "a.npy"],
                                 ["--affinity", "does not apply"]),
    "ft-batch-zero": (finetune_oasis.main, SCRATCH + ["{ok}", "--out", "{root}/f", "--batch", "0"], ["--batch", "0", "1"]),
    "ft-negative-steps": (finetune_oasis.main, SCRATCH + ["{ok}", "--out", "{root}/f", "--stage2-steps", "-1"],
                          ["--stage2-steps", "-1", "0"]),
    "ft-negative-lr": (finetune_oasis.main, SCRATCH + ["{ok}", "--out", "{root}/f", "--lr", "-1"], ["--lr"]),
    "ft-ema-decay": (finetune_oasis.main, SCRATCH + ["{ok}", "--out", "{root}/f", "--ema-decay", "1.5"],
                     ["--ema-decay", "'1.5'", "[0, 1)"]),
    "ft-workers-not-int": (finetune_oasis.main, SCRATCH + ["{ok}", "--out", "{root}/f", "--workers", "two"],
                           ["--workers", "two"]),
    "ft-size-mismatch": (finetune_oasis.main, SCRATCH + ["{size}", "--out", "{root}/f1"], ["0.png", "64x48", "64x64"]),
    "ft-duplicate-classes": (finetune_oasis.main, SCRATCH + ["{dup}", "--out", "{root}/f2"], ["classes.txt", "repeats"]),
    "ft-size-not-64": (finetune_oasis.main, SCRATCH + ["{ok}", "--out", "{root}/f3", "--size", "96"], ["96x96", "64"]),
    "ft-source-ckpt-missing": (finetune_oasis.main, CAT[:5] + ["{root}/nope.pt"] + CAT[6:] + ["--affinity", "x.npy"],
                               ["--source-ckpt", "nope.pt"]),
    "ft-source-ckpt-truncated": (finetune_oasis.main, CAT[:5] + ["{root}/trunc.pt"] + CAT[6:] + ["--affinity", "x.npy"],
                                 ["--source-ckpt", "truncated"]),
    "ft-source-other-classes": (finetune_oasis.main, CAT + ["--affinity", "{root}/aff_rows.npy"],
                                ["--source-ckpt", "checkpoint.pt", "folder (3 label channels)", "expects 4"]),
    "ft-affinity-missing": (finetune_oasis.main, CAT[:3] + ["{ok}"] + CAT[4:] + ["--affinity", "{root}/nope.npy"],
                            ["--affinity", "nope.npy", "not found"]),
    "ft-affinity-shape": (finetune_oasis.main, CAT[:3] + ["{ok}"] + CAT[4:] + ["--affinity", "{root}/aff_shape.npy"],
                          ["--affinity", "aff_shape.npy", "(4, 4)", "(2, 2)"]),
    "ft-affinity-text": (finetune_oasis.main, CAT[:3] + ["{ok}"] + CAT[4:] + ["--affinity", "{root}/aff.txt"],
                         ["--affinity", "aff.txt", "not a .npy file"]),
    "ft-affinity-pickled": (finetune_oasis.main, CAT[:3] + ["{ok}"] + CAT[4:] + ["--affinity", "{root}/aff_object.npy"],
                            ["--affinity", "aff_object.npy", "Python objects"]),
    # evaluate.py
    "ev-real-without-fake": (evaluate.main, ["--real-dir", "{ok}/images", "--out", "{root}/ev"], ["--fake-dir"]),
    "ev-nothing": (evaluate.main, ["--out", "{root}/ev"], ["--ckpt", "--real-dir"]),
    "ev-real-dir-missing": (evaluate.main, ["--real-dir", "{root}/nope", "--fake-dir", "{ok}/images", "--out",
                                            "{root}/ev"], ["--real-dir", "nope"]),
    "ev-ckpt-missing": (evaluate.main, ["--ckpt", "{root}/nope.pt"] + EVAL[2:], ["--ckpt", "nope.pt", "not found"]),
    "ev-ckpt-pickled": (evaluate.main, ["--ckpt", "{root}/pickled.pt"] + EVAL[2:], ["--ckpt", "pickled"]),
    "ev-ckpt-empty": (evaluate.main, ["--ckpt", "{root}/empty.pt"] + EVAL[2:], ["--ckpt", "empty.pt", "empty"]),
    "ev-ckpt-text": (evaluate.main, ["--ckpt", "{root}/text.pt"] + EVAL[2:], ["--ckpt", "text.pt", "not a torch file"]),
    "ev-samples-per-map": (evaluate.main, EVAL + ["--samples-per-map", "0"], ["--samples-per-map", "'0'", ">= 1"]),
    "ev-n-on-val": (evaluate.main, EVAL + ["--n", "2"], ["--n 2", "--limit"]),
    "ev-bad-split": (evaluate.main, EVAL + ["--split", "test"], ["--split", "test"]),
    "ev-other-classes": (evaluate.main, EVAL[:5] + ["{three}"] + EVAL[6:], ["--ckpt", "--data folder has 3 classes", "2", "'sea'"]),
    "ev-affinity-without-source": (evaluate.main, EVAL + ["--affinity", "{root}/aff_rows.npy"], ["--ckpt"]),
    "ev-segmenter-without-weights": (evaluate.main, EVAL + ["--segmenter", "deeplabv2"],
                                     ["--segmenter deeplabv2", "--segmenter-weights"]),
    "ev-out-is-file": (evaluate.main, EVAL[:-1] + ["{root}/a_file"], ["--out", "a_file", "is a file"]),
    "ev-size-mismatch": (evaluate.main, EVAL[:5] + ["{size}"] + EVAL[6:] + ["--workers", "0"],
                         ["0.png", "64x48", "64x64"]),
    "ev-inception-truncated": (evaluate.main, [a for a in EVAL if a != "--no-fid"] + ["--inception", "{root}/trunc.pt"],
                               ["--inception", "truncated"]),
    "ev-inception-and-no-fid": (evaluate.main, EVAL + ["--inception", "{root}/trunc.pt"], ["--no-fid", "--inception"]),
    # finetune_piti.py (fails before any model is built)
    "piti-base-config-json": (finetune_piti.main, PITI + ["--base-config", "{{bad"], ["--base-config", "not JSON"]),
    "piti-base-missing": (finetune_piti.main, ["--out", "{root}/p", "--upsampler", "u.pt", "--affinity", "none"],
                          ["--base", "required"]),
    "piti-base-truncated": (finetune_piti.main, PITI[:8] + ["--out", "{root}/p", "--base", "{root}/trunc.pt", "--upsampler", "{root}/trunc.pt",
                                                            "--affinity", "none"], ["trunc.pt", "truncated"]),
    "piti-base-not-found": (finetune_piti.main, PITI[:8] + ["--out", "{root}/p", "--base", "{root}/nope.pt", "--upsampler", "{root}/trunc.pt",
                                                            "--affinity", "none"], ["nope.pt", "not found"]),
    "piti-batch-zero": (finetune_piti.main, PITI + ["--batch", "0"], ["--batch", "'0'", ">= 1"]),
    "piti-eval-every-zero": (finetune_piti.main, PITI + ["--eval-every", "0"], ["--eval-every", "'0'", ">= 1"]),
    "piti-steps-not-int": (finetune_piti.main, PITI + ["--steps", "many"], ["--steps", "many"]),
    "piti-unknown-source": (finetune_piti.main, PITI + ["--source", "imagenet"], ["--source", "imagenet"]),
    "piti-init-glide-moved": (finetune_piti.main, PITI + ["--init", "glide"], ["unrecognized arguments: --init"]),
    # pretrain_piti.py (fails before any model is built)
    "pretrain-without-glide-ckpt": (pretrain_piti.main, ["--out", "{root}/p", "--data", "folder", "--data-root", "{ok}"],
                                    ["--glide-ckpt", "--glide-up-ckpt"]),
    "pretrain-fixdec": (pretrain_piti.main, PRE + ["--train", "fixdec"], ["--train", "invalid choice: 'fixdec'"]),
    "pretrain-resume-cat-run": (pretrain_piti.main, ["--out", "{root}/piti_run", "--resume"],
                                ["a CAT run", "finetune_piti.py --out", "--resume"]),
    "piti-resume-truncated": (finetune_piti.main, ["--out", "{root}/trunc_piti", "--resume"], ["--resume", "truncated"]),
    "piti-resume-wrong-kind": (finetune_piti.main, ["--out", "{root}/run", "--resume"], ["--resume", "piti-cat"]),
    "piti-out-is-file": (finetune_piti.main, PITI[:-2] + ["--out", "{root}/a_file"], ["--out", "a_file", "is a file"]),
    "piti-out-not-empty": (finetune_piti.main, PITI[:-2] + ["--out", "{root}/nonempty"], ["--out", "not empty"]),
    "piti-affinity-shape": (finetune_piti.main, PITI[:8] + ["--out", "{root}/p", "--base", "{root}/trunc.pt", "--upsampler", "{root}/trunc.pt",
                                                            "--affinity", "{root}/aff_shape.npy"],
                            ["--affinity", "aff_shape.npy", "(4, 4)"]),
    "piti-duplicate-classes": (finetune_piti.main, PITI[:3] + ["{dup}"] + PITI[4:], ["classes.txt", "repeats"]),
}


@pytest.mark.parametrize("case", sorted(IN_PROCESS))
def test_main_refuses_in_one_line(W, case):
    for name, src in (("pickled_run", "pickled.pt"), ("piti_run", "piti_kind.pt"), ("trunc_piti", "trunc.pt")):
        (W.root / name).mkdir(exist_ok=True)
        (W.root / name / "checkpoint.pt").write_bytes((W.root / src).read_bytes())
    refused_row(IN_PROCESS[case], W)


# ---------------------------------------------------------------------------------------------- round 2
# The second round of cases a new user tried (issue 22), one block per script, each with its own test.
# Rows are (main, args, words) as in IN_PROCESS unless the block says otherwise.

# finetune_piti.py, round 2
PITI2 = {
    "piti-steps-negative": (finetune_piti.main, PITI + ["--steps", "-1"], ["--steps", "'-1'", ">= 0"]),
    "piti-ema-decay": (finetune_piti.main, PITI + ["--ema-decay", "2"], ["--ema-decay", "'2'", "[0, 1)"]),
    "piti-guidance-nan": (finetune_piti.main, PITI + ["--guidance", "nan"], ["--guidance", "'nan'", "finite"]),
    "piti-guidance-negative": (finetune_piti.main, PITI + ["--guidance", "-1"], ["--guidance >= 0", "got -1"]),
    "piti-lr-negative": (finetune_piti.main, PITI + ["--lr", "-1"], ["--lr", "'-1'", "> 0"]),
    "piti-lr-nan": (finetune_piti.main, PITI + ["--lr", "nan"], ["--lr", "'nan'", "finite"]),
    "piti-uncond-p": (finetune_piti.main, PITI + ["--uncond-p", "2"], ["--uncond-p", "'2'", "[0, 1]"]),
    "piti-grid-n-negative": (finetune_piti.main, PITI + ["--grid-n", "-1"], ["--grid-n", "'-1'", ">= 1"]),
    "piti-log-every-zero": (finetune_piti.main, PITI + ["--log-every", "0"], ["--log-every", "'0'", ">= 1"]),
    "piti-patience-zero": (finetune_piti.main, PITI + ["--patience", "0"], ["--patience", "'0'", ">= 1"]),
    "piti-fid-n-negative": (finetune_piti.main, PITI + ["--fid-n", "-3"], ["--fid-n", "'-3'", ">= 1"]),
    "piti-sample-steps-word": (finetune_piti.main, PITI + ["--sample-steps", "abc"],
                               ["--sample-steps 'abc'", "'ddimN'", "'fast27'"]),
    "piti-sample-steps-zero": (finetune_piti.main, PITI + ["--sample-steps", "0"], ["--sample-steps '0'", "step count"]),
    "piti-sample-steps-too-many": (finetune_piti.main, PITI + ["--sample-steps", "2000"],
                                   ["--sample-steps", "2000", "1000"]),
    "piti-up-steps-ddim": (finetune_piti.main, PITI + ["--up-steps", "ddimx"], ["--up-steps 'ddimx'", "'ddimN'"]),
    "piti-base-config-unknown-key": (finetune_piti.main, PITI + ["--base-config", '{{"widht": 8, "prompts": 2}}'],
                                     ["--base-config", "unknown key(s) prompts, widht", "known: image_size",
                                      "transformer_proj_in"]),
    "piti-up-config-not-object": (finetune_piti.main, PITI + ["--up-config", "[1, 2]"],
                                  ["--up-config [1, 2]", "JSON array", "expected an object"]),
}


@pytest.mark.parametrize("case", sorted(PITI2))
def test_piti_round2(W, case):
    refused_row(PITI2[case], W)


# estimate_affinity.py, round 2 (an empty torch hub cache and no network: nothing is downloaded)
EST_F = ["--source", "{three}", "--target", "{ok}", "--text-encoder", "minilm"]  # folder -> folder, MiniLM offline
EST2 = {
    "est2-temperature-nan": (estimate_affinity.main, EST + ["--temperature", "nan"], ["--temperature", "nan", "finite"]),
    "est2-temperature-inf": (estimate_affinity.main, EST + ["--temperature", "inf"], ["--temperature", "inf", "finite"]),
    "est2-weights-inf": (estimate_affinity.main, EST + ["--weights", "text=1e400"], ["--weights", "1e400", "finite"]),
    "est2-weights-negative": (estimate_affinity.main, EST + ["--weights", "text=-1"], ["--weights", "-1", ">= 0"]),
    "est2-weights-overflow": (estimate_affinity.main, EST + ["--weights", "text=1e308,supervised=1e308"],
                              ["--weights", "1e308", "sum"]),
    "est2-scores-overflow": (estimate_affinity.main, EST_F + ["--method", "text", "--temperature", "1e-310", "--out",
                                                              "{root}/e2"], ["--temperature 1e-310", "not finite"]),
    "est2-out-in-target": (estimate_affinity.main, EST_F + ["--method", "random", "--out", "{ok}/aff"],
                           ["--out", "{ok}/aff", "inside the dataset folder", "{ok}"]),
    "est2-out-in-data-root": (estimate_affinity.main, ["--source", "{three}", "--target", "{three}", "--data-root", "{ok}",
                                                       "--method", "random", "--out", "{ok}"],
                              ["--out", "inside the dataset folder --data-root {ok}"]),
    "est2-d-size": (estimate_affinity.main, EST_F[:1] + ["{ok}"] + EST_F[2:] + ["--method", "supervised", "--source-ckpt",
                                                                               "{ckpt}", "--out", "{root}/e3"],
                    ["--source-ckpt", "64x64", "256x256", "--size"]),
    "est2-d-size-not-64": (estimate_affinity.main, EST_F[:1] + ["{ok}"] + EST_F[2:] + [
        "--method", "supervised", "--source-ckpt", "{ckpt}", "--size", "96", "--out", "{root}/e3"],
                           ["--size 96", "96x96", "multiples of 64"]),
    "est2-override-duplicate": (estimate_affinity.main, EST_F + ["--method", "random", "--override",
                                                                 "{root}/est2_dup.txt", "--out", "{root}/e4"],
                                ["est2_dup.txt:3", "'Sky'", "line 1"]),
    "est2-hand-duplicate": (estimate_affinity.main, EST_F + ["--method", "hand", "--hand", "{root}/est2_dup.txt",
                                                             "--out", "{root}/e4"], ["est2_dup.txt:3", "line 1"]),
    "est2-combination-no-dino": (estimate_affinity.main, EST, ["--method combination", "self-supervised needs",
                                                               "--dino-weights NAME|FILE", "--source-root",
                                                               "--weights text=1,supervised=1"]),
    "est2-combination-nothing-but-text": (estimate_affinity.main, EST_F + ["--out", "{root}/e5"],
                                          ["supervised needs --source-ckpt", "--segmenter FILE", "--dino-weights",
                                           "--weights text=1"]),
    "est2-subset-still-needs-its-input": (estimate_affinity.main, EST_F + ["--weights", "text=1,supervised=1", "--out",
                                                                           "{root}/e5"], ["supervised needs", "--weights text=1"]),
    "est2-default-segmenter-by-name": (estimate_affinity.main, EST + ["--method", "supervised"],
                                       ["--source coco", "deeplabv2", "--segmenter-weights",
                                        "deeplabv2_resnet101_msc-cocostuff164k-100000.pth", "--source-ckpt"]),
    "est2-default-segmenter-said-first": (estimate_affinity.main, EST + ["--text-encoder", "minilm", "--weights",
                                                                         "text=1,supervised=1"],
                                          ["--weights text=1,supervised=1", "default segmenter for --source coco",
                                           "deeplabv2_resnet101_msc-cocostuff164k-100000.pth", "--weights text=1"]),
    "est2-minilm-and-clip": (estimate_affinity.main, EST + ["--text-encoder", "minilm", "--clip-weights", "c.pt"],
                             ["--clip-weights c.pt", "--text-encoder minilm"]),
}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty torch hub cache; any download attempt fails."""
    def no_network(*args, **kwargs):
        raise OSError("no network in tests")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.delenv("CAT_WEIGHTS_MIRROR", raising=False)
    monkeypatch.setattr("socket.getaddrinfo", no_network)
    monkeypatch.setattr("urllib.request.urlopen", no_network)


@pytest.mark.parametrize("case", sorted(EST2))
def test_estimate_round2(W, offline, case):
    (W.root / "est2_dup.txt").write_text("sky -> sky\ngrass -> grass\nSky -> grass\n")
    refused_row(EST2[case], W)
    assert not (W.ok / "aff").exists()


@pytest.mark.parametrize("dtype", ["complex64", "bool", "<U3"])
def test_load_affinity_refuses_non_real_arrays(W, dtype):
    path = W.root / f"est2_aff_{dtype.strip('<')}.npy"
    np.save(path, np.ones((2, 3), dtype))
    table = data.class_table("folder", W.ok), data.class_table("folder", W.three)
    one_line(lambda: data.load_affinity(path, *table), "--affinity", path.name, str(np.dtype(dtype)), "real float")


def test_estimate_full_disk_leaves_no_affinity(W, offline, monkeypatch):
    """A write that fails (ENOSPC) on the last output, affinity.npy: none of the outputs stays, no temporary."""
    out = W.root / "est2_full"
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(np, "save", full)
    one_line(lambda: estimate_affinity.main(["--source", str(W.three), "--target", str(W.ok), "--method", "random",
                                             "--out", str(out)]), "--out", "affinity.npy", "No space left on device")
    assert sorted(os.listdir(out)) == []


# evaluate.py and data.py, round 2 ({names} also from the fixture E below)
EVAL_FID = [a for a in EVAL if a != "--no-fid"] + ["--fid-features", "{root}/feat.pt"]
EVAL2 = {
    "ev-piti-steps-oasis": (evaluate.main, EVAL + ["--sample-steps", "ddim50"],
                            ["--sample-steps applies to PITI checkpoints"]),
    "ev-piti-up-steps-oasis": (evaluate.main, EVAL + ["--up-steps", "fast27"], ["--up-steps", "PITI"]),
    "ev-piti-steps-ddimabc": (evaluate.main, EVAL + ["--sample-steps", "ddimabc"],
                              ["--sample-steps 'ddimabc'", "100", "ddim50", "10,10,3,2,2", "fast27"]),
    "ev-piti-steps-abc": (evaluate.main, EVAL + ["--sample-steps", "abc"], ["--sample-steps 'abc'", "ddim50"]),
    "ev-piti-steps-too-many": (evaluate.main, EVAL + ["--sample-steps", "2000"],
                               ["--sample-steps '2000'", "cannot take 2000 steps from a section of 1000"]),
    "ev-piti-up-steps-zero": (evaluate.main, EVAL + ["--up-steps", "0"],
                              ["--up-steps '0'", "fast27"]),
    "ev-piti-steps-ddim300": (evaluate.main, EVAL + ["--sample-steps", "ddim300"],
                            ["--sample-steps 'ddim300'", "no integer stride gives 300 steps out of 1000", "ddim50"]),
    "ev-grid-n-negative": (evaluate.main, EVAL + ["--grid-n", "-1"], ["--grid-n", "'-1'", ">= 0"]),
    "ev-no-data": (evaluate.main, ["--ckpt", "{ckpt}", "--no-fid", "--out", "{root}/ev"],
                   ["model mode needs --data", "--data toy-target", "--labels"]),
    "ev-labels-with-data": (evaluate.main, EVAL + ["--labels", "{ok}/labels"], ["--data", "not used with --labels"]),
    "ev-labels-missing": (evaluate.main, ["--ckpt", "{ckpt}", "--labels", "{root}/nope", "--out", "{root}/ev"],
                          ["--labels", "nope", "no such folder"]),
    "ev-labels-classes-elsewhere": (evaluate.main, ["--ckpt", "{ckpt}", "--labels", "{ok}/labels", "--classes",
                                                    "{ok}/classes.csv", "--out", "{root}/ev"],
                                    ["--classes", "classes.csv", "expected a classes.txt file"]),
    "ev-out-is-data-root": (evaluate.main, EVAL[:-1] + ["{ok}"], ["--out", "is --data-root"]),
    "ev-out-inside-labels": (evaluate.main, ["--ckpt", "{ckpt}", "--labels", "{ok}/labels", "--out",
                                             "{ok}/labels/gen"], ["--out", "lies inside --labels"]),
    "ev-sample-steps-folder-mode": (evaluate.main, ["--real-dir", "{ok}/images", "--fake-dir", "{ok}/images",
                                                    "--sample-steps", "50", "--out", "{root}/ev"],
                                    ["--sample-steps", "not used in folder mode"]),
    "ev-stats-cache-is-file": (evaluate.main, EVAL_FID + ["--stats-cache", "{root}/a_file"],
                               ["--stats-cache", "a_file", "is a file, expected a folder"]),
    "ev-inception-folder": (evaluate.main, [a for a in EVAL if a != "--no-fid"] + ["--inception", "{root}"],
                            ["--inception", "is a folder, expected a file"]),
    "ev-fid-features-folder": (evaluate.main, EVAL_FID[:-1] + ["{root}"],
                               ["--fid-features", "is a folder, expected a file"]),
    "ev-segmenter-folder": (evaluate.main, EVAL + ["--segmenter", "{root}"],
                            ["--segmenter", "is a folder, expected a file"]),
    "ev-segmenter-weights-folder": (evaluate.main, EVAL + ["--segmenter", "deeplabv2", "--segmenter-weights", "{root}"],
                                    ["--segmenter-weights", "is a folder, expected a file"]),
    "ev-affinity-folder": (evaluate.main, EVAL + ["--source", "folder", "--source-root", "{ok}",
                                                  "--affinity", "{root}"],
                           ["--affinity", "is a folder, expected a file"]),
    "ev-ckpt-folder-resume": (finetune_oasis.main, ["--out", "{root}/dir_run", "--resume"],
                              ["--resume", "checkpoint.pt", "is a folder, expected a file"]),
    "est-override-folder": (estimate_affinity.main, EST + ["--method", "random", "--override", "{root}"],
                            ["{root}: is a folder, expected a file; expected a mapping file"]),
    "info-subset-file-folder": (data.main, INFO + ["{ok}", "--subset-file", "{root}"],
                                ["--subset-file", "is a folder, expected a file"]),
    "info-no-val-split": (data.main, INFO + ["{train_only}", "--split", "val"],
                          ["--data-root", "train_only", "has train/ but no val/"]),
    "info-no-train-split": (data.main, INFO + ["{val_only}"], ["--data-root", "val_only", "has val/ but no train/"]),
    "info-unpaired-says-extensions": (data.main, INFO + ["{unpaired_img}"],
                                      ["without a label", "images .jpg/.jpeg/.png, labels .png"]),
    "info-exif-size-mismatch": (data.main, INFO + ["{exif_bad}"],
                                ["0.png", "label is 64x48", "is 48x64", "image turned by its EXIF orientation 6"]),
}


@pytest.fixture(scope="module")
def E(W):
    """Round-2 datasets: split folders with one split missing, a flat one, 'background' first in classes.txt,
    JPEGs stored sideways with an EXIF orientation (6: turn 90 degrees clockwise) whose labels are upright
    (exif_ok) or stored as the pixels lie (exif_bad)."""
    ns = argparse.Namespace(**vars(W))
    ns.train_only = make_ds(W.root / "train_only" / "train", n=2).parent
    (ns.train_only / "classes.txt").write_text("sky\ngrass\n")
    ns.val_only = make_ds(W.root / "val_only" / "val", n=2).parent
    (ns.val_only / "classes.txt").write_text("sky\ngrass\n")
    ns.flat = make_ds(W.root / "flat", n=2)
    ns.background = make_ds(W.root / "background", n=2, classes="Background\nsky\n")
    for name, label_size in (("exif_ok", (48, 64)), ("exif_bad", (64, 48))):
        root = make_ds(W.root / name, n=2, size=label_size)
        exif = Image.Exif()
        exif[0x0112] = 6
        for i in range(2):
            (root / "images" / f"{i}.png").unlink()
            Image.new("RGB", (64, 48), (200, 0, 0)).save(root / "images" / f"{i}.jpg", exif=exif)
        setattr(ns, name, root)
    (W.root / "dir_run" / "checkpoint.pt").mkdir(parents=True, exist_ok=True)
    return ns


@pytest.mark.parametrize("case", sorted(EVAL2))
def test_evaluate_and_data_round2(E, case):
    refused_row(EVAL2[case], E)


def test_val_split_of_a_flat_folder_is_said_once(E, capsys):
    """A folder dataset without train/ and val/: its val split is the training images, said in one line, once."""
    for _ in range(2):
        assert len(data.open_dataset("folder", E.flat, "val")) == 2
    lines = [s for s in capsys.readouterr().out.splitlines() if "warning" in s]
    assert len(lines) == 1 and "has no train/ and val/ subfolders: the val split is the training images" in lines[0]
    data.open_dataset("folder", E.flat, "train")
    data.open_dataset("folder", E.train_only, "train")
    assert "warning" not in capsys.readouterr().out


def test_background_as_first_class_is_warned(E, capsys):
    data.main(INFO + [str(E.background)])
    lines = [s for s in capsys.readouterr().out.splitlines() if "warning" in s]
    assert len(lines) == 1
    assert "classes.txt: line 1 'Background' is read as class 1 (label value 1); value 0 is unlabelled" in lines[0]
    data.main(INFO + [str(E.ok)])
    assert "warning" not in capsys.readouterr().out


def test_exif_rotated_jpeg_is_read_upright(E):
    image, label = data.open_pair(*data.list_files("folder", E.exif_ok, "train")[0])
    assert image.size == label.size == (48, 64) and image.exif_turned == 6
    item = data.SegDataset("folder", E.exif_ok, size=64)[0]
    assert item["image"].shape == (3, 64, 64) and item["image"][0].min() > 0.5  # red everywhere, no black bars


def test_reruns_remove_their_own_stale_images_only(E, tmp_path, capsys, monkeypatch):
    """evaluate.py into a used --out keeps the files it did not write (its own earlier ones, listed in its
    manifest, go: tests/test_evaluate.py); finetune --overwrite drops the earlier run's images, keeps other files;
    evaluate.py says why mIoU is skipped, and a tiny folder FID gives one warning line of ours."""
    import metrics
    ev = tmp_path / "ev"
    for stale in ("images/xyz.png", "grid.png"):
        (ev / stale).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(ev / stale)
    (ev / "images" / "mine.txt").write_text("keep")
    evaluate.main([a.format(**vars(E)) for a in EVAL[:-1]] + [str(ev), "--grid-n", "0", "--workers", "0"])
    assert (ev / "images" / "xyz.png").exists() and (ev / "grid.png").exists()  # not written by evaluate.py: kept
    assert (ev / "images" / "mine.txt").exists() and len(list((ev / "images").glob("*.png"))) == 5
    out = capsys.readouterr().out
    assert "mIoU skipped: no segmenter given, and the paper has none for --data folder" in out
    # finetune --overwrite removes only what its earlier run recorded (manifest.txt): an image no run recorded
    # where the run writes is refused, not removed; the earlier run's own grids go, the user's notes stay
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(run / "samples" / "xyz.png")
    (run / "notes.txt").write_text("keep")
    ft = SCRATCH[:-1] + ["--data-root", str(E.ok), "--out", str(run), "--overwrite", "--stage2-steps", "0"]
    one_line(lambda: finetune_oasis.main(ft), "--overwrite", "samples/xyz.png", "not recorded")
    assert (run / "samples" / "xyz.png").exists()
    (run / "samples" / "xyz.png").rename(run / "xyz.png")
    finetune_oasis.main(ft)
    (run / "samples" / "000000.png").rename(run / "samples" / "000007.png")  # as if from a longer earlier run
    models.run.record(run, ["samples/000007.png"])
    finetune_oasis.main(ft)
    assert not (run / "samples" / "000007.png").exists() and (run / "samples" / "000000.png").exists()
    assert (run / "notes.txt").read_text() == "keep" and (run / "xyz.png").exists()
    capsys.readouterr()
    monkeypatch.setattr(metrics, "_SAID", set())  # a fresh run: its FID note not said yet
    evaluate.main(["--real-dir", str(E.fake), "--fake-dir", str(E.ok / "images"), "--fid-features",
                   str(E.root / "feat.pt"), "--out", str(tmp_path / "fid"), "--workers", "0"])
    lines = capsys.readouterr().out.splitlines()
    assert [s.split()[0] for s in lines] == ["fid", "kid", "warning:", "wrote"], lines
    assert "FID on 3 images for 12 features: the covariances are singular" in lines[2]


def test_scipy_singular_matrix_warning_becomes_our_note(monkeypatch):
    import metrics
    monkeypatch.setattr(metrics, "_SAID", set())
    rng = np.random.default_rng(8)  # 2 images of 4 features: scipy's sqrtm warns 'Matrix is singular'
    a, b = rng.random((2, 4)), rng.random((2, 4))
    notes = []
    with warnings.catch_warnings(record=True) as leaked:
        warnings.simplefilter("always")
        fid = metrics.frechet_distance(*metrics.stats(a), *metrics.stats(b), n=2, note=notes.append)
        metrics.frechet_distance(*metrics.stats(a), *metrics.stats(b), n=2, note=notes.append)
    assert np.isfinite(fid) and not leaked and len(notes) == 1 and "FID on 2 images for 4 features" in notes[0]


# flags every script shares, checkpoints and resume, round 2
FT2 = SCRATCH + ["{ok}", "--out", "{root}/c2"]
CAT2 = CAT[:3] + ["{ok}"] + CAT[4:-2] + ["--out", "{root}/c2_cat", "--affinity", "none"]  # a valid CAT run
SCRIPTS2 = {"est": (estimate_affinity.main, EST), "ft": (finetune_oasis.main, FT2), "piti": (finetune_piti.main, PITI),
            "pre": (pretrain_piti.main, PRE), "ev": (evaluate.main, EVAL)}
COMMON2 = {
    **{f"{k}-device-banana": (m, a + ["--device", "banana"], ["--device 'banana'", "not a device name", "cpu"])
       for k, (m, a) in SCRIPTS2.items()},
    **{f"{k}-device-cuda": (m, a + ["--device", "cuda"], ["--device cuda", "no CUDA GPU visible", "use --device cpu"])
       for k, (m, a) in SCRIPTS2.items()},
    **{f"{k}-device-cuda7": (m, a + ["--device", "cuda:7"], ["--device cuda:7", "GPU", "visible"])
       for k, (m, a) in SCRIPTS2.items()},
    **{f"{k}-seed-negative": (m, a + ["--seed", "-1"], ["--seed", "'-1'", ">= 0"]) for k, (m, a) in SCRIPTS2.items()},
    "toy-seed-negative": (toy.main, ["write", "--seed", "-1", "--out", "{root}/c2_toy"], ["--seed", "'-1'", ">= 0"]),
    "ft-workers-negative": (finetune_oasis.main, FT2 + ["--workers", "-1"], ["--workers", "'-1'", ">= 0"]),
    "ev-workers-negative": (evaluate.main, EVAL + ["--workers", "-1"], ["--workers", "'-1'", ">= 0"]),
    "ft-channels-zero": (finetune_oasis.main, FT2 + ["--channels", "0"], ["--channels", "'0'", ">= 1"]),
    "ft-d-last-zero": (finetune_oasis.main, FT2 + ["--d-last", "0"], ["--d-last", "'0'", ">= 1"]),
    "ft-d-channels-not-rgb": (finetune_oasis.main, FT2 + ["--d-channels", "4,8,8"], ["--d-channels 4,8,8", "3 (RGB)"]),
    "ft-d-channels-short": (finetune_oasis.main, FT2 + ["--d-channels", "3,8"], ["--d-channels 3,8", "at least two"]),
    "ft-d-channels-zero": (finetune_oasis.main, FT2 + ["--d-channels", "3,0,8"], ["--d-channels 3,0,8", "positive"]),
    "ft-d-channels-too-deep": (finetune_oasis.main, FT2 + ["--d-channels", "3,4,4,4,4,4,4,4"],
                               ["--d-channels", "7 encoder blocks", "multiples of 128", "64x64"]),
    "ft-freeze-d-too-deep": (finetune_oasis.main, CAT2 + ["--freeze-d", "7"], ["--freeze-d 7", "6 encoder blocks",
                                                                               "at most 6"]),
    "ft-scratch-with-freeze-d": (finetune_oasis.main, FT2 + ["--freeze-d", "2"], ["--init scratch", "--freeze-d",
                                                                                  "does not apply"]),
    "ft-source-with-other-width": (finetune_oasis.main, CAT2 + ["--channels", "8"],
                                   ["--channels 8", "the source model", "has --channels 4", "drop --channels"]),
    "ft-source-with-other-d-channels": (finetune_oasis.main, CAT2 + ["--d-channels", "3,8,8"],
                                        ["--d-channels 3,8,8", "has --d-channels 3,8,8,16,16,16,16"]),
    "ft-lr-nan": (finetune_oasis.main, FT2 + ["--lr", "nan"], ["--lr", "'nan'", "finite"]),
    "ft-lr-d-nan": (finetune_oasis.main, FT2 + ["--lr-d", "nan"], ["--lr-d", "'nan'", "finite"]),
    "ft-lr-d-inf": (finetune_oasis.main, FT2 + ["--lr-d", "inf"], ["--lr-d", "'inf'", "finite"]),
    "ft-lambda-labelmix-negative": (finetune_oasis.main, FT2 + ["--lambda-labelmix", "-1"], ["--lambda-labelmix -1", ">= 0"]),
    "ft-grid-n-negative": (finetune_oasis.main, FT2 + ["--grid-n", "-1"], ["--grid-n", "'-1'", ">= 0"]),
    "ft-fid-n-negative": (finetune_oasis.main, FT2 + ["--fid-n", "-5"], ["--fid-n", "'-5'", ">= 1"]),
    "piti-fid-n-negative": (finetune_piti.main, PITI + ["--fid-n", "-5"], ["--fid-n", "'-5'", ">= 1"]),
    "ft-source-ckpt-piti": (finetune_oasis.main, CAT[:5] + ["{root}/piti_kind.pt"] + CAT[6:] + ["--affinity", "x.npy"],
                            ["--source-ckpt", "piti_kind.pt", "a finetune_piti.py checkpoint", "expected an OASIS"]),
    "ft-source-ckpt-tensor": (finetune_oasis.main, CAT[:5] + ["{root}/c2_tensor.pt"] + CAT[6:] + ["--affinity", "x.npy"],
                              ["--source-ckpt", "c2_tensor.pt", "a single tensor, not a state dict / checkpoint"]),
    "est-source-ckpt-tensor": (estimate_affinity.main, EST + ["--method", "supervised", "--source-ckpt",
                                                              "{root}/c2_tensor.pt"], ["--source-ckpt", "single tensor"]),
    "ev-ckpt-tensor-alone": (evaluate.main, ["--ckpt", "{root}/c2_tensor.pt"] + EVAL[2:],
                             ["--ckpt", "c2_tensor.pt", "a single tensor, not a state dict / checkpoint"]),
    "ft-resume-tensor": (finetune_oasis.main, ["--out", "{root}/c2_tensor_run", "--resume"],
                         ["--resume", "checkpoint.pt", "a single tensor"]),
    "ev-ckpt-tensor": (evaluate.main, ["--ckpt", "{root}/c2_tensor.pt", "--source", "folder", "--source-root", "{ok}",
                                       "--affinity", "{root}/aff_rows.npy"] + EVAL[2:], ["--ckpt", "single tensor"]),
}


@pytest.mark.parametrize("case", sorted(COMMON2))
def test_common_round2(W, case):
    if case.endswith("-device-cuda") and torch.cuda.is_available():
        pytest.skip("the case needs a machine without a CUDA GPU")
    if not (W.root / "c2_tensor.pt").is_file():
        torch.save(torch.zeros(3), W.root / "c2_tensor.pt")
        (W.root / "c2_tensor_run").mkdir()
        torch.save(torch.zeros(3), W.root / "c2_tensor_run" / "checkpoint.pt")
    refused_row(COMMON2[case], W)


@pytest.mark.parametrize("error,words", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), ["no space left", "free some space"]),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), ["unexpected pos"])],
    ids=["ENOSPC", "torch-writer"])
def test_checkpoint_save_on_a_full_disk(tmp_path, monkeypatch, error, words):
    """A write that fails half-way (disk full; torch's own writer says so as a RuntimeError): one line naming
    the file and the cause, no .tmp left, the previous checkpoint intact."""
    path = tmp_path / "checkpoint.pt"
    models.run.save({"step": 1}, path)

    def full(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 half")
        raise error

    monkeypatch.setattr(models.run.torch, "save", full)
    one_line(lambda: models.run.save({"step": 2}, path), str(path), "could not write the checkpoint", *words,
             "previous one is kept")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    monkeypatch.undo()
    assert models.run.load(path)["step"] == 1


def tiny_run(W, tmp_path, *extra):
    """A copy of the ok dataset and the flags of a 2-step scratch run on it, checkpoint at step 1."""
    ds = tmp_path / "ds"
    if not ds.exists():
        shutil.copytree(W.ok, ds)
    return ["--init", "scratch", "--data", "folder", "--data-root", str(ds), "--size", "64", "--out",
            str(tmp_path / "run"), "--stage1-steps", "0", "--stage2-steps", "2", "--eval-every", "1", *TINY, *extra]


def test_resume_refuses_a_changed_dataset_and_says_its_step(W, tmp_path, capsys):
    args = tiny_run(W, tmp_path, "--stage2-steps", "1")
    finetune_oasis.main(args)
    finetune_oasis.main(args[:-2] + ["--stage2-steps", "2", "--resume"])
    assert "resuming from step 1 of 2" in capsys.readouterr().out
    for sub in ("images", "labels"):
        shutil.copy(tmp_path / "ds" / sub / "0.png", tmp_path / "ds" / sub / "9.png")
    one_line(lambda: finetune_oasis.main(args[:-2] + ["--stage2-steps", "3", "--resume"]), "--data-root",
             "4 image/label pairs then, 5 now (1 added)", "--overwrite", "new --out")


def test_resume_follows_the_data_not_its_spelling(W, tmp_path, capsys):
    """Issue 31 §6: --data-root spelled with a trailing slash, or the dataset moved to another folder, resumes
    (the fingerprint matches); another --fid-features than the run's starts best-FID tracking anew with a note;
    a checkpoint of format 1 (from before the fingerprint) is refused naming its format."""
    args = tiny_run(W, tmp_path, "--stage2-steps", "1")
    finetune_oasis.main(args)
    ds = args[args.index("--data-root") + 1]
    finetune_oasis.main(args[:-2] + ["--stage2-steps", "2", "--resume", "--data-root", ds + "/"])
    shutil.move(ds, tmp_path / "moved")
    finetune_oasis.main(args[:-2] + ["--stage2-steps", "3", "--resume", "--data-root", str(tmp_path / "moved")])
    assert "resuming from step 2 of 3" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["args"]["data_root"] == str(tmp_path / "moved")
    assert models.run.fid_network_changed({**ckpt["args"], "fid_features": "a.pt"}, argparse.Namespace(
        inception=None, fid_features="b.pt"))
    assert "start anew" in capsys.readouterr().out
    del ckpt["data"], ckpt["format"]
    torch.save(ckpt, tmp_path / "run" / "checkpoint.pt")
    one_line(lambda: finetune_oasis.main(["--out", str(tmp_path / "run"), "--resume"]), "--resume", "checkpoint.pt",
             "checkpoint format 1", "reads format 2")


def ctrl_c_at_step_2(monkeypatch, script):
    """The script's training step (gan_step, diffusion_step) raises KeyboardInterrupt (Ctrl-C) when it is called
    the second time."""
    name = "gan_step" if hasattr(script, "gan_step") else "diffusion_step"
    real, calls = getattr(script, name), []

    def step(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(script, name, step)


def test_ctrl_c_says_how_to_resume(W, tmp_path, monkeypatch):
    """Ctrl-C at the second step: one line with the last checkpoint's step and the --resume command."""
    args = tiny_run(W, tmp_path)
    ctrl_c_at_step_2(monkeypatch, finetune_oasis)
    with pytest.raises(SystemExit) as e:
        cli(lambda: finetune_oasis.main(args))
    out = tmp_path / "run"
    assert e.value.code == (f"interrupted: last checkpoint {out / 'checkpoint.pt'} (step 1); continue with: "
                            f"python finetune_oasis.py --out {out} --resume --device cpu")


@pytest.fixture(scope="module")
def piti_files(tmp_path_factory):
    """Tiny 'official' PITI base and upsampler files of the toy source classes (as tests/test_finetune_piti.py)."""
    from models.piti import PITI
    from test_finetune_piti import BASE, UP
    d = tmp_path_factory.mktemp("piti2")
    torch.manual_seed(0)
    for name, kw, sr in (("base.pt", BASE, False), ("up.pt", UP, True)):
        m = PITI(**kw, super_res=sr, source_channels=data.class_table("toy-source").n_channels)
        torch.save({k: v for k, v in m.state_dict().items() if k in m.official_keys()}, d / name)
    return d, ["--base-config", json.dumps(BASE), "--up-config", json.dumps(UP)]


def test_piti_ctrl_c_resume_line_and_changed_dataset(W, piti_files, tmp_path, monkeypatch, capsys):
    """finetune_piti.py: Ctrl-C at the second step names the step-1 checkpoint and the --resume command; --resume
    says where it continues; a dataset that changed since is refused."""
    d, configs = piti_files
    shutil.copytree(W.ok, tmp_path / "ds")
    out = tmp_path / "run"
    args = ["--out", str(out), "--base", str(d / "base.pt"), "--upsampler", str(d / "up.pt"), *configs, "--source",
            "toy-source", "--affinity", "none", "--data", "folder", "--data-root", str(tmp_path / "ds"), "--size", "64",
            "--batch", "2", "--prompts", "2", "--steps", "2", "--eval-every", "1", "--grid-n", "2", "--sample-steps",
            "2", "--up-steps", "2", "--device", "cpu"]
    ctrl_c_at_step_2(monkeypatch, finetune_piti)
    with pytest.raises(SystemExit) as e:
        cli(lambda: finetune_piti.main(args))
    assert e.value.code == (f"interrupted: last checkpoint {out / 'checkpoint.pt'} (step 1); continue with: "
                            f"python finetune_piti.py --out {out} --resume --device cpu")
    monkeypatch.undo()
    capsys.readouterr()
    finetune_piti.main(["--out", str(out), "--resume", "--device", "cpu"])
    assert "resuming from step 1 of 2" in capsys.readouterr().out
    (tmp_path / "ds" / "images" / "3.png").unlink()
    (tmp_path / "ds" / "labels" / "3.png").unlink()
    one_line(lambda: finetune_piti.main(["--out", str(out), "--resume", "--steps", "3"]), "--data-root",
             "4 image/label pairs then, 3 now (1 removed)", "--overwrite")


def test_at_least_forty_cases_beyond_the_listed_ones():
    assert len(SUBPROCESS) + len(IN_PROCESS) >= 60
    assert len(PITI2) + len(EST2) + len(EVAL2) + len(COMMON2) >= 58  # the second round's cases (and more)


# ---------------------------------------------------------------------------------------------- what is accepted


def test_bom_is_stripped_and_info_prints_the_images_own_size(W, capsys):
    assert data.class_table("folder", W.bom).names == ["sky", "grass"]
    data.main(["info", "--data", "folder", "--data-root", str(W.bom)])
    out = capsys.readouterr().out
    assert "images 64x64 (width x height), resized to 256x256" in out and "\ufeff" not in out
    big = make_ds(W.root / "wide", n=2, size=(96, 64))
    data.main(["info", "--data", "folder", "--data-root", str(big), "--size", "64"])
    assert "images 96x64 (width x height), resized to 64x64" in capsys.readouterr().out


@pytest.mark.parametrize("name,words", [("trunc.pt", ["truncated"]), ("empty.pt", ["empty"]),
                                        ("text.pt", ["not a torch file"]), ("pickled.pt", ["pickled"]),
                                        ("nope.pt", ["not found"])])
def test_checkpoint_load_says_why(W, name, words):
    one_line(lambda: models.run.load(W.root / name, "--resume"), "--resume", name, *words)


def test_truncate_log_drops_a_torn_last_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    models.curves.truncate_log(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    log.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    one_line(lambda: models.curves.truncate_log(log, 2), "log.jsonl", "line 2")


# ---------------------------------------------------------------------------------------------- kill -9, resume


@pytest.mark.parametrize("n_shot", [True, False], ids=["n-shot", "all-images"])
def test_sigkill_then_resume_logs_every_step_once(W, tmp_path, n_shot):
    """SIGKILL finetune_oasis.py once its first checkpoint exists and it has logged steps past it; --resume
    must finish the run from that checkpoint with each training step and each evaluation logged once."""
    ds = make_ds(tmp_path / "ds", n=8)
    out, total = tmp_path / "run", 10
    args = ["finetune_oasis.py", "--init", "scratch", "--data", "folder", "--data-root", ds, "--size", "64",
            "--out", out, "--stage1-steps", "0", "--stage2-steps", total, "--eval-every", "2", "--log-every", "1",
            *TINY, *(["--n", "6"] if n_shot else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            steps = [json.loads(s).get("step", 0) for s in (out / "log.jsonl").read_text().splitlines()
                     if s.endswith("}")] if (out / "log.jsonl").is_file() else []
            if (out / "checkpoint.pt").is_file() and max(steps, default=0) >= 3:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed ({proc.returncode}): {err[-2000:]}"
    killed_at = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["step"]
    assert 2 <= killed_at < total
    r = run(*args, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    entries = [json.loads(s) for s in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries if "loss_G" in e] == list(range(1, total + 1))
    assert [e["step"] for e in entries if "grid" in e] == list(range(2, total + 1, 2))
    assert torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["step"] == total
    if n_shot:
        assert (out / "subset.txt").read_text().count("\n") == 6


def test_out_dir_checks_without_leaving_folders(W, tmp_path):
    assert models.run.out_dir(tmp_path / "a" / "b", keep=False) == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()
    one_line(lambda: models.run.out_dir(W.root / "a_file" / "sub", replaces=("results.json",)), "--out", "a_file",
             "cannot write")
    assert models.run.out_dir(tmp_path / "c").is_dir()


def test_cli_prints_one_line(tmp_path):
    """The entry point: a DataError from a loader worker (wrapped in the worker's traceback) and an OSError
    nobody foresaw both end as one 'error:' line naming the file."""
    def worker_error():
        raise DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"data.py\", line 1, in __getitem__\nmodels.DataError: x/labels/3.png: bad")

    def os_error():
        open(tmp_path / "missing" / "f.txt")

    for fn, want in ((worker_error, "error: x/labels/3.png: bad"),
                     (os_error, f"error: {tmp_path / 'missing' / 'f.txt'}: No such file or directory")):
        with pytest.raises(SystemExit) as e:
            cli(fn)
        assert e.value.code == want


def test_failed_runs_leave_no_earlier_numbers(W, tmp_path):
    """A run that fails after it started leaves no results.json / affinity.npy of an earlier run in --out,
    where they would read as its own."""
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "results.json").write_text('{"fid": 1.0}')
    bad_size = [a.format(**vars(W)) for a in EVAL[:5] + ["{size}"] + EVAL[6:-1]] + [str(ev)]
    one_line(lambda: evaluate.main(bad_size), "64x48")  # a results.json no run recorded is the user's: kept
    assert (ev / "results.json").read_text() == '{"fid": 1.0}'
    (ev / "manifest.txt").write_text("results.json\n")  # an earlier evaluate.py run's own numbers: removed first
    one_line(lambda: evaluate.main(bad_size), "64x48")
    assert not (ev / "results.json").exists()
    aff = tmp_path / "aff"
    aff.mkdir()
    np.save(aff / "affinity.npy", np.eye(2, dtype=np.float32))
    one_line(lambda: estimate_affinity.main(["--source", "coco", "--target", "ade20k", "--method", "random",
                                             "--override", str(W.root / "map_weight.txt"), "--out", str(aff)]), "lots")
    assert not (aff / "affinity.npy").exists()


# ---------------------------------------------------------------------------------------------- round 3, data
# real-world files (issue 31 section 4), the class tables of the affinity (section 3), flags checked by their types


@pytest.fixture(scope="module")
def R3(W):
    """Round-3 inputs: text files in other encodings and numberings, JPEG-damaged labels, a source folder whose
    classes.txt lists the classes of {three} in another order."""
    ns = argparse.Namespace(**vars(W))
    ns.utf16 = make_ds(W.root / "r3_utf16", n=2, classes="sky\ngrass\n".encode("utf-16"))
    ns.gap = make_ds(W.root / "r3_gap", n=2, classes="1\tsky\n3\tgrass\n")
    ns.csv_broken = make_ds(W.root / "r3_csv", n=2, classes="id,name\n1,sky\ngrass\n")
    ns.zero_class = make_ds(W.root / "r3_zero", n=2, classes="0,sky\n1,grass\n")
    ns.disguised = make_ds(W.root / "r3_disguised", n=2)
    for i in range(2):
        Image.open(ns.disguised / "labels" / f"{i}.png").convert("L").save(ns.disguised / "labels" / f"{i}.png",
                                                                              format="JPEG")
    ns.ringing = make_ds(W.root / "r3_ringing", n=2, classes="".join(f"c{k}\n" for k in range(1, 13)))
    yy, xx = np.mgrid[:64, :64]
    for i in range(2):
        lab = np.zeros((64, 64), np.uint8)
        lab[:29], lab[(yy - 44) ** 2 + (xx - 40) ** 2 < 200] = 4, 8
        Image.fromarray(lab).save(W.root / "r3.jpg", quality=70)
        Image.open(W.root / "r3.jpg").save(ns.ringing / "labels" / f"{i}.png")
    ns.reordered = W.root / "r3_reordered"
    ns.reordered.mkdir(exist_ok=True)
    (ns.reordered / "classes.txt").write_text("grass\nsky\nsea\n")
    for sub in ("images", "labels"):
        if not (ns.reordered / sub).exists():
            (ns.reordered / sub).symlink_to(ns.three / sub)
    (W.root / "r3_latin1.txt").write_bytes("sky -> gr\xe4ss\n".encode("latin-1"))
    (W.root / "r3_utf16.txt").write_text("sky -> sky\n", encoding="utf-16")
    (W.root / "r3_two.txt").write_bytes(b"\xef\xbb\xbfimages/0.png\r\nimages/1.png\r\n")  # BOM + CRLF: read as written
    dim, sd = 16, {"cls_token": torch.zeros(1, 1, 16), "pos_embed": torch.zeros(1, 17, 16), "norm.weight": torch.ones(16),
                   "patch_embed.proj.weight": torch.zeros(16, 3, 8, 8), "patch_embed.proj.bias": torch.zeros(16),
                   "norm.bias": torch.zeros(16)}  # a DINO ViT of depth 1 in the official key format
    for name, shape in (("norm1", (dim,)), ("norm2", (dim,)), ("attn.qkv", (3 * dim, dim)), ("attn.proj", (dim, dim)),
                        ("mlp.fc1", (4 * dim, dim)), ("mlp.fc2", (dim, 4 * dim))):
        sd[f"blocks.0.{name}.weight"], sd[f"blocks.0.{name}.bias"] = torch.ones(shape), torch.zeros(shape[0])
    torch.save(sd, W.root / "r3_dino.pth")
    return ns


ESTF = ["--source", "{three}", "--target", "{ok}", "--text-encoder", "minilm", "--out", "{root}/r3_est"]
DATA3 = {
    "info-data-missing": (data.main, ["info", "--data-root", "{ok}"], ["--data is required", "--data toy-target"]),
    "info-classes-utf16": (data.main, INFO + ["{utf16}"], ["r3_utf16/classes.txt", "UTF-16", "UTF-8"]),
    "info-classes-latin1-named": (data.main, INFO + ["{latin1}"], ["latin1/classes.txt", "byte 0xe4", "Latin-1"]),
    "info-classes-numbered-gap": (data.main, INFO + ["{gap}"], ["classes.txt", "id 3 where 2 was expected"]),
    "info-classes-csv-broken": (data.main, INFO + ["{csv_broken}"], ["classes.txt", "header 'id,name'", "line 3"]),
    "info-classes-zero-is-a-class": (data.main, INFO + ["{zero_class}"], ["classes.txt", "id 0 is 'sky'", "from 1"]),
    "info-jpeg-under-png-name": (data.main, INFO + ["{disguised}"], ["0.png", "JPEG data under a .png name"]),
    "info-jpeg-ringing": (data.main, INFO + ["{ringing}"], ["0.png", "thin lines", "JPEG compression"]),
    "info-subset-file-latin1": (data.main, INFO + ["{ok}", "--subset-file", "{root}/r3_latin1.txt"],
                                ["--subset-file", "r3_latin1.txt", "not UTF-8", "Latin-1"]),
    "info-subset-seed-negative": (data.main, INFO + ["{ok}", "--subset-seed", "-1"], ["--subset-seed", "'-1'", ">= 0"]),
    "est-override-latin1": (estimate_affinity.main, ESTF + ["--method", "random", "--override", "{root}/r3_latin1.txt"],
                            ["--override", "r3_latin1.txt", "not UTF-8", "Latin-1"]),
    "est-hand-utf16": (estimate_affinity.main, ESTF + ["--method", "hand", "--hand", "{root}/r3_utf16.txt"],
                       ["--hand", "r3_utf16.txt", "UTF-16"]),
    "est-source-data-reordered": (estimate_affinity.main, ESTF + [
        "--method", "self-supervised", "--dino-weights", "{root}/r3_dino.pth", "--source-data", "{reordered}"],
        ["--source-data", "another order", "class 1 is 'sky' in --source", "'grass'"]),
    "est-void-row-with-hand": (estimate_affinity.main, ESTF + ["--method", "random", "--void-row", "on"],
                               ["--void-row on with --method random", "unlabeled -> CLASS"]),
    "est-batch-zero": (estimate_affinity.main, ESTF + ["--batch", "0"], ["--batch", "'0'", ">= 1"]),
    "est-workers-negative": (estimate_affinity.main, ESTF + ["--workers", "-1"], ["--workers", "'-1'", ">= 0"]),
    "est-dino-size-zero": (estimate_affinity.main, ESTF + ["--dino-size", "0"], ["--dino-size", "'0'", ">= 1"]),
    "est-source-n-zero": (estimate_affinity.main, ESTF + ["--source-n", "0"], ["--source-n", "'0'", ">= 1"]),
    "est-batch-size-renamed": (estimate_affinity.main, ESTF + ["--batch-size", "8"], ["--batch-size"]),
    "info-cityscapes-size": (data.main, ["info", "--data", "cityscapes", "--data-root", "{ok}", "--size", "64"],
                             ["--size 64 does not apply to --data cityscapes", "256x512"]),
    "info-n-and-subset-file": (data.main, INFO + ["{ok}", "--n", "4", "--subset-file", "{root}/r3_two.txt"],
                               ["--n 4 with --subset-file", "r3_two.txt", "names 2 images", "drop --n"]),
    "est-missing-all-at-once": (estimate_affinity.main, ["--method", "self-supervised"],
                                ["--source, --target, --out are required", "self-supervised needs --dino-weights",
                                 "e.g. python estimate_affinity.py"]),
}


@pytest.mark.parametrize("case", sorted(DATA3))
def test_data_round3(R3, offline, case):
    refused_row(DATA3[case], R3)


# ---------------------------------------------------------------------------------------------- round 3 (issue 31)
# the run folder (§1 §2) and flags that would be bent (§5), for the three training scripts
RUN3_SCRIPTS = {"ft": (finetune_oasis.main, FT2), "piti": (finetune_piti.main, PITI), "pre": (pretrain_piti.main, PRE)}
RUN3 = {
    **{f"{k}-seed-2**64": (m, a + ["--seed", str(2 ** 64)], ["--seed", str(2 ** 64), "< 2**32"])
       for k, (m, a) in RUN3_SCRIPTS.items()},
    **{f"{k}-out-is-data-root": (m, a + ["--out", "{ok}", "--overwrite"], ["--out", "is --data-root", "never writes"])
       for k, (m, a) in RUN3_SCRIPTS.items()},
    **{f"{k}-out-inside-data-root": (m, a + ["--out", "{ok}/images/run"], ["--out", "lies inside --data-root"])
       for k, (m, a) in RUN3_SCRIPTS.items()},
    **{f"{k}-out-contains-data-root": (m, a + ["--out", "{root}"], ["--out", "contains --data-root"])
       for k, (m, a) in RUN3_SCRIPTS.items()},
    **{f"{k}-resume-and-overwrite": (m, a + ["--resume", "--overwrite"], ["--resume", "--overwrite", "one of the two"])
       for k, (m, a) in RUN3_SCRIPTS.items()},
    **{f"{k}-cityscapes-size": (m, a + ["--data", "cityscapes", "--size", "64"], ["--size 64", "cityscapes", "256x512"])
       for k, (m, a) in RUN3_SCRIPTS.items()},
}


@pytest.mark.parametrize("case", sorted(RUN3))
def test_run_folder_and_bent_flags_round3(W, case):
    """Each refused in one line before anything is written: the dataset keeps exactly its files."""
    before = sorted(p for p in W.ok.rglob("*"))
    refused_row(RUN3[case], W)
    assert sorted(p for p in W.ok.rglob("*")) == before
