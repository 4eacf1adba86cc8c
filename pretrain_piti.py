r"""Train PITI itself from GLIDE, the official way: a PITI source for your own label space, or the paper's
Figure 3 baseline (PITI finetuned from GLIDE on the few target images, no CAT).

PITI released only COCO-Stuff models. The official mask schedule, on ADE20K (GLIDE's files in glide/):

    python pretrain_piti.py --glide-ckpt glide/base.pt --recipe piti-stage1 \
        --data ade20k --data-root ADEChallengeData2016 --out runs/ade_stage1
    python pretrain_piti.py --glide-ckpt glide/base.pt --recipe piti-stage1-cont \
        --encoder runs/ade_stage1/base.pt --data ade20k --data-root ADEChallengeData2016 --out runs/ade_stage1c
    python pretrain_piti.py --glide-ckpt glide/base.pt --recipe piti-stage2 \
        --encoder runs/ade_stage1c/base.pt --data ade20k --data-root ADEChallengeData2016 --out runs/ade_base
    python pretrain_piti.py --glide-up-ckpt glide/upsample.pt --recipe piti-upsample ... --out runs/ade_up
    # Figure 3's baseline: base and upsampler from GLIDE, everything trained on 100 target images
    python pretrain_piti.py --glide-ckpt glide/base.pt --glide-up-ckpt glide/upsample.pt --recipe piti-stage2 \
        --steps 5000 --data folder --data-root my_data --n 100 --out runs/fig3

GLIDE's file goes unchanged into the decoder after the official key filter (the text tower out, transformer_proj
kept; strict), with a fresh encoder (or --encoder: a stage-1 encoder file or an earlier run's base.pt); the
label space is --data's classes (models/glide.py). Every evaluation exports <out>/base.pt (and
<out>/upsampler.pt), the EMA weights in the official flat format: the --base / --upsampler of a later
finetune_piti.py run (with --source set to this dataset). A run that trains the base alone samples its grids
(and FID) from the base alone, or through --upsampler (a PITI upsampler of this label space); one that trains
the upsampler alone upsamples the 8-bit low-res versions of the grid's real images (grids only).

--recipe sets --train, --uncond-p, --lr, --steps, --schedule-sampler and --ema-decay unless given (--batch is
yours: the official global batch is 128 for the base stages, 4 for the upsampler). Loss: the official PITI
loss (eps MSE + the variational bound training the learned variance), AdamW without weight decay, EMA of the
trained weights. The loss-second-moment timestep sampler's loss history is part of the checkpoint, so resumes
stay exact.

Every --eval-every steps: a grid of EMA samples, FID with --inception or --fid-features (sampled as evaluate.py
reports unless --select-steps/--select-up-steps; printed with the best so far; early stopping with --patience;
<out>/best.pt keeps the best, none without a feature net), the exports and <out>/checkpoint.pt written
atomically. Each step draws its randomness from (--seed, step), so --resume continues exactly as an
uninterrupted run, taking the run's flags from its checkpoint (model and data flags cannot change; --steps, the evaluation cadence and --lr
may). A non-empty --out is refused without --resume or --overwrite. The checkpoint (a 'piti-cat' one with
init 'glide', which evaluate.py samples from) keeps the trained weights and a record of the exported files
(path, size, sha256: found again by name in a moved run folder). The
last line printed names the steps trained, the checkpoint and the best FID with its step.
"""
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import metrics
from models import (ArgumentParser, DataError, HelpFormatter, cli, curves, decay_float, diffusion, finite_float,
                    glide, nonneg_int, piti, positive_float, positive_int, run, seed_int, unit_float)
from models.amp import HELP as AMP_HELP, MODES as AMP_MODES, grad_scaler, pick as pick_amp, restore as restore_scalers
from models.state_dict import load_strict

# flags a resumed run must share with the run it continues (steps, evaluation cadence, lr, device may change)
MODEL_FLAGS = ("glide_ckpt", "glide_up_ckpt", "encoder", "recipe", "schedule_sampler", "upsampler", "base_config",
               "up_config", "data", "data_root", "n", "subset_seed", "subset_file", "size", "train", "batch",
               "ema_decay", "uncond_p", "seed")
# files and folders a run reads: never its --out (nor --data-root)
INPUT_FLAGS = ("glide_ckpt", "glide_up_ckpt", "encoder", "upsampler", "subset_file", "inception", "fid_features")

# The official stage schedule (PITI's mask_finetune_*.sh). official_batch is the official global batch
# (8 GPUs x 16 for the base); everything else applies unless given on the command line.
RECIPES = {
    "piti-stage1": dict(train="encoder", uncond_p=0.0, lr=3.5e-5, steps=200_000, official_batch=128,
                        schedule_sampler="loss-second-moment", ema_decay=0.9999,
                        doc="encoder only, decoder = GLIDE base, no condition dropout"),
    "piti-stage1-cont": dict(train="encoder", uncond_p=0.2, lr=2e-5, steps=60_000, official_batch=128,
                             schedule_sampler="loss-second-moment", ema_decay=0.9999,
                             doc="encoder only from the stage-1 EMA (--encoder), condition dropout 0.2"),
    "piti-stage2": dict(train="all", uncond_p=0.2, lr=3.5e-5, steps=200_000, official_batch=128,
                        schedule_sampler="loss-second-moment", ema_decay=0.9999,
                        doc="everything, decoder = GLIDE base, encoder = stage-1-cont EMA (--encoder); open-ended"),
    "piti-upsample": dict(train="all", uncond_p=0.0, lr=1e-5, steps=200_000, official_batch=4, schedule_sampler="uniform",
                          ema_decay=0.9999, doc="the upsampler: everything from GLIDE upsample.pt, fresh encoder"),
}
EXPORTS = {"base": "base.pt", "up": "upsampler.pt"}  # the trained models as official flat files
# the folder each stage's --encoder comes from, for example commands
ENCODER_FROM = {"piti-stage1-cont": "runs/ade_stage1", "piti-stage2": "runs/ade_stage1c"}


def example(recipe):
    """A copy-paste command for a --recipe (None: the Figure 3 baseline), for the missing-flag message."""
    if recipe is None:
        return ("python pretrain_piti.py --glide-ckpt glide/base.pt --glide-up-ckpt glide/upsample.pt --recipe "
                "piti-stage2 --steps 5000 --data folder --data-root my_data --n 100 --out runs/fig3")
    glide_flag = "--glide-up-ckpt glide/upsample.pt" if recipe == "piti-upsample" else "--glide-ckpt glide/base.pt"
    encoder = f" --encoder {ENCODER_FROM[recipe]}/base.pt" if recipe in ENCODER_FROM else ""
    return (f"python pretrain_piti.py {glide_flag} --recipe {recipe}{encoder} --data ade20k --data-root "
            f"ADEChallengeData2016 --out runs/ade_{recipe.split('-', 1)[1].replace('-', '_')}")


def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", help="(required) run folder: checkpoint.pt, best.pt, base.pt, upsampler.pt, log.jsonl, "
                   "samples/, subset.txt")
    p.add_argument("--resume", action="store_true",
                   help="continue <out>/checkpoint.pt exactly; flags not given again come from the run")
    p.add_argument("--overwrite", action="store_true", help="start over in --out: the files its earlier run recorded "
                   "(manifest.txt) are removed, nothing else")
    g = p.add_argument_group("GLIDE files and the official stage")
    g.add_argument("--glide-ckpt", help="GLIDE base.pt (openai/glide-text2im): trains the base model")
    g.add_argument("--glide-up-ckpt", help="GLIDE upsample.pt: trains the upsampler too (or alone)")
    g.add_argument("--encoder", help="base encoder init: an official stage-1 file or a run's base.pt (default: fresh)")
    g.add_argument("--recipe", choices=sorted(RECIPES), help="the official stage (default: none, the flags "
                   "below as given): " + "; ".join(
        f"{name}: {r['doc']} (lr {r['lr']:g}, uncond_p {r['uncond_p']:g}, {r['schedule_sampler']} t)"
        for name, r in RECIPES.items()))
    g.add_argument("--train", default=None, choices=["all", "encoder"],
                   help="all (default): the whole model; encoder: the encoder only (official stage 1)")
    g.add_argument("--upsampler", help="a PITI upsampler of --data's label space (e.g. an earlier run's "
                   "upsampler.pt) for the grids and FID of a base-only run; not trained")
    g.add_argument("--base-config", default="{}", help="JSON overrides of the released base configuration (tiny tests)")
    g.add_argument("--up-config", default="{}", help="JSON overrides of the released upsampler configuration")
    data.add_data_args(p)
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=nonneg_int, default=5000, help="optimisation steps (a --recipe sets its "
                   "official count unless given)")
    g.add_argument("--batch", type=positive_int, default=8, help="global batch size (split across torchrun ranks)")
    g.add_argument("--lr", type=positive_float, default=None, help="default: the recipe's, else 7e-5 for a "
                   "Cityscapes target and 2e-4 otherwise (the paper's few-shot rates)")
    g.add_argument("--ema-decay", type=decay_float, default=0.999, help="EMA of the trained weights (official 0.9999)")
    g.add_argument("--uncond-p", type=unit_float, default=0.2, help="condition dropout for guidance (official 0.2)")
    g.add_argument("--schedule-sampler", default="uniform", choices=["uniform", "loss-second-moment"],
                   help="timestep sampler (official base stages: loss-second-moment, importance-weighted)")
    g.add_argument("--seed", type=seed_int, default=0, help="the run's randomness: each step's draws from (seed, step)")
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-every", type=positive_int, default=500, help="grid + FID + exports + checkpoint every N steps")
    g.add_argument("--log-every", type=positive_int, default=10, help="log.jsonl line every N steps")
    g.add_argument("--grid-n", type=positive_int, default=4, help="validation label maps in the sample grid")
    g.add_argument("--tensorboard", action="store_true", help="also write log.jsonl's numbers and the sample grids as "
                   "TensorBoard events in <out>/tensorboard (needs: pip install tensorboard); curves.png is always written")
    g.add_argument("--sample-steps", default="100", help="base respacing for the sample grids (official previews: "
                   "100): " + diffusion.RESPACINGS)
    g.add_argument("--up-steps", default=diffusion.UP_STEPS, help="upsampler respacing for the grids, the same forms")
    g.add_argument("--select-steps", default=diffusion.BASE_STEPS, help="base respacing for the validation FID that "
                   "picks best.pt; the default is the sampler evaluate.py reports with (its --sample-steps); fewer "
                   "steps (e.g. the grids' 100) make each evaluation faster but may rank checkpoints differently")
    g.add_argument("--select-up-steps", default=diffusion.UP_STEPS, help="upsampler respacing for that FID "
                   "(evaluate.py's --up-steps default)")
    g.add_argument("--guidance", type=finite_float, default=diffusion.GUIDANCE,
                   help="classifier-free guidance scale (>= 0; official base 1.3, 1 = none)")
    g.add_argument("--inception", default=None, help="pt_inception-2015-12-05-6726825d.pth or fid_inception (downloaded "
                   "once): early stopping on val FID")
    g.add_argument("--fid-features", default=None, help="TorchScript feature net (toy-domain FID) instead of Inception")
    g.add_argument("--fid-n", type=positive_int, default=None, help="val images used for FID (default all)")
    g.add_argument("--patience", type=positive_int, default=5, help="stop after N evaluations without a better FID")
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
    if saved is not None and saved.get("init") != "glide":
        raise DataError(f"--resume {Path(args.out) / 'checkpoint.pt'}: a CAT run, not a pretraining one; continue it "
                        f"with finetune_piti.py --out {args.out} --resume")
    elif not args.resume:  # a resumed run's recipe settings are in its checkpoint's args
        for k, v in RECIPES[args.recipe].items() if args.recipe else ():
            if k not in ("doc", "official_batch") and k not in given:
                setattr(args, k, v)
        missing = [] if args.glide_ckpt or args.glide_up_ckpt else [
            "--glide-up-ckpt (GLIDE upsample.pt)" if args.recipe == "piti-upsample" else
            "--glide-ckpt (GLIDE base.pt)" if args.recipe else "--glide-ckpt (GLIDE base.pt) and/or --glide-up-ckpt"]
        missing += [f"--{f}" for f in ("data", "out") if getattr(args, f) is None]
        if missing:  # every one at once, with a command to start from
            raise DataError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required; for example: "
                            f"{example(args.recipe)} (see --help)")
        if args.encoder and not args.glide_ckpt:
            raise DataError("--encoder initialises the base model's encoder: it needs --glide-ckpt")
        if args.upsampler and args.glide_up_ckpt:
            raise DataError("--upsampler stands in for an upsampler this run does not train: not with --glide-up-ckpt")
        args.train = args.train or "all"
        if args.lr is None:
            args.lr = 7e-5 if args.data == "cityscapes" else 2e-4
    if not args.glide_ckpt and (args.inception or args.fid_features):
        raise DataError("FID needs the base model: an upsampler-only run (--glide-up-ckpt alone) writes grids only")
    if args.guidance < 0:
        raise DataError(f"--guidance >= 0 expected, got {args.guidance}")
    for flag in ("sample_steps", "up_steps", "select_steps", "select_up_steps"):
        diffusion.check_respacing(getattr(args, flag), f"--{flag.replace('_', '-')}")
    return args, given


def trainable(model, mode):
    """Parameters a stage optimises: 'encoder' (stages 1 and 1-cont) or 'all' (stage 2, the upsampler)."""
    if mode == "encoder":
        return {k: p for k, p in model.named_parameters() if k.startswith("encoder.")}
    return dict(model.named_parameters())


def build_models(args, n_channels):
    """(base, up): the GLIDE decoders in --data's label space (fresh encoders, or --encoder), or an upsampler
    of this label space that is not trained (--upsampler); None where the run has none."""
    own = {"source_channels": n_channels}
    base = up = None
    if args.glide_ckpt:
        base = glide.glide_model(args.glide_ckpt, False, {**args.base_config, **own}, encoder=args.encoder,
                                 seed=args.seed)
    if args.glide_up_ckpt:
        up = glide.glide_model(args.glide_up_ckpt, True, {**args.up_config, **own}, seed=args.seed + 1)
    elif args.upsampler:  # not trained: it upsamples the base's grids and FID samples
        up = piti.load_official(args.upsampler, super_res=True, config={**piti.UP_KWARGS, **args.up_config, **own})
    return base, up


def diffusion_step(models, params, ema, opt, scaler, amp, diffs, samplers, batch, s, args, low_side, device, rank, world):
    """One optimisation step of the models that train on this rank's share of the global batch (t, noise and
    condition dropout from (--seed, s)) -> (loss, per-model loss terms); gradients averaged over the ranks, EMA
    updated. (finetune_piti.py's step, repeated on purpose: each script reads alone.)"""
    gen = torch.Generator().manual_seed(run.step_seed(args.seed, 0, s))  # t, noise, dropout of the global batch
    run.seed_step(args.seed, s, rank)  # UNet dropout
    image, label = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
    logs, total = {}, 0.0
    for name, m in models.items():
        m.train()
        # the official upsampler is never trained unconditionally (it samples without guidance)
        terms = diffusion.training_loss(m, diffs[name], image, label, 0.0 if name == "up" else args.uncond_p,
                                        low_side if name == "up" else None, amp=amp,
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

    # data: PITI is trained in --data's own label space (no CAT, no affinity); a resumed n-shot run reads its subset
    if ckpt is not None and args.n is not None:
        args.subset_file = str(out / "subset.txt")
    train_ds = data.dataset_from_args(args, "train", augment=True, out_dir=out if master and ckpt is None else None)
    val_ds = data.dataset_from_args(args, "val")
    classes = train_ds.classes
    data.check_labels(train_ds)  # every label file read once: a bad id fails here, in one line
    data_fp = run.data_fingerprint(train_ds)  # a resumed run must train on the same files
    if ckpt is not None:  # the same classes and files as the run's
        run.check_data(ckpt, train_ds.classes, data_fp, args, data.compare_classes)

    # models (GLIDE decoders), what trains, EMA, optimiser, timestep samplers
    if ckpt is not None and args.upsampler and not args.glide_up_ckpt:  # the run's upsampler, found by its sha256
        args.upsampler = str(run.find_recorded_file(ckpt["up_file"], args.upsampler if "upsampler" in given else None,
                                                    "--upsampler", near=(out,)))
    base, up = build_models(args, classes.n_channels)
    present = {name: m for name, m in (("base", base), ("up", up)) if m is not None}
    models = {name: m for name, m in (("base", base), ("up", up if args.glide_up_ckpt else None)) if m is not None}
    params = {name: trainable(m, args.train) for name, m in models.items()}
    for name, m in models.items():
        m.requires_grad_(False)
        for p in params[name].values():
            p.requires_grad_(True)
    ema = {name: {k: p.detach().clone() for k, p in ps.items()} for name, ps in params.items()}
    opt = torch.optim.AdamW([p for ps in params.values() for p in ps.values()], lr=args.lr, weight_decay=0.0)
    if ckpt is not None:
        for name in models:  # the checkpoint keeps what trains; the rest stays as the GLIDE file gave it
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
    low_side = base.image_size if base is not None else up.image_size // 4  # the upsampler's input side
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
    up_file = (ckpt["up_file"] if ckpt else run.file_record(args.upsampler)) if args.upsampler and master else None

    # evaluation. Base and upsampler: the cascade. Base alone: its own samples. Upsampler alone: it upsamples the
    # 8-bit low-res versions of the grid's real images.
    grid = metrics.fixed_grid(val_ds, args.grid_n, [args.seed], device)

    def sampler(steps, up_steps):  # grids with the preview sampler, the FID with the selection sampler
        def sample(label, seeds):
            gen = torch.Generator(label.device).manual_seed(int(seeds[0]))
            ddim = steps.startswith("ddim")
            if base is not None and up is not None:
                x = diffusion.cascade(base, up, label, generator=gen, steps=steps, up_steps=up_steps,
                                      guidance=args.guidance, ddim=ddim, amp=amp)
            elif base is not None:
                x = diffusion.sample(base, base.ref(label), steps=steps, guidance=args.guidance, generator=gen,
                                     ddim=ddim, amp=amp)
            else:
                real = grid["real"][:len(label)].to(label.device)
                low = diffusion.quantize(F.interpolate(real, (low_side,) * 2, mode="bicubic", antialias=True,
                                                       align_corners=False))
                x = diffusion.sample(up, up.ref(label), steps=up_steps, low_res=low, generator=gen, amp=amp)
            return metrics.resize_images(x, val_ds.size)
        return sample

    fid = metrics.validation_fid(sampler(args.select_steps, args.select_up_steps), val_ds, args.inception,
                                 args.fid_features, args.fid_n, out / "fid_cache", device, args.batch,
                                 args.seed) if master else None
    if master:  # subset.txt, the FID cache: what --overwrite may remove
        run.record(out)
        if fid is None:
            run.no_fid_note(out, f", or the exports {', '.join(EXPORTS[n] for n in models)}")

    def evaluate_and_save(s):
        """EMA grid, FID, the exported official files, then run.finish_evaluation (log line, curves, best.pt on a
        better FID, checkpoint.pt) on rank 0; on every rank: True when early stopping says stop."""
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
            for name, m in models.items():  # the EMA weights: a later run's --base / --upsampler
                run.save(glide.official_state(m), out / EXPORTS[name])
        files = {"up": up_file, **{name: run.file_record(out / EXPORTS[name]) for name in models}}  # its own exports
        table = data.table_info(classes)
        state = {"kind": "piti-cat", "format": run.FORMAT, "step": s, "args": vars(args), "init": "glide",
                 "amp": amp, "affinity": None, "data": data_fp, "source": table, "target": table,
                 "base_file": files.get("base"), "up_file": files["up"],
                 "base_kwargs": base.kwargs if base is not None else None,
                 "up_kwargs": up.kwargs if up is not None else None,
                 "timestep_samplers": {name: ts.state_dict() for name, ts in samplers.items()},
                 "opt": opt.state_dict(), "scaler": scaler.state_dict(), **best.state()}
        for name, ps in params.items():
            state[name] = {k: p.detach().cpu().clone() for k, p in ps.items()}
            state[f"{name}_ema"] = {k: v.cpu().clone() for k, v in ema[name].items()}
        return run.finish_evaluation(out, state, entry, better, best, device, board)  # log, curves, best.pt, checkpoint

    # training
    last = done = step  # `last`: the step of the last checkpoint written
    stop = ckpt is None and evaluate_and_save(0)  # the model before training
    if ckpt is not None and master:
        print(f"resuming from step {step} of {args.steps} ({out / 'checkpoint.pt'})")
    bar = tqdm(range(step, args.steps if not stop else step), initial=step, total=args.steps, desc="pretrain_piti",
               disable=not master)
    batches = run.loader(train_ds, args.seed, args.batch, rank, world, step, args.workers, device)
    t0 = time.time()
    try:
        for s, batch in zip(bar, batches):
            loss, logs = diffusion_step(models, params, ema, opt, scaler, amp, diffs, samplers, batch, s, args, low_side,
                                        device, rank, world)
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
        raise run.interrupted("pretrain_piti.py", args, given, last) from None
    if master:  # the run's last line: steps trained, its checkpoint, the best FID where there is one
        print(f"done: {done} steps, checkpoint {out / 'checkpoint.pt'}{best.summary(out / 'best.pt')}")
    run.finish(ddp)


if __name__ == "__main__":
    cli(main)
