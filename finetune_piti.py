r"""Finetune the official PITI models on a few target images with Class Affinity Transfer (CAT).

    # COCO-Stuff PITI -> your label set: affinity from estimate_affinity.py, 100 target images
    python finetune_piti.py --base ckpt/base_mask.pt --upsampler ckpt/upsample_mask.pt \
        --affinity runs/aff/affinity.npy --data folder --data-root my_data --n 100 --lr 2e-4 --out runs/piti_cat
    # training-free CAT (no steps): writes the checkpoint evaluate.py samples from, and a grid
    python finetune_piti.py --base ... --upsampler ... --affinity affinity.npy --steps 0 --out runs/free

The paper's recipe (FixDec): the CAT 1x1 conv (target one-hot -> source classes, initialised from the
affinity, followed by the fixed palette rendering the official encoder eats), K prompt tokens, the
encoder CNN and the last transformer block are trained; the UNet decoder stays fixed.
--recipe names the rows of the paper's PITI ablation (supplement Table 11, whose switch columns are FixDec,
Prompts and CAT; the rows here turn them on one after the other, as bench/rows.py lays the table out), as flag
values that explicit flags override:
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
--fid-features (sampled as evaluate.py reports, 250 + fast27 steps unless --select-steps/--select-up-steps;
printed with the best so far; early stopping with --patience; <out>/best.pt keeps the best; without a feature
net no best.pt, the run says so at start), <out>/checkpoint.pt written
atomically. Each step draws its randomness from (--seed, step), so --resume continues exactly as an
uninterrupted run, taking the run's flags from its checkpoint (model and data flags cannot change; --steps,
the evaluation cadence and --lr may); log.jsonl then holds each step once. A non-empty --out is refused
without --resume or --overwrite (which removes only the files the earlier run recorded in <out>/manifest.txt),
and a second process writing the same --out is refused (a lock). The checkpoint keeps the trained weights and
a record of the official files (path as given, size, sha256; the decoder is not copied unless trained): a run
whose files moved resumes with --base/--upsampler naming them anew. The last line printed names the steps
trained, the checkpoint and the best FID with its step.
"""
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import metrics
from models import (ArgumentParser, DataError, HelpFormatter, cli, curves, decay_float, diffusion, finite_float,
                    nonneg_int, piti, positive_float, positive_int, run, seed_int, unit_float)
from models.amp import HELP as AMP_HELP, MODES as AMP_MODES, grad_scaler, pick as pick_amp, restore as restore_scalers
from models.state_dict import load_strict

# flags a resumed run must share with the run it continues (steps, evaluation cadence, lr, device may change)
MODEL_FLAGS = ("recipe", "schedule_sampler", "base", "upsampler", "base_config", "up_config", "source", "source_root",
               "affinity", "data", "data_root", "n", "subset_seed", "subset_file", "size", "prompts", "train",
               "finetune_upsampler", "batch", "ema_decay", "uncond_p", "seed")
# files and folders a run reads: never its --out (nor --data-root)
INPUT_FLAGS = ("base", "upsampler", "source_root", "affinity", "subset_file", "inception", "fid_features")

# The rows of the paper's PITI ablation (supplement Table 11: columns FixDec, Prompts, CAT), as flag values;
# flags given explicitly override a recipe's. prompts None: the default (8, or 0 for a training-free run).
RECIPES = {
    "finetune": dict(train="all", prompts=0, affinity="none"),
    "fixdec": dict(train="fixdec", prompts=0, affinity="none"),
    "fixdec-prompts": dict(train="fixdec", prompts=None, affinity="none"),
    "cat": dict(train="fixdec", prompts=None),  # all three (needs --affinity FILE)
}


def example(recipe):
    """A copy-paste command for a --recipe, for the missing-flag message."""
    mode = "--affinity runs/aff/affinity.npy" if recipe == "cat" else f"--recipe {recipe}"
    return (f"python finetune_piti.py --base ckpt/base_mask.pt --upsampler ckpt/upsample_mask.pt {mode} --data folder "
            f"--data-root my_data --n 100 --out runs/piti_{recipe.replace('-', '_')}")


def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", help="(required) run folder: checkpoint.pt, best.pt, log.jsonl, curves.png, samples/, "
                   "subset.txt")
    p.add_argument("--resume", action="store_true",
                   help="continue <out>/checkpoint.pt exactly; flags not given again come from the run")
    p.add_argument("--overwrite", action="store_true", help="start over in --out: the files its earlier run recorded "
                   "(manifest.txt) are removed, nothing else")
    g = p.add_argument_group("source model")
    g.add_argument("--base", help="official PITI base file (base_mask.pt, from the PITI README's 'Pretrained Models'); "
                   "with --resume: the run's file moved elsewhere (its sha256 is checked)")
    g.add_argument("--upsampler", help="official PITI upsampler file (upsample_mask.pt); with --resume, as --base")
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
    g.add_argument("--prompts", type=nonneg_int, default=None,
                   help="learned prompt tokens K at the encoder input (default 8; 0, the source model, with --steps 0)")
    g.add_argument("--train", default=None, choices=["fixdec", "all"],
                   help="fixdec (CAT default): 1x1 conv, prompts, encoder CNN, last transformer block; all: the whole "
                        "model")
    g.add_argument("--finetune-upsampler", action="store_true", help="also train the upsampler (same recipe)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=nonneg_int, default=5000, help="optimisation steps (0: training-free CAT, "
                   "the checkpoint and a grid only)")
    g.add_argument("--batch", type=positive_int, default=8, help="global batch size (split across torchrun ranks)")
    g.add_argument("--lr", type=positive_float, default=None, help="default: the paper's, 7e-5 for a Cityscapes target, else 2e-4")
    g.add_argument("--ema-decay", type=decay_float, default=0.999, help="EMA of the trained weights (official 0.9999 for 200k-step runs)")
    g.add_argument("--uncond-p", type=unit_float, default=0.2, help="condition dropout for guidance (official 0.2)")
    g.add_argument("--schedule-sampler", default="uniform", choices=["uniform", "loss-second-moment"],
                   help="timestep sampler (official base stages: loss-second-moment, importance-weighted)")
    g.add_argument("--seed", type=seed_int, default=0, help="the run's randomness: each step's batch, augmentation, "
                   "t, noise and dropout are drawn from (seed, step)")
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-every", type=positive_int, default=500, help="grid + FID + checkpoint every N steps")
    g.add_argument("--log-every", type=positive_int, default=10, help="log.jsonl line every N steps")
    g.add_argument("--grid-n", type=positive_int, default=4, help="validation label maps in the sample grid")
    g.add_argument("--sample-steps", default="100", help="base respacing for the sample grids (official previews: "
                   "100): " + diffusion.RESPACINGS)
    g.add_argument("--up-steps", default=diffusion.UP_STEPS, help="upsampler respacing for the grids, the same forms")
    g.add_argument("--select-steps", default=diffusion.BASE_STEPS, help="base respacing for the validation FID that "
                   "picks best.pt; the default is the sampler evaluate.py reports with (its --sample-steps), so "
                   "best.pt is chosen by the number it is reported by; fewer steps (e.g. the grids' 100) make each "
                   "evaluation faster (base sampling time grows with the steps) but may rank checkpoints differently")
    g.add_argument("--select-up-steps", default=diffusion.UP_STEPS, help="upsampler respacing for that FID "
                   "(evaluate.py's --up-steps default)")
    g.add_argument("--guidance", type=finite_float, default=diffusion.GUIDANCE,
                   help="classifier-free guidance scale (>= 0; official base 1.3, 1 = none)")
    g.add_argument("--inception", default=None, help="pt_inception-2015-12-05-6726825d.pth or fid_inception (downloaded "
                   "once): early stopping on val FID")
    g.add_argument("--fid-features", default=None, help="TorchScript feature net (toy-domain FID) instead of Inception")
    g.add_argument("--fid-n", type=positive_int, default=None, help="val images used for FID (default all)")
    g.add_argument("--patience", type=positive_int, default=5, help="stop after N evaluations without a better FID")
    g.add_argument("--tensorboard", action="store_true", help="also write log.jsonl's numbers and the sample grids as "
                   "TensorBoard events in <out>/tensorboard (needs: pip install tensorboard); curves.png is always written")
    g = p.add_argument_group("speed")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (the default: cuda when a GPU is visible, "
                   "else cpu)")
    g.add_argument("--amp", default="auto", choices=AMP_MODES, help=AMP_HELP)
    g.add_argument("--workers", type=nonneg_int, default=None, help="data loader workers (default 4 on CUDA, 0 on CPU)")
    return p


def get_args(argv=None):
    """(args, given): the flags, with --resume completed from the run's checkpoint."""
    args, given = run.parse_with_given(build_parser(), argv)
    run.machine_flags(args)  # --device, --workers, --tensorboard
    for flag in ("base_config", "up_config"):
        setattr(args, flag, piti.config_overrides(getattr(args, flag), f"--{flag.replace('_', '-')}"))
    if args.out is None and args.resume:
        raise DataError("--resume needs --out, the run folder to continue (see --help)")
    saved = run.resumed_args(args, given, MODEL_FLAGS, ("piti-cat",)) if args.out else None  # the run's own flags
    if saved is not None and saved.get("init") == "glide":
        raise DataError(f"--resume {Path(args.out) / 'checkpoint.pt'}: a PITI pretraining run (from GLIDE); continue "
                        f"it with pretrain_piti.py --out {args.out} --resume")
    elif not args.resume:
        for k, v in RECIPES[args.recipe].items():
            if k not in given:
                setattr(args, k, v)
        missing = [f"--{f}" for f in ("base", "upsampler", "affinity", "data", "out") if getattr(args, f) is None]
        if missing:  # every one at once, with a command to start from
            raise DataError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required for --recipe "
                            f"{args.recipe}; for example: {example(args.recipe)} (see --help)")
        if args.prompts is None:  # a training-free run (--steps 0) is the source model: no random prompt tokens
            args.prompts = 0 if args.steps == 0 else 8
        if args.lr is None:
            args.lr = 7e-5 if args.data == "cityscapes" else 2e-4
    if args.guidance < 0:
        raise DataError(f"--guidance >= 0 expected, got {args.guidance}")
    for flag in ("sample_steps", "up_steps", "select_steps", "select_up_steps"):
        diffusion.check_respacing(getattr(args, flag), f"--{flag.replace('_', '-')}")
    return args, given


def trainable(model, mode):
    """FixDec's parameter set (or everything): names -> parameters, in model order."""
    if mode == "all":
        return dict(model.named_parameters())
    last = f"encoder.transformer.resblocks.{len(model.encoder.transformer.resblocks) - 1}."
    keep = ("cat_map", "prompts", "encoder.cnn.", last)
    return {k: p for k, p in model.named_parameters() if k.startswith(keep)}


def build_models(args, source, target, M, base_file, up_file):
    """(base, upsampler): the official files with the CAT layers (the 1x1 conv from the affinity M, or random
    with --affinity none; --prompts tokens), in train mode on the CPU."""
    cat = dict(source_channels=source.n_channels, target_channels=target.n_channels)
    base_kw = {**piti.BASE_KWARGS, **args.base_config, **cat, "prompts": args.prompts}
    up_kw = {**piti.UP_KWARGS, **args.up_config, **cat, "prompts": args.prompts if args.finetune_upsampler else 0}
    base = piti.load_official(base_file, super_res=False, config=base_kw)
    up = piti.load_official(up_file, super_res=True, config=up_kw)
    torch.manual_seed(args.seed)  # prompts' random init (and the 1x1 conv's with --affinity none)
    for m in (base, up):  # the upsampler's 1x1 conv gets the same affinity
        m.reset_cat()
        m.set_affinity(M) if M is not None else m.random_cat_map()
    return base, up


def diffusion_step(models, params, ema, opt, scaler, amp, diffs, samplers, batch, s, args, device, rank, world):
    """One optimisation step of the models that train ({name: model}, their trained `params` and `ema`) on
    this rank's share of the global batch; t, noise and condition dropout from (--seed, s). -> (loss, per-model
    loss terms); the gradients are averaged over the ranks, the EMA updated."""
    gen = torch.Generator().manual_seed(run.step_seed(args.seed, 0, s))  # t, noise, dropout of the global batch
    run.seed_step(args.seed, s, rank)  # UNet dropout
    image, label = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
    logs, total = {}, 0.0
    for name, m in models.items():
        m.train()
        # the official upsampler is never trained unconditionally (it samples without guidance)
        terms = diffusion.training_loss(m, diffs[name], image, label, 0.0 if name == "up" else args.uncond_p,
                                        models["base"].image_size if name == "up" else None, amp=amp,
                                        sampler=samplers[name], gen=gen, part=(rank, world))
        samplers[name].update(*(run.gather(v, world).cpu().numpy() for v in terms.pop("per_sample")))
        total = total + terms["loss"]
        logs.update({f"{name}_{k}": v.detach().item() for k, v in terms.items()})
    loss = run.mean_over_ranks(total.detach().clone(), world).item()  # the global batch's; a NaN stops every rank
    if not np.isfinite(loss):
        raise DataError(f"loss is {loss} at step {s}; stopping, {Path(args.out) / 'checkpoint.pt'} left as it was "
                        "(lower --lr?)")
    opt.zero_grad(set_to_none=True)
    scaler.scale(total).backward()  # models/amp.py: fp16 loss scaling, or exactly total.backward()
    run.average_gradients([p for ps in params.values() for p in ps.values()], world)  # one bucketed all-reduce
    scaler.step(opt)  # skips a step whose gradients overflowed (fp16), else opt.step()
    scaler.update()
    with torch.no_grad():
        for name, ps in params.items():
            for k, p in ps.items():
                ema[name][k].lerp_(p.detach(), 1 - args.ema_decay)
    return loss, logs


def main(argv=None):
    args, given = get_args(argv)
    ddp, rank, world, device = run.init_distributed(args.device, args.batch)  # torchrun: one process per GPU
    master = rank == 0  # rank 0 alone owns the run folder
    data.check_data_args(args)
    inputs = run.flag_paths(args, INPUT_FLAGS, data.toy.task_root(args.data) if args.data in data.toy.TASKS else None)
    out = run.prepare_out(args.out, args.resume, args.overwrite, inputs) if master else Path(args.out)
    ckpt = run.load(out / "checkpoint.pt", "--resume", kinds=("piti-cat",)) if args.resume else None
    amp = pick_amp(device, args.amp)  # what --amp means on this machine (a resumed run picks anew), kept in the checkpoint

    # data, class tables, affinity: a resumed n-shot run reads the subset it drew
    if ckpt is not None and args.n is not None:
        args.subset_file = str(out / "subset.txt")
    train_ds = data.dataset_from_args(args, "train", augment=True, out_dir=out if master and ckpt is None else None)
    val_ds = data.dataset_from_args(args, "val")
    target = train_ds.classes
    data.check_labels(train_ds)  # every label file read once: a bad id fails here, in one line
    data_fp = run.data_fingerprint(train_ds)  # a resumed run must train on the same files
    if ckpt is not None:  # the same classes and files as the run's
        run.check_data(ckpt, train_ds.classes, data_fp, args, data.compare_classes)
    source = data.class_table(args.source, args.source_root)
    if ckpt is not None:  # the 1x1 convs come back from the checkpoint: the affinity file is not read again
        A, M = ckpt["affinity"], None
    else:
        A, M = (None, None) if args.affinity == "none" else data.load_affinity(args.affinity, target, source)
        A = None if A is None else torch.from_numpy(A)

    # models: the official files (a resumed run's found by their recorded sha256), what trains, EMA, optimiser
    if ckpt is None:
        base_file, up_file = args.base, args.upsampler
    else:
        base_file, up_file = (run.find_recorded_file(ckpt[k + "_file"], getattr(args, f) if f in given else None,
                                                     "--" + f, near=(out,)) for k, f in (("base", "base"), ("up", "upsampler")))
    base, up = build_models(args, source, target, M, base_file, up_file)  # (checks the files)
    files = {"base": ckpt["base_file"], "up": ckpt["up_file"]} if ckpt else (
        {"base": run.file_record(args.base), "up": run.file_record(args.upsampler)} if master else None)
    present = {"base": base, "up": up}
    models = present if args.finetune_upsampler else {"base": base}
    params = {name: trainable(m, args.train) for name, m in models.items()}
    for name, m in models.items():
        m.requires_grad_(False)
        for p in params[name].values():
            p.requires_grad_(True)
    saved = {"base": params["base"], "up": params.get("up", {"cat_map": up.cat_map})}  # what a checkpoint keeps
    ema = {name: {k: p.detach().clone() for k, p in ps.items()} for name, ps in params.items()}
    opt = torch.optim.AdamW([p for ps in params.values() for p in ps.values()], lr=args.lr, weight_decay=0.0)
    if ckpt is not None:
        for name in saved:  # the checkpoint keeps what trains; the rest stays as the official file gave it
            m = present[name]
            load_strict(m, {**m.state_dict(), **ckpt[name]}, f"--resume {out / 'checkpoint.pt'} ({name})",
                        f"weights of this run's PITI {name} model")
        ema = {name: {k: v.clone() for k, v in ckpt[f"{name}_ema"].items()} for name in models}
    for m in present.values():
        m.to(device)
        if device.type == "cuda":
            m.to(memory_format=torch.channels_last)
    ema = {name: {k: v.to(device) for k, v in e.items()} for name, e in ema.items()}
    scaler = grad_scaler(device, amp)  # fp16 loss scaling (GPUs without bf16); else a pass-through
    diffs = {name: diffusion.Diffusion(m.noise_schedule) for name, m in present.items()}
    samplers = {name: diffusion.TimestepSampler(args.schedule_sampler, diffs[name].num_timesteps) for name in models}
    step, best = 0, run.Best(args.patience)
    if ckpt is not None:  # optimizer state follows its parameters' device; --lr may change on resume
        run.restore_optimizer(opt, ckpt["opt"], args.lr)
        restore_scalers([scaler], [ckpt["scaler"]])
        for name, state in ckpt["timestep_samplers"].items():
            samplers[name].load_state_dict(state)
        step, best = ckpt["step"], run.Best.resume(ckpt, args)
        was = ckpt["args"]  # a run from before --select-steps selected with its grid sampler
        then = [was.get("select_steps", was["sample_steps"]), was.get("select_up_steps", was["up_steps"])]
        if then != [args.select_steps, args.select_up_steps] and best.fid is not None:
            print(f"note: the run selected with the {'+'.join(then)} sampler, this resume with {args.select_steps}+"
                  f"{args.select_up_steps}: best-FID tracking and early stopping start anew")
            best = run.Best(args.patience)
        if master:  # a killed run may have logged steps past its last checkpoint
            curves.truncate_log(out / "log.jsonl", step)
    board = curves.Board(out, step) if args.tensorboard and master else None  # --tensorboard's events

    # evaluation: the EMA models' cascade on fixed val maps and seeds; FID with a feature network
    grid = metrics.fixed_grid(val_ds, args.grid_n, [args.seed], device)

    def sampler(steps, up_steps):  # grids with the preview sampler, the FID with the selection sampler
        def sample(label, seeds):
            gen = torch.Generator(label.device).manual_seed(int(seeds[0]))
            x = diffusion.cascade(base, up, label, generator=gen, steps=steps, up_steps=up_steps,
                                  guidance=args.guidance, ddim=steps.startswith("ddim"), amp=amp)
            return metrics.resize_images(x, val_ds.size)
        return sample

    fid = metrics.validation_fid(sampler(args.select_steps, args.select_up_steps), val_ds, args.inception,
                                 args.fid_features, args.fid_n, out / "fid_cache", device, args.batch,
                                 args.seed) if master else None
    if master:  # subset.txt, the FID cache: what --overwrite may remove
        run.record(out)
        if fid is None:
            run.no_fid_note(out)

    def evaluate_and_save(s):
        """EMA grid, FID, then run.finish_evaluation (log line, curves, best.pt on a better FID, checkpoint.pt) on
        rank 0; on every rank: True when early stopping says stop."""
        if not master:
            return run.broadcast_stop(False, device)
        for m in present.values():
            m.eval()
        better, entry = False, {"step": s, "grid": f"samples/{s:06d}.png"}
        with ExitStack() as stack:
            for name in params:
                stack.enter_context(run.swapped(params[name], ema[name]))
            metrics.sample_grid(sampler(args.sample_steps, args.up_steps), grid, out / "samples" / f"{s:06d}.png")
            if fid is not None:
                entry["fid"] = fid()
                better = best.update(entry["fid"], s)
                tqdm.write(best.line(s, entry["fid"], f"{args.select_steps}+{args.select_up_steps} steps"))
        state = {"kind": "piti-cat", "format": run.FORMAT, "step": s, "args": vars(args), "init": "piti",
                 "amp": amp, "affinity": A, "data": data_fp,
                 "source": data.table_info(source), "target": data.table_info(target),
                 "base_file": files["base"], "up_file": files["up"], "base_kwargs": base.kwargs, "up_kwargs": up.kwargs,
                 "timestep_samplers": {name: ts.state_dict() for name, ts in samplers.items()},
                 "opt": opt.state_dict(), "scaler": scaler.state_dict(), **best.state()}
        for name, ps in saved.items():
            state[name] = {k: p.detach().cpu().clone() for k, p in ps.items()}
            state[f"{name}_ema"] = {k: v.cpu().clone() for k, v in ema[name].items()} if name in ema else state[name]
        return run.finish_evaluation(out, state, entry, better, best, device, board)  # log, curves, best.pt, checkpoint

    # training
    last = done = step  # `last`: the step of the last checkpoint written
    stop = ckpt is None and evaluate_and_save(0)  # the model before training: training-free CAT
    if ckpt is not None and master:
        print(f"resuming from step {step} of {args.steps} ({out / 'checkpoint.pt'})")
    bar = tqdm(range(step, args.steps if not stop else step), initial=step, total=args.steps, desc="finetune_piti",
               disable=not master)
    batches = run.loader(train_ds, args.seed, args.batch, rank, world, step, args.workers, device)
    t0 = time.time()
    try:
        for s, batch in zip(bar, batches):
            loss, logs = diffusion_step(models, params, ema, opt, scaler, amp, diffs, samplers, batch, s, args, device,
                                        rank, world)
            bar.set_postfix(loss=f"{loss:.4f}")
            done = s + 1
            if master and (done % args.log_every == 0 or done == args.steps):
                curves.append_log(out / "log.jsonl", {"step": done, "loss": loss, **logs,
                                                   "sec_per_step": (time.time() - t0) / (done - step)})
            if done % args.eval_every == 0 or done == args.steps:
                stop, last = evaluate_and_save(done), done
                if stop:
                    if master:
                        print(f"early stop at step {done}: no better FID in {args.patience} evaluations "
                              f"(best {best.fid:.2f})")
                    break
    except KeyboardInterrupt:  # Ctrl-C: one line saying where the run can continue from (models.cli prints it)
        raise run.interrupted("finetune_piti.py", args, given, last) from None
    if master:  # the run's last line: steps trained, its checkpoint, the best FID where there is one
        print(f"done: {done} steps, checkpoint {out / 'checkpoint.pt'}{best.summary(out / 'best.pt')}")
    run.finish(ddp)


if __name__ == "__main__":
    cli(main)
