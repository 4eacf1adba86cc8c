r"""Finetune a pretrained OASIS generator on a few target images with Class Affinity Transfer (CAT).

    # CAT: source model + affinity (from estimate_affinity.py) + 100 target images
    python finetune_oasis.py --source ade20k --source-ckpt checkpoints/oasis_ade20k_pretrained \
        --affinity runs/aff/affinity.npy --data folder --data-root my_data --n 100 --out runs/cat
    # the toy task: pretrain a small source model from scratch, then transfer it
    python finetune_oasis.py --init scratch --data toy-source --channels 16 --spade-hidden 32 \
        --d-channels 3,32,32,64,64,128,128 --d-last 32 --stage2-steps 20000 --out runs/toy_source
    python finetune_oasis.py --source toy-source --source-ckpt runs/toy_source/checkpoint.pt \
        --affinity runs/aff/affinity.npy --data toy-target --n 100 --out runs/toy_cat
    # several GPUs (the batch is global and split across the ranks)
    torchrun --nproc_per_node 4 finetune_oasis.py ...

Training follows the official OASIS recipe (Adam betas (0, 0.999), lr_D = 4e-4 for every dataset, N+1
class-balanced loss, LabelMix, EMA with a BN-statistics pass before every evaluation and save; per iteration:
G step, D step, EMA). The paper's schedule (`stage_of`): stage 1 trains the CAT layers and the SPADE gamma/beta
convs, stage 2 "all layers in the SPADE blocks", read as every SPADE module (`--g-train`, models/oasis.py
Generator.stage_parameters). A source model of another aspect serves the target's size (256x256 -> 256x512
Cityscapes): the generator is convolutional. Every `--eval-every` steps (and at the end) the EMA's BN
statistics are re-estimated, a sample grid is written, FID is computed when a feature network is given,
and <out>/checkpoint.pt (the last) and <out>/best.pt (the best FID) are saved atomically. `--resume`
continues the run in --out exactly, with its own settings; model and data flags cannot change, nor its training
files (the checkpoint records their number and a hash of names and sizes). Ctrl-C prints the --resume command.

--recipe expresses the rows of the paper's OASIS ablation (supplement Table 10) and its two transfer baselines:
  finetune, freezed, freezed-2stage, freezed-2stage-resid, cat (the default, all four components);
  transfergan   TransferGAN (Wang et al. 2018): G and D finetuned from the source model with a new first layer,
                which in this architecture is exactly the plain finetuning row;
  cgantransfer  our adaptation of cGANTransfer (Shahbazi et al. 2021), knowledge propagation across classes:
                every target class is a *learned* convex combination of the source classes (a softmax over
                free logits per row, uniform at the start, in every CAT input layer), trained jointly with the
                whole G and D, with no residual layers and no FreezeD.
"""
import argparse
import copy
import math
import random
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import metrics
from models import (ArgumentParser, DataError, amp, cli, curves, finite_float, int_list, nonneg_int,
                    oasis, positive_int, run)

# The rows of the paper's OASIS ablation (supplement Table 10, adding one component per row) and the two
# transfer baselines of its comparison, as flag values; flags given explicitly override a recipe's.
PLAIN = dict(affinity="none", stages=1, g_train="all", no_residual=True, freeze_d=0, d_head="reinit")
RECIPES = {
    "finetune": PLAIN,  # the whole source G and D, a random 1x1 input layer: Table 10's first row
    "freezed": {**PLAIN, "freeze_d": 2},
    "freezed-2stage": {**PLAIN, "freeze_d": 2, "stages": 2, "g_train": "spade"},
    "freezed-2stage-resid": {**PLAIN, "freeze_d": 2, "stages": 2, "g_train": "spade", "no_residual": False},
    "cat": dict(stages=2, g_train="spade", no_residual=False, freeze_d=2),  # all four (needs --affinity FILE)
    "transfergan": PLAIN,  # see the module docstring
    "cgantransfer": {**PLAIN, "affinity": "learned"},
}
# the generator learning rates the paper chose per target dataset (supplement, Training); folder/toy targets keep
# 1e-4. The paper's rate is lr_G: official OASIS keeps lr_D = 4e-4 for every dataset (Cityscapes included).
LR_BY_TARGET = {"cityscapes": 4e-4, "ade20k": 1e-4, "coco": 1e-4}
OASIS_LR_D = 4e-4
OASIS_WIDTHS = {"channels": 64, "z_dim": 64, "spade_hidden": 128, "d_channels": [3, 128, 128, 256, 256, 512, 512],
                "d_last": 64}  # the official widths: --init scratch's defaults

SOURCE_FLAGS = {"source", "source_ckpt", "source_d", "affinity", "d_head", "recipe", "freeze_d"}  # meaningless with --init scratch
# flags a resumed run takes from its checkpoint and refuses to change
MODEL_FLAGS = ("recipe", "g_train", "init", "source", "source_root", "source_ckpt", "source_d", "which", "affinity", "data", "data_root",
               "n", "subset_seed", "size", "paths", "no_residual", "stages", "stage1_steps", "freeze_d", "d_head",
               "channels", "z_dim", "spade_hidden", "d_channels", "d_last", "batch", "seed", "lambda_labelmix")


def get_args(argv=None):
    """(args, given): the parsed flags with their run-dependent defaults filled in, and the flags given."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, best.pt, log.jsonl, curves.png, samples/, subset.txt")
    p.add_argument("--resume", action="store_true", help="continue <out>/checkpoint.pt exactly, with the run's own flags")
    p.add_argument("--overwrite", action="store_true", help="start afresh in a non-empty --out (its run files are replaced)")
    p.add_argument("--init", default="source", choices=["source", "scratch"],
                   help="source: CAT from a pretrained model; scratch: random G/D at the target classes, all layers trained "
                        "(the paper's 'from scratch' row, and how the toy source model is pretrained)")
    g = p.add_argument_group("source model (--init source)")
    g.add_argument("--source", default=None, choices=data.DATASETS, help="dataset the source model was trained on")
    g.add_argument("--source-root", default=None, help="folder of the source dataset's classes.txt (--source folder)")
    g.add_argument("--source-ckpt", default=None,
                   help="official run dir (<dir>/models/best_{EMA,D}.pth), an official generator .pth (with --source-d), "
                        "or a checkpoint.pt written by this script with --init scratch")
    g.add_argument("--source-d", default=None, help="official discriminator .pth when --source-ckpt is a single generator file")
    g.add_argument("--which", default="best", help="official checkpoint prefix: best, latest or an iteration")
    g.add_argument("--affinity", default=None,
                   help="affinity.npy (target classes x source classes) from estimate_affinity.py; 'none': the 1x1 "
                        "input layers keep their random init; 'learned': softmax rows learned from uniform (cGANTransfer)")
    data.add_data_args(p)
    g = p.add_argument_group("CAT variants and baselines (paper Table 10)")
    g.add_argument("--recipe", default="cat", choices=list(RECIPES),
                   help="a row of the paper's ablation or a baseline, as the flags below (explicit flags override)")
    g.add_argument("--g-train", default="spade", choices=["spade", "blocks", "all"],
                   help="stage 2 set. spade: every SPADE module (shared conv, gamma, beta) + CAT layers, the supplement's "
                        "'all layers in the SPADE blocks'; blocks: also the residual blocks' main-path convs (conv_0/1/s); "
                        "all: every G parameter incl. fc and conv_img")
    g.add_argument("--paths", default="separate", choices=["separate", "shared"], help="gamma/beta paths of the CAT layers")
    g.add_argument("--no-residual", action="store_true", help="drop the zero-initialised residual layers")
    g.add_argument("--stages", type=int, default=2, choices=[1, 2],
                   help="2: the paper's schedule; 1: the full parameter set from the start, for stage1+stage2 steps")
    g.add_argument("--stage1-steps", type=nonneg_int, default=2000, help="iterations training the CAT layers + SPADE gamma/beta convs")
    g.add_argument("--stage2-steps", type=nonneg_int, default=3000, help="iterations training every SPADE-block layer")
    g.add_argument("--freeze-d", type=nonneg_int, default=2,
                   help="FreezeD: keep the first K encoder blocks of D frozen (not with --init scratch)")
    g.add_argument("--d-head", default=None, choices=["affinity", "reinit"],
                   help="D's N+1 head for the target classes: built through the affinity (default when one is given) or fresh")
    g = p.add_argument_group("model widths (--init scratch; a source model brings its own, and a width given with "
                             "one must equal the source's)")
    g.add_argument("--channels", type=positive_int, default=None, help="G base width (official 64)")
    g.add_argument("--z-dim", type=nonneg_int, default=None, help="noise channels (official 64)")
    g.add_argument("--spade-hidden", type=positive_int, default=None, help="SPADE hidden width (official 128)")
    g.add_argument("--d-channels", type=int_list, default=None,
                   help="D encoder widths, comma separated: 3 (RGB), then one width per encoder block (at least two); "
                        "images must be multiples of 2^blocks (official 3,128,128,256,256,512,512)")
    g.add_argument("--d-last", type=positive_int, default=None, help="width of D's last decoder block (official 64)")
    g = p.add_argument_group("optimisation (official OASIS values by default)")
    g.add_argument("--batch", type=positive_int, default=8, help="global batch size (split across torchrun ranks)")
    g.add_argument("--lr", type=float, default=None,
                   help="generator learning rate (default: the paper's per target, 4e-4 for Cityscapes, else 1e-4)")
    g.add_argument("--lr-d", type=float, default=None, help="discriminator learning rate (default 4e-4, official OASIS for every dataset)")
    g.add_argument("--lambda-labelmix", type=finite_float, default=None, help="LabelMix weight (default 10; 5 for Cityscapes)")
    g.add_argument("--ema-decay", type=float, default=None,
                   help="EMA decay after its warm-up (see ema_decay_at; default 0.9999 for ADE20K/COCO as the official "
                        "runs, 0.999 otherwise)")
    g.add_argument("--bn-batches", type=positive_int, default=51, help="batches of the EMA BN-statistics pass (official 51)")
    g.add_argument("--seed", type=nonneg_int, default=0)
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-every", type=positive_int, default=500, help="BN pass + grid + FID + checkpoint every N steps")
    g.add_argument("--log-every", type=positive_int, default=10, help="log.jsonl line every N steps")
    g.add_argument("--grid-n", type=nonneg_int, default=8, help="rows of the sample grid (fixed val labels and noise)")
    g.add_argument("--inception", default=None, help="pt_inception-2015-12-05-6726825d.pth or fid_inception: early stopping on val FID")
    g.add_argument("--fid-features", default=None, help="TorchScript feature net (toy-domain FID) instead of Inception")
    g.add_argument("--fid-n", type=positive_int, default=None, help="val images used for FID (default all)")
    g.add_argument("--patience", type=positive_int, default=5, help="stop after N evaluations without a better FID")
    g.add_argument("--tensorboard", action="store_true", help="also write log.jsonl's numbers and the sample grids as "
                   "TensorBoard events in <out>/tensorboard (needs: pip install tensorboard); curves.png is always written")
    g = p.add_argument_group("speed")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when a GPU is visible)")
    g.add_argument("--amp", default="auto", choices=amp.MODES, help=amp.HELP)
    g.add_argument("--compile", action="store_true", help="torch.compile G and D")
    g.add_argument("--workers", type=nonneg_int, default=None, help="data loader workers (default 4 on CUDA, 0 on CPU)")
    args, given = run.parse_with_given(p, argv)
    run.check_device(args.device)
    if args.workers is None:  # a machine flag: never from a resumed run's checkpoint
        args.workers = 4 if args.device.startswith("cuda") else 0
    if args.resume:  # the run's own settings, except what the command line repeats (model/data flags must agree)
        saved = run.load(Path(args.out) / "checkpoint.pt", "--resume", kinds=("oasis-cat",), mmap=True)["args"]
        if "stage2_reading" not in saved and saved.get("g_train") == "spade":
            saved = {**saved, "g_train": "blocks"}  # written when 'spade' named today's 'blocks' set: keep its meaning
        run.resume_args(args, saved, MODEL_FLAGS, given)
        args.resume = True
    else:
        for k, v in RECIPES[args.recipe].items() if args.init == "source" else ():
            if k not in given:
                setattr(args, k, v)
    if args.init == "source" and not args.resume:
        for flag in ("source", "source_ckpt", "affinity"):
            if getattr(args, flag) is None:
                raise DataError(f"--init source needs --{flag.replace('_', '-')} (or use --init scratch)")
    elif args.init == "scratch" and given & SOURCE_FLAGS:
        raise DataError(f"--init scratch trains a new model: --{min(given & SOURCE_FLAGS).replace('_', '-')} does not apply")
    if args.lr is None:
        args.lr = LR_BY_TARGET.get(args.data, 1e-4)
    if args.lr_d is None:
        args.lr_d = OASIS_LR_D
    for flag, lr in (("--lr", args.lr), ("--lr-d", args.lr_d)):
        if not (math.isfinite(lr) and lr > 0):
            raise DataError(f"{flag} {lr}: expected a positive finite learning rate")
    args.stage2_reading = "supplement"  # --g-train spade = the SPADE modules (a marker for resumed checkpoints)
    if args.lambda_labelmix is None:
        args.lambda_labelmix = 5.0 if args.data == "cityscapes" else 10.0
    if args.lambda_labelmix < 0:
        raise DataError(f"--lambda-labelmix {args.lambda_labelmix}: expected a weight >= 0 (0 turns LabelMix off)")
    if args.init == "scratch":
        for k, v in OASIS_WIDTHS.items():
            setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    d = args.d_channels
    if d is not None and (d[0] != 3 or len(d) < 3 or min(d) < 1):
        raise DataError(f"--d-channels {','.join(map(str, d))}: expected 3 (RGB) then at least two positive widths, "
                        "one per encoder block, e.g. 3,128,128,256,256,512,512")
    if args.ema_decay is None:
        args.ema_decay = 0.9999 if args.data in ("ade20k", "coco") else 0.999
    if not 0 <= args.ema_decay < 1:
        raise DataError(f"--ema-decay {args.ema_decay}: expected a value in [0, 1)")
    if args.d_head is None:
        args.d_head = "affinity" if args.affinity not in (None, "none", "learned") else "reinit"
    if args.d_head == "affinity" and args.affinity in (None, "none", "learned"):
        raise DataError("--d-head affinity needs an --affinity file")
    if args.tensorboard:  # before any file is written
        curves.require_tensorboard()
    return args, given


def stage_of(step, args):
    """CAT's two finetuning stages: 1 for the first --stage1-steps iterations (CAT layers + SPADE gamma/beta
    convs), then 2 (--g-train's set: the SPADE modules by default). One stage (--stages 1, and --init scratch)
    trains the full set from the start."""
    if args.init == "scratch" or args.stages == 1:
        return 2
    return 1 if step < args.stage1_steps else 2


def stage_parameters(G, stage, args):
    """The generator parameters trained in `stage`: the paper's sets, or all of them (scratch, --g-train all)."""
    if stage == 2 and (args.init == "scratch" or args.g_train == "all"):
        return list(G.parameters())
    return G.stage_parameters(stage, args.g_train)


def ema_decay_at(step, decay):
    """The EMA decay of iteration `step`: min(decay, (1 + step) / (10 + step)). A fixed 0.9999 over a 5000-step
    finetuning run would leave ~61% of the step-0 weights in the evaluated model; the warm-up lets the average
    follow a short run from its start and reaches `decay` on long ones."""
    return min(decay, (1 + step) / (10 + step))


def build_models(args, target, size):
    """(G, D, A, source info) for a fresh run: random at the target classes (--init scratch), or the source
    model with CAT layers (affinity A in them unless --affinity none) and D's head retargeted."""
    if args.init == "scratch":
        H, W = size
        G = oasis.Generator(target.n_channels, z_dim=args.z_dim, channels=args.channels, spade_hidden=args.spade_hidden,
                            crop_size=W, aspect_ratio=W / H)
        D = oasis.Discriminator(target.n_channels, channels=tuple(args.d_channels), last_width=args.d_last)
        return G, D, None, data.table_info(target)
    source = data.class_table(args.source, args.source_root)
    src = oasis.load_source(args.source_ckpt, source.dataset, source.n_channels, args.which, args.source_d)
    have = {"channels": src["G_kwargs"]["channels"], "z_dim": src["G_kwargs"]["z_dim"],
            "spade_hidden": src["G_kwargs"]["spade_hidden"], "d_channels": list(src["D_kwargs"]["channels"]),
            "d_last": src["D_kwargs"]["last_width"]}
    for k, v in have.items():  # a width flag would be ignored: only the source's own value may be repeated
        if getattr(args, k) not in (None, v):
            flag, text = "--" + k.replace("_", "-"), lambda x: ",".join(map(str, x)) if isinstance(x, list) else x
            raise DataError(f"{flag} {text(getattr(args, k))}: the source model {args.source_ckpt} has {flag} "
                            f"{text(v)}; a source model brings its own widths (drop {flag})")
    G = oasis.Generator(**{**src["G_kwargs"], "cat_nc": target.n_channels, "cat_paths": args.paths,
                           "cat_residual": not args.no_residual,
                           "cat_affinity": "learned" if args.affinity == "learned" else "fixed"})
    G.load_source(src["EMA"], args.source_ckpt, f"--source {args.source}")
    G.resize(size, f"--source-ckpt {args.source_ckpt}")  # the target's size: 256x256 source -> 256x512 Cityscapes
    D = oasis.Discriminator(**src["D_kwargs"])
    oasis.check_state_dict(D, src["D"], args.source_d or args.source_ckpt, f"--source {args.source}")
    A = M = None
    if args.affinity not in ("none", "learned"):
        A, M = data.load_affinity(args.affinity, target, source)
        A = torch.from_numpy(A)
        G.set_affinity(M)
    D.retarget(target.n_channels, M if args.d_head == "affinity" else None)
    return G, D, A, data.table_info(source)


# ----------------------------------------------------------------------------------------------
# One training iteration: G step, D step, EMA (the official order)


def train_step(nets, optG, optD, d_trainable, y, real, lambda_labelmix, ema_decay, ctx, scalers=(None, None)):
    """One official iteration; returns the two losses (detached). scalers: (G's, D's) amp.grad_scaler or None.

    nets: 'G', 'D' train (DDP and/or compiled wrappers); 'G_fwd', 'D_fwd' the same modules without DDP
    (the D step's fake images, D inside the G loss); 'G_raw' the plain module the EMA follows."""
    G, D, EMA = nets["G"], nets["D"], nets["EMA"]
    for p in d_trainable:  # D's gradients from the G step would be thrown away: don't compute them
        p.requires_grad_(False)
    with ctx:
        fake = G(y)
        loss_G = oasis.generator_loss(nets["D_fwd"], fake, y)
    optG.zero_grad(set_to_none=True)
    amp.backward_step(loss_G, optG, scalers[0])
    for p in d_trainable:
        p.requires_grad_(True)
    with ctx:
        with torch.no_grad():
            fake = nets["G_fwd"](y)  # train mode, fresh z, as the official D step
        loss_D, _ = oasis.discriminator_loss(D, real, fake, y, lambda_labelmix)
    optD.zero_grad(set_to_none=True)
    amp.backward_step(loss_D, optD, scalers[1])
    oasis.ema_update(EMA, nets["G_raw"], ema_decay)
    return loss_G.detach(), loss_D.detach()


def wrap(G, D, EMA, stage, args, ddp, device):
    """The networks of train_step for this stage, whose generator parameters alone require grad (DDP registers
    the parameters that require grad)."""
    ids = {id(p) for p in stage_parameters(G, stage, args)}
    for p in G.parameters():
        p.requires_grad_(id(p) in ids)
    g, d = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)
    nets = {"G": g, "D": d, "G_fwd": g, "D_fwd": d, "G_raw": G, "EMA": EMA}
    if ddp:
        ids = [device.index] if device.type == "cuda" else None
        nets["G"], nets["D"] = DDP(g, device_ids=ids), DDP(d, device_ids=ids)
    return nets


def bn_batches(train_items, args, step, n_channels, device, mem):
    """One-hot label maps for the EMA BN pass at `step`: shuffled, augmented, full batches (as the official
    training loader), over as many epochs as --bn-batches needs."""
    keys, epoch = [], 0
    while len(keys) < args.bn_batches:
        keys += data.epoch_batches(len(train_items), args.batch, args.seed, f"bn{step}.{epoch}", 0, 1)
        epoch += 1
    dl = torch.utils.data.DataLoader(train_items, batch_sampler=keys[:args.bn_batches], num_workers=args.workers,
                                     generator=torch.Generator().manual_seed(step))
    return (data.onehot(b["label"].to(device), n_channels).contiguous(memory_format=mem) for b in dl)


# ----------------------------------------------------------------------------------------------


def setup(args):
    """Everything a run needs, fresh or resumed, as one namespace: data, models, optimisers, sampler."""
    ddp, rank, world, device = run.init_distributed(args)
    master, cuda = rank == 0, device.type == "cuda"
    out = run.prepare_out(args.out, args.resume, args.overwrite) if master else Path(args.out)
    ckpt = run.load(out / "checkpoint.pt", "--resume", kinds=("oasis-cat",)) if args.resume else None
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)
    args.precision = amp.pick(device, args.amp)  # what --amp means on this machine (a resumed run picks anew)
    R = SimpleNamespace(args=args, ddp=ddp, rank=rank, world=world, device=device, master=master, out=out,
                        ctx=amp.autocast(device, args.precision), scalers=[amp.grad_scaler(device, args.precision) for _ in "GD"],
                        mem=torch.channels_last if cuda else torch.contiguous_format,
                        bf16=cuda and args.precision == "bf16", step=0, best_fid=None, bad_evals=0)

    # Data: a resumed n-shot run reads the subset it drew
    if ckpt is not None and args.n is not None:
        args.subset_file = str(out / "subset.txt")
    R.train_ds = data.dataset_from_args(args, "train", augment=True, out_dir=out if master and ckpt is None else None)
    val_ds = data.dataset_from_args(args, "val", augment=False)
    R.target = R.train_ds.classes
    if len(R.train_ds) < args.batch:
        raise DataError(f"--batch {args.batch} is larger than the {len(R.train_ds)} training images (--n)")
    data.check_labels(R.train_ds, f"--data {args.data}")
    R.train_items = data.Seeded(R.train_ds, args.seed)
    R.data_fp = run.data_fingerprint(R.train_ds)  # a resumed run must train on the same files
    if ckpt is not None:
        run.check_data(ckpt.get("data"), R.data_fp, args)

    # Models: a fresh run builds them, a resumed one restores every tensor
    if ckpt is None:
        G, D, R.A, R.source_info = build_models(args, R.target, R.train_ds.size)
        EMA = copy.deepcopy(G)
    else:
        G, D, EMA = (oasis.Generator(**ckpt["G_kwargs"]), oasis.Discriminator(**ckpt["D_kwargs"]),
                     oasis.Generator(**ckpt["G_kwargs"]))
        for m, k in ((G, "G"), (D, "D"), (EMA, "EMA")):
            m.load_state_dict(ckpt[k])
        R.A, R.source_info = ckpt["affinity"], ckpt["source"]
    if G.output_hw != R.train_ds.size:
        raise DataError(f"the generator makes {G.output_hw[0]}x{G.output_hw[1]} images, --data {args.data} gives "
                        f"{R.train_ds.size[0]}x{R.train_ds.size[1]} (--size)")
    scratch = args.init == "scratch"
    blocks = len(D.blocks_for_freeze())
    if any(side % 2 ** blocks for side in R.train_ds.size):
        raise DataError(f"{'--d-channels' if scratch else '--source-ckpt'}: the discriminator has {blocks} encoder blocks "
                        f"and needs image sides that are multiples of {2 ** blocks}; --size gives "
                        f"{R.train_ds.size[0]}x{R.train_ds.size[1]}")
    if not scratch and args.freeze_d > blocks:
        raise DataError(f"--freeze-d {args.freeze_d}: the discriminator has {blocks} encoder blocks; expected at most {blocks}")
    frozen = {id(p) for block in D.blocks_for_freeze()[:args.freeze_d] for p in block.parameters()} if not scratch else set()
    R.d_trainable = [p for p in D.parameters() if id(p) not in frozen]
    for p in D.parameters():
        p.requires_grad_(id(p) not in frozen)
    if ddp and cuda:  # global batch statistics, as the official multi-GPU runs; EMA keeps plain BN (rank 0 runs it)
        G = torch.nn.SyncBatchNorm.convert_sync_batchnorm(G)
    R.G, R.D, R.EMA = (m.to(device, memory_format=R.mem) for m in (G, D, EMA))
    R.optG = torch.optim.Adam(stage_parameters(R.G, 2, args), lr=args.lr, betas=(0.0, 0.999))
    R.optD = torch.optim.Adam(R.d_trainable, lr=args.lr_d, betas=(0.0, 0.999))
    if ckpt is not None:
        R.optG.load_state_dict(ckpt["optG"])
        R.optD.load_state_dict(ckpt["optD"])
        for opt, lr in ((R.optG, args.lr), (R.optD, args.lr_d)):  # the command line's rates, e.g. to continue slower
            for group in opt.param_groups:
                group["lr"] = lr
        R.step, R.best_fid, R.bad_evals = ckpt["step"], ckpt["best_fid"], ckpt["bad_evals"]
        amp.restore(R.scalers, ckpt.get("scalers"))  # fp16 loss scales continue where they were
        if len(ckpt["rng"]) == world:  # another number of ranks cannot replay the same draws: keep the fresh seeds
            run.set_rng_state(ckpt["rng"][rank], device)
        if master:
            run.truncate_log(out / "log.jsonl", R.step)
    R.board = curves.Board(out, R.step) if args.tensorboard and master else None

    # Evaluation: samples from metrics' sampler (EMA in eval mode, noise seeded per image, global RNG untouched)
    R.sample = metrics.oasis_sampler(R.EMA, R.target.n_channels, R.bf16)
    R.grid = metrics.fixed_grid(val_ds, args.grid_n, lambda n: metrics.image_seeds(args.seed, 0, n, 0), device)
    R.fid = metrics.validation_fid(R.sample, val_ds, args.inception, args.fid_features, args.fid_n, out / "fid_cache",
                                   device, args.batch, args.seed, R.bf16) if master else None
    return R


def evaluate_and_save(R, s):
    """BN pass on the EMA, grid, FID, checkpoint.pt (+ best.pt when the FID improved); True when early
    stopping says stop. Every rank takes part (RNG states, the stop flag); rank 0 does the work."""
    stop, better, entry = False, False, {"step": s, "grid": f"samples/{s:06d}.png"}
    if R.master:
        if s > 0:
            with R.ctx:
                oasis.recompute_bn_stats(R.EMA, bn_batches(R.train_items, R.args, s, R.target.n_channels, R.device, R.mem))
        metrics.sample_grid(R.sample, R.grid, R.out / "samples" / f"{s:06d}.png")
        if R.fid is not None:
            entry["fid"] = R.fid()
            better = R.best_fid is None or entry["fid"] < R.best_fid
            R.best_fid, R.bad_evals = (entry["fid"], 0) if better else (R.best_fid, R.bad_evals + 1)
            stop = R.bad_evals >= R.args.patience
    rngs = [None] * R.world
    if R.ddp:
        dist.all_gather_object(rngs, run.rng_state(R.device))
    else:
        rngs = [run.rng_state(R.device)]
    if R.master:
        state = {"kind": "oasis-cat", "step": s, "args": vars(R.args), "affinity": R.A, "source": R.source_info,
                 "data": R.data_fp,
                 "target": data.table_info(R.target), "G_kwargs": R.G.kwargs, "D_kwargs": R.D.kwargs,
                 "G": R.G.state_dict(), "D": R.D.state_dict(), "EMA": R.EMA.state_dict(),
                 "optG": R.optG.state_dict(), "optD": R.optD.state_dict(), "rng": rngs,
                 "scalers": [sc.state_dict() for sc in R.scalers],
                 "best_fid": R.best_fid, "bad_evals": R.bad_evals}
        # log and best.pt first: killed before checkpoint.pt, a resume drops the line and redoes this evaluation
        run.append_log(R.out / "log.jsonl", entry)
        curves.update(R.out, R.board)  # curves.png (+ TensorBoard events) from log.jsonl
        if better:
            run.save(state, R.out / "best.pt")
        run.save(state, R.out / "checkpoint.pt")
    return run.broadcast_stop(stop, R.device)


def main(argv=None):
    args, given = get_args(argv)
    R = setup(args)
    total, step = args.stage1_steps + args.stage2_steps, R.step
    if R.master:
        print(f"{args.init}: {R.target.dataset} ({len(R.train_ds)} images, {R.target.n_channels} channels) from "
              f"{R.source_info['dataset']}; {total} steps, batch {args.batch} on {R.world} x {R.device}, {args.precision}")
        if step == 0:  # the recipe, then the model before training (training-free CAT)
            run.append_log(R.out / "log.jsonl", {"step": 0, "recipe": args.recipe, "flags": {
                k: getattr(args, k) for k in ("affinity", "stages", "g_train", "no_residual", "freeze_d", "d_head", "lr")}})
            metrics.sample_grid(R.sample, R.grid, R.out / "samples" / f"{0:06d}.png")
        else:
            print(f"resuming from step {step} of {total} ({R.out / 'checkpoint.pt'})")
    R.last_saved = step if args.resume else None  # the step of the last checkpoint written
    try:
        step = train(R, step, total)
    except KeyboardInterrupt:  # Ctrl-C: one line saying where the run can continue from (models.cli prints it)
        raise run.interrupted("finetune_oasis.py", args, given, R.last_saved) from None
    if step == 0 and total == 0:  # training-free: save the model as built
        evaluate_and_save(R, 0)
    if R.master:
        best = f", best FID {R.best_fid:.2f} in {R.out / 'best.pt'}" if R.best_fid is not None else ""
        print(f"done: {R.out / 'checkpoint.pt'} (step {step})" + best)
    if R.ddp:
        dist.destroy_process_group()
    return R.G, R.D, R.EMA


def train(R, step, total):
    """The training loop from `step` to `total` (or early stopping); returns the last step."""
    args, stage = R.args, None
    bar = tqdm(total=total, initial=step, disable=not R.master, dynamic_ncols=True)
    t0 = time.time()
    # One loader for the whole run. Its own generator: a DataLoader iterator otherwise draws a seed from the
    # global RNG, and a resumed run (which opens it after restoring that RNG) would drift from an uninterrupted one.
    batches = data.Batches(len(R.train_ds), args.batch, args.seed, R.rank, R.world, start=step)
    loader = torch.utils.data.DataLoader(R.train_items, batch_sampler=batches, num_workers=args.workers,
                                         pin_memory=R.device.type == "cuda", generator=torch.Generator().manual_seed(args.seed))
    for batch in (loader if step < total else ()):
        if stage_of(step, args) != stage:
            stage = stage_of(step, args)
            nets = wrap(R.G, R.D, R.EMA, stage, args, R.ddp, R.device)
        y = data.onehot(batch["label"].to(R.device, non_blocking=True), R.target.n_channels).contiguous(memory_format=R.mem)
        real = batch["image"].to(R.device, non_blocking=True).contiguous(memory_format=R.mem)
        losses = torch.stack(train_step(nets, R.optG, R.optD, R.d_trainable, y, real, args.lambda_labelmix,
                                        ema_decay_at(step, args.ema_decay), R.ctx, R.scalers)).float()
        step += 1
        if R.ddp:  # log the mean over ranks; a NaN anywhere stops every rank at the same step
            dist.all_reduce(losses)
            losses /= R.world
        lg, ld = losses.tolist()
        if not (math.isfinite(lg) and math.isfinite(ld)):
            bar.close()
            where = f"{R.out / 'checkpoint.pt'} (step {R.last_saved})" if R.last_saved is not None else "none saved yet"
            raise DataError(f"loss is not finite at step {step} (G {lg}, D {ld}); stopped. Last good checkpoint: {where}")
        bar.update(1)
        bar.set_postfix(stage=stage, G=f"{lg:.3f}", D=f"{ld:.3f}")
        if R.master and (step % args.log_every == 0 or step == total):
            run.append_log(R.out / "log.jsonl", {"step": step, "stage": stage, "loss_G": lg, "loss_D": ld,
                                                        "sec": round(time.time() - t0, 3)})
        if step % args.eval_every == 0 or step == total:
            stop = evaluate_and_save(R, step)
            R.last_saved = step
            if stop:
                if R.master:
                    print(f"early stop at step {step}: no better FID in {args.patience} evaluations")
                break
        if step >= total:
            break
    bar.close()
    return step


if __name__ == "__main__":
    cli(main)
