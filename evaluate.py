"""Evaluate a generator, or two folders of images: FID, KID, mIoU, sample PNGs and a grid.

    # a checkpoint of ours (finetune_oasis.py / finetune_piti.py) on the toy task's validation maps
    python evaluate.py --ckpt runs/x/checkpoint.pt --data toy-target --split val --out out/eval \
        --fid-features toy_features.pt --segmenter toy_segmenter.pt
    # training-free CAT: an official OASIS run dir (or our source checkpoint) + an affinity
    python evaluate.py --ckpt checkpoints/oasis_ade20k_pretrained --source ade20k --affinity affinity.npy \
        --data folder --data-root my_data --out out/eval --inception pt_inception-2015-12-05-6726825d.pth
    # two folders, no model (pytorch-fid's `fid_score` on two paths, plus KID)
    python evaluate.py --real-dir A --fake-dir B --inception pt_inception-2015-12-05-6726825d.pth --out out/fid

Protocol (also written into results.json):
- Generation: the EMA generator in eval mode, one image per validation label map (K with
  --samples-per-map); image k of map i uses its own noise, seeded by (--seed, i, k), so results do not
  depend on the batch size (PITI samplers take one seed per batch: the first image's).
- FID: the 2048-d pool3 features of the FID Inception (pt_inception-2015-12-05-6726825d.pth, as
  pytorch-fid 0.3.0 and OASIS): input in [0, 1], resized bilinearly (align_corners=False) to 299x299,
  mapped to [-1, 1]; mean and covariance (np.cov, 1/(N-1)) in float64; the Frechet distance with
  scipy's sqrtm, retried with eps*I on non-finite results, the real part kept when the imaginary
  diagonal is below 1e-3 (else an error), exactly as pytorch-fid. As in OASIS, real images are the
  preprocessed validation images and generated images are scored as floats, not quantised PNGs.
  --fid-features FILE replaces Inception by a TorchScript feature net: a toy-domain FID that is not
  comparable to Inception FID (results.json says so).
- KID: unbiased MMD^2 with the kernel (x.y/d + 1)^3, over 100 random subsets of min(1000, N) images
  from each side; mean and std over the subsets.
- mIoU: a TorchScript segmenter on the generated images at the generated resolution; labels
  nearest-resized (legacy 'nearest') to that resolution; dontcare pixels (channel 0) ignored and
  channel 0 never predicted; one confusion matrix over the whole split; IoU of a class with an empty
  union is undefined and left out of the mean. The same segmenter on the real images gives miou_real.
- PNGs: uint8 = round(255 (x+1)/2), clamped (the official OASIS test.py truncates instead).
- Precision: on CUDA the generator and the segmenter run under bf16 autocast (--fp32 turns it off).
  The FID/KID network runs in fp32 (cuDNN's default TF32, as pytorch-fid) unless --bf16-features;
  bench/bench_fid.py measures what bf16 does to FID (allowed: 0.1% relative) and the speed-up.

Importable helpers (stable names; the finetune scripts use them for early stopping):
    load_feature_net(inception=None, fid_features=None, device='cpu') -> net ((B,3,H,W) in [0,1] -> (B,D))
    embed(net, images, bf16=False) -> float64 array (B, D)           one batch
    features(net, batches, bf16=False) -> float64 array (N, D)       an iterable of batches
    stats(feats) -> (mu, sigma)
    frechet_distance(mu1, sigma1, mu2, sigma2) -> float
    kid(feats1, feats2, n_subsets=100, subset_size=1000, seed=0) -> (mean, std)
    real_stats(dataset, net, cache_dir=None, device='cpu', batch_size=16, bf16=False) -> (mu, sigma, feats)
    oasis_sampler(G, n_channels, bf16=False) -> sample(label, seeds) -> images in [-1, 1]
    generate(sample, dataset, device, batch_size=8, seed=0, samples_per_map=1) -> yields batches
    generator_fid(sample, dataset, net, real, device, batch_size=8, seed=0, bf16=False) -> float
    image_seeds(seed, first_map, n_maps, k) -> the per-image noise seeds of `generate`
    load_segmenter(path, device), segment(seg, images, n_channels), confusion(pred, label, n_channels),
    iou(conf, channels) -> (mIoU, per-class IoU)
    to_uint8(x), palette(n), save_grid(rows, path)                    PNGs and grids
    sample_grid(sample, grid, path)                                   the finetune scripts' fixed grid
"""
import argparse
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg

from data import add_data_args, affinity_to_channels, class_table, dataset_from_args, onehot
from models.oasis import Generator, check_state_dict, load_official, oasis_config
from models.piti import load_piti_generator

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_HELP = (f"{INCEPTION_FILE}: get it from the 'fid_weights' release of mseitzer/pytorch-fid on GitHub "
                  f"(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE})")
IMAGE_EXTS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}  # pytorch-fid's list
PROTOCOL = {  # the module docstring in short, written into results.json
    "generation": "EMA generator in eval mode; image k of label map i from noise seeded by (seed, i, k)",
    "fid_inputs": "model mode: the preprocessed real images and the generated images as floats (x+1)/2, not "
                  "quantised (OASIS); folder mode: PNG/JPEG files read with PIL as RGB, uint8/255 (pytorch-fid)",
    "fid": "Inception input resized bilinearly (align_corners=False) to 299x299, mapped to 2x-1, 2048-d pool3 "
           "(or the --fid-features net's output); float64 mean and np.cov; Frechet distance with scipy's sqrtm "
           "as pytorch-fid 0.3.0",
    "kid": "unbiased MMD^2, kernel (x.y/d+1)^3, 100 subsets of min(1000, N) images per side; mean and std",
    "miou": "segmenter on the generated images at the generated resolution; labels nearest-resized; dontcare "
            "(channel 0) ignored and never predicted; one confusion matrix per split; classes with an empty "
            "union left out of the mean; Cityscapes scores its 19 evaluation classes and ignores void pixels",
    "images": "images/<label stem>[_k].png = uint8 round(255 (x+1)/2); grid.png rows: label | samples | real",
}

# ----------------------------------------------------------------------------------------------
# The FID Inception: TF's 2015-12-05 Inception v3 as ported by pytorch-fid. Module names equal the
# keys of the weights file, so it loads strictly.


class Conv(nn.Module):
    """conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    # TensorFlow's 3x3 average pool leaves the zero padding out of the average.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(tf_avg_pool(x))], 1)


class MixedB(nn.Module):  # grid reduction 35 -> 17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class MixedC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = Conv(cin, c7, 1), Conv(c7, c7, **row)
        self.branch7x7_3 = Conv(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = Conv(cin, c7, 1), Conv(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = Conv(c7, c7, **row), Conv(c7, c7, **col)
        self.branch7x7dbl_5 = Conv(c7, 192, **row)
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        b = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([self.branch1x1(x),
                          self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                          self.branch7x7dbl_5(self.branch7x7dbl_4(b)),
                          self.branch_pool(tf_avg_pool(x))], 1)


class MixedD(nn.Module):  # grid reduction 17 -> 8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), self.branch7x7x3_4(b),
                          F.max_pool2d(x, 3, stride=2)], 1)


class MixedE(nn.Module):
    def __init__(self, cin, max_pool):
        super().__init__()
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.max_pool = max_pool  # the last block of the FID Inception max-pools (a quirk of the TF graph)
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = Conv(384, 384, **row), Conv(384, 384, **col)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = Conv(384, 384, **row), Conv(384, 384, **col)
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
                          self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """(B,3,H,W) in [0,1] -> (B,2048) pool3 features."""

    tag, toy = "inception", False  # load_feature_net adds the weight file's digest to the tag

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = MixedA(192, 32), MixedA(256, 64), MixedA(288, 64)
        self.Mixed_6a = MixedB(288)
        self.Mixed_6b, self.Mixed_6c = MixedC(768, 128), MixedC(768, 160)
        self.Mixed_6d, self.Mixed_6e = MixedC(768, 160), MixedC(768, 192)
        self.Mixed_7a = MixedD(768)
        self.Mixed_7b, self.Mixed_7c = MixedE(1280, max_pool=False), MixedE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # unused; present so that the official file loads strictly

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):  # resize and scale in fp32 even under autocast
            x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
            x = 2 * x - 1
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.float().mean((2, 3))


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
    """The FID Inception from its local file, or a TorchScript feature net; eval mode, on `device`.

    `net.tag` names the network (and its file's digest) for the real-statistics cache;
    `net.toy` is True for a TorchScript feature net (toy-domain FID).
    """
    if (inception is None) == (fid_features is None):
        raise SystemExit("FID needs exactly one of --inception (the FID Inception weights) or --fid-features "
                         "(a TorchScript feature net)")
    if inception is not None:
        path = Path(inception)
        if not path.is_file():
            raise SystemExit(f"--inception {path}: file not found; FID needs {INCEPTION_HELP}")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SystemExit(f"--inception {path}: not a readable state dict ({type(e).__name__}); "
                             f"expected {INCEPTION_FILE}")
        if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
            raise SystemExit(f"--inception {path}: holds a {type(sd).__name__}, expected the state dict "
                             f"{INCEPTION_FILE}")
        net = FIDInception()
        own = net.state_dict()
        missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]  # optional in old files
        unexpected = [k for k in sd if k not in own]
        shapes = [k for k in own if k in sd and sd[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            raise SystemExit(f"--inception {path}: not the FID Inception weights ({len(missing)} keys missing, "
                             f"{len(unexpected)} unexpected, {len(shapes)} of another shape, e.g. "
                             f"{(missing + unexpected + shapes)[0]}); expected {INCEPTION_FILE}")
        net.load_state_dict(sd)
        net.tag = f"inception-{file_digest(path)}"
    else:
        path = Path(fid_features)
        if not path.is_file():
            raise SystemExit(f"--fid-features {path}: file not found; expected a TorchScript feature net "
                             "(input (B,3,H,W) in [0,1], output (B,D))")
        try:
            scripted = jit_load(path, "cpu")
        except Exception as e:
            raise SystemExit(f"--fid-features {path}: not a TorchScript file ({type(e).__name__})")
        net = ScriptedFeatures(scripted, f"features-{path.stem}-{file_digest(path)}")
    net.requires_grad_(False)
    net = net.to(device).eval()
    if torch.device(device).type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    return net


@torch.no_grad()
def embed(net, images, bf16=False):
    """Features of one batch (B,3,H,W) in [0,1] as a float64 array (B, D)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and images.is_cuda):
        f = net(images)
    if f.ndim != 2 or f.shape[0] != images.shape[0]:
        raise SystemExit(f"feature net {getattr(net, 'tag', '')}: returned shape {tuple(f.shape)}, "
                         f"expected (B, D) with B = {images.shape[0]}")
    return f.double().cpu().numpy()


def features(net, batches, bf16=False):
    """Features of an iterable of batches in [0,1], stacked: float64 (N, D)."""
    parts = [embed(net, x, bf16) for x in batches]
    return np.concatenate(parts) if parts else np.zeros((0, 0))


def stats(feats):
    """Mean and covariance in float64, as pytorch-fid (np.cov: unbiased, 1/(N-1))."""
    feats = np.asarray(feats, dtype=np.float64)
    if len(feats) < 2:
        raise SystemExit(f"FID needs at least 2 images, got {len(feats)}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1-mu2||^2 + tr(s1 + s2 - 2 sqrt(s1 s2)), with pytorch-fid 0.3.0's numerics."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise SystemExit(f"FID statistics differ in size: {mu1.shape[0]} vs {mu2.shape[0]} features")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))  # scipy >= 1.17: no `disp`, same array
    if not np.isfinite(covmean).all():
        print(f"fid: sqrtm gave non-finite values; adding {eps} to the covariance diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def kid(feats1, feats2, n_subsets=100, subset_size=1000, seed=0):
    """Kernel Inception Distance: unbiased MMD^2 with k(x,y) = (x.y/d + 1)^3 over random subsets."""
    m = min(len(feats1), len(feats2), subset_size)
    if m < 2:
        raise SystemExit(f"KID needs at least 2 images on each side, got {len(feats1)} and {len(feats2)}")
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


def real_stats(dataset, net, cache_dir=None, device="cpu", batch_size=16, bf16=False, workers=0):
    """(mu, sigma, feats) of a dataset's preprocessed images ((x+1)/2, not quantised, as OASIS).

    Cached in cache_dir as <dataset>-<split>-<HxW>-<net tag>[-bf16]-<N>-<digest of the file list>.npz.
    """
    h, w = dataset.size
    key = hashlib.sha1("\n".join(str(Path(img).resolve()) for img, _ in dataset.files).encode()).hexdigest()[:10]
    name = f"{dataset.dataset}-{dataset.split}-{h}x{w}-{net.tag}{'-bf16' if bf16 else ''}-{len(dataset)}-{key}.npz"
    path = Path(cache_dir) / name if cache_dir else None
    if path is not None and path.is_file():
        z = np.load(path)
        return z["mu"], z["sigma"], z["feats"].astype(np.float64)
    feats = features(net, ((b["image"].to(device) + 1) / 2 for b in loader(dataset, batch_size, workers)), bf16)
    mu, sigma = stats(feats)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, mu=mu, sigma=sigma, feats=feats.astype(np.float32))  # features are fp32 network outputs
        os.replace(tmp, path)
    return mu, sigma, feats


# ----------------------------------------------------------------------------------------------
# Generation


def image_seeds(seed, first_map, n_maps, k):
    """One independent seed per image: (seed, map index, sample index) -> uint32."""
    return [int(np.random.SeedSequence([seed, first_map + i, k]).generate_state(1)[0]) for i in range(n_maps)]


def oasis_sampler(G, n_channels, bf16=False):
    """sample(label (B,H,W) channel ids, seeds) -> images in [-1,1] from an OASIS Generator, in eval mode."""
    z_dim = G.kwargs["z_dim"]

    @torch.no_grad()
    def sample(label, seeds):
        z = torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(s)) for s in seeds])
        was_training = G.training
        G.eval()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and label.is_cuda):
            x = G(onehot(label, n_channels), z.to(label.device))
        G.train(was_training)
        return x.float()

    return sample


def generate(sample, dataset, device, batch_size=8, seed=0, samples_per_map=1, workers=0):
    """Yields per batch {'label', 'real' (in [-1,1]), 'fake': [K tensors in [-1,1]], 'path'}."""
    first = 0
    for batch in loader(dataset, batch_size, workers):
        label = batch["label"].to(device)
        fake = [sample(label, image_seeds(seed, first, len(label), k)) for k in range(samples_per_map)]
        yield {"label": label, "real": batch["image"].to(device), "fake": fake, "path": batch["path"]}
        first += len(label)


def generator_fid(sample, dataset, net, real, device, batch_size=8, seed=0, bf16=False):
    """FID of a sampler on a dataset's label maps against real (mu, sigma), e.g. for early stopping."""
    batches = ((b["fake"][0] + 1) / 2 for b in generate(sample, dataset, device, batch_size, seed))
    mu, sigma = stats(features(net, batches, bf16))
    return frechet_distance(mu, sigma, real[0], real[1])


# ----------------------------------------------------------------------------------------------
# mIoU


def load_segmenter(path, device):
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"--segmenter {path}: file not found; expected a TorchScript segmenter "
                         "(input (B,3,H,W) in [0,1], output logits (B,C,H,W) over the dataset's channels)")
    try:
        return jit_load(path, device).eval()
    except Exception as e:
        raise SystemExit(f"--segmenter {path}: not a TorchScript file ({type(e).__name__})")


@torch.no_grad()
def segment(seg, images, n_channels, bf16=False, name="segmenter"):
    """Predicted channel ids (B,H,W) at the images' resolution; channel 0 (dontcare) is never predicted."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and images.is_cuda):
        logits = seg(images)
    logits = logits.float()
    if logits.ndim != 4 or logits.shape[1] != n_channels:
        got = f"{logits.shape[1]} channels" if logits.ndim == 4 else "not (B, C, H, W)"
        raise SystemExit(f"{name}: outputs shape {tuple(logits.shape)}, i.e. {got}; the dataset has {n_channels} "
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


def palette(n):
    """A fixed colour per channel (the PASCAL VOC bit pattern); channel 0 is black."""
    colours = np.zeros((n, 3), np.uint8)
    for c in range(n):
        v = c
        for bit in range(8):
            for ch in range(3):
                colours[c, ch] |= ((v >> ch) & 1) << (7 - bit)
            v >>= 3
    return colours


def save_grid(rows, path):
    """rows: lists of (H,W,3) uint8 tiles (label colours | samples | real); tiles of another size are
    nearest-resized to the largest one; 2-pixel white gaps."""
    h = max(t.shape[0] for r in rows for t in r)
    w = max(t.shape[1] for r in rows for t in r)
    cols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, t in enumerate(r):
            if t.shape[:2] != (h, w):
                t = np.asarray(Image.fromarray(t).resize((w, h), Image.NEAREST))
            grid[i * (h + 2):i * (h + 2) + h, j * (w + 2):j * (w + 2) + w] = t
    Image.fromarray(grid).save(path)


def sample_grid(sample, grid, path):
    """The training scripts' grid: label colours | sample | real image for fixed val maps and seeds.
    grid: {'label': (B,H,W) long, 'real': (B,3,H,W) in [-1,1], 'seeds': per-row seeds, 'n_channels': int}."""
    fake = sample(grid["label"], grid["seeds"])
    colours = palette(grid["n_channels"])
    rows = [[colours[lab], f, r] for lab, f, r in
            zip(grid["label"].cpu().numpy(), to_uint8(fake), to_uint8(grid["real"]))]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(rows, path)


def folder_images(folder, flag):
    """Sorted image files of a folder (not recursive), all of one size, at least 2."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"{flag} {folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if len(files) < 2:
        raise SystemExit(f"{flag} {folder}: {len(files)} image(s) found, FID and KID need at least 2")
    sizes = {}
    for p in files:
        try:
            with Image.open(p) as im:
                sizes.setdefault(im.size, p)
        except OSError as e:
            raise SystemExit(f"{p}: unreadable image ({e})")
        if len(sizes) > 1:
            (s1, p1), (s2, p2) = sizes.items()
            raise SystemExit(f"{flag} {folder}: images of mixed sizes: {p1.name} is {s1[0]}x{s1[1]}, "
                             f"{p2.name} is {s2[0]}x{s2[1]}; expected one size")
    return files


class ImageFiles(torch.utils.data.Dataset):
    """Images read as pytorch-fid does: PIL, RGB, uint8 / 255 -> float (3,H,W) in [0,1]."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        image = np.asarray(Image.open(self.files[i]).convert("RGB")).copy()
        return torch.from_numpy(image).permute(2, 0, 1).float() / 255


def image_batches(files, batch_size, device, workers=0):
    for x in loader(ImageFiles(files), batch_size, workers):
        yield x.to(device)


# ----------------------------------------------------------------------------------------------
# Generators from checkpoints


def read_affinity(path):
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"--affinity {path}: file not found; estimate_affinity.py writes it")
    try:
        A = np.load(path)
    except Exception as e:
        raise SystemExit(f"--affinity {path}: not a .npy array ({type(e).__name__})")
    sums = A.sum(1) if A.ndim == 2 else None
    if sums is not None and not np.allclose(sums, 1, atol=1e-3):
        k = int(np.argmax(np.abs(sums - 1)))
        raise SystemExit(f"--affinity {path}: row {k} sums to {sums[k]:.4f}; expected rows summing to 1")
    return A


def load_generator(args, dataset, device, bf16):
    """A sampler for the target dataset from --ckpt (ours, official OASIS + affinity, or PITI), and a description."""
    path = Path(args.ckpt)
    if not path.exists():
        raise SystemExit(f"--ckpt {path}: not found; expected a checkpoint of ours or an official OASIS run folder")
    ckpt = None
    if path.is_file():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SystemExit(f"--ckpt {path}: not a readable checkpoint ({type(e).__name__})")
        ckpt = obj if isinstance(obj, dict) and "kind" in obj else None
    info = {"ckpt": str(path)}
    if ckpt is not None and ckpt["kind"] == "piti-cat":
        steps = args.piti_steps
        piti = load_piti_generator(str(path), device, steps=steps, up_steps=args.piti_up_steps,
                                   ddim=bool(steps and steps.startswith("ddim")), amp=bf16)
        info.update(kind="piti-cat", steps=steps or "official (250)",
                    up_steps=args.piti_up_steps or "official (fast27)")
        return (lambda label, seeds: piti(label, seeds[0])), info

    if ckpt is not None and ckpt["kind"] != "oasis-cat":
        raise SystemExit(f"--ckpt {path}: kind '{ckpt['kind']}', expected 'oasis-cat' or 'piti-cat'")
    if ckpt is not None and args.affinity is None:
        if "EMA" not in ckpt:
            raise SystemExit(f"--ckpt {path}: has no 'EMA' generator")
        G = Generator(**ckpt["G_kwargs"])
        check_state_dict(G, ckpt["EMA"], path)
        info["kind"] = "oasis-cat"
    else:  # training-free CAT: a source generator + an affinity
        if args.affinity is None or args.source is None:
            raise SystemExit(f"--ckpt {path}: a source model; the training-free mode needs --source (its dataset) "
                             "and --affinity (target x source .npy)")
        source = class_table(args.source, args.source_root)
        if ckpt is not None:
            kwargs, sd = dict(ckpt["G_kwargs"]), ckpt["EMA"]
        else:
            if args.source not in ("ade20k", "coco", "cityscapes"):
                raise SystemExit(f"--source {args.source}: official OASIS models exist for ade20k, coco, cityscapes")
            kwargs, sd = oasis_config(args.source)[0], load_official(path, "EMA", args.which)
        if kwargs.get("cat_nc"):
            raise SystemExit(f"--ckpt {path}: already has CAT layers; --affinity applies to a source model only")
        if kwargs["semantic_nc"] != source.n_channels:
            raise SystemExit(f"--ckpt {path}: has {kwargs['semantic_nc']} label channels, --source {args.source} "
                             f"expects {source.n_channels}")
        M = affinity_to_channels(read_affinity(args.affinity), dataset.classes, source)
        G = Generator(**{**kwargs, "cat_nc": dataset.n_channels})
        G.load_source(sd, path)
        G.set_affinity(M)
        info.update(kind="oasis-training-free", source=args.source, affinity=str(args.affinity))
    takes = G.kwargs.get("cat_nc") or G.kwargs["semantic_nc"]
    if takes != dataset.n_channels:
        raise SystemExit(f"--ckpt {path}: the generator takes {takes} label channels, --data {dataset.dataset} "
                         f"has {dataset.n_channels}")
    G = G.to(device).eval()
    return oasis_sampler(G, dataset.n_channels, bf16), info


# ----------------------------------------------------------------------------------------------


def fid_metrics(real_feats, fake_feats, real=None):
    """FID (from real (mu, sigma) when given) and KID of two feature sets."""
    mu_r, sigma_r = real if real is not None else stats(real_feats)
    mu_f, sigma_f = stats(fake_feats)
    kid_mean, kid_std = kid(real_feats, fake_feats)
    return {"fid": frechet_distance(mu_f, sigma_f, mu_r, sigma_r), "kid_mean": kid_mean, "kid_std": kid_std}


def describe_features(net, args):
    if net.toy:
        return (f"toy-domain FID on the TorchScript feature net {args.fid_features}: "
                "not comparable to Inception FID")
    return f"Inception FID ({INCEPTION_FILE}, 2048-d pool3, as pytorch-fid 0.3.0)"


def write_results(out, results):
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out / "results.json")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder: results.json, grid.png, images/")
    p.add_argument("--inception", help=f"FID Inception weights, {INCEPTION_FILE} (never downloaded)")
    p.add_argument("--fid-features", help="TorchScript feature net for a toy-domain FID instead of Inception")
    p.add_argument("--real-dir", help="folder mode: the real images")
    p.add_argument("--fake-dir", help="folder mode: the generated images")
    p.add_argument("--ckpt", help="our checkpoint (oasis-cat / piti-cat), or an official OASIS run folder / .pth")
    p.add_argument("--which", default="best", help="official OASIS checkpoint to load: best or latest")
    p.add_argument("--source", help="training-free mode: the source model's dataset (ade20k, coco, cityscapes, ...)")
    p.add_argument("--source-root", help="training-free mode: folder of a folder/toy source dataset (classes.txt)")
    p.add_argument("--affinity", help="training-free mode: affinity .npy (target classes x source classes)")
    p.add_argument("--piti-steps", help="PITI base sampler respacing, e.g. ddim50 (default: the official 250 steps)")
    p.add_argument("--piti-up-steps", help="PITI upsampler respacing (default: the official fast27)")
    add_data_args(p)
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--limit", type=int, help="only the first N label maps (quick checks; not for reporting)")
    p.add_argument("--segmenter",
                   help="TorchScript segmenter for mIoU (input [0,1], logits over the dataset's channels)")
    p.add_argument("--samples-per-map", type=int, default=1, help="images generated per label map")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    p.add_argument("--grid-rows", type=int, default=8, help="label maps shown in grid.png (0: no grid)")
    p.add_argument("--stats-cache", default="data/fid_stats", help="folder for cached real statistics ('' = off)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA for the generator and segmenter")
    p.add_argument("--bf16-features", action="store_true",
                   help="FID/KID network under bf16 autocast on CUDA (faster; see BENCHMARKS.md for its effect)")
    args = p.parse_args()

    device = torch.device(args.device)
    bf16 = device.type == "cuda" and not args.fp32
    bf16_features = device.type == "cuda" and args.bf16_features
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    out = Path(args.out)
    files = {k: getattr(args, k) for k in ("inception", "fid_features", "segmenter", "ckpt", "affinity",
                                           "real_dir", "fake_dir") if getattr(args, k)}
    results = {"precision": {"generator and segmenter": "bf16 autocast" if bf16 else "fp32",
                             "features": "bf16 autocast" if bf16_features else "fp32"}, "files": files}

    if args.real_dir or args.fake_dir:  # folder mode
        if not (args.real_dir and args.fake_dir):
            raise SystemExit("folder mode needs both --real-dir and --fake-dir")
        real_files, fake_files = folder_images(args.real_dir, "--real-dir"), folder_images(args.fake_dir, "--fake-dir")
        net = load_feature_net(args.inception, args.fid_features, device)
        real_feats = features(net, image_batches(real_files, args.batch_size, device, args.workers), bf16_features)
        fake_feats = features(net, image_batches(fake_files, args.batch_size, device, args.workers), bf16_features)
        metrics = fid_metrics(real_feats, fake_feats)
        results = {"mode": "folder", **metrics, "n_real": len(real_files), "n_fake": len(fake_files),
                   "fid_features": describe_features(net, args), "toy_domain_fid": net.toy, **results,
                   "protocol": {k: PROTOCOL[k] for k in ("fid_inputs", "fid", "kid")}}
        out.mkdir(parents=True, exist_ok=True)
        write_results(out, results)
        print(f"fid {metrics['fid']:.4f}")
        print(f"kid {metrics['kid_mean']:.6f} +- {metrics['kid_std']:.6f}")
        print(f"wrote {out / 'results.json'}")
        return

    if not args.ckpt:
        raise SystemExit("give --ckpt (model mode) or --real-dir and --fake-dir (folder mode)")
    if args.samples_per_map < 1:
        raise SystemExit(f"--samples-per-map {args.samples_per_map}: expected at least 1")
    if args.n is not None and args.split != "train":
        raise SystemExit(f"--n {args.n} picks training shots; use --limit to evaluate fewer {args.split} maps")
    dataset = dataset_from_args(args, args.split)
    if args.limit:
        dataset.files = dataset.files[:args.limit]
    sample, gen_info = load_generator(args, dataset, device, bf16)
    net = load_feature_net(args.inception, args.fid_features, device) if args.inception or args.fid_features else None
    seg = load_segmenter(args.segmenter, device) if args.segmenter else None
    if net is None:
        print("no --inception / --fid-features: FID and KID skipped")
    if net is not None and len(dataset) < 2:
        raise SystemExit(f"--data {dataset.dataset} ({args.split}): {len(dataset)} label map(s), FID needs at least 2")

    (out / "images").mkdir(parents=True, exist_ok=True)
    colours = palette(dataset.n_channels)
    fake_feats, grid = [], []
    conf = np.zeros((dataset.n_channels,) * 2, np.int64)
    conf_real = np.zeros_like(conf)
    for b in generate(sample, dataset, device, args.batch_size, args.seed, args.samples_per_map, args.workers):
        K = len(b["fake"])
        tiles = [to_uint8(x) for x in b["fake"]]
        for k, fake in enumerate(b["fake"]):
            for i, src in enumerate(b["path"]):
                name = Path(src).stem + (f"_{k}" if K > 1 else "") + ".png"
                Image.fromarray(tiles[k][i]).save(out / "images" / name)
            if net is not None:
                fake_feats.append(embed(net, (fake + 1) / 2, bf16_features))
            if seg is not None:
                conf += confusion(segment(seg, (fake + 1) / 2, dataset.n_channels, bf16, args.segmenter),
                                  b["label"], dataset.n_channels)
        if seg is not None:
            conf_real += confusion(segment(seg, (b["real"] + 1) / 2, dataset.n_channels, bf16, args.segmenter),
                                   b["label"], dataset.n_channels)
        reals = to_uint8(b["real"])
        for i in range(min(len(b["path"]), args.grid_rows - len(grid))):
            grid.append([colours[b["label"][i].cpu().numpy()]] + [t[i] for t in tiles[:4]] + [reals[i]])
    if grid:
        save_grid(grid, out / "grid.png")

    n_fake = len(dataset) * args.samples_per_map
    results = {"mode": "model", "generator": gen_info, "n_real": len(dataset), "n_fake": n_fake,
               "n_maps": len(dataset), "samples_per_map": args.samples_per_map, "seed": args.seed,
               "dataset": {"name": dataset.dataset, "root": str(dataset.root), "split": args.split,
                           "size": list(dataset.size), "limit": args.limit}, **results}
    lines = []
    if net is not None:
        mu, sigma, rf = real_stats(dataset, net, args.stats_cache or None, device, args.batch_size, bf16_features,
                                   args.workers)
        metrics = fid_metrics(rf, np.concatenate(fake_feats), (mu, sigma))
        results.update(metrics, fid_features=describe_features(net, args), toy_domain_fid=net.toy)
        lines += [f"fid {metrics['fid']:.4f}" + (" (toy-domain features)" if net.toy else ""),
                  f"kid {metrics['kid_mean']:.6f} +- {metrics['kid_std']:.6f}"]
    if seg is not None:
        scored = dataset.classes.eval_channels
        names = [n for n, c in zip(dataset.classes.names, dataset.classes.channels) if c in scored]  # unique names
        miou, per = iou(conf, scored)
        miou_real, per_real = iou(conf_real, scored)
        results.update(miou=miou, miou_real=miou_real, per_class_iou=dict(zip(names, per)),
                       per_class_iou_real=dict(zip(names, per_real)))
        lines += [f"miou {miou:.4f}" if miou is not None else "miou undefined (no labelled pixels)",
                  f"miou_real {miou_real:.4f}" if miou_real is not None else "miou_real undefined"]
    results["protocol"] = PROTOCOL
    write_results(out, results)
    for line in lines:
        print(line)
    print(f"wrote {out / 'results.json'}" + (f", {out / 'grid.png'}" if grid else "") +
          f" and {n_fake} images in {out / 'images'}")


if __name__ == "__main__":
    main()
