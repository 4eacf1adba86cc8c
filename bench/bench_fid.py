"""FID feature extraction: evaluate.py's Inception vs pytorch-fid on the same device and images.

    python bench/bench_fid.py --inception pt_inception-2015-12-05-6726825d.pth            # on a GPU
    python bench/bench_fid.py --device cpu --n 8 --batch-size 4 --ours-batch 4 --size 64  # CPU smoke check

Prints images/s of pytorch-fid (its defaults: fp32, batch 50), of ours in fp32 (same batch) and of ours
with bf16 autocast + channels_last (--ours-batch); the largest relative feature difference between ours
(fp32) and pytorch-fid; and the FID between the toy task's source and target validation images in fp32
and in bf16 with its relative change (allowed: 0.1%). Without --inception the weights are random
in the official format: the timings hold, the FID figures mean nothing (the script says so).
pytorch-fid and torchvision are needed here only (test/benchmark dependencies).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import metrics as ev  # noqa: E402
from data import open_dataset  # noqa: E402
from models.inception import INCEPTION_FILE, FIDInception  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--inception", help=f"{INCEPTION_FILE} (random weights in its format when omitted)")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--n", type=int, default=2000, help="images timed per configuration")
p.add_argument("--size", type=int, default=256, help="image side fed to the networks (resized to 299 inside)")
p.add_argument("--batch-size", type=int, default=50, help="pytorch-fid's batch (its default 50)")
p.add_argument("--ours-batch", type=int, default=200, help="batch of ours under bf16")
p.add_argument("--fid-images", type=int, default=200,
               help="toy validation images per side for the bf16 FID check (0: skip)")
args = p.parse_args()
device = torch.device(args.device)
torch.backends.cudnn.benchmark = True  # as evaluate.py: fixed sizes, fastest kernels (for both networks)


def random_state_dict():
    g = torch.Generator().manual_seed(0)
    sd = FIDInception().state_dict()
    for k, v in sd.items():  # scale-preserving values so that activations neither vanish nor explode
        if v.dtype.is_floating_point:
            if k.endswith("weight") and v.ndim > 1:
                v.copy_(torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5)
            elif k.endswith("running_var") or k.endswith("bn.weight"):
                v.copy_(torch.rand(v.shape, generator=g) + 0.5)
            else:
                v.copy_(torch.randn(v.shape, generator=g) * 0.1)
    return sd


if args.inception:
    sd = torch.load(args.inception, map_location="cpu", weights_only=True)
    path = Path(args.inception)
else:
    sd = random_state_dict()
    path = Path("/tmp") / "bench_fid_random" / INCEPTION_FILE
    path.parent.mkdir(exist_ok=True)
    torch.save(sd, path)
    print("no --inception: random weights (timings are valid, FID values are not)")

from pytorch_fid import inception as pfi  # noqa: E402

pfi.load_state_dict_from_url = lambda *a, **k: sd  # offline: hand pytorch-fid the same weights
ref = pfi.InceptionV3([3]).to(device).eval()
ours = ev.load_feature_net(inception=path, device=device)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def throughput(fn, images, batch):
    fn(images[:batch])  # warm-up (cuDNN autotuning, lazy init)
    sync()
    t = time.perf_counter()
    for i in range(0, len(images), batch):
        fn(images[i:i + batch])
    sync()
    return len(images) / (time.perf_counter() - t)


# the toy task's validation images, repeated to --n, resized to --size, on the device
target = open_dataset("toy-target", split="val")
source = open_dataset("toy-source", split="val")
pool = torch.stack([target[i]["image"] for i in range(min(len(target), args.n))])
images = ((pool.repeat((args.n + len(pool) - 1) // len(pool), 1, 1, 1)[:args.n] + 1) / 2).to(device)
images = F.interpolate(images, size=(args.size, args.size), mode="bicubic", align_corners=False).clamp(0, 1)

# every configuration ends with its features in host memory, as pytorch-fid's get_activations does
rates = {
    "pytorch-fid fp32": throughput(lambda x: ref(x)[0].flatten(1).cpu().numpy(), images, args.batch_size),
    "ours fp32": throughput(lambda x: ev.embed(ours, x), images, args.batch_size),
    "ours bf16": throughput(lambda x: ev.embed(ours, x, "bf16" if device.type == "cuda" else "fp32"), images,
                            args.ours_batch),
}
dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
print(f"device {dev_name}, {args.n} images {args.size}x{args.size}")
for name, r in rates.items():
    print(f"  {name:<18s} {r:8.1f} img/s   ({r / rates['pytorch-fid fp32']:.2f}x pytorch-fid)")

with torch.no_grad():
    x = images[:args.batch_size]
    a = ref(x)[0].flatten(1).double().cpu().numpy()
    b = ev.embed(ours, x)
print(f"  max |ours - pytorch-fid| / max |pytorch-fid| (fp32 features): {np.abs(a - b).max() / np.abs(a).max():.2e}")


def toy_batches(ds):
    n = min(len(ds), args.fid_images)
    for i in range(0, n, args.batch_size):
        yield (torch.stack([ds[j]["image"] for j in range(i, min(n, i + args.batch_size))]).to(device) + 1) / 2


if args.fid_images < 2:
    sys.exit(0)
fids = {}
for asked in ("fp32", "bf16"):  # evaluate.py --bf16-features: bf16 autocast on CUDA only
    amp = asked if device.type == "cuda" else "fp32"
    fr, ft = ev.features(ours, toy_batches(source), amp), ev.features(ours, toy_batches(target), amp)
    fids[asked] = ev.frechet_distance(*ev.stats(fr), *ev.stats(ft))
change = abs(fids["bf16"] - fids["fp32"]) / abs(fids["fp32"])
note = "" if args.inception else "  (random weights: not meaningful)"
cpu = " (no effect on CPU)" if device.type != "cuda" else ""
print(f"  FID toy source vs target val ({min(len(target), args.fid_images)} images): fp32 {fids['fp32']:.4f}, "
      f"bf16{cpu} {fids['bf16']:.4f}, relative change {change:.2e}{note}")
