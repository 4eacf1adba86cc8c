"""The class affinity of CAT (Careil et al., CVPR 2023) as arithmetic on tensors, and its report and files.

What every stage computes with an affinity: the channel-space matrix the models use (affinity_to_channels, with
the unlabelled channel 0 by extend_affinity) and the sha256 that ties affinity.npy to affinity.json.
estimate_affinity.py runs the estimation stage (flags, inputs, one estimator per method, combination); this
module holds what its steps compute: the text method (cosine of prompt-ensembled class-name embeddings, softmax over the
source classes), the supervised method's per-class accumulation of a source segmenter's predictions, the
self-supervised method's prototype cosines (models/dino.py computes the prototypes), the paper's hard rows, the
report (mapping.md, affinity.png) and the all-or-none write of the four outputs. Their reader is
data.load_affinity."""
import dataclasses
import hashlib
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from models import DataError, figures, oasis
from models.amp import autocast
from models.dino import class_prototypes

PROMPTS = ("a photo of a {}.", "a photo of the {}.", "a picture of {}.", "there is {} in the scene.", "the {} in the image.")
# COCO-Stuff thing ids that never occur in the label maps (classes/README.md). They keep their columns (the
# paper's own mappings use two of them), but four share a display name with a used stuff class (door, desk,
# mirror, window): on such exact ties the hard argmax picks the class the source generator was trained on.
COCO_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
OUTPUTS = ("mapping.md", "affinity.png", "affinity.json", "affinity.npy")  # written in this order, all or none


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


def affinity_sha256(A):
    """The sha256 that affinity.json records of its .npy's array (float32 values and shape)."""
    A = np.ascontiguousarray(A, np.float32)
    return hashlib.sha256(repr(A.shape).encode() + A.tobytes()).hexdigest()


def with_void(table):
    """The table with the unlabelled value 0 as a class of its own, first (its row is estimated like any other)."""
    return dataclasses.replace(table, ids=[0] + table.ids, names=["unlabeled"] + table.names,
                               display=["unlabeled"] + table.display, channels=[0] + table.channels, eval_channels=None)


def channel_rows(table):
    """Lookup channel id -> row of the table (-1 for dontcare and channels without a class)."""
    lut = torch.full((table.n_channels,), -1, dtype=torch.long)
    lut[torch.tensor(table.channels)] = torch.arange(len(table))
    return lut


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


def source_discriminator(path, dataset, n_channels, device):
    """The source OASIS discriminator as a segmenter of the source classes: (fn: images in [-1,1] -> logits over
    the n_channels, {G_kwargs, D_kwargs} of the source model). A run folder without a best_* keeps latest_*."""
    which = "best"
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, d, "best_D.pth")) for d in ("models", "")):
        which = "latest"  # runs without a best_* keep latest_*
    src = oasis.load_source(path, dataset, n_channels, which, parts=("D",))
    D = oasis.Discriminator(**src["D_kwargs"])
    oasis.check_state_dict(D, src["D"], path, f"--source {dataset}")
    D = D.eval().to(device)
    # output channel 0 is "fake", k+1 is semantic channel k (OASIS's N+1 loss)
    return (lambda x: D(x)[:, 1:]), {k: src[k] for k in ("G_kwargs", "D_kwargs")}


def fit_discriminator(kwargs, size, path, flag):
    """Check that the source discriminator of source_discriminator's `kwargs` takes images of `size` (W, H): sides
    that are multiples of 2**blocks, a height its generator supports (`flag`: what gave the size)."""
    step = 2 ** (len(kwargs["D_kwargs"]["channels"]) - 1)
    if size[0] % step or size[1] % step:
        raise DataError(f"{flag}: the target images are {size[0]}x{size[1]}, the source discriminator ({path}) has "
                        f"{step.bit_length() - 1} encoder blocks and takes sides that are multiples of {step}")
    oasis.resize_kwargs(kwargs["G_kwargs"], size, f"--source-ckpt {path}")


@torch.no_grad()
def supervised_affinity(segment, dataset, target, source, stat, device, batch, amp=None, workers=0):
    """Row t = mean predicted source distribution (or argmax histogram) over target pixels of class t."""
    t_rows, s_cols = channel_rows(target), torch.tensor(source.channels)
    sums, counts = torch.zeros(len(target), len(source), dtype=torch.float64), torch.zeros(len(target), dtype=torch.float64)
    for b in torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers):
        x, label = b["image"].to(device), b["label"]
        with autocast(device, amp):  # amp: a mode of models.amp.pick (None: auto for the device)
            logits = segment(x)
        if logits.shape[1] != source.n_channels:
            raise DataError(f"segmenter outputs {logits.shape[1]} channels, --source {source.dataset} has {source.n_channels} "
                            "(dontcare + its classes)")
        logits = logits.float()[:, s_cols.to(device)]  # drop dontcare, keep the real classes in table order
        if logits.shape[-2:] != label.shape[-2:]:
            logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
        p = torch.softmax(logits, 1) if stat == "soft" else F.one_hot(logits.argmax(1), len(source)).permute(0, 3, 1, 2).float()
        rows, values = t_rows[label], p.permute(0, 2, 3, 1).cpu()
        keep = rows >= 0  # pixels of a row of the table
        sums.index_add_(0, rows[keep], values[keep].double())
        counts.index_add_(0, rows[keep], torch.ones(int(keep.sum()), dtype=torch.float64))
    if counts.sum() == 0:
        raise DataError(f"target images in {dataset.root}: no pixel carries a target class (labels are all dontcare)")
    return (sums / counts.clamp(min=1)[:, None]).float().numpy(), (counts > 0).numpy()


def prototype_affinity(t_proto, s_proto, s_present, temperature):
    """Cosine of prototypes (DINO ViT patch features), softmax over the source classes seen in the source sample."""
    cos = (t_proto @ s_proto.T) / temperature
    cos[:, ~torch.as_tensor(s_present)] = -float("inf")
    return torch.softmax(cos, dim=1).numpy()


def dino_affinity(vit, source_images, target_images, source, target, side, device, batch, amp, temperature):
    """Self-supervised: prototypes of the source classes in `source_images` and of the target classes in
    `target_images` (models.dino.class_prototypes), then prototype_affinity. -> (rows, target rows seen)."""
    s_proto, s_present = class_prototypes(vit, source_images, source, side, device, batch, amp)
    if not s_present.any():
        raise DataError(f"source images in {source_images.root}: no pixel carries a source class")
    t_proto, t_present = class_prototypes(vit, target_images, target, side, device, batch, amp)
    if not t_present.any():
        raise DataError(f"target images in {target_images.root}: no pixel carries a target class (labels are all "
                        "dontcare)")
    return prototype_affinity(t_proto, s_proto, s_present, temperature), t_present


def harden(estimate, source):
    """CAT's hard affinity (the paper's default): each target row becomes one-hot at its largest source class.
    Exact ties avoid COCO-Stuff's unused thing ids, which share names with used stuff classes."""
    unused = np.isin(source.ids, COCO_UNUSED) if source.dataset == "coco" else np.zeros(len(source), bool)
    return np.eye(len(source))[(estimate - 1e-9 * unused).argmax(1)]


def normalise(estimate, flags, method):
    """Rows scaled to sum to 1, as float64; rows that are not finite are refused (an overflow would read as a
    row's argmax: column 0 everywhere), naming `flags` (what shaped the scores) and the method."""
    estimate = np.asarray(estimate, np.float64)
    estimate = estimate / estimate.sum(1, keepdims=True)
    if not np.isfinite(estimate).all():
        bad = int((~np.isfinite(estimate).all(1)).sum())
        raise DataError(f"{flags}: {bad} of {len(estimate)} rows of the {method} scores are not finite (overflow); "
                        "use a temperature like 0.05 and weights like 1")
    return estimate


def place_rows(A, rows, n_target, void):
    """Write mapping-file rows {k: row} (read_mapping's: k and the row's columns index [unlabelled, *classes]) into
    A as given. A gains the source's unlabelled column 0 when it has a void row (void: A's first row is the
    target's value 0) or a row involves channel 0, and then also the unlabelled row (extend_affinity) if it has
    none. A's rows are the n_target classes, after those extra rows."""
    if void or any(t == 0 or row[0] > 0 for t, row in rows.items()):
        A = np.concatenate([np.zeros((len(A), 1)), A], 1) if void else extend_affinity(A)
    for t, row in rows.items():
        A[t - 1 + len(A) - n_target] = row if len(A) > n_target else row[1:]
    return A


def record(method, hard, info, source, target, void, A, estimate, estimates, marks, args):
    """What affinity.json holds: the method, hard or soft, `info` (encoders, files, skipped methods), both class
    tables, whether the void row was estimated, the final array's shape and sha256 (data.load_affinity checks it),
    the run's args, the rows' notes {display name: note}, the estimate and, for a combination, each method's."""
    table = lambda t: dict(dataset=t.dataset, ids=t.ids, names=t.names, display=t.display, n_channels=t.n_channels)  # noqa: E731
    return dict(method=method, hard=hard, **info, source=table(source), target=table(target), void_row=void,
                shape=list(A.shape), sha256=affinity_sha256(A), args=args, marks=marks,
                estimate=np.round(estimate, 6).tolist(),
                matrices={m: np.round(np.asarray(E, np.float64), 6).tolist() for m, E in estimates.items()}
                if len(estimates) > 1 else {})


def report(A, estimate, target, source, meta, marks):
    """(text of mapping.md, affinity.png image): mapping.md (final choice, top-3 of the estimate and, for a
    combination, each method's top-1 per target class: the form of the CAT supplement's Tables 5 and 6) and
    affinity.png (labelled heatmap + top-3 per row). `target` is the table of the estimate's rows (with
    'unlabeled' first under --void-row); A may have one more row (channel 0 by hand) and a column 0 (the source's
    unlabelled channel)."""
    lines = [f"# Class affinity: {meta['args']['target']} -> {meta['args']['source']}", "",
             f"method: {meta['method']} ({'hard' if meta['hard'] else 'soft'})" + "".join(f"; {k}: {v}" for k, v in meta["encoders"].items()),
             *(f"skipped {m}: {why}" for m, why in meta["skipped"].items()), "",
             "| target | → source | top-3 of the estimate (score) | " + "".join(f"{m} | " for m in meta["matrices"]) + "note |",
             "|---|---|---|" + "---|" * len(meta["matrices"]) + "---|"]
    # a display name shared by two source classes (COCO: door, desk, mirror, window) is shown by its raw name
    label = [d if source.display.count(d) == 1 else n for d, n in zip(source.display, source.names)]
    by_hand, cols = len(A) - len(target), (["unlabelled"] * (A.shape[1] - len(source))) + label
    choice = [cols[int(r.argmax())] for r in A]
    if by_hand:  # the unlabelled channel 0 mapped by a mapping file, without an estimated row
        lines.append(f"| unlabelled (channel 0) | {choice[0]} | | {'| ' * len(meta['matrices'])}by hand |")
    for t in range(len(target)):
        scores = ", ".join(f"{label[s]} {estimate[t, s]:.2f}" for s in np.argsort(-estimate[t], kind="stable")[:3])
        per_method = "".join(f"{label[int(np.argmax(E[t]))]} {max(E[t]):.2f} | " for E in meta["matrices"].values())
        lines.append(f"| {target.display[t]} | {choice[t + by_hand]} | {scores} | {per_method}{marks.get(t, '')} |")

    # the estimate as a tall heatmap, each row labelled with its top-3 written out (models/figures.py)
    title = f"class affinity {meta['args']['target']} -> {meta['args']['source']}: {meta['method']}"
    img = figures.affinity_figure(estimate, A[by_hand:, A.shape[1] - len(source):], target.display, label,
                                  title + f" ({'hard' if meta['hard'] else 'soft'})",
                                  f"target: {target.dataset}, {len(target)} classes",
                                  f"source: {source.dataset}, {len(source)} classes")
    return "\n".join(lines) + "\n", img


def write_outputs(out, text, img, meta, A):
    """OUTPUTS into `out`, all or none: mapping.md (text), affinity.png (img), affinity.json (meta) and
    affinity.npy (A) each go to a temporary name in `out`, then all are moved into place; a failure (a full disk)
    removes the temporaries and the files already moved: one DataError line."""
    writers = dict(zip(OUTPUTS, (lambda f: f.write(text.encode()), lambda f: img.save(f, format="PNG"),
                                 lambda f: f.write(json.dumps(meta, indent=1).encode()), lambda f: np.save(f, A))))
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

