"""Speed of PITI sampling, label maps -> 256x256 images, at the released configurations (random weights).

    python bench/bench_piti.py                            # ours: bf16, batch 8, 250 base steps s=1.3, fast27 upsampler
    python bench/bench_piti.py --batch 32 --compile       # larger batch, torch.compile on the UNets
    python bench/bench_piti.py --modes official,fp32,bf16 --traj-steps 250   # + the baselines and bf16's drift
    python bench/bench_piti.py --device cpu --tiny --steps 2 --up-steps 2 --batch 1 --modes official,fp32,bf16  # smoke

Modes (same card, same weights, same steps):
  official  the official code path: fp32, the label encoder re-run at every step on the 2B CFG batch
  fp32      ours in fp32: encoder once per sample, cond+uncond in one batch (still golden-exact)
  bf16      ours with bf16 autocast (norms and softmax in fp32)
Reference (official code, one H100, fp32, batch 8): base 0.40 img/s (79 ms/step, 4.1 GiB), upsampler
2.58 img/s (6.5 GiB), end to end 0.35 img/s; the target is >= 5x end to end (1.75 img/s).
Prints one JSON line per mode, and the bf16-vs-fp32 trajectory difference with --traj-steps.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from models import diffusion, piti  # noqa: E402

OFFICIAL_H100 = {"base img/s": 0.40, "up img/s": 2.58, "end-to-end img/s": 0.35}
TINY = dict(model_channels=32, num_res_blocks=1, attention_ds=[2], num_head_channels=16, xf_width=32, xf_heads=4,
            encoder_layers=2, cnn_widths=[8, 8, 16, 16, 32], n_tokens=16, ref_size=64, transformer_proj_in=32)


def build(args, super_res, device):
    kw = dict(piti.UP_KWARGS if super_res else piti.BASE_KWARGS)
    if args.tiny:
        kw.update(TINY, image_size=32 if super_res else 16, channel_mult=[1, 1] if super_res else [1, 2])
    model = piti.PITI(**kw).to(device).eval()
    with torch.no_grad():  # the encoder's two th.empty parameters, as a checkpoint would fill them
        model.encoder.cls_token.normal_(0, 0.5)
        model.encoder.positional_embedding.normal_(0, 0.5)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if args.compile:
        model.decoder = torch.compile(model.decoder)
    return model


def labels(batch, side, device):
    """Blocky random COCO channel maps (16x16 cells)."""
    coarse = torch.randint(1, piti.COCO_CHANNELS, (batch, 1, 16, 16), device=device).float()
    return F.interpolate(coarse, size=(side, side), mode="nearest").long()[:, 0]


@torch.no_grad()
def official_like(model, ref, steps, guidance, low_res=None, gen=None):
    """The official loop: the whole model (encoder included) on [cond; uncond] at every step, fp32."""
    diff = diffusion.Diffusion(model.noise_schedule, steps)
    B, side = ref.shape[0], model.image_size
    guided = not model.super_res
    refs = torch.cat([ref, torch.ones_like(ref)]) if guided else ref
    x = torch.randn(B, 3, side, side, generator=gen, device=ref.device) * (diffusion.UP_TEMP if model.super_res else 1)
    for i in range(diff.num_timesteps - 1, -1, -1):
        t = torch.full((B,), i, device=ref.device)
        tm = diff.model_t(t)
        if guided:
            out = model(torch.cat([x, x]), torch.cat([tm, tm]), refs)
            eps = out[B:, :3] + guidance * (out[:B, :3] - out[B:, :3])
            out = torch.cat([eps, out[:B, 3:]], 1)
        else:
            out = model(x, tm, refs, low_res=low_res)
        x, _ = diff.p_sample(out, x, t, torch.randn(x.shape, generator=gen, device=ref.device))
    return x


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    return out, time.perf_counter() - t0, peak


def run_mode(mode, base, up, label, args, device):
    gen = torch.Generator(device).manual_seed(0)
    amp = "bf16" if mode == "bf16" and device.type == "cuda" else "fp32"  # bf16 autocast on CUDA only
    if mode == "official":
        base_fn = lambda: official_like(base, base.ref(label), args.steps, args.guidance, gen=gen)  # noqa: E731
    else:
        base_fn = lambda: diffusion.sample(base, base.ref(label), steps=args.steps, guidance=args.guidance,  # noqa: E731
                                      generator=gen, amp=amp)
    for _ in range(args.warmup):
        low, _, _ = timed(base_fn, device)
    low, t_base, m_base = timed(base_fn, device)
    low = diffusion.quantize(low)
    up_fn = (lambda: official_like(up, up.ref(label), args.up_steps, 1.0, low_res=low, gen=gen)) if mode == "official" \
        else (lambda: diffusion.sample(up, up.ref(label), steps=args.up_steps, low_res=low, generator=gen, amp=amp))
    for _ in range(args.warmup):
        timed(up_fn, device)
    img, t_up, m_up = timed(up_fn, device)
    B = label.shape[0]
    n_steps = diffusion.Diffusion(base.noise_schedule, args.steps).num_timesteps
    return {"mode": mode, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "batch": B, "base_steps": args.steps, "up_steps": args.up_steps, "guidance": args.guidance,
            "compile": args.compile, "tiny": args.tiny,
            "base img/s": B / t_base, "base ms/step": 1000 * t_base / n_steps, "up img/s": B / t_up,
            "end-to-end img/s": B / (t_base + t_up), "peak GiB base": m_base, "peak GiB up": m_up,
            "vs official H100 end-to-end": B / (t_base + t_up) / OFFICIAL_H100["end-to-end img/s"]
            if device.type == "cuda" else None,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "finite": bool(torch.isfinite(img).all())}


def trajectory_drift(base, label, args, device):
    """bf16 vs fp32 on one base trajectory from the same noise: how far the final 64x64 images move."""
    B, side = label.shape[0], base.image_size
    gen = torch.Generator(device).manual_seed(1)
    n = diffusion.Diffusion(base.noise_schedule, args.traj_steps).num_timesteps
    x_T = torch.randn(B, 3, side, side, generator=gen, device=device)
    noises = [torch.randn(B, 3, side, side, generator=gen, device=device) for _ in range(n)]
    outs = [diffusion.sample(base, base.ref(label), steps=args.traj_steps, guidance=args.guidance, x_T=x_T, noises=noises,
                        amp=amp) for amp in ("fp32", "bf16" if device.type == "cuda" else "fp32")]
    d = (outs[1] - outs[0]).abs()
    return {"bf16 vs fp32 trajectory": args.traj_steps, "max |diff|": d.max().item(), "mean |diff|": d.mean().item(),
            "note": "final base samples in [-1,1], same x_T and noises; random weights"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8, help="label maps per call (the base runs 2x that with guidance)")
    p.add_argument("--steps", default=diffusion.BASE_STEPS, help="base respacing (official 250)")
    p.add_argument("--up-steps", default=diffusion.UP_STEPS, help="upsampler respacing (official fast27)")
    p.add_argument("--guidance", type=float, default=diffusion.GUIDANCE)
    p.add_argument("--modes", default="bf16", help="comma list of official, fp32, bf16")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (compile, cuDNN autotune)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNets")
    p.add_argument("--traj-steps", default=None, help="also report bf16's drift on a base trajectory of these steps")
    p.add_argument("--tiny", action="store_true", help="tiny widths (CPU smoke check; figures meaningless)")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    base, up = build(args, False, device), build(args, True, device)
    label = labels(args.batch, 256, device)
    for mode in args.modes.split(","):
        print(json.dumps(run_mode(mode, base, up, label, args, device)), flush=True)
    if args.traj_steps:
        print(json.dumps(trajectory_drift(base, label, args, device)), flush=True)


if __name__ == "__main__":
    main()
