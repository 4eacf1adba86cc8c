"""Metrics shared by evaluate.py and the finetuning scripts' early stopping: FID statistics and the
Frechet distance (pytorch-fid 0.3.0's numerics), KID, the cached real-image statistics, seeded generation,
the confusion matrix and IoU, and the PNG/grid helpers. The protocol is written out in evaluate.py's
docstring and in every results.json. Every bad input raises models.DataError (one line).

Public functions (stable names; the finetune scripts use the first group for early stopping):
    load_feature_net(inception=None, fid_features=None, device='cpu') -> net ((B,3,H,W) in [0,1] -> (B,D));
        net.tag names the network and its file's digest, net.toy is True for a TorchScript feature net
    real_stats(dataset, net, cache_dir=None, device='cpu', batch_size=16, amp='fp32', workers=0)
        -> (mu, sigma, feats) of a dataset's preprocessed images, cached by file content
    oasis_sampler(G, n_channels, amp='fp32') -> sample(label, seeds) -> images in [-1, 1]
    piti_sampler(base, up, steps=None, up_steps=None, ddim=False, amp='fp32') -> the same for a PITI cascade,
        one noise stream per image
    image_seeds(seed, first_map, n_maps, k) -> the per-image noise seeds of `generate`
    generator_fid(sample, dataset, net, real, device, batch_size=8, seed=0, amp='fp32') -> float
    sample_grid(sample, grid, path)                                   the finetune scripts' fixed grid

    embed(net, images, amp='fp32') -> float64 array (B, D)           one batch
    features(net, batches, amp='fp32') -> float64 array (N, D)       an iterable of batches
    stats(feats) -> (mu, sigma)
    frechet_distance(mu1, sigma1, mu2, sigma2, n=None, note=print) -> float (n: images per side: few-images note)
    kid(feats1, feats2, n_subsets=100, subset_size=1000, seed=0) -> (mean, std)
    generate(sample, dataset, device, batch_size=8, seed=0, samples_per_map=1, workers=0) -> yields batches
    label_maps(folder, n_values, min_hw, flag) -> the label PNGs of a folder, each checked; LabelMaps: their dataset;
        output_names(rel, K) -> the images/ paths of a map's K images
    load_segmenter(segmenter, device='cpu', weights=None, dataset=None) -> (seg, its input from [-1,1], name)
        or None: the paper's segmenters (models/segmenters.py) or a TorchScript file
    segment(seg, images, n_channels, amp='fp32', name='segmenter') -> channel ids (B,H,W)
    confusion(pred, label, n_channels) -> (C, C) int64;  iou(conf, channels) -> (mIoU, per-class IoU)
    to_uint8(x), save_grid(rows, path)                                PNGs and grids
    folder_images(folder, flag) -> sorted image files; image_batches(files, batch_size, device, workers=0)
    fid_metrics, describe_features, fid_lines, check_sizes, miou_results, score_folders, model_classes:
        evaluate.py's scores, lines and checks
    provenance(argv=None, script) -> command line, git commit, package versions (results.json); Said: the
        stdout that keeps the warning lines for it

`amp` is a precision mode of models/amp.py ('bf16', 'fp16', 'fp32'; autocast on CUDA, bf16 also on the CPU);
metrics' functions take the mode the caller picked (default 'fp32'), never None: it names cached statistics.
"""
import copy
import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg

from data import class_table, onehot
from models import DataError, diffusion, figures, no_file, segmenters
from models.amp import autocast
from models.figures import channel_names, legend_of
from models.weights import fetch as fetch_weights, resolve as resolve_weights
from models.inception import INCEPTION_FILE, load_fid_inception
from models.palette import palette

IMAGE_EXTS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}  # pytorch-fid's list


class ScriptedFeatures(nn.Module):
    """A TorchScript feature net ((B,3,H,W) in [0,1] -> (B,D)) for the toy-domain FID."""

    toy = True

    def __init__(self, net, tag):
        super().__init__()
        self.net, self.tag = net, tag

    def forward(self, x):
        return self.net(x).float()


def file_digest(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:10]


def jit_load(path, device):
    with warnings.catch_warnings():  # torch 2.14 flags torch.jit as deprecated; TorchScript files are our format
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location=device)


def load_feature_net(inception=None, fid_features=None, device="cpu"):
    """The FID Inception (a local file, a weight name, or by default `weights.fetch('fid_inception')`, as
    pytorch-fid), or a TorchScript feature net; eval mode, on `device`.

    `net.tag` names the network (and its file's digest) for the real-statistics cache;
    `net.toy` is True for a TorchScript feature net (toy-domain FID).
    """
    if inception is not None and fid_features is not None:
        raise DataError("FID takes one of --inception (the FID Inception weights) or --fid-features "
                        "(a TorchScript feature net), not both")
    if fid_features is None:  # the Inception: a given file, or by name from the cache (downloaded once)
        path = resolve_weights(inception, "--inception") if inception else fetch_weights("fid_inception")
        net = load_fid_inception(path)
        net.tag = f"inception-{file_digest(path)}"
    else:
        path = Path(fid_features)
        if not path.is_file():
            raise DataError(f"--fid-features {path}: {no_file(path)}; expected a TorchScript feature net "
                             "(input (B,3,H,W) in [0,1], output (B,D))")
        try:
            scripted = jit_load(path, "cpu")
        except Exception as e:
            raise DataError(f"--fid-features {path}: not a TorchScript file ({type(e).__name__})")
        net = ScriptedFeatures(scripted, f"features-{path.stem}-{file_digest(path)}")
        net.path = str(path)
    net.requires_grad_(False)
    net = net.to(device).eval()
    if torch.device(device).type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    return net


@torch.no_grad()
def embed(net, images, amp="fp32"):
    """Features of one batch (B,3,H,W) in [0,1] as a float64 array (B, D)."""
    with autocast(images.device, amp):
        f = net(images)
    if f.ndim != 2 or f.shape[0] != images.shape[0]:
        raise DataError(f"feature net {getattr(net, 'tag', '')}: returned shape {tuple(f.shape)}, "
                         f"expected (B, D) with B = {images.shape[0]}")
    return f.double().cpu().numpy()


def features(net, batches, amp="fp32"):
    """Features of an iterable of batches in [0,1], stacked: float64 (N, D)."""
    parts = [embed(net, x, amp) for x in batches]
    return np.concatenate(parts) if parts else np.zeros((0, 0))


def stats(feats):
    """Mean and covariance in float64, as pytorch-fid (np.cov: unbiased, 1/(N-1))."""
    feats = np.asarray(feats, dtype=np.float64)
    if len(feats) < 2:
        raise DataError(f"FID needs at least 2 images, got {len(feats)}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


_SAID = set()  # the few-images notes printed already (once per run)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6, n=None, note=print):
    """||mu1-mu2||^2 + tr(s1 + s2 - 2 sqrt(s1 s2)), with pytorch-fid 0.3.0's numerics.

    scipy's warnings on singular covariances (few images: `n`, the smaller side's count, not above the feature
    dimension) are not printed; one line of ours says what they mean, once per run, given to `note`."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise DataError(f"FID statistics differ in size: {mu1.shape[0]} vs {mu2.shape[0]} features")
    diff, d = mu1 - mu2, mu1.shape[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        covmean = linalg.sqrtm(sigma1.dot(sigma2))  # scipy >= 1.17: no `disp`, same array
        retried = not np.isfinite(covmean).all()
        if retried:  # pytorch-fid's fallback
            offset = np.eye(d) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    caught = [w for w in caught if issubclass(w.category, (linalg.LinAlgWarning, RuntimeWarning))]
    few = f"{n} images for {d} features" if n is not None and n <= d else None
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            imag = np.max(np.abs(covmean.imag))
            raise DataError(f"FID: sqrtm of the covariances has an imaginary component {imag:.3g} (pytorch-fid's "
                            "error)" + (f"; {few}: use more images" if few else ""))
        covmean = covmean.real
    if (few or caught or retried) and (n, d) not in _SAID:
        _SAID.add((n, d))
        why = few or "singular covariances"
        note(f"warning: FID on {why}: the covariances are singular (scipy's sqrtm is inaccurate"
              f"{', retried with eps*I' if retried else ''}), so this FID is noisy and biased high; "
              "compare FIDs only at one number of images, ideally more than the feature dimension")
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def kid(feats1, feats2, n_subsets=100, subset_size=1000, seed=0):
    """Kernel Inception Distance: unbiased MMD^2 with k(x,y) = (x.y/d + 1)^3 over random subsets."""
    m = min(len(feats1), len(feats2), subset_size)
    if m < 2:
        raise DataError(f"KID needs at least 2 images on each side, got {len(feats1)} and {len(feats2)}")
    d = feats1.shape[1]
    rng = np.random.default_rng(seed)
    t = np.empty(n_subsets)
    for i in range(n_subsets):
        x = feats1[rng.choice(len(feats1), m, replace=False)]
        y = feats2[rng.choice(len(feats2), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        within = kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)
        t[i] = within / (m * (m - 1)) - 2 * kxy.mean()
    return float(t.mean()), float(t.std())


def loader(dataset, batch_size, workers=0):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def stats_key(dataset, net, amp="fp32"):
    """Digest of what the real statistics depend on: every image and label file (path, size, mtime_ns),
    the preprocessing (output and load size, augmentation) and the network (tag, precision)."""
    h = hashlib.sha1(f"{dataset.size} {getattr(dataset, 'load', None)} {getattr(dataset, 'augment', False)} "
                     f"{net.tag} {amp}\n".encode())
    for pair in dataset.files:
        for f in pair:
            st = os.stat(f)
            h.update(f"{Path(f).resolve()} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:10]


def real_stats(dataset, net, cache_dir=None, device="cpu", batch_size=16, amp="fp32", workers=0):
    """(mu, sigma, feats) of a dataset's preprocessed images ((x+1)/2, not quantised, as OASIS).

    Cached in cache_dir as <dataset>-<split>-<HxW>-<net tag>[-bf16|-fp16]-<N>-<stats_key>.npz: replacing an image
    or a label file (even under the same name) changes the key, so stale statistics are never reused.
    """
    h, w = dataset.size
    low = "" if amp == "fp32" else f"-{amp}"
    name = f"{dataset.dataset}-{dataset.split}-{h}x{w}-{net.tag}{low}-{len(dataset)}-{stats_key(dataset, net, amp)}.npz"
    path = Path(cache_dir) / name if cache_dir else None
    if path is not None and path.is_file():
        print(f"real statistics: cached {path}")
        z = np.load(path)
        return z["mu"], z["sigma"], z["feats"].astype(np.float64)
    feats = features(net, ((b["image"].to(device) + 1) / 2 for b in loader(dataset, batch_size, workers)), amp)
    mu, sigma = stats(feats)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")  # per process: two runs may share a cache
        np.savez(tmp, mu=mu, sigma=sigma, feats=feats.astype(np.float32))  # features are fp32 network outputs
        os.replace(tmp, path)
    return mu, sigma, feats


# ----------------------------------------------------------------------------------------------
# Generation


def image_seeds(seed, first_map, n_maps, k):
    """One independent seed per image: (seed, map index, sample index) -> uint32."""
    return [int(np.random.SeedSequence([seed, first_map + i, k]).generate_state(1)[0]) for i in range(n_maps)]


def oasis_sampler(G, n_channels, amp="fp32"):
    """sample(label (B,H,W) channel ids, seeds) -> images in [-1,1] from an OASIS Generator, in eval mode."""
    z_dim = G.kwargs["z_dim"]

    @torch.no_grad()
    def sample(label, seeds):
        z = torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(s)) for s in seeds])
        was_training = G.training
        G.eval()
        with autocast(label.device, amp):
            x = G(onehot(label, n_channels), z.to(label.device))
        G.train(was_training)
        return x.float()

    return sample


def piti_sampler(base, up, steps=None, up_steps=None, ddim=False, amp="fp32"):
    """sample(label (B,H,W) channel ids, seeds) -> (B,3,S,S) images in [-1,1] from a PITI base + upsampler
    (models/diffusion.cascade's steps), with one noise stream per image: image i's initial and step noises
    come from its own generator seeded by seeds[i], so an image does not depend on the batch it is in."""

    class Noise:  # step k's noise (noises[k] in diffusion.sample): one draw per image from its own stream
        def __init__(self, gens, side, device):
            self.gens, self.shape, self.device = gens, (3, side, side), device

        def __getitem__(self, k, scale=1.0):
            return torch.stack([torch.randn(self.shape, generator=g, device=self.device) for g in self.gens]) * scale

    @torch.no_grad()
    def sample(label, seeds):
        gens = [torch.Generator(label.device).manual_seed(int(s)) for s in seeds]
        lo, hi = Noise(gens, base.image_size, label.device), Noise(gens, up.image_size, label.device)
        low = diffusion.sample(base, base.ref(label), steps=steps, x_T=lo[0], noises=lo, ddim=ddim, amp=amp)
        return diffusion.sample(up, up.ref(label), steps=up_steps, low_res=diffusion.quantize(low),
                                x_T=hi.__getitem__(0, diffusion.UP_TEMP), noises=hi, amp=amp).float()

    return sample


def generate(sample, dataset, device, batch_size=8, seed=0, samples_per_map=1, workers=0):
    """Yields per batch {'label', 'real' (in [-1,1]; None for label maps alone), 'fake': [K tensors in [-1,1]],
    'path', 'item' (the dataset's own fields)}; image k of map i is seeded by (seed, i, k) (image_seeds)."""
    first = 0
    for batch in loader(dataset, batch_size, workers):
        label = batch["label"].to(device)
        fake = [sample(label, image_seeds(seed, first, len(label), k)) for k in range(samples_per_map)]
        real = batch["image"].to(device) if "image" in batch else None
        yield {"label": label, "real": real, "fake": fake, "path": batch["path"], "item": batch}
        first += len(label)


def generator_fid(sample, dataset, net, real, device, batch_size=8, seed=0, amp="fp32"):
    """FID of a sampler on a dataset's label maps against real (mu, sigma), e.g. for early stopping."""
    batches = ((b["fake"][0] + 1) / 2 for b in generate(sample, dataset, device, batch_size, seed))
    feats = features(net, batches, amp)
    mu, sigma = stats(feats)
    return frechet_distance(mu, sigma, real[0], real[1], n=len(feats))


def validation_fid(sample, val_ds, inception, fid_features, fid_n, cache_dir, device, batch_size, seed, amp="fp32"):
    """fid() -> FID of a sampler on the first `fid_n` validation maps (all with None), for the finetuning
    scripts' early stopping; None without a feature network. The real statistics are computed once (cached)."""
    if not (inception or fid_features):
        return None
    net = load_feature_net(inception, fid_features, device)
    fid_ds = copy.copy(val_ds)
    fid_ds.files = val_ds.files[:fid_n]
    real = real_stats(fid_ds, net, cache_dir=cache_dir, device=device, amp=amp)[:2]
    return lambda: generator_fid(sample, fid_ds, net, real, device, batch_size, seed, amp)


def fixed_grid(val_ds, n, seeds, device):
    """The finetuning scripts' grid: the first n validation maps and images with fixed seeds (see sample_grid)."""
    items = [val_ds[i] for i in range(min(n, len(val_ds)))]
    return {"label": torch.stack([it["label"] for it in items]).to(device),
            "real": torch.stack([it["image"] for it in items]), "n_channels": val_ds.n_channels,
            "names": channel_names(val_ds.classes), "seeds": seeds(len(items)) if callable(seeds) else seeds}


def resize_images(x, hw):
    """Generated images to the evaluation size `hw` (bilinear, antialiased, clamped to [-1, 1]): how both
    evaluate.py and the finetuning scripts score a model whose output size differs from the real images'
    (PITI samples 256x256, Cityscapes images are 256x512)."""
    if tuple(x.shape[-2:]) != tuple(hw):
        x = F.interpolate(x, tuple(hw), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(-1, 1)


# ----------------------------------------------------------------------------------------------
# mIoU


def load_segmenter(segmenter, device="cpu", weights=None, dataset=None):
    """The mIoU segmenter from --segmenter / --segmenter-weights, the one place where segmenters are resolved.

    `segmenter`: deeplabv2 / upernet101 / drn105 (official weights in `weights`; with weights only, the
    default segmenter of `dataset`), torchscript (one file in `weights`) or a TorchScript file path
    (input (B,3,H,W) in [0,1], logits (B,C,H,W) over the dataset's channels). Weight files may be given by
    name (upernet101_encoder upernet101_decoder: fetched once, models/weights.py). Returns (segmenter in eval
    mode on `device`, its input from images in [-1,1], its name), or None when neither flag is given."""
    weights = [str(resolve_weights(w, "--segmenter-weights")) for w in weights] if weights else weights
    name, paths = segmenters.resolve_choice(segmenter, weights, dataset)
    if name is None:
        return None
    if name == "torchscript":
        return jit_segmenter(paths[0], device), (lambda x: (x + 1) / 2), paths[0]
    return segmenters.build_segmenter(name, paths, device), (lambda x: x), name


def jit_segmenter(path, device):
    """A TorchScript segmenter file, in eval mode on `device`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--segmenter {path}: {no_file(path)}; expected a TorchScript segmenter "
                        "(input (B,3,H,W) in [0,1], output logits (B,C,H,W) over the dataset's channels)")
    try:
        return jit_load(path, device).eval()
    except Exception as e:
        raise DataError(f"--segmenter {path}: not a TorchScript file ({type(e).__name__})")


@torch.no_grad()
def segment(seg, images, n_channels, amp="fp32", name="segmenter"):
    """Predicted channel ids (B,H,W) at the images' resolution; channel 0 (dontcare) is never predicted."""
    with autocast(images.device, amp):
        logits = seg(images)
    logits = logits.float()
    if logits.ndim != 4 or logits.shape[1] != n_channels:
        got = f"{logits.shape[1]} channels" if logits.ndim == 4 else "not (B, C, H, W)"
        raise DataError(f"{name}: outputs shape {tuple(logits.shape)}, i.e. {got}; the dataset has {n_channels} "
                         "(channel 0 = dontcare)")
    if logits.shape[2:] != images.shape[2:]:
        logits = F.interpolate(logits, size=images.shape[2:], mode="bilinear", align_corners=False)
    return logits[:, 1:].argmax(1) + 1


def confusion(pred, label, n_channels):
    """Confusion matrix (rows: true channel, columns: predicted) over the labelled (non-dontcare) pixels.

    The labels are nearest-resized (legacy 'nearest', as OASIS) to the prediction's resolution.
    """
    if label.shape[-2:] != pred.shape[-2:]:
        label = F.interpolate(label[:, None].float(), size=pred.shape[-2:], mode="nearest")[:, 0].long()
    valid = label > 0
    idx = label[valid] * n_channels + pred[valid]
    return torch.bincount(idx, minlength=n_channels * n_channels).reshape(n_channels, n_channels).cpu().numpy()


def iou(conf, channels):
    """(mIoU, [IoU per channel in `channels`, None where the class is absent from labels and predictions]).

    Pixels labelled with a channel outside `channels` are ignored, as Cityscapes ignores its void classes."""
    conf = conf.astype(np.float64)[channels]  # rows: the scored label channels only
    inter = conf[np.arange(len(channels)), channels]
    union = conf.sum(1) + conf[:, channels].sum(0) - inter
    per = [float(i / u) if u > 0 else None for i, u in zip(inter, union)]
    present = [v for v in per if v is not None]
    return (float(np.mean(present)) if present else None), per


# ----------------------------------------------------------------------------------------------
# Images


def to_uint8(x):
    """(B,3,H,W) in [-1,1] -> (B,H,W,3) uint8, rounded."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

def save_grid(rows, path, titles=None, legend=None, key=None):
    """rows: lists of (H,W,3) uint8 tiles (label colours | samples | real); tiles of another size are
    nearest-resized to the largest one; 2-pixel white gaps. titles: one per column, written above;
    legend: [(class name, colour)] swatches written below; key: texts saying what short titles stand for,
    written below before the legend (models/figures.py)."""
    h = max(t.shape[0] for r in rows for t in r)
    w = max(t.shape[1] for r in rows for t in r)
    cols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, t in enumerate(r):
            if t.shape[:2] != (h, w):
                t = np.asarray(Image.fromarray(t).resize((w, h), Image.NEAREST))
            grid[i * (h + 2):i * (h + 2) + h, j * (w + 2):j * (w + 2) + w] = t
    if titles or legend or key:
        grid = figures.annotate_grid(grid, w, 2, titles, legend, key)
    Image.fromarray(grid).save(path)


def grid_titles(n_samples):
    """Column titles of a grid row: labels | generated (1..K) | real."""
    gen = ["generated"] if n_samples == 1 else [f"generated {k + 1}" for k in range(n_samples)]
    return ["labels", *gen, "real"]


def sample_grid(sample, grid, path):
    """The training scripts' grid: label colours | sample | real image for fixed val maps and seeds, with column
    titles and a legend of the classes shown. grid: {'label': (B,H,W) long, 'real': (B,3,H,W) in [-1,1],
    'seeds': per-row seeds, 'n_channels': int, optional 'names': {channel: class name} (channel_names)}."""
    fake = sample(grid["label"], grid["seeds"])
    colours = palette(grid["n_channels"]).numpy()
    labels = grid["label"].cpu().numpy()
    rows = [[colours[lab], f, r] for lab, f, r in zip(labels, to_uint8(fake), to_uint8(grid["real"]))]
    legend = legend_of(labels, grid["names"], colours) if grid.get("names") else None
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(rows, path, grid_titles(1), legend)


def folder_images(folder, flag):
    """Sorted image files of a folder (not recursive), all of one size, at least 2."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{flag} {folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if len(files) < 2:
        raise DataError(f"{flag} {folder}: {len(files)} image(s) found, FID and KID need at least 2")
    sizes = {}
    for p in files:
        try:
            with Image.open(p) as im:
                sizes.setdefault(im.size, p)
        except OSError as e:
            raise DataError(f"{p}: unreadable image ({e})")
        if len(sizes) > 1:
            (s1, p1), (s2, p2) = sizes.items()
            raise DataError(f"{flag} {folder}: images of mixed sizes: {p1.name} is {s1[0]}x{s1[1]}, "
                             f"{p2.name} is {s2[0]}x{s2[1]}; expected one size")
    return files


class ImageFiles(torch.utils.data.Dataset):
    """Images read as pytorch-fid does: PIL, RGB, uint8 / 255 -> float (3,H,W) in [0,1]."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            image = np.asarray(Image.open(self.files[i]).convert("RGB")).copy()
        except OSError as e:  # truncated or not an image: one line (also from a loader worker)
            raise DataError(f"{self.files[i]}: unreadable image ({e})") from None
        return torch.from_numpy(image).permute(2, 0, 1).float() / 255


def image_batches(files, batch_size, device, workers=0):
    for x in loader(ImageFiles(files), batch_size, workers):
        yield x.to(device)


# ----------------------------------------------------------------------------------------------
# Scores as evaluate.py reports them


def fid_metrics(real_feats, fake_feats, real=None, notes=None):
    """FID (from real (mu, sigma) when given) and KID of two feature sets; a few-images warning goes to `notes`."""
    mu_r, sigma_r = real if real is not None else stats(real_feats)
    mu_f, sigma_f = stats(fake_feats)
    kid_mean, kid_std = kid(real_feats, fake_feats)
    fid = frechet_distance(mu_f, sigma_f, mu_r, sigma_r, n=min(len(real_feats), len(fake_feats)),
                           note=print if notes is None else notes.append)
    return {"fid": fid, "kid_mean": kid_mean, "kid_std": kid_std}


def describe_features(net):
    """What the FID of `net` is, for results.json."""
    if net.toy:
        return (f"toy-domain FID on the TorchScript feature net {net.path}: "
                "not comparable to Inception FID")
    return f"Inception FID ({INCEPTION_FILE}, 2048-d pool3, as pytorch-fid 0.3.0)"


def fid_lines(metrics, toy):
    """The printed FID and KID. KID is an unbiased estimate, so it can be slightly below 0 when the two sets are
    close or few, and its +- is the spread over random subsets: 0 when every subset holds all images (N <= 1000)."""
    why = [w for w, c in (("unbiased estimate: can be below 0", metrics["kid_mean"] < 0),
                          ("one subset of all images: no spread", metrics["kid_std"] == 0)) if c]
    return [f"fid {metrics['fid']:.4f}" + (" (toy-domain features)" if toy else ""),
            f"kid {metrics['kid_mean']:.6f} +- {metrics['kid_std']:.6f}" + (f" ({'; '.join(why)})" if why else "")]


def check_sizes(fake_hw, real_hw, ckpt, dataset):
    """Refuses to score generated images of one size (H, W) against real images of another, before generating."""
    (h, w), (H, W) = fake_hw, real_hw
    if (h, w) != (H, W):
        fix = (f"pass --size {w} to read the real images at the generator's size"
               if (dataset.dataset == "folder" or dataset.dataset.startswith("toy")) and h == w
               else "evaluate it on data of its own resolution")
        raise DataError(f"--ckpt {ckpt}: the generator makes {h}x{w} images, --data {dataset.dataset} "
                        f"({dataset.split}) images are {H}x{W} here; {fix}, so that FID and mIoU compare one size")


def score_folders(real_dir, fake_dir, inception=None, fid_features=None, device="cpu", batch_size=16, workers=0,
                  amp="fp32"):
    """evaluate.py's folder mode: FID and KID of two folders of images, as pytorch-fid reads them
    -> (results, printed lines)."""
    real_files, fake_files = folder_images(real_dir, "--real-dir"), folder_images(fake_dir, "--fake-dir")
    net = load_feature_net(inception, fid_features, device)
    real_feats = features(net, image_batches(real_files, batch_size, device, workers), amp)
    fake_feats = features(net, image_batches(fake_files, batch_size, device, workers), amp)
    notes = []
    metrics = fid_metrics(real_feats, fake_feats, notes=notes)
    results = {"mode": "folder", **metrics, "n_real": len(real_files), "n_fake": len(fake_files),
               "fid_features": describe_features(net), "toy_domain_fid": net.toy}
    return results, fid_lines(metrics, False) + notes


def model_classes(info):
    """(names, channels) of the classes a checkpoint's target table records (None: an older one without names)."""
    names = (info or {}).get("names")
    if not names:
        return None
    known = info.get("dataset") in ("coco", "ade20k", "cityscapes")
    return list(names), class_table(info["dataset"]).channels if known else list(range(1, len(names) + 1))


def miou_results(conf, conf_real, dataset, seg):
    """mIoU of the generated and of the real images over the dataset's scored classes -> (results, lines)."""
    scored = dataset.classes.eval_channels
    names = [n for n, c in zip(dataset.classes.names, dataset.classes.channels) if c in scored]  # unique names
    miou, per = iou(conf, scored)
    miou_real, per_real = iou(conf_real, scored)
    results = dict(miou=miou, miou_real=miou_real, segmenter=seg[2], per_class_iou=dict(zip(names, per)),
                   per_class_iou_real=dict(zip(names, per_real)))
    return results, [f"miou {miou:.4f}" if miou is not None else "miou undefined (no labelled pixels)",
                     f"miou_real {miou_real:.4f}" if miou_real is not None else "miou_real undefined"]


# ----------------------------------------------------------------------------------------------
# Label maps alone (evaluate.py --labels)

LABEL_MODES = ("1", "L", "P", "I;16", "I")  # single-channel class ids (P: read by its palette indices)


def _label_values(path):
    """A label PNG's class ids as an int64 array (H, W), or one DataError line saying what the file is."""
    try:
        with Image.open(path) as im:
            if im.mode not in LABEL_MODES:
                how = ("convert the colours to class ids (one value per class, value k = line k of classes.txt), "
                       "or save it as a palette PNG (mode P), whose indices are read as the ids"
                       if im.mode in ("RGB", "RGBA") else "expected a single-channel PNG of class ids")
                raise DataError(f"{path}: a mode-{im.mode} image, not a map of class ids; {how}")
            return np.asarray(im).astype(np.int64)
    except (OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise DataError(f"{path}: unreadable image ({e})") from None


def label_maps(folder, n_values, min_hw, flag="--labels"):
    """The label PNGs under `folder` (flat or in subfolders, by relative path), every one read and checked before
    anything is generated: a readable single-channel map of ids (modes 1, L, P, I;16, I) with values 0..n_values
    (the classes.txt convention: value k = line k, 0 = unlabelled), at least min_hw (H, W) in size.
    -> [(path, relative path, (H, W))]; one DataError line naming the first bad file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{flag} {folder}: no such folder; expected a folder of label PNGs and its classes.txt")
    files = sorted((p for p in folder.rglob("*") if p.suffix.lower() == ".png" and p.is_file()),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise DataError(f"{flag} {folder}: no .png label maps found (flat or in subfolders)")
    maps = []
    for p in files:
        v = _label_values(p)
        (h, w), (mh, mw) = v.shape, min_hw
        if v.max(initial=0) > n_values:
            y, x = np.argwhere(v > n_values)[0]
            raise DataError(f"{p}: value {int(v[y, x])} at (x={x}, y={y}) is outside the {n_values} classes of "
                            f"classes.txt (expected 0..{n_values}: value k = line k, 0 = unlabelled)")
        if h < mh or w < mw:
            raise DataError(f"{p}: {w}x{h} pixels, smaller than the model's minimum {mw}x{mh}")
        maps.append((p, p.relative_to(folder).as_posix(), (h, w)))
    return maps


def output_names(rel, K):
    """images/<relative path of the map, .png>, with _k before the suffix for K > 1 samples per map."""
    stem = Path(rel).with_suffix("").as_posix()
    return [f"images/{stem}{f'_{k}' if K > 1 else ''}.png" for k in range(K)]


class LabelMaps(torch.utils.data.Dataset):
    """Checked label maps (label_maps) as model input: item i -> {'label': channel ids (H,W) (the folder
    convention: PNG value k = channel k), nearest-resized (PIL, as the datasets) to the model's size `hw`,
    'path': the map's relative path, 'hw': its own (H, W)}; `classes` is the maps' class table."""

    def __init__(self, maps, classes, hw):
        self.maps, self.classes, self.n_channels, self.hw = maps, classes, classes.n_channels, tuple(hw)

    def __len__(self):
        return len(self.maps)

    def __getitem__(self, i):
        path, rel, hw = self.maps[i]
        ids = Image.fromarray(_label_values(path).astype(np.int32))
        ids = np.asarray(ids.resize(self.hw[::-1], Image.NEAREST)).astype(np.int64)
        return {"label": torch.from_numpy(ids), "path": rel, "hw": torch.tensor(hw)}


def provenance(argv=None, script="evaluate.py"):
    """What a results.json needs to be traced back: the command line, the git commit (in a checkout; a dirty
    tree says so), the versions of python and of the packages the numbers depend on."""
    import platform
    import subprocess
    import sys
    import PIL
    import scipy
    repo = Path(__file__).resolve().parent
    commit = None
    if (repo / ".git").exists():
        try:
            git = ["git", "-C", str(repo)]
            commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
            dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=10).stdout.strip()
            commit = (commit + (" (with uncommitted changes)" if dirty else "")) if commit else None
        except (OSError, subprocess.SubprocessError):
            commit = None
    argv = sys.argv if argv is None else [script, *argv]
    return {"command": " ".join(map(str, argv)), "git_commit": commit,
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                         "scipy": scipy.__version__, "pillow": PIL.__version__}}


class Said:
    """stdout that also keeps the 'warning...' and note lines printed during a run, for results.json."""

    def __init__(self, stream):
        self.stream, self.lines = stream, []

    def write(self, text):
        self.lines += [ln for ln in text.splitlines() if ln.startswith(("warning", "note"))]
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()
