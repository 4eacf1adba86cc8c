"""The first GPU run as one prepared command: every CUDA path of the toolkit and the three speed benches, in a
fixed, budgeted order, each part recorded as it finishes.

    python bench/gpu_check.py --out runs/gpu_check                          # on one GPU (budget: 4 min on an H100)
    python bench/gpu_check.py --device cpu --tiny --out runs/gpu_check_cpu  # the CPU rehearsal (a test runs it)
    python bench/gpu_check.py --out runs/gpu_check --parts env,oasis        # a subset

Writes DIR/gpu_check.json, {"device": ..., "parts": {"<part>": {"ok": true|false, "seconds": ..., "error": "...",
<figures>}}}, and DIR/gpu_check.md, a block to paste into BENCHMARKS.md (device, torch/CUDA versions, date, commit).
Both are rewritten after every part, and every part prints one line when it ends, so a run cut off by a time limit
leaves everything done so far. A part's failure (an exception, a script's non-zero exit, a figure out of range) is
recorded with its traceback and the run goes on to the next part; the exit status is 1 when any part failed.
Random weights in the official formats and toy data written on the spot into DIR: nothing is downloaded. At full
size DIR holds about 4 GB of such weight files (the released PITI base and upsampler, the segmenters): give a scratch
folder and keep gpu_check.json / gpu_check.md.
CAT_GPU_CHECK_FAIL=<part>[,<part>] makes those parts raise at their start (the test's planted failure).

Parts, in order, with their share of the 4-minute H100 budget (SHARE):
  env          device, capability, bf16, torch / CUDA / cuDNN versions, free memory, missing packages
  oasis        finetune_oasis.py at the ADE20K configuration (256x256, 151 classes): --amp bf16, fp16 (scaler
               scale, finite losses) and fp32; a --resume that continues exactly; torchrun --nproc_per_node 1
  piti         finetune_piti.py at the released configurations (base 64 + upsampler 256): bf16 and fp16, the
               evaluation grid sampled with the base and the fast27 upsampler; SDPA on a fused kernel (no math
               fallback); torchrun --nproc_per_node 1
  evaluate     evaluate.py --amp auto: FID (Inception, official format) + KID + mIoU with upernet101 (ADE20K),
               mIoU with deeplabv2 (COCO-Stuff) and drn105 (Cityscapes)
  bench_oasis  bench/bench_oasis.py: batch 8/16/32 img/s, peak GB, MFU, ratio to the official figures; --compile once
  bench_piti   bench/bench_piti.py: bf16 base + upsampler img/s at batch 8 and 32, ratio to the official figure
  bench_fid    bench/bench_fid.py: img/s against pytorch-fid, FID relative difference bf16 vs fp32
With --tiny every part runs at tiny widths, one or two steps and a few images (figures meaningless): the plumbing.
"""
import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

FAIL_ENV = "CAT_GPU_CHECK_FAIL"
# Planned seconds per part on one H100 (estimates until a GPU run measures them; gpu_check.json records each part's).
SHARE = {"env": 2, "oasis": 70, "piti": 50, "evaluate": 30, "bench_oasis": 40, "bench_piti": 30, "bench_fid": 18}
PARTS = list(SHARE)
# Python packages each part imports beyond torch (module name -> pip name). The device image lacks some test-only
# ones (pytorch-fid): such a part fails with that name as its error, the others run.
SCRIPTS = {"scipy": "scipy", "PIL": "pillow", "tqdm": "tqdm"}  # what finetune_*.py / evaluate.py import
NEEDS = {"oasis": SCRIPTS, "piti": SCRIPTS, "evaluate": SCRIPTS, "bench_oasis": SCRIPTS, "bench_piti": {"PIL": "pillow"},
         "bench_fid": {"scipy": "scipy", "PIL": "pillow", "pytorch_fid": "pytorch-fid"}}
# Tiny widths of the rehearsal (and only of it).
OASIS_TINY = ["--channels", "4", "--z-dim", "8", "--spade-hidden", "8", "--d-channels", "3,8,8", "--d-last", "8"]
PITI_TINY = dict(model_channels=32, num_res_blocks=1, attention_ds=[2], num_head_channels=16, xf_width=32, xf_heads=4,
                 encoder_layers=2, cnn_widths=[8, 8, 16, 16, 32], n_tokens=16, ref_size=64, transformer_proj_in=32)
PITI_TINY_BASE = dict(PITI_TINY, image_size=16, channel_mult=[1, 2])
PITI_TINY_UP = dict(PITI_TINY, image_size=32, channel_mult=[1, 1])


class CheckFailed(RuntimeError):
    """A figure out of its allowed range, or a script that exited non-zero."""


# ----------------------------------------------------------------------------------------------
# Command lines: every flag of the project's scripts that this check passes is spelt here and only here, so that a
# renamed flag is a one-line change. `c` is the run's context (device, tiny, folders, files).


def oasis_cmd(c, out, amp, steps, eval_every=None, resume=False):
    """finetune_oasis.py: ADE20K configuration from scratch (the official widths, or tiny ones); evaluation (BN pass,
    grid, checkpoint) every `eval_every` steps (default: at the end)."""
    if resume:
        return ["finetune_oasis.py", "--out", out, "--resume", "--stage2-steps", steps]
    return (["finetune_oasis.py", "--out", out, "--init", "scratch", "--data", "ade20k", "--data-root", c.ade,
             "--stage1-steps", "0", "--stage2-steps", steps, "--eval-every", eval_every or steps, "--log-every", "1",
             "--batch", c.oasis_batch, "--bn-batches", "1", "--grid-n", "2", "--device", c.device, "--amp", amp,
             "--workers", "0", "--seed", "0"] + (OASIS_TINY if c.tiny else []))


def piti_cmd(c, out, amp, steps):
    """finetune_piti.py: released base + upsampler files (COCO-Stuff source) -> the toy ADE20K data."""
    cmd = ["finetune_piti.py", "--out", out, "--base", c.piti_base, "--upsampler", c.piti_up, "--source", "coco",
           "--affinity", c.piti_affinity, "--data", "ade20k", "--data-root", c.ade, "--steps", steps,
           "--eval-every", steps, "--log-every", "1", "--batch", c.piti_batch, "--grid-n", c.piti_batch,
           "--sample-steps", c.piti_sample_steps, "--up-steps", "fast27", "--device", c.device, "--amp", amp,
           "--seed", "0"]
    if c.tiny:
        cmd += ["--base-config", json.dumps(PITI_TINY_BASE), "--up-config", json.dumps(PITI_TINY_UP)]
    return cmd


def evaluate_cmd(c, out, ckpt, dataset, root, segmenter, weights, inception=None):
    """evaluate.py in model mode on the validation maps; FID + KID only with `inception` (at least 2 images)."""
    fid = ["--inception", inception] if inception else ["--no-fid"]
    return (["evaluate.py", "--ckpt", ckpt, "--data", dataset, "--data-root", root, "--split", "val", "--out", out,
             "--limit", c.eval_images if inception or not c.tiny else 1, "--batch", c.eval_batch,
             "--workers", "0", "--grid-n", "0",
             "--stats-cache", "", "--device", c.device, "--amp", "auto", "--segmenter", segmenter,
             "--segmenter-weights", *weights] + fid)


def torchrun(cmd):
    """One rank under torchrun (NCCL on CUDA, gloo on CPU: the scripts pick by --device)."""
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "--", *cmd]


def bench_oasis_args(c, batch, compile_=False):
    """bench_oasis.bench_iteration's namespace (its command-line flags)."""
    return SimpleNamespace(device=c.device, dataset="ade20k", batch=batch, steps=1 if c.tiny else 5,
                           warmup=0 if c.tiny else 2, amp="bf16", compile=compile_, no_channels_last=False,
                           tiny=c.tiny)


def bench_oasis_compile_cmd(c):
    """bench_oasis.py --compile at the largest batch, as a script (its compile time is bounded by a timeout)."""
    return ["bench/bench_oasis.py", "--device", c.device, "--batch", "32", "--steps", "5", "--warmup", "2", "--compile"]


def bench_piti_args(c, batch):
    """bench_piti's namespace (its command-line flags): ours in bf16, the official 250 + fast27 steps, no untimed
    warm-up run (it would double the part: the first steps' cuDNN autotuning is inside the timed 250)."""
    return SimpleNamespace(device=c.device, batch=batch, steps="2" if c.tiny else "250",
                           up_steps="2" if c.tiny else "fast27", guidance=1.3, modes="bf16", warmup=0,
                           compile=False, traj_steps=None, tiny=c.tiny)


def bench_fid_cmd(c):
    return (["bench/bench_fid.py", "--device", c.device] +
            (["--n", "2", "--batch-size", "2", "--ours-batch", "2", "--size", "64", "--fid-images", "0"] if c.tiny
             else ["--n", "1000", "--batch-size", "50", "--ours-batch", "200", "--fid-images", "100"]))


# ----------------------------------------------------------------------------------------------
# Helpers


def run_script(c, cmd, name, timeout=None):
    """Run `python cmd...` in the repository (one torch thread on CPU); its output goes to DIR/logs/<name>.log.
    CheckFailed with the log's last lines when it exits non-zero; subprocess.TimeoutExpired after `timeout` s.
    Returns the output and the seconds taken."""
    log = c.out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if c.device == "cpu":
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=timeout)
    log.write_text(r.stdout)
    if r.returncode != 0:
        tail = "\n".join(r.stdout.splitlines()[-8:])
        raise CheckFailed(f"{name}: exit {r.returncode} ({log}):\n{tail}")
    return r.stdout, time.perf_counter() - t0


def log_lines(run_dir):
    return [json.loads(s) for s in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def step_losses(run_dir, keys):
    """{step: (loss values)} of a run's log.jsonl training lines."""
    return {e["step"]: tuple(e[k] for k in keys) for e in log_lines(run_dir) if all(k in e for k in keys)}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def random_like(module, seed=0):
    """`module`'s state dict (its keys are the official file's) filled with scale-preserving random values."""
    g = torch.Generator().manual_seed(seed)
    sd = module.state_dict()
    for k, v in sd.items():
        if not v.dtype.is_floating_point:
            continue
        if k.endswith("running_var"):
            v.copy_(torch.rand(v.shape, generator=g) + 0.5)
        elif v.ndim > 1:
            v.copy_(torch.randn(v.shape, generator=g) * (2 / max(1, v[0].numel())) ** 0.5)  # He: ReLU nets stay alive
        elif k.endswith("weight"):
            v.copy_(torch.rand(v.shape, generator=g) * 0.5 + 0.5)
        else:
            v.copy_(torch.randn(v.shape, generator=g) * 0.1)
    return sd


def blocky_labels(rng, values, side_hw, cells=8):
    h, w = side_hw
    coarse = rng.choice(values, (cells, cells * w // h))
    return np.kron(coarse, np.ones((h // cells, h // cells), dtype=coarse.dtype)).astype(np.uint8)


def write_pairs(img_dir, lbl_dir, n, hw, values, seed, img_suffix=".jpg", lbl_suffix=".png", stem="{:04d}"):
    from PIL import Image
    rng = np.random.default_rng(seed)
    img_dir.mkdir(parents=True, exist_ok=True)
    lbl_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        lab = blocky_labels(rng, values, hw)
        img = (rng.random((len(values), 3)) * 255)[np.searchsorted(np.sort(values), lab)] + rng.normal(0, 8, (*hw, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(img_dir / (stem.format(i) + img_suffix))
        Image.fromarray(lab).save(lbl_dir / (stem.format(i) + lbl_suffix))


def toy_dataset(c, dataset):
    """A few toy images in the official layout of ade20k / coco / cityscapes, written once under DIR/data."""
    root = c.out / "data" / dataset
    if (root / ".done").exists():
        return root
    hw = (256, 512) if dataset == "cityscapes" else (256, 256)
    if c.tiny:  # the loaders resize to the dataset's size: small files suffice
        hw = (hw[0] // 8, hw[1] // 8)
    n_train, n_val = (4, 2) if c.tiny else (16, 16)
    if dataset == "ade20k":
        values = np.array([0, 1, 3, 5, 13, 22, 88, 150])
        for split, sub, n in (("train", "training", n_train), ("val", "validation", n_val)):
            write_pairs(root / "images" / sub, root / "annotations" / sub, n, hw, values, hash(split) % 1000,
                        stem="ADE_" + split + "_{:08d}")
    elif dataset == "coco":
        values = np.array([0, 1, 2, 95, 100, 123, 156, 181, 255])
        for split, n in (("train", n_train), ("val", n_val)):
            write_pairs(root / f"{split}_img", root / f"{split}_label", n, hw, values, 7)
    else:
        values = np.array([7, 8, 11, 21, 23, 24, 26])
        for split, n in (("train", n_train), ("val", n_val)):
            d = root / "{}" / split / "aachen"
            write_pairs(Path(str(d).format("leftImg8bit")), Path(str(d).format("gtFine")), n, hw, values, 11,
                        img_suffix="_leftImg8bit.png", lbl_suffix="_gtFine_labelIds.png", stem="aachen_000000_{:06d}")
    (root / ".done").write_text("")
    return root


def random_affinity(n_target, n_source, seed=0):
    """A hard affinity (rows one-hot at a random source class), as estimate_affinity.py --method random --hard."""
    A = np.zeros((n_target, n_source), np.float32)
    A[np.arange(n_target), np.random.default_rng(seed).integers(1, n_source, n_target)] = 1
    return A


def oasis_generator_ckpt(c, dataset, path):
    """An OASIS generator checkpoint of ours (kind oasis-cat) over `dataset`'s classes with random weights: the
    official configuration, or tiny widths."""
    import data
    from models import oasis
    table = data.class_table(dataset)
    G_kwargs, _ = oasis.oasis_config(dataset)
    if c.tiny:
        G_kwargs.update(z_dim=8, channels=4, spade_hidden=8)
    torch.manual_seed(0)
    G = oasis.Generator(**G_kwargs)  # BN running statistics at their initial values: plumbing, not quality
    info = {"dataset": table.dataset, "names": table.names, "n_channels": table.n_channels}
    torch.save({"kind": "oasis-cat", "format": 2, "step": 0, "args": {}, "affinity": None, "source": info, "target": info,
                "G_kwargs": G.kwargs, "EMA": G.eval().state_dict(), "D_kwargs": {}, "D": {}}, path)
    return path


# ----------------------------------------------------------------------------------------------
# Parts: each returns its figures (a dict) or raises


def part_env(c):
    import importlib.util
    res = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
           "missing packages": sorted({pip for needs in NEEDS.values() for mod, pip in needs.items()
                                       if importlib.util.find_spec(mod) is None})}
    if c.device.startswith("cuda"):
        dev = torch.device(c.device)
        free, total = torch.cuda.mem_get_info(dev)
        nccl = torch.cuda.nccl.version()  # a tuple in current torch, an int in older ones
        res.update(name=torch.cuda.get_device_name(dev),
                   capability=".".join(map(str, torch.cuda.get_device_capability(dev))),
                   bf16=torch.cuda.is_bf16_supported(), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
                   **{"free GiB": round(free / 2 ** 30, 1), "total GiB": round(total / 2 ** 30, 1)})
    else:
        res.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return res


def part_oasis(c):
    c.ade = toy_dataset(c, "ade20k")
    n = 2  # steps per run (the resume check: 1, then resumed to 2)
    res = {"steps": n, "batch": c.oasis_batch, "config": "tiny widths" if c.tiny else "ADE20K official widths"}
    runs = c.out / "oasis"
    # on the CPU rehearsal bf16 runs under torchrun only (below), to save a process start; fp16 is CUDA-only
    amps = ["bf16", "fp32", "fp16"] if c.device.startswith("cuda") else ["fp32"]
    for amp in amps:
        every = n // 2 if amp == "fp32" else n  # the fp32 run is the resume check's reference (below)
        _, s = run_script(c, oasis_cmd(c, runs / amp, amp, n, eval_every=every), f"oasis_{amp}")
        losses = step_losses(runs / amp, ("loss_G", "loss_D"))
        if sorted(losses) != list(range(1, n + 1)) or not np.isfinite(list(losses.values())).all():
            raise CheckFailed(f"--amp {amp}: losses per step {losses}; expected {n} finite steps")
        res[f"{amp} s/step"] = round(s / n, 3)  # the whole process: start, data, evaluation included
        res[f"{amp} last losses G, D"] = [round(v, 4) for v in losses[n]]
        if amp == "fp16":
            scales = [sc.get("scale") for sc in load(runs / amp / "checkpoint.pt")["scalers"]]
            if not all(s is not None and np.isfinite(s) and s > 0 for s in scales):
                raise CheckFailed(f"--amp fp16: grad scaler scales {scales}; expected finite and > 0")
            res["fp16 scaler scales G, D"] = scales
    if "fp16" not in amps:
        res["fp16"] = "skipped: fp16 + GradScaler is CUDA-only (finetune_oasis.py refuses it on the CPU)"
        res["bf16"] = "CPU rehearsal: under torchrun only"
    # --resume: half the steps, then resume to all of them; the losses must equal the uninterrupted fp32 run's
    # (which evaluates at the same steps: the BN pass and the grid are part of what a resume must reproduce)
    run_script(c, oasis_cmd(c, runs / "resumed", "fp32", n // 2), "oasis_resume_first_half")
    run_script(c, oasis_cmd(c, runs / "resumed", "fp32", n, resume=True), "oasis_resume")
    a, b = step_losses(runs / "fp32", ("loss_G", "loss_D")), step_losses(runs / "resumed", ("loss_G", "loss_D"))
    gap = max(abs(x - y) for s in a for x, y in zip(a[s], b.get(s, (np.inf, np.inf))))
    tol = 0.0 if c.device == "cpu" else 1e-2  # cuDNN autotuning is not bit-deterministic
    res["resume max |loss gap|"] = gap
    if sorted(b) != sorted(a) or gap > tol:
        raise CheckFailed(f"--resume: losses {b} against the uninterrupted run's {a} (allowed gap {tol})")
    _, s = run_script(c, torchrun(oasis_cmd(c, runs / "torchrun", "bf16", n)), "oasis_torchrun")
    losses = step_losses(runs / "torchrun", ("loss_G", "loss_D"))
    if sorted(losses) != list(range(1, n + 1)) or not np.isfinite(list(losses.values())).all():
        raise CheckFailed(f"torchrun: losses per step {losses}")
    res["torchrun backend"] = "nccl" if c.device.startswith("cuda") else "gloo"
    res["torchrun s"] = round(s, 1)
    res["torchrun bf16 last losses G, D"] = [round(v, 4) for v in losses[n]]
    return res


def piti_files(c):
    """Base + upsampler files in the official key format (random weights), and a hard affinity ADE20K -> COCO."""
    import data
    from models import piti
    d = c.out / "piti_files"
    d.mkdir(parents=True, exist_ok=True)
    c.piti_base, c.piti_up, c.piti_affinity = d / "base_mask.pt", d / "upsample_mask.pt", d / "affinity.npy"
    torch.manual_seed(0)
    for path, kw, sr in ((c.piti_base, PITI_TINY_BASE if c.tiny else piti.BASE_KWARGS, False),
                         (c.piti_up, PITI_TINY_UP if c.tiny else piti.UP_KWARGS, True)):
        if not path.exists():
            m = piti.PITI(**{**kw, "super_res": sr})
            torch.save({k: v for k, v in m.state_dict().items() if k in m.official_keys()}, path)
            del m
    np.save(c.piti_affinity, random_affinity(data.class_table("ade20k").n_channels, piti.COCO_CHANNELS))


def fused_sdpa(c):
    """One forward of the base model with SDPA's math fallback disabled: it runs only on a fused kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import bench_piti
    from models import amp as amp_mod
    from models import piti
    dev = torch.device(c.device)
    kw = PITI_TINY_BASE if c.tiny else piti.BASE_KWARGS
    m = piti.PITI(**{**kw, "super_res": False}).to(dev).eval()
    x = torch.randn(2, 3, m.image_size, m.image_size, device=dev)
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with torch.no_grad(), sdpa_kernel(fused), amp_mod.autocast(dev, "bf16"):
        out = m(x, torch.tensor([10, 500], device=dev), m.ref(bench_piti.labels(2, 256, dev)))
    if not torch.isfinite(out.float()).all():
        raise CheckFailed("fused SDPA forward: non-finite output")
    return "ran with the math fallback disabled"


def part_piti(c):
    c.ade = toy_dataset(c, "ade20k")
    piti_files(c)
    n = 1 if c.tiny else 2
    res = {"steps": n, "batch": c.piti_batch, "config": "tiny widths" if c.tiny else "released base 64 + upsampler 256",
           "grid": f"{c.piti_batch} maps, base {c.piti_sample_steps} steps + upsampler fast27"}
    runs = c.out / "piti"
    amps = ["bf16"] + (["fp16"] if c.device.startswith("cuda") else [])
    for amp in amps:
        out, s = run_script(c, piti_cmd(c, runs / amp, amp, n), f"piti_{amp}")
        losses = step_losses(runs / amp, ("loss",))
        if sorted(losses) != list(range(1, n + 1)) or not np.isfinite(list(losses.values())).all():
            raise CheckFailed(f"--amp {amp}: losses per step {losses}; expected {n} finite steps")
        grids = list((runs / amp / "samples").glob("*.png"))
        if not grids:
            raise CheckFailed(f"--amp {amp}: no sample grid in {runs / amp / 'samples'}")
        res[f"{amp} s (train + grid)"] = round(s, 1)
        res[f"{amp} last loss"] = round(losses[n][0], 4)
    if "fp16" not in amps:
        res["fp16"] = "skipped: fp16 + GradScaler is CUDA-only"
    res["fused SDPA"] = fused_sdpa(c)
    _, s = run_script(c, torchrun(piti_cmd(c, runs / "torchrun", "bf16", n)), "piti_torchrun")
    losses = step_losses(runs / "torchrun", ("loss",))
    if sorted(losses) != list(range(1, n + 1)) or not np.isfinite(list(losses.values())).all():
        raise CheckFailed(f"torchrun: losses per step {losses}")
    res["torchrun backend"] = "nccl" if c.device.startswith("cuda") else "gloo"
    res["torchrun s"] = round(s, 1)
    return res


def part_evaluate(c):
    from models import inception, segmenters as S
    d = c.out / "eval_files"
    d.mkdir(parents=True, exist_ok=True)
    files = {"inception": d / inception.INCEPTION_FILE,
             "deeplabv2": [d / "deeplabv2_resnet101_msc-cocostuff164k-100000.pth"],
             "upernet101": [d / "encoder_epoch_50.pth", d / "decoder_epoch_50.pth"],
             "drn105": [d / "drn-d-105_ms_cityscapes.pth"]}
    nets = {"inception": inception.FIDInception(), "deeplabv2": [S.DeepLabV2MSC(182)],
            "upernet101": [S.UperNetEncoder(), S.UperNetDecoder()], "drn105": [S.DRNSeg()]}
    for name, net in nets.items():
        for path, module in zip([files[name]] if name == "inception" else files[name],
                                [net] if name == "inception" else net):
            if not path.exists():
                torch.save(random_like(module), path)
    res = {"images": c.eval_images}
    for dataset, seg in (("ade20k", "upernet101"), ("coco", "deeplabv2"), ("cityscapes", "drn105")):
        ckpt = oasis_generator_ckpt(c, dataset, d / f"G_{dataset}.pt")
        out = c.out / "evaluate" / dataset
        fid = files["inception"] if dataset == "ade20k" else None
        _, s = run_script(c, evaluate_cmd(c, out, ckpt, dataset, toy_dataset(c, dataset), seg, files[seg], fid),
                          f"evaluate_{dataset}")
        r = json.loads((out / "results.json").read_text())
        figures = {"miou": r["miou"], "miou_real": r["miou_real"], "s": round(s, 1)}
        if fid:
            figures.update(fid=r["fid"], kid=r["kid_mean"], kid_std=r["kid_std"])
        bad = [k for k, v in figures.items() if not np.isfinite(np.asarray(v, float)).all()]
        if bad or not 0 <= r["miou"] <= 1:
            raise CheckFailed(f"evaluate {dataset} ({seg}): figures {figures}")
        res[f"{dataset} {seg}"] = figures
    return res


def capture(fn, *a):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(*a)
    return buf.getvalue()


def part_bench_oasis(c):
    import bench_oasis
    res, t0 = {}, time.perf_counter()
    for batch in ([1] if c.tiny else [8, 16, 32]):
        text = capture(bench_oasis.bench_iteration, bench_oasis_args(c, batch))
        line = json.loads(text.splitlines()[0])
        keep = ("img/s", "s/iter", "MFU %", "peak GB")
        res[f"batch {batch}"] = {k: line[k] for k in keep if k in line}
        res[f"batch {batch}"]["vs official img/s"] = round(line["img/s"] / bench_oasis.OFFICIAL["img/s"], 3)
        if "peak GB" in line:
            res[f"batch {batch}"]["vs official peak GB"] = round(line["peak GB"] / bench_oasis.OFFICIAL["peak GB"], 3)
        if not np.isfinite([line["loss_G"], line["loss_D"]]).all():
            raise CheckFailed(f"bench_oasis batch {batch}: non-finite losses {line}")
        if c.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if c.device.startswith("cuda"):  # torch.compile once, at the largest batch, if it compiles within the share
        left = max(10.0, SHARE["bench_oasis"] - (time.perf_counter() - t0))
        try:
            out, s = run_script(c, bench_oasis_compile_cmd(c), "bench_oasis_compile", timeout=left)
            line = json.loads(next(s for s in out.splitlines() if s.startswith("{")))
            res["batch 32 --compile"] = {"img/s": line["img/s"], "peak GB": line.get("peak GB"),
                                         "vs official img/s": round(line["img/s"] / bench_oasis.OFFICIAL["img/s"], 3),
                                         "s incl. compile": round(s, 1)}
        except subprocess.TimeoutExpired:
            res["batch 32 --compile"] = f"not done: did not compile and run within the {left:.0f} s left of the share"
    else:
        res["--compile"] = "skipped on the CPU rehearsal"
    res["target (BENCHMARKS.md)"] = ">= 120 img/s and <= 28 GB at batch 32 on one H100"
    return res


def part_bench_piti(c):
    import bench_piti
    res = {}
    for batch in ([1] if c.tiny else [8, 32]):
        args = bench_piti_args(c, batch)
        dev = torch.device(c.device)
        torch.manual_seed(0)
        base, up = bench_piti.build(args, False, dev), bench_piti.build(args, True, dev)
        line = bench_piti.run_mode("bf16", base, up, bench_piti.labels(batch, 256, dev), args, dev)
        if not line["finite"]:
            raise CheckFailed(f"bench_piti batch {batch}: non-finite samples")
        res[f"batch {batch}"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in line.items()
                                 if k in ("base img/s", "base ms/step", "up img/s", "end-to-end img/s", "peak GiB base",
                                          "peak GiB up", "vs official H100 end-to-end")}
        del base, up
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    res["official H100 end-to-end img/s"] = bench_piti.OFFICIAL_H100["end-to-end img/s"]
    res["target (BENCHMARKS.md)"] = ">= 5x the official end to end (1.75 img/s) at batch 8 on one H100"
    return res


def part_bench_fid(c):
    out, s = run_script(c, bench_fid_cmd(c), "bench_fid")
    res = {"s": round(s, 1)}
    for line in out.splitlines():
        m = re.match(r"\s+(pytorch-fid fp32|ours fp32|ours bf16)\s+([\d.]+) img/s\s+\(([\d.]+)x", line)
        if m:
            res[m[1]] = {"img/s": float(m[2]), "vs pytorch-fid": float(m[3])}
        m = re.search(r"max \|ours - pytorch-fid\| / max \|pytorch-fid\| \(fp32 features\): (\S+)", line)
        if m:
            res["max relative feature difference"] = float(m[1])
        m = re.search(r"fp32 ([\d.]+), bf16.* ([\d.]+), relative change (\S+)", line)
        if m:
            res.update({"FID fp32": float(m[1]), "FID bf16": float(m[2]), "FID relative change": float(m[3])})
    res["target (BENCHMARKS.md)"] = "ours bf16 >= 2x pytorch-fid; FID relative change bf16 vs fp32 <= 0.1%"
    if "ours bf16" not in res or "max relative feature difference" not in res:
        raise CheckFailed(f"bench_fid: figures not found in its output (see {c.out / 'logs' / 'bench_fid.log'})")
    if res["max relative feature difference"] > 1e-2:  # TF32 convolutions on a GPU stay far below this
        raise CheckFailed(f"bench_fid: features differ from pytorch-fid's by {res['max relative feature difference']}")
    if c.device.startswith("cuda") and res.get("FID relative change", 0) > 1e-3:
        res["note"] = "bf16 FID change above the allowed 0.1% (random weights: see BENCHMARKS.md)"
    return res


RUN = {"env": part_env, "oasis": part_oasis, "piti": part_piti, "evaluate": part_evaluate,
       "bench_oasis": part_bench_oasis, "bench_piti": part_bench_piti, "bench_fid": part_bench_fid}
assert list(RUN) == PARTS


# ----------------------------------------------------------------------------------------------
# The run


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def write_reports(c, report):
    tmp = c.out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(c.out / "gpu_check.json")
    env = report["parts"].get("env", {})
    lines = [f"### GPU check, {report['date']} (commit {report['commit']})", "",
             f"Device: {report['device']}; torch {env.get('torch', torch.__version__)}, CUDA {env.get('cuda', '-')}, "
             f"cuDNN {env.get('cudnn', '-')}. Command: `{report['command']}`" + (" (tiny widths: figures meaningless)"
                                                                                 if c.tiny else ""), "",
             "| part | ok | seconds | figures / error |", "|---|---|---|---|"]
    for name, r in report["parts"].items():
        figs = r.get("error", "").splitlines()[0] if not r["ok"] else \
            "; ".join(f"{k}: {v}" for k, v in r.items() if k not in ("ok", "seconds", "cpu seconds", "error", "traceback"))
        lines.append(f"| {name} | {'yes' if r['ok'] else '**no**'} | {r['seconds']} | {figs.replace('|', '/')} |")
    tmp = c.out / "gpu_check.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(c.out / "gpu_check.md")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md, logs/ and the parts' runs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda (default when "
                   "visible), cuda:N or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny widths, 1-2 steps, few images (the CPU rehearsal)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list, run in the fixed order: {','.join(PARTS)}")
    args = p.parse_args(argv)
    asked = [s for s in args.parts.split(",") if s]
    unknown = [s for s in asked if s not in RUN]
    if unknown:
        p.error(f"--parts: unknown {', '.join(unknown)}; expected some of {', '.join(PARTS)}")
    parts = [s for s in PARTS if s in asked]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA GPU visible (the CPU rehearsal: --device cpu --tiny)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(1)
    c = SimpleNamespace(out=out, device=args.device, tiny=args.tiny, oasis_batch=1 if args.tiny else 8,
                        piti_batch=2 if args.tiny else 4, piti_sample_steps="2" if args.tiny else "25",
                        eval_images=2 if args.tiny else 16, eval_batch=2 if args.tiny else 16)
    planted = set(filter(None, os.environ.get(FAIL_ENV, "").split(",")))
    report = {"device": torch.cuda.get_device_name(torch.device(args.device)) if cuda else f"cpu ({platform.machine()})",
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit(),
              "command": "python bench/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "tiny": args.tiny, "budget s": {k: SHARE[k] for k in parts}, "parts": {}}
    t_all = time.perf_counter()
    for name in parts:
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        try:
            if name in planted:
                raise CheckFailed(f"{name}: planted failure ({FAIL_ENV})")
            missing = [pip for mod, pip in NEEDS.get(name, {}).items() if importlib_find(mod) is None]
            if missing:
                raise CheckFailed(f"{name}: missing package(s) {', '.join(missing)} (carry them as wheels)")
            entry = {"ok": True, **RUN[name](c)}
        except Exception as e:  # noqa: BLE001 - every failure is recorded, and the next part runs
            entry = {"ok": False, "error": f"{name}: {type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        entry["cpu seconds"] = round(cpu_seconds() - cpu0, 1)  # this process and its scripts: on a loaded machine
        report["parts"][name] = entry
        report["seconds"] = round(time.perf_counter() - t_all, 1)
        write_reports(c, report)
        state = "ok" if entry["ok"] else "FAILED: " + entry["error"].splitlines()[0]
        print(f"[{name}] {state} ({entry['seconds']} s, share {SHARE[name]} s)", flush=True)
    failed = [k for k, v in report["parts"].items() if not v["ok"]]
    print(f"gpu_check: {len(parts) - len(failed)}/{len(parts)} parts ok in {report['seconds']} s"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"; {out / 'gpu_check.json'}", flush=True)
    return 1 if failed else 0


def cpu_seconds():
    """User + system CPU time of this process and of its finished children (the scripts)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def importlib_find(mod):
    import importlib.util
    return importlib.util.find_spec(mod)


if __name__ == "__main__":
    sys.exit(main())
