r"""Finetune the official PITI models on a few target images with Class Affinity Transfer (CAT).

    # COCO-Stuff PITI -> your label set: affinity from estimate_affinity.py, 100 target images
    python finetune_piti.py --base ckpt/base_mask.pt --upsampler ckpt/upsample_mask.pt \
        --affinity runs/aff/affinity.npy --data folder --data-root my_data --n 100 --lr 2e-4 --out runs/piti_cat
    # training-free CAT (no steps): writes the checkpoint evaluate.py samples from, and a grid
    python finetune_piti.py --base ... --upsampler ... --affinity affinity.npy --steps 0 --out runs/free

The paper's recipe (FixDec): the CAT 1x1 conv (target one-hot -> source classes, initialised from the
affinity, followed by the fixed palette rendering the official encoder eats), K prompt tokens, the
encoder CNN and the last transformer block are trained; the UNet decoder stays fixed.
--recipe names the rows of the paper's PITI ablation (supplement Table 11, adding one component per row), as
flag values that explicit flags override:
  finetune        none of the three: the whole model trained, no prompts, the 1x1 conv keeps PyTorch's default
                  random init (--train all --prompts 0 --affinity none), as finetune_oasis.py's 'finetune';
  fixdec          + FixDec: the decoder fixed (--train fixdec --prompts 0 --affinity none);
  fixdec-prompts  + Prompts: K learned prompt tokens (--train fixdec --affinity none);
  cat             + CAT, the default: the 1x1 conv initialised from --affinity FILE.
Loss: the official PITI base loss, eps MSE + the variational bound training the learned variance
(uniform t unless --schedule-sampler); condition dropout (--uncond-p, the input becomes ones as in the official
code) keeps classifier-free guidance working; AdamW without weight decay, EMA of the trained weights.
The upsampler is used as released (its own encoder gets the same CAT 1x1 conv, training-free) unless
--finetune-upsampler, which trains it the same way on 8-bit bicubic low-res inputs, without condition
dropout as the official upsampler (the official BSRGAN degradation, VGG and adversarial terms are left out).

A PITI source for another label space than COCO-Stuff, and the paper's Figure 3 baseline (PITI finetuned from
GLIDE on the few target images, no CAT), are trained by pretrain_piti.py; its exported base.pt / upsampler.pt
are the --base / --upsampler here (with --source set to that dataset).

Every --eval-every steps: a grid of EMA samples (base -> upsampler cascade), FID with --inception or
--fid-features (early stopping with --patience; <out>/best.pt keeps the best), <out>/checkpoint.pt written
atomically. Each step draws its randomness from (--seed, step), so --resume continues exactly as an
uninterrupted run, taking the run's flags from its checkpoint (model and data flags cannot change; --steps,
the evaluation cadence and --lr may); log.jsonl then holds each step once. A non-empty --out is refused
without --resume or --overwrite. The checkpoint keeps the trained weights and the official files' paths
(the decoder is not copied unless trained). The last line printed names the steps trained, the checkpoint and
the best FID with its step.
"""
import argparse
import os
import random
import time
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import metrics
from models import (DataError, amp, cli, curves, diffusion, finite_float, nonneg_int, piti, positive_float, positive_int,
                    unit_float)
from models.run import (append_log, batch_indices, broadcast_stop, check_data, check_device, data_fingerprint,
                               gather, init_distributed, interrupted, load, parse_with_given, prepare_out,
                               resume_args, save, step_seed, swapped, truncate_log)
from models.state_dict import load_strict

# flags a resumed run must share with the run it continues (steps, evaluation cadence, lr, device may change)
MODEL_FLAGS = ("recipe", "schedule_sampler", "base", "upsampler", "base_config", "up_config", "source", "source_root",
               "affinity", "data", "data_root", "n", "subset_seed", "subset_file", "size", "prompts", "train",
               "finetune_upsampler", "batch", "ema_decay", "uncond_p", "seed")

# The rows of the paper's PITI ablation (supplement Table 11, adding one component per row), as flag values;
# flags given explicitly override a recipe's. prompts None: the default (8, or 0 for a training-free run).
RECIPES = {
    "finetune": dict(train="all", prompts=0, affinity="none"),
    "fixdec": dict(train="fixdec", prompts=0, affinity="none"),
    "fixdec-prompts": dict(train="fixdec", prompts=None, affinity="none"),
    "cat": dict(train="fixdec", prompts=None),  # all three (needs --affinity FILE)
}


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """A bad flag is a DataError (one line from cli()), not argparse's SystemExit; --help still exits."""
        raise DataError(f"{message} (see --help)")


def build_parser():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, best.pt, log.jsonl, curves.png, samples/, subset.txt")
    p.add_argument("--resume", action="store_true",
                   help="continue <out>/checkpoint.pt exactly; flags not given again come from the run")
    p.add_argument("--overwrite", action="store_true", help="start over in a non-empty --out (its run files are removed)")
    g = p.add_argument_group("source model")
    g.add_argument("--base", help="official PITI base file (base_mask.pt, from the PITI README's 'Pretrained Models')")
    g.add_argument("--upsampler", help="official PITI upsampler file (upsample_mask.pt)")
    g.add_argument("--base-config", default="{}", help="JSON overrides of the released base configuration (tiny tests)")
    g.add_argument("--up-config", default="{}", help="JSON overrides of the released upsampler configuration")
    g.add_argument("--source", default="coco", choices=data.DATASETS, help="label space the PITI models were trained on")
    g.add_argument("--source-root", default=None, help="folder of the source classes.txt (--source folder)")
    g.add_argument("--affinity", default=None,
                   help="affinity.npy (target x source classes) from estimate_affinity.py, or 'none' for the no-CAT row "
                        "(the 1x1 conv keeps its random init)")
    data.add_data_args(p)
    g = p.add_argument_group("CAT variants (paper Table 11)")
    g.add_argument("--recipe", default="cat", choices=list(RECIPES),
                   help="a row of the paper's PITI ablation, as the flags below (explicit flags override): "
                        + "; ".join(f"{k}: {' '.join(f'--{f} {v}' for f, v in r.items() if v is not None)}"
                                    for k, r in RECIPES.items()) + " --affinity FILE (the default)")
    g.add_argument("--prompts", type=int, default=None,
                   help="learned prompt tokens K at the encoder input (default 8; 0, the source model, with --steps 0)")
    g.add_argument("--train", default=None, choices=["fixdec", "all"],
                   help="fixdec (CAT default): 1x1 conv, prompts, encoder CNN, last transformer block; all: the whole "
                        "model")
    g.add_argument("--finetune-upsampler", action="store_true", help="also train the upsampler (same recipe)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=nonneg_int, default=5000)
    g.add_argument("--batch", type=int, default=8)
    g.add_argument("--lr", type=positive_float, default=None, help="default: the paper's, 7e-5 for a Cityscapes target, else 2e-4")
    g.add_argument("--ema-decay", type=unit_float, default=0.999, help="EMA of the trained weights (official 0.9999 for 200k-step runs)")
    g.add_argument("--uncond-p", type=unit_float, default=0.2, help="condition dropout for guidance (official 0.2)")
    g.add_argument("--schedule-sampler", default="uniform", choices=["uniform", "loss-second-moment"],
                   help="timestep sampler (official base stages: loss-second-moment, importance-weighted)")
    g.add_argument("--seed", type=nonneg_int, default=0)
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-every", type=int, default=500, help="grid + FID + checkpoint every N steps")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--grid-n", type=positive_int, default=4, help="validation label maps in the sample grid")
    g.add_argument("--sample-steps", default="100", help="base respacing for grids/FID (official previews: 100): "
                   + diffusion.RESPACINGS)
    g.add_argument("--up-steps", default="fast27", help="upsampler respacing for grids/FID, the same forms")
    g.add_argument("--guidance", type=finite_float, default=diffusion.GUIDANCE,
                   help="classifier-free guidance scale (>= 0; official base 1.3, 1 = none)")
    g.add_argument("--inception", default=None, help="pt_inception-2015-12-05-6726825d.pth or fid_inception (downloaded "
                   "once): early stopping on val FID")
    g.add_argument("--fid-features", default=None, help="TorchScript feature net (toy-domain FID) instead of Inception")
    g.add_argument("--fid-n", type=positive_int, default=None, help="val images used for FID (default all)")
    g.add_argument("--patience", type=int, default=5, help="stop after N evaluations without a better FID")
    g.add_argument("--tensorboard", action="store_true", help="also write log.jsonl's numbers and the sample grids as "
                   "TensorBoard events in <out>/tensorboard (needs: pip install tensorboard); curves.png is always written")
    g = p.add_argument_group("speed")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--amp", default="auto", choices=amp.MODES, help=amp.HELP)
    return p


def settings(argv):
    """(args, checkpoint): the flags, with --resume completed from the run's checkpoint (None for a fresh run)."""
    args, given = parse_with_given(build_parser(), argv)
    check_device(args.device)
    if args.tensorboard:  # before any file is written
        curves.require_tensorboard()
    for flag in ("base_config", "up_config"):
        setattr(args, flag, piti.config_overrides(getattr(args, flag), f"--{flag.replace('_', '-')}"))
    if not args.resume:  # a resumed run's recipe settings are in its checkpoint's args
        for k, v in RECIPES[args.recipe].items():
            if k not in given:
                setattr(args, k, v)
        for flag in ("base", "upsampler", "affinity"):
            if getattr(args, flag) is None:
                raise DataError(f"--{flag} is required (see --help)")
        if args.prompts is None:  # a training-free run (--steps 0) is the source model: no random prompt tokens
            args.prompts = 0 if args.steps == 0 else 8
        if args.lr is None:
            args.lr = 7e-5 if args.data == "cityscapes" else 2e-4
    master = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 alone owns the run folder
    out = prepare_out(args.out, args.resume, args.overwrite) if master else Path(args.out)
    ckpt = None
    if args.resume:
        ckpt = load(out / "checkpoint.pt", "--resume", kinds=("piti-cat",))
        if ckpt.get("init") == "glide":
            raise DataError(f"--resume {out / 'checkpoint.pt'}: a PITI pretraining run (from GLIDE); continue it with "
                            f"pretrain_piti.py --out {out} --resume")
        resume_args(args, ckpt["args"], MODEL_FLAGS, given)
    for flag, least in (("prompts", 0), ("batch", 1), ("guidance", 0), ("eval_every", 1), ("log_every", 1),
                        ("patience", 1)):
        if getattr(args, flag) < least:
            raise DataError(f"--{flag.replace('_', '-')} >= {least} expected, got {getattr(args, flag)}")
    for flag in ("sample_steps", "up_steps"):
        diffusion.check_respacing(getattr(args, flag), f"--{flag.replace('_', '-')}")
    return args, ckpt


def trainable(model, mode):
    """FixDec's parameter set (or everything): names -> parameters, in model order."""
    if mode == "all":
        return dict(model.named_parameters())
    last = f"encoder.transformer.resblocks.{len(model.encoder.transformer.resblocks) - 1}."
    keep = ("cat_map", "prompts", "encoder.cnn.", last)
    return {k: p for k, p in model.named_parameters() if k.startswith(keep)}


def build(args, source, target, M, ckpt, device):
    """The models (official weights + CAT layers), what trains, its EMA, optimiser and timestep samplers (restored
    from `ckpt`)."""
    cat = dict(source_channels=source.n_channels, target_channels=target.n_channels)
    base_kw = {**piti.BASE_KWARGS, **args.base_config, **cat, "prompts": args.prompts}
    up_kw = {**piti.UP_KWARGS, **args.up_config, **cat, "prompts": args.prompts if args.finetune_upsampler else 0}
    base = piti.load_official(args.base, super_res=False, config=base_kw)
    up = piti.load_official(args.upsampler, super_res=True, config=up_kw)
    torch.manual_seed(args.seed)  # prompts' random init (and the 1x1 conv's with --affinity none)
    for m in (base, up):  # the upsampler's 1x1 conv gets the same affinity
        m.reset_cat()
        m.set_affinity(M) if M is not None else m.random_cat_map()
    models = {"base": base, "up": up} if args.finetune_upsampler else {"base": base}
    present = {"base": base, "up": up}
    params = {name: trainable(m, args.train) for name, m in models.items()}
    for name, m in models.items():
        m.requires_grad_(False)
        for p in params[name].values():
            p.requires_grad_(True)
    saved = {"base": params["base"], "up": params.get("up", {"cat_map": up.cat_map})}  # what a checkpoint keeps
    ema = {name: {k: p.detach().clone() for k, p in ps.items()} for name, ps in params.items()}
    opt = torch.optim.AdamW([p for ps in params.values() for p in ps.values()], lr=args.lr, weight_decay=0.0)
    if ckpt is not None:
        for name in saved:
            m = present[name]  # the checkpoint keeps what trains; the rest stays as the official file gave it
            load_strict(m, {**m.state_dict(), **ckpt[name]}, f"--resume {Path(args.out) / 'checkpoint.pt'} ({name})",
                        f"weights of this run's PITI {name} model")
        ema = {name: {k: v.clone() for k, v in ckpt[f"{name}_ema"].items()} for name in models}
    for m in present.values():
        m.to(device)
        if device.type == "cuda":
            m.to(memory_format=torch.channels_last)
    ema = {name: {k: v.to(device) for k, v in e.items()} for name, e in ema.items()}
    if ckpt is not None:  # optimizer state follows its parameters' device; --lr may change on resume
        opt.load_state_dict(ckpt["opt"])
        for group in opt.param_groups:
            group["lr"] = args.lr
    scaler = amp.grad_scaler(device, args.precision)  # fp16 loss scaling (GPUs without bf16); else a pass-through
    amp.restore([scaler], [(ckpt or {}).get("scaler")])
    diffs = {name: diffusion.Diffusion(m.noise_schedule) for name, m in present.items()}
    samplers = {name: diffusion.TimestepSampler(args.schedule_sampler, diffs[name].num_timesteps) for name in models}
    for name, state in (ckpt or {}).get("timestep_samplers", {}).items():
        samplers[name].load_state_dict(state)
    return SimpleNamespace(base=base, up=up, present=list(present.values()), models=models, params=params, saved=saved,
                           ema=ema, opt=opt, scaler=scaler, diffs=diffs, samplers=samplers, low_side=base.image_size,
                           step=ckpt["step"] if ckpt else 0, best_fid=ckpt["best_fid"] if ckpt else None,
                           best_step=(ckpt or {}).get("best_step"), bad_evals=ckpt["bad_evals"] if ckpt else 0)


def train_step(net, args, train_ds, n_target_channels, s, device, rank=0, world=1):
    """One optimisation step (randomness from (--seed, s)) and the EMA update -> (loss, per-model loss terms).
    Under torchrun each rank takes items rank::world of the global batch and the gradients are averaged."""
    seed = step_seed(args.seed, 0, s)
    gen = torch.Generator().manual_seed(seed)  # t, noise, condition dropout of the global batch
    torch.manual_seed(seed + rank)  # UNet dropout
    items = []
    for k, i in enumerate(batch_indices(s, len(train_ds), args.batch, args.seed)):
        if k % world == rank:
            random.seed(f"{seed}/{k}")  # the dataset's crop and flip, per item of the global batch
            items.append(train_ds[i])
    image = torch.stack([it["image"] for it in items]).to(device)
    label = torch.stack([it["label"] for it in items]).to(device)
    if label.max() >= n_target_channels:
        raise DataError(f"label id {int(label.max())} beyond the {n_target_channels} target channels")
    logs, total = {}, 0.0
    for name, m in net.models.items():
        m.train()
        # the official upsampler is never trained unconditionally (it samples without guidance)
        terms = diffusion.training_loss(m, net.diffs[name], image, label, 0.0 if name == "up" else args.uncond_p,
                                        net.low_side if name == "up" else None, amp=args.precision,
                                        sampler=net.samplers[name], gen=gen, part=(rank, world))
        net.samplers[name].update(*(gather(v, world).cpu().numpy() for v in terms.pop("per_sample")))
        total = total + terms["loss"]
        logs.update({f"{name}_{k}": v.detach().item() for k, v in terms.items()})
    loss = total.detach().clone()
    if world > 1:  # the global batch's mean; a NaN anywhere stops every rank
        dist.all_reduce(loss)
        loss /= world
    loss = loss.item()
    if not np.isfinite(loss):
        raise DataError(f"loss is {loss} at step {s}; stopping, {Path(args.out) / 'checkpoint.pt'} left as it was "
                        "(lower --lr?)")
    net.opt.zero_grad(set_to_none=True)
    net.scaler.scale(total).backward()  # models/amp.py: fp16 loss scaling, or exactly total.backward()
    if world > 1:  # the global batch's gradient: each rank's mean over its equal share, averaged
        for p in (p for ps in net.params.values() for p in ps.values()):
            dist.all_reduce(p.grad)
            p.grad /= world
    net.scaler.step(net.opt)  # skips a step whose gradients overflowed (fp16), else net.opt.step()
    net.scaler.update()
    with torch.no_grad():
        for name, ps in net.params.items():
            for k, p in ps.items():
                net.ema[name][k].lerp_(p.detach(), 1 - args.ema_decay)
    return loss, logs


def evaluation(args, net, val_ds, n_target_channels, out, device):
    """(sample, grid, fid): the EMA models' sampler (the base -> upsampler cascade), fixed val maps and seeds for
    grids, FID or None."""
    grid = metrics.fixed_grid(val_ds, args.grid_n, [args.seed], device)
    ddim = args.sample_steps.startswith("ddim")

    def sample(label, seeds):
        gen = torch.Generator(label.device).manual_seed(int(seeds[0]))
        x = diffusion.cascade(net.base, net.up, label, generator=gen, steps=args.sample_steps, up_steps=args.up_steps,
                              guidance=args.guidance, ddim=ddim, amp=args.precision)
        return metrics.resize_images(x, val_ds.size)

    return sample, grid, metrics.validation_fid(sample, val_ds, args.inception, args.fid_features, args.fid_n,
                                                out / "fid_cache", device, args.batch, args.seed)


def evaluate_and_save(s, net, args, out, sample, grid, fid, info):
    """EMA grid, FID, log line, checkpoint.pt (and best.pt on a better FID); True when early stopping says stop."""
    for m in net.present:
        m.eval()
    better = stop = False
    with ExitStack() as stack:
        for name in net.params:
            stack.enter_context(swapped(net.params[name], net.ema[name]))
        metrics.sample_grid(sample, grid, out / "samples" / f"{s:06d}.png")
        entry = {"step": s, "grid": f"samples/{s:06d}.png"}
        if fid is not None:
            entry["fid"] = fid()
            better = net.best_fid is None or entry["fid"] < net.best_fid
            net.best_fid, net.bad_evals = (entry["fid"], 0) if better else (net.best_fid, net.bad_evals + 1)
            net.best_step = s if better else net.best_step
            stop = net.bad_evals >= args.patience
    state = {"kind": "piti-cat", "step": s, "args": vars(args), **info,
             "base_kwargs": net.base.kwargs, "up_kwargs": net.up.kwargs,
             "timestep_samplers": {name: ts.state_dict() for name, ts in net.samplers.items()},
             "opt": net.opt.state_dict(), "scaler": net.scaler.state_dict(), "best_fid": net.best_fid,
             "best_step": net.best_step, "bad_evals": net.bad_evals}
    for name, ps in net.saved.items():
        state[name] = {k: p.detach().cpu().clone() for k, p in ps.items()}
        state[f"{name}_ema"] = {k: v.cpu().clone() for k, v in net.ema[name].items()} if name in net.ema else state[name]
    append_log(out / "log.jsonl", entry)  # before the checkpoint: a resume from an older one drops it again
    curves.update(out, net.board)  # curves.png (+ TensorBoard events) from log.jsonl
    save(state, out / "checkpoint.pt")
    if better:
        save(state, out / "best.pt")
    return stop


def main(argv=None):
    args, ckpt = settings(argv)
    ddp, rank, world, device = init_distributed(args)  # torchrun: one process per GPU, rank 0 writes
    args.precision = amp.pick(device, args.amp)  # what --amp means on this machine, kept in the checkpoint's args
    master, out = rank == 0, Path(args.out)

    # data, class tables, affinity
    train_ds = data.dataset_from_args(args, "train", augment=True, out_dir=out if master and not args.resume else None)
    val_ds = data.dataset_from_args(args, "val")
    target = train_ds.classes
    data_fp = data_fingerprint(train_ds)  # a resumed run must train on the same files
    if ckpt is not None:
        check_data(ckpt.get("data"), data_fp, args)
    if ckpt is not None and master:  # a killed run may have logged steps past its last checkpoint
        truncate_log(out / "log.jsonl", ckpt["step"])
    source = data.class_table(args.source, args.source_root)
    A, M = (None, None) if args.affinity == "none" else data.load_affinity(args.affinity, target, source)

    # models (official weights + CAT layers), evaluation
    net = build(args, source, target, M, ckpt, device)
    net.board = curves.Board(out, net.step) if args.tensorboard and master else None  # --tensorboard's events
    sample, grid, fid = evaluation(args, net, val_ds, target.n_channels, out, device) if master else (None,) * 3
    files = {"base": args.base, "up": args.upsampler}
    info = {"init": "piti", "affinity": None if A is None else torch.from_numpy(A), "data": data_fp,
            "source": {"dataset": source.dataset, "names": source.names, "n_channels": source.n_channels},
            "target": {"dataset": target.dataset, "names": target.names, "n_channels": target.n_channels},
            **{f"{k}_file": os.path.abspath(v) if v else None for k, v in files.items()}}
    def save_and_stop(s):  # rank 0 evaluates and saves; every rank learns whether early stopping says stop
        return broadcast_stop(evaluate_and_save(s, net, args, out, sample, grid, fid, info) if master else False, device)

    if ckpt is None and (save_and_stop(0) or args.steps == 0):  # the model before training: training-free CAT
        return finish(ddp, master, net, out, 0)

    # training
    start = last = done = net.step  # `last`: the step of the last checkpoint written
    if ckpt is not None and master:
        print(f"resuming from step {start} of {args.steps} ({out / 'checkpoint.pt'})")
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="finetune_piti", disable=not master)
    t0 = time.time()
    try:
        for s in bar:
            loss, logs = train_step(net, args, train_ds, target.n_channels, s, device, rank, world)
            bar.set_postfix(loss=f"{loss:.4f}")
            done = s + 1
            if master and (done % args.log_every == 0 or done == args.steps):
                append_log(out / "log.jsonl", {"step": done, "loss": loss, **logs,
                                               "sec_per_step": (time.time() - t0) / (done - start)})
            if done % args.eval_every == 0 or done == args.steps:
                stop = save_and_stop(done)
                last = done
                if stop:
                    if master:
                        print(f"early stop at step {done}: no better FID in {args.patience} evaluations "
                              f"(best {net.best_fid:.2f})")
                    break
    except KeyboardInterrupt:  # Ctrl-C: one line saying where the run can continue from (models.cli prints it)
        raise interrupted("finetune_piti.py", args, parse_with_given(build_parser(), argv)[1], last) from None
    finish(ddp, master, net, out, done)


def finish(ddp, master, net, out, steps):
    """The run's last line (rank 0): steps trained, its checkpoint, the best FID where there is one."""
    if master:
        at = f" at step {net.best_step}" if net.best_step is not None else ""  # runs from before best_step: unknown
        best = f", best FID {net.best_fid:.2f}{at} ({out / 'best.pt'})" if net.best_fid is not None else ""
        print(f"done: {steps} steps, checkpoint {out / 'checkpoint.pt'}{best}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    cli(main)
