"""Speed of one OASIS training iteration (G step + D step + EMA blend), as finetune_oasis.py runs it.

    python bench/bench_oasis.py                          # ADE20K config, 256x256, 151 classes, batch 32, bf16
    python bench/bench_oasis.py --amp fp32 --no-channels-last   # closer to the official code path
    python bench/bench_oasis.py --toy-compare            # bf16 vs fp32 losses over 200 toy steps
    python bench/bench_oasis.py --device cpu --batch 2 --steps 2 --warmup 1   # smoke check
    python bench/bench_oasis.py --device cpu --tiny --batch 2 --steps 2 --warmup 0   # quicker: tiny widths

Reference (official code, one H100): 34.5 img/s, 56 GB peak, 2.60 TFLOP per image per iteration.
MFU is counted against the H100's dense bf16 peak (989 TFLOP/s) whatever the device.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import finetune_oasis  # noqa: E402
from models import oasis  # noqa: E402

FLOP_PER_IMAGE = 2.60e12
PEAK = 989e12
OFFICIAL = {"img/s": 34.5, "peak GB": 56.0}
TINY_G, TINY_D = dict(z_dim=8, channels=4, spade_hidden=8), dict(channels=[3, 8, 8], last_width=8)


def random_labels(batch, n_channels, size, device):
    """Blocky random label maps (16x16 cells), so LabelMix and class balancing see realistic class counts."""
    coarse = torch.randint(0, n_channels, (batch, 1, 16, 16), device=device).float()
    label = F.interpolate(coarse, size=size, mode="nearest").long()[:, 0]
    return torch.zeros(batch, n_channels, *size, device=device).scatter_(1, label.unsqueeze(1), 1.0)


def bench_iteration(args):
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    G_kwargs, D_kwargs = oasis.oasis_config(args.dataset)
    if getattr(args, "tiny", False):  # the CPU smoke check of bench/gpu_check.py: tiny widths, figures meaningless
        G_kwargs.update(TINY_G)
        D_kwargs.update(TINY_D)
    mem = torch.channels_last if cuda and not args.no_channels_last else torch.contiguous_format
    G = oasis.Generator(**G_kwargs).to(device, memory_format=mem)
    D = oasis.Discriminator(**D_kwargs).to(device, memory_format=mem)
    EMA = oasis.Generator(**G_kwargs).to(device, memory_format=mem)
    EMA.load_state_dict(G.state_dict())
    optG = torch.optim.Adam(G.parameters(), lr=1e-4, betas=(0.0, 0.999))
    optD = torch.optim.Adam(D.parameters(), lr=4e-4, betas=(0.0, 0.999))
    G_run, D_run = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and args.amp == "bf16" else nullcontext()
    size = (256, 512) if args.dataset == "cityscapes" else (256, 256)
    nc = G_kwargs["semantic_nc"]
    y = random_labels(args.batch, nc, size, device).contiguous(memory_format=mem)
    real = (torch.rand(args.batch, 3, *size, device=device) * 2 - 1).contiguous(memory_format=mem)

    def step():
        return finetune_oasis.gan_step(G_run, D_run, EMA, optG, optD, y, real, 10.0, 0.9999, ctx)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss_G, loss_D = step()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    ips = args.batch * args.steps / dt
    res = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "dataset": args.dataset,
           "batch": args.batch, "amp": args.amp if cuda else "fp32", "compile": args.compile,
           "channels_last": mem == torch.channels_last, "img/s": round(ips, 2),
           "s/iter": round(dt / args.steps, 4), "MFU %": round(100 * ips * FLOP_PER_IMAGE / PEAK, 2),
           "loss_G": round(loss_G.item(), 4), "loss_D": round(loss_D.item(), 4)}
    if cuda:
        res["peak GB"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    print(json.dumps(res))
    print(f"official: {OFFICIAL['img/s']} img/s, {OFFICIAL['peak GB']} GB peak; "
          f"speed-up x{ips / OFFICIAL['img/s']:.2f}" + (f", memory x{res['peak GB'] / OFFICIAL['peak GB']:.2f}" if cuda else ""))


def toy_compare(args):
    """Train the same small toy model twice (bf16 autocast, fp32) and report how far the losses drift apart."""
    logs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for amp in ("bf16", "fp32"):
            out = Path(tmp) / amp
            cmd = [sys.executable, str(REPO / "finetune_oasis.py"), "--init", "scratch", "--data", "toy-source",
                   "--out", str(out), "--stage1-steps", "0", "--stage2-steps", str(args.toy_steps),
                   "--eval-every", str(args.toy_steps), "--log-every", "1", "--batch", "8", "--n", "200",
                   "--channels", "16", "--spade-hidden", "32", "--d-channels", "3,32,32,64,64,128,128",
                   "--d-last", "32", "--amp", amp, "--device", args.device, "--bn-batches", "4"]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            lines = [json.loads(s) for s in (out / "log.jsonl").read_text().splitlines()]
            logs[amp] = [e for e in lines if "loss_G" in e]
    res = {}
    for k in ("loss_G", "loss_D"):
        a = torch.tensor([e[k] for e in logs["bf16"]])
        b = torch.tensor([e[k] for e in logs["fp32"]])
        res[k] = {"fp32 last 20": round(b[-20:].mean().item(), 4), "bf16 last 20": round(a[-20:].mean().item(), 4),
                  "mean |gap|": round((a - b).abs().mean().item(), 4),
                  "relative gap last 20 %": round(100 * abs(a[-20:].mean() - b[-20:].mean()).item() / b[-20:].mean().abs().item(), 2)}
    print(json.dumps({"toy steps": args.toy_steps, "device": args.device, **res}))
    if not args.device.startswith("cuda"):
        print("note: on the CPU the bf16 run uses CPU bf16 autocast (--amp bf16 asks for it explicitly)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dataset", default="ade20k", choices=["ade20k", "coco", "cityscapes"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed iterations")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compile, cuDNN autotune)")
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--toy-compare", action="store_true", help="bf16-vs-fp32 loss gap over --toy-steps toy steps")
    p.add_argument("--toy-steps", type=int, default=200)
    p.add_argument("--tiny", action="store_true", help="tiny widths (CPU smoke check; figures meaningless)")
    args = p.parse_args()
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    toy_compare(args) if args.toy_compare else bench_iteration(args)
