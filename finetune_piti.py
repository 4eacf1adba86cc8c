"""Finetune the official PITI models on a few target images with Class Affinity Transfer (CAT).

    # COCO-Stuff PITI -> your label set: affinity from estimate_affinity.py, 100 target images
    python finetune_piti.py --base ckpt/base_mask.pt --upsampler ckpt/upsample_mask.pt \
        --affinity runs/aff/affinity.npy --data folder --data-root my_data --n 100 --lr 2e-4 --out runs/piti_cat
    # training-free CAT (no steps): writes the checkpoint evaluate.py samples from, and a grid
    python finetune_piti.py --base ... --upsampler ... --affinity affinity.npy --steps 0 --prompts 0 --out runs/free

The paper's recipe (FixDec): the CAT 1x1 conv (target one-hot -> source classes, initialised from the
affinity, followed by the fixed palette rendering the official encoder eats), K prompt tokens, the
encoder CNN and the last transformer block are trained; the UNet decoder stays fixed. Table 11 rows:
--train all (finetune everything), --prompts 0 (no prompts), --affinity none (no CAT: random 1x1).
Loss: the official PITI base loss, eps MSE + the variational bound training the learned variance
(uniform t); condition dropout (--uncond-p, the input becomes ones as in the official code) keeps
classifier-free guidance working; AdamW without weight decay, EMA of the trained weights.
The upsampler is used as released (its own encoder gets the same CAT 1x1 conv, training-free) unless
--finetune-upsampler, which trains it the same way on 8-bit bicubic low-res inputs, without condition
dropout as the official upsampler (the official BSRGAN degradation, VGG and adversarial terms are left out).

A PITI source for your own dataset (SPEC section 10, the official stage schedule), and the paper's Figure 3
baseline (PITI finetuned from GLIDE on the few target images, no CAT):

    python finetune_piti.py --init glide --glide-ckpt glide/base.pt --recipe piti-stage1 \
        --data ade20k --data-root ADEChallengeData2016 --out runs/ade_stage1
    python finetune_piti.py --init glide --glide-ckpt glide/base.pt --recipe piti-stage1-cont \
        --encoder runs/ade_stage1/base.pt --data ade20k --data-root ADEChallengeData2016 --out runs/ade_stage1c
    python finetune_piti.py --init glide --glide-ckpt glide/base.pt --recipe piti-stage2 \
        --encoder runs/ade_stage1c/base.pt --data ade20k --data-root ADEChallengeData2016 --out runs/ade_base
    python finetune_piti.py --init glide --glide-up-ckpt glide/upsample.pt --recipe piti-upsample ... --out runs/ade_up

--init glide loads GLIDE's file unchanged into the decoder after the official key filter (the text tower out,
transformer_proj kept; strict), with a fresh encoder (or --encoder: a stage-1 encoder file or an earlier run's
base.pt); the label space is --data's classes. The run exports <out>/base.pt (and <out>/upsampler.pt), the EMA
weights in the official flat format: the --base / --upsampler of a later CAT run (with --source set to that
dataset). Recipes set --train, --uncond-p, --lr, --steps, --schedule-sampler and --ema-decay unless given (--batch
is yours: the official global batch is 128 for the base stages, 4 for the upsampler).

Every --eval-every steps: a grid of EMA samples (base -> upsampler cascade), FID with --inception or
--fid-features (early stopping with --patience), <out>/checkpoint.pt written atomically. Each step
draws its randomness from (--seed, step), so --resume continues exactly as an uninterrupted run.
The checkpoint keeps the trained weights and the official files' paths (the decoder is not copied).
"""
import argparse
import copy
import json
import os
import random
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from models import DataError, cli
import metrics
from models import piti, piti_train

# flags a resumed run must share with the run it continues
SAME_ON_RESUME = ("init", "glide_ckpt", "glide_up_ckpt", "encoder", "recipe", "schedule_sampler", "base", "upsampler", "base_config", "up_config", "source", "affinity", "data", "data_root", "n",
                  "subset_seed", "size", "prompts", "train", "finetune_upsampler", "batch", "lr", "ema_decay",
                  "uncond_p", "seed")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, log.jsonl, samples/, subset.txt")
    p.add_argument("--resume", action="store_true",
                   help="continue <out>/checkpoint.pt exactly; model, data and optimisation flags default to the run's")
    g = p.add_argument_group("source model")
    g.add_argument("--init", default="piti", choices=["piti", "glide"],
                   help="piti: CAT from released PITI files; glide: train PITI itself from GLIDE (a new source, or the "
                        "Figure 3 baseline on a few-shot target)")
    g.add_argument("--glide-ckpt", help="--init glide: GLIDE base.pt (openai/glide-text2im) for the base decoder")
    g.add_argument("--glide-up-ckpt", help="--init glide: GLIDE upsample.pt; trains the upsampler too (or alone)")
    g.add_argument("--encoder", help="--init glide: base encoder init, an official stage-1 file or a run's base.pt")
    g.add_argument("--recipe", choices=sorted(piti_train.RECIPES), help="the official stage: " + piti_train.describe_recipes())
    g.add_argument("--base", help="official PITI base file (base_mask.pt, from the PITI README's 'Pretrained Models')")
    g.add_argument("--upsampler", help="official PITI upsampler file (upsample_mask.pt)")
    g.add_argument("--base-config", default="{}", help="JSON overrides of the released base configuration (tiny tests)")
    g.add_argument("--up-config", default="{}", help="JSON overrides of the released upsampler configuration")
    g.add_argument("--source", default="coco", choices=data.DATASETS, help="label space the PITI models were trained on")
    g.add_argument("--source-root", default=None, help="folder of the source classes.txt (--source folder)")
    g.add_argument("--affinity", default=None,
                   help="affinity.npy (target x source classes) from estimate_affinity.py, or 'none' for the no-CAT row "
                        "(random 1x1 conv)")
    data.add_data_args(p)
    g = p.add_argument_group("CAT recipe (paper Table 11)")
    g.add_argument("--prompts", type=int, default=8, help="learned prompt tokens K at the encoder input (0: none)")
    g.add_argument("--train", default=None, choices=["fixdec", "all", "encoder"],
                   help="fixdec (CAT default): 1x1 conv, prompts, encoder CNN, last transformer block; all: the whole "
                        "model (--init glide default); encoder: the encoder only (official stage 1)")
    g.add_argument("--finetune-upsampler", action="store_true", help="also train the upsampler (same recipe)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=5000)
    g.add_argument("--batch", type=int, default=8)
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the trained weights (official 0.9999 for 200k-step runs)")
    g.add_argument("--uncond-p", type=float, default=0.2, help="condition dropout for guidance (official 0.2)")
    g.add_argument("--schedule-sampler", default="uniform", choices=["uniform", "loss-second-moment"],
                   help="timestep sampler (official base stages: loss-second-moment, importance-weighted)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-every", type=int, default=500, help="grid + FID + checkpoint every N steps")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--grid-n", type=int, default=4, help="validation label maps in the sample grid")
    g.add_argument("--sample-steps", default="100", help="base respacing for grids/FID (official previews: 100)")
    g.add_argument("--up-steps", default="fast27", help="upsampler respacing for grids/FID")
    g.add_argument("--guidance", type=float, default=piti.GUIDANCE)
    g.add_argument("--inception", default=None, help="pt_inception-2015-12-05-6726825d.pth: early stopping on val FID")
    g.add_argument("--fid-features", default=None, help="TorchScript feature net (toy-domain FID) instead of Inception")
    g.add_argument("--fid-n", type=int, default=None, help="val images used for FID (default all)")
    g.add_argument("--patience", type=int, default=5, help="stop after N evaluations without a better FID")
    g = p.add_argument_group("speed")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--amp", default="bf16", choices=["bf16", "fp32"], help="autocast dtype on CUDA (CPU always fp32)")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    flags = {a.split("=")[0] for a in argv if a.startswith("--")}
    given = {a.dest for a in p._actions if flags & set(a.option_strings)}
    if args.recipe and args.resume and "steps" not in given:  # the stage's length, as the run being continued
        args.steps = old["steps"]
    if args.recipe and not args.resume:  # a named official stage: its settings unless given on the command line
        for k, v in piti_train.RECIPES[args.recipe].items():
            if k not in ("doc", "official_batch") and k not in given:  # --batch stays per run (official: 8 GPUs x 16)
                setattr(args, k, v)
    for flag in ("base_config", "up_config"):
        try:
            setattr(args, flag, json.loads(getattr(args, flag)))
        except json.JSONDecodeError as e:
            raise DataError(f"--{flag.replace('_', '-')}: not JSON ({e})")
    if args.resume:  # flags not repeated come from the run being continued
        path = Path(args.out) / "checkpoint.pt"
        if not path.is_file():
            raise DataError(f"{path}: nothing to resume")
        old = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["args"]
        old = {k: old.get(k, p.get_default(k)) for k in SAME_ON_RESUME} | old  # runs from before --init
        for k in SAME_ON_RESUME:
            if k not in given:
                setattr(args, k, old[k])
            elif getattr(args, k) != old[k]:
                raise DataError(f"--resume: --{k.replace('_', '-')} is {getattr(args, k)!r}, the run in {args.out} "
                                 f"used {old[k]!r}")
    elif args.init == "glide":
        if not (args.glide_ckpt or args.glide_up_ckpt):
            raise DataError("--init glide needs --glide-ckpt (GLIDE base.pt) and/or --glide-up-ckpt (upsample.pt)")
        if args.affinity or args.base or ("prompts" in given and args.prompts):
            raise DataError("--init glide trains PITI on --data's own classes: no --affinity, --base or --prompts")
        args.prompts = 0
    else:
        for flag in ("base", "upsampler", "affinity"):
            if getattr(args, flag) is None:
                raise DataError(f"--{flag} is required (see --help)")
    if args.train is None:
        args.train = "all" if args.init == "glide" else "fixdec"
    if args.init == "glide" and args.train == "fixdec":
        raise DataError("--train fixdec is CAT's recipe; --init glide trains 'encoder' or 'all'")
    if args.prompts < 0 or not 0 <= args.uncond_p <= 1 or args.batch < 1 or args.guidance < 0:
        raise DataError("--prompts >= 0, --batch >= 1, --guidance >= 0 and --uncond-p in [0, 1] expected")
    return args


def load_affinity(path, target, source, seed):
    """Channel-space affinity (T, S): from the .npy, or a random row-stochastic one for 'none'."""
    if path == "none":
        A = np.random.RandomState(seed).rand(len(target), len(source)).astype(np.float32)
        return None, data.affinity_to_channels(A / A.sum(1, keepdims=True), target, source)
    if not os.path.isfile(path):
        raise DataError(f"--affinity {path}: not found; make one with estimate_affinity.py")
    A = np.load(path)
    if A.ndim != 2 or A.shape != (len(target), len(source)):
        raise DataError(f"--affinity {path}: shape {A.shape}, expected ({len(target)}, {len(source)}) = "
                         f"({target.dataset} classes, {source.dataset} classes)")
    return torch.from_numpy(A.astype(np.float32)), data.affinity_to_channels(A, target, source)


def trainable(model, mode):
    """FixDec's parameter set (or everything, or the encoder): names -> parameters, in model order."""
    if mode in ("all", "encoder"):
        return piti_train.trainable(model, mode)
    last = f"encoder.transformer.resblocks.{len(model.encoder.transformer.resblocks) - 1}."
    keep = ("cat_map", "prompts", "encoder.cnn.", last)
    return {k: p for k, p in model.named_parameters() if k.startswith(keep)}


@contextmanager
def swapped(params, ema):
    """Temporarily put the EMA weights into the model (only the trained tensors are copied)."""
    raw = {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(ema[k])
    try:
        yield
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(raw[k])


def step_seed(seed, what, i):
    """Independent seed for (run seed, what: 0 = a step's draws, 1 = an epoch's order, index)."""
    return int(np.random.SeedSequence([seed, what, i]).generate_state(1)[0])


def batch_indices(step, n, batch, seed):
    """Items of a step: consecutive slices of per-epoch permutations (stateless, so resumes are exact)."""
    out = []
    for pos in range(step * batch, (step + 1) * batch):
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, 1, epoch)))
        out.append(int(perm[i]))
    return out


def training_loss(model, diff, image, label, uncond_p, low_res_side=None, amp=True, sampler=None):
    """Official PITI loss on one batch: q_sample at t from `sampler` (None: uniform), model output, mse + vb;
    batch values = mean(term * importance weight), as the official TrainLoop; "per_sample" = (t, losses)."""
    B = image.shape[0]
    side = model.image_size
    x0 = F.interpolate(image, (side, side), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
    ref = model.ref(label)
    drop = torch.rand(B, device=image.device) < uncond_p
    ref = torch.where(drop[:, None, None, None], torch.ones_like(ref), ref)
    if sampler is None or sampler.kind == "uniform":
        t, weights = torch.randint(0, diff.num_timesteps, (B,), device=image.device), None
    else:
        t, weights = sampler.sample(B, image.device)
    noise = torch.randn_like(x0)
    low = None
    if low_res_side:  # upsampler: an 8-bit bicubic low-res version of the target
        low = piti.quantize(F.interpolate(x0, (low_res_side, low_res_side), mode="bicubic", antialias=True,
                                          align_corners=False))
    terms = piti_train.diffusion_terms(model, diff, x0, ref, t, noise, low_res=low, amp=amp)
    return {**piti_train.weighted_means(terms, weights), "per_sample": (t.detach(), terms["loss"].detach())}


def sampler(base, up, args, out_side, real=None):
    """sample(label, seeds) -> images in [-1,1] at the dataset's side (one seed per batch).

    Base and upsampler: the cascade. Base alone (--init glide without an upsampler): its 64x64 samples.
    Upsampler alone: it upsamples the 8-bit low-res versions of `real` (the grid's real images)."""
    def sample(label, seeds):
        gen = torch.Generator(label.device).manual_seed(int(seeds[0]))
        amp, ddim = args.amp == "bf16", args.sample_steps.startswith("ddim")
        if base is not None and up is not None:
            x = piti.cascade(base, up, label, generator=gen, steps=args.sample_steps, up_steps=args.up_steps,
                             guidance=args.guidance, ddim=ddim, amp=amp)
        elif base is not None:
            x = piti.sample(base, base.ref(label), steps=args.sample_steps, guidance=args.guidance, generator=gen,
                            ddim=ddim, amp=amp)
        else:
            side = up.image_size // 4
            low = piti.quantize(F.interpolate(real[:len(label)].to(label.device), (side, side), mode="bicubic",
                                              antialias=True, align_corners=False))
            x = piti.sample(up, up.ref(label), steps=args.up_steps, low_res=low, generator=gen, amp=amp)
        if x.shape[-2:] != tuple(out_side):
            x = F.interpolate(x, out_side, mode="bilinear", antialias=True, align_corners=False)
        return x.clamp(-1, 1)
    return sample


EXPORTS = {"base": "base.pt", "up": "upsampler.pt"}  # --init glide: the EMA models in the official format


def glide_models(args, n_channels):
    """--init glide: (base, up, trained models) with decoders from the GLIDE files; --upsampler (a PITI upsampler
    of this label space) may stand in for an untrained one, for grids and FID."""
    own = {"source_channels": n_channels}
    base = up = None
    if args.glide_ckpt:
        base = piti_train.glide_model(args.glide_ckpt, False, {**args.base_config, **own}, encoder=args.encoder,
                                      seed=args.seed)
    if args.glide_up_ckpt:
        up = piti_train.glide_model(args.glide_up_ckpt, True, {**args.up_config, **own}, seed=args.seed + 1)
    elif args.upsampler:
        up = piti.load_official(args.upsampler, super_res=True, config={**piti.UP_KWARGS, **args.up_config, **own})
    models = {"base": base} if base is not None else {}
    if args.glide_up_ckpt:
        models["up"] = up
    return base, up, models


def save_checkpoint(obj, path):
    tmp = str(path) + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv=None):
    args = get_args(argv)
    out = Path(args.out)
    path = out / "checkpoint.pt"
    ckpt = None
    if args.resume:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    elif path.exists():
        raise DataError(f"{path} exists; use --resume to continue it, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)

    # data, class tables, affinity
    train_ds = data.dataset_from_args(args, "train", augment=True, out_dir=None if args.resume else out)
    val_ds = data.dataset_from_args(args, "val")
    target = train_ds.classes
    if args.init == "glide":  # PITI itself from GLIDE, in the data's own label space (no CAT)
        source, A = target, None
        base, up, models = glide_models(args, target.n_channels)
    else:
        source = data.class_table(args.source, args.source_root)
        A, M = load_affinity(args.affinity, target, source, args.seed)
        # models: official weights + CAT layers (the upsampler's 1x1 conv gets the same affinity)
        cat = dict(source_channels=source.n_channels, target_channels=target.n_channels)
        base_kw = {**piti.BASE_KWARGS, **args.base_config, **cat, "prompts": args.prompts}
        up_kw = {**piti.UP_KWARGS, **args.up_config, **cat, "prompts": args.prompts if args.finetune_upsampler else 0}
        base = piti.load_official(args.base, super_res=False, config=base_kw)
        up = piti.load_official(args.upsampler, super_res=True, config=up_kw)
        torch.manual_seed(args.seed)  # prompts' random init
        for m in (base, up):
            m.reset_cat()
            m.set_affinity(M)
        models = {"base": base, "up": up} if args.finetune_upsampler else {"base": base}
    present = [m for m in (base, up) if m is not None]
    params = {name: trainable(m, args.train) for name, m in models.items()}
    for name, m in models.items():
        m.requires_grad_(False)
        for p in params[name].values():
            p.requires_grad_(True)
    saved = dict(params) if args.init == "glide" else \
        {"base": params["base"], "up": params.get("up", {"cat_map": up.cat_map})}  # what a checkpoint keeps
    ema = {name: {k: p.detach().clone() for k, p in ps.items()} for name, ps in params.items()}
    opt = torch.optim.AdamW([p for ps in params.values() for p in ps.values()], lr=args.lr, weight_decay=0.0)
    step, best_fid, bad_evals = 0, None, 0
    if ckpt is not None:
        for name, m in models.items():
            m.load_state_dict(ckpt[name], strict=False)
            ema[name] = {k: v.clone() for k, v in ckpt[f"{name}_ema"].items()}
        step, best_fid, bad_evals = ckpt["step"], ckpt["best_fid"], ckpt["bad_evals"]
    for m in present:
        m.to(device)
        if device.type == "cuda":
            m.to(memory_format=torch.channels_last)
    ema = {name: {k: v.to(device) for k, v in e.items()} for name, e in ema.items()}
    if ckpt is not None:  # optimizer state follows its parameters' device
        opt.load_state_dict(ckpt["opt"])
    diffs = {name: piti.Diffusion(m.noise_schedule) for name, m in (("base", base), ("up", up)) if m is not None}
    tsamplers = {name: piti_train.TimestepSampler(args.schedule_sampler, diffs[name].num_timesteps) for name in models}
    if ckpt is not None:
        for name, state in ckpt.get("timestep_samplers", {}).items():
            tsamplers[name].load_state_dict(state)
    low_side = base.image_size if base is not None else up.image_size // 4  # the upsampler's input side

    # evaluation: grid of fixed val maps and seeds, FID of the EMA cascade
    grid_items = [val_ds[i] for i in range(min(args.grid_n, len(val_ds)))]
    grid = {"label": torch.stack([it["label"] for it in grid_items]).to(device),
            "real": torch.stack([it["image"] for it in grid_items]), "n_channels": target.n_channels,
            "seeds": [args.seed]}
    sample = sampler(base, up, args, val_ds.size, grid["real"])
    fid = None
    if (args.inception or args.fid_features) and base is None:
        raise DataError("FID needs the base model: an upsampler-only run (--glide-up-ckpt alone) writes grids only")
    if args.inception or args.fid_features:
        net = metrics.load_feature_net(args.inception, args.fid_features, device)
        fid_ds = copy.copy(val_ds)
        fid_ds.files = val_ds.files[:args.fid_n]
        real = metrics.real_stats(fid_ds, net, cache_dir=out / "fid_cache", device=device)[:2]

        def fid():
            return metrics.generator_fid(sample, fid_ds, net, real, device, args.batch, args.seed)

    def evaluate_and_save(s):
        """EMA grid, FID, checkpoint; True when early stopping says stop."""
        nonlocal best_fid, bad_evals
        for m in present:
            m.eval()
        with ExitStack() as stack:
            for name in params:
                stack.enter_context(swapped(params[name], ema[name]))
            metrics.sample_grid(sample, grid, out / "samples" / f"{s:06d}.png")
            entry = {"step": s, "grid": f"samples/{s:06d}.png"}
            stop = False
            if fid is not None:
                entry["fid"] = fid()
                better = best_fid is None or entry["fid"] < best_fid
                best_fid, bad_evals = (entry["fid"], 0) if better else (best_fid, bad_evals + 1)
                stop = bad_evals >= args.patience
            if args.init == "glide":  # the EMA weights as official flat files: a later run's --base / --upsampler
                for name in models:
                    save_checkpoint(piti_train.official_state(models[name]), out / EXPORTS[name])
        files = {"base": args.base, "up": args.upsampler}
        if args.init == "glide":
            files.update({name: out / EXPORTS[name] for name in models})
        state = {"kind": "piti-cat", "init": args.init, "step": s, "args": vars(args), "affinity": A,
                 "source": {"dataset": source.dataset, "names": source.names, "n_channels": source.n_channels},
                 "target": {"dataset": target.dataset, "names": target.names, "n_channels": target.n_channels},
                 "base_kwargs": base.kwargs if base is not None else None,
                 "up_kwargs": up.kwargs if up is not None else None,
                 "base_file": os.path.abspath(files["base"]) if files["base"] else None,
                 "up_file": os.path.abspath(files["up"]) if files["up"] else None,
                 "timestep_samplers": {name: ts.state_dict() for name, ts in tsamplers.items()},
                 "opt": opt.state_dict(), "best_fid": best_fid, "bad_evals": bad_evals}
        for name, ps in saved.items():
            state[name] = {k: p.detach().cpu().clone() for k, p in ps.items()}
            state[f"{name}_ema"] = {k: v.cpu().clone() for k, v in ema[name].items()} if name in ema else state[name]
        save_checkpoint(state, path)
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        return stop

    if step == 0 and not args.resume:
        if evaluate_and_save(0) or args.steps == 0:  # the model before training: training-free CAT
            return
    bar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc="finetune_piti")
    t0 = time.time()
    for s in bar:
        seed = step_seed(args.seed, 0, s)
        torch.manual_seed(seed)  # t, noise, condition dropout, UNet dropout
        random.seed(seed)  # the dataset's crop and flip
        items = [train_ds[i] for i in batch_indices(s, len(train_ds), args.batch, args.seed)]
        image = torch.stack([it["image"] for it in items]).to(device)
        label = torch.stack([it["label"] for it in items]).to(device)
        if label.max() >= target.n_channels:
            raise DataError(f"label id {int(label.max())} beyond the {target.n_channels} channels of {target.dataset}")
        for m in models.values():
            m.train()
        logs, total = {}, 0.0
        for name, m in models.items():
            # the official upsampler is never trained unconditionally (it samples without guidance)
            terms = training_loss(m, diffs[name], image, label, 0.0 if name == "up" else args.uncond_p,
                                  low_side if name == "up" else None, amp=args.amp == "bf16", sampler=tsamplers[name])
            tsamplers[name].update(*(v.cpu().numpy() for v in terms.pop("per_sample")))
            total = total + terms["loss"]
            logs.update({f"{name}_{k}": v.detach().item() for k, v in terms.items()})
        loss = total.detach().item()
        if not np.isfinite(loss):
            raise DataError(f"loss is {loss} at step {s}; stopping, {path} left as it was (lower --lr?)")
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        with torch.no_grad():
            for name, ps in params.items():
                for k, p in ps.items():
                    ema[name][k].lerp_(p.detach(), 1 - args.ema_decay)
        bar.set_postfix(loss=f"{loss:.4f}")
        done = s + 1
        if done % args.log_every == 0 or done == args.steps:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps({"step": done, "loss": loss, **logs,
                                    "sec_per_step": (time.time() - t0) / (done - step)}) + "\n")
        if done % args.eval_every == 0 or done == args.steps:
            if evaluate_and_save(done):
                print(f"early stop at step {done}: no better FID in {args.patience} evaluations (best {best_fid:.2f})")
                break


if __name__ == "__main__":
    cli(main)
