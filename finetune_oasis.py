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

Training follows the official OASIS recipe (Adam betas (0, 0.999), lr_D = 4e-4 for every dataset, N+1 class-balanced
loss, LabelMix, EMA with a BN-statistics pass before every evaluation and save; per iteration: G step, D step, EMA;
no EMA warm-up unless --ema-warmup). The paper's two stages (supplement §B; `stage_of`): stage 1 trains the CAT
layers and the SPADE gamma/beta convs, stage 2 "all layers in the SPADE blocks", read as every SPADE module
(`--g-train`, models/oasis.py Generator.stage_parameters). A source model of another aspect serves the target's size
(256x256 -> 256x512 Cityscapes): the generator is convolutional. Every `--eval-every` steps (and at the end) the
EMA's BN statistics are re-estimated, a sample grid is written, FID is computed when a feature network is given, and
<out>/checkpoint.pt (the last) and <out>/best.pt (the best FID) are saved atomically. `--resume` continues the run
in --out exactly, with its own settings; model and data flags cannot change, nor its training files (the checkpoint
records their number and a hash of names and sizes). Ctrl-C prints the --resume command.

The step counts (2,000 + 3,000) and the batch (8) are this toolkit's defaults, not the paper's: the supplement
gives neither (official OASIS trains with batch 32, 20 for Cityscapes). 5,000 steps at batch 8 are 400 epochs of
100 images, a batch of 8 suits sets of 25 to 100 images on one GPU, and early stopping on validation FID (the
supplement's, §C) ends a run sooner.

--recipe expresses the rows of the paper's OASIS ablation (supplement Table 10) and its two transfer baselines:
  finetune, freezed, freezed-2stage, freezed-2stage-resid   (--d-head random: D's class head freshly initialised)
  cat           the default, all four components            (--d-head affinity: D's head through the affinity)
  transfergan   TransferGAN (Wang et al. 2018): G and D finetuned from the source model with a new first layer,
                which in this architecture is exactly the plain finetuning row (--d-head random);
  cgantransfer  our adaptation of cGANTransfer (Shahbazi et al. 2021), knowledge propagation across classes:
                every target class is a *learned* convex combination of the source classes (a softmax over
                free logits per row, uniform at the start, in every CAT input layer), trained jointly with the
                whole G and D, with no residual layers and no FreezeD (--d-head random).
"""
import copy
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import metrics
from models import (ArgumentParser, DataError, HelpFormatter, cli, curves, decay_float, finite_float, int_list,
                    nonneg_int, oasis, oasis_train, positive_float, positive_int, run, seed_int)
from models.amp import (HELP as AMP_HELP, MODES as AMP_MODES, autocast, backward_step, grad_scaler, pick as pick_amp,
                        restore as restore_scalers)

# The rows of the paper's OASIS ablation (supplement Table 10, adding one component per row) and the two
# transfer baselines of its comparison, as flag values; flags given explicitly override a recipe's.
PLAIN = dict(affinity="none", stages=1, g_train="all", no_residual=True, freeze_d=0, d_head="random")
RECIPES = {
    "finetune": PLAIN,  # the whole source G and D, a random 1x1 input layer: Table 10's first row
    "freezed": {**PLAIN, "freeze_d": 2},
    "freezed-2stage": {**PLAIN, "freeze_d": 2, "stages": 2, "g_train": "spade"},
    "freezed-2stage-resid": {**PLAIN, "freeze_d": 2, "stages": 2, "g_train": "spade", "no_residual": False},
    "cat": dict(stages=2, g_train="spade", no_residual=False, freeze_d=2),  # all four (needs --affinity FILE)
    "transfergan": PLAIN,  # see the module docstring
    "cgantransfer": {**PLAIN, "affinity": "learned"},
}
# the generator learning rates the paper chose per target dataset (supplement §C, Training); folder/toy targets keep
# 1e-4. The paper's rate is lr_G: official OASIS keeps lr_D = 4e-4 for every dataset (Cityscapes included).
LR_BY_TARGET = {"cityscapes": 4e-4, "ade20k": 1e-4, "coco": 1e-4}
OASIS_LR_D = 4e-4
OASIS_WIDTHS = {"channels": 64, "z_dim": 64, "spade_hidden": 128, "d_channels": [3, 128, 128, 256, 256, 512, 512],
                "d_last": 64}  # the official widths: --init scratch's defaults

SOURCE_FLAGS = {"source", "source_ckpt", "source_d", "affinity", "d_head", "recipe", "freeze_d"}  # meaningless with --init scratch
# a copy-paste command per mode for the line listing every missing flag ({}: the affinity, or a baseline's --recipe)
EXAMPLE = {"source": "--source ade20k --source-ckpt checkpoints/oasis_ade20k_pretrained {}--data folder --data-root my_data "
           "--n 100 --out runs/cat", "scratch": "--init scratch --data folder --data-root my_source_data --out runs/source"}
# flags a resumed run takes from its checkpoint and refuses to change
MODEL_FLAGS = ("recipe", "g_train", "init", "source", "source_root", "source_ckpt", "source_d", "which", "affinity", "data", "data_root",
               "n", "subset_seed", "size", "paths", "no_residual", "stages", "stage1_steps", "freeze_d", "d_head", "ema_warmup",
               "channels", "z_dim", "spade_hidden", "d_channels", "d_last", "batch", "seed", "lambda_labelmix")
# files and folders a run reads: never its --out (nor --data-root)
INPUT_FLAGS = ("source_ckpt", "source_d", "source_root", "affinity", "subset_file", "inception", "fid_features")


def get_args(argv=None):
    """(args, given): the parsed flags with their run-dependent defaults filled in, and the flags given."""
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", help="required: run folder: checkpoint.pt, best.pt, log.jsonl, curves.png, samples/, subset.txt")
    p.add_argument("--resume", action="store_true", help="continue <out>/checkpoint.pt exactly, with the run's own flags")
    p.add_argument("--overwrite", action="store_true", help="start afresh in --out: the files its earlier run recorded "
                   "(manifest.txt) are removed, nothing else")
    p.add_argument("--init", default="source", choices=["source", "scratch"],
                   help="source: CAT from a pretrained model; scratch: random G/D at the target classes, all layers trained "
                        "(how the toy source model is pretrained; not the paper's Table 8 'from scratch / random' row, which is "
                        "a source model with a random 1x1 input layer: --affinity none)")
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
                        "(§B) 'all layers in the SPADE blocks'; blocks: also the residual blocks' main-path convs (conv_0/1/s); "
                        "all: every G parameter incl. fc and conv_img")
    g.add_argument("--paths", default="separate", choices=["separate", "shared"], help="gamma/beta paths of the CAT layers")
    g.add_argument("--no-residual", action="store_true", help="drop the zero-initialised residual layers")
    g.add_argument("--stages", type=int, default=2, choices=[1, 2],
                   help="2: the paper's two stages (supplement §B); 1: the full parameter set from the start, for stage1+stage2 steps")
    g.add_argument("--stage1-steps", type=nonneg_int, default=2000, help="iterations training the CAT layers + SPADE gamma/beta convs "
                   "(this toolkit's default: the supplement gives no count)")
    g.add_argument("--stage2-steps", type=nonneg_int, default=3000, help="iterations training every SPADE-block layer (this toolkit's default; early stopping may end it sooner)")
    g.add_argument("--freeze-d", type=nonneg_int, default=2,
                   help="FreezeD: keep the first K encoder blocks of D frozen (not with --init scratch)")
    g.add_argument("--d-head", default=None, choices=["affinity", "random"],
                   help="D's N+1 head for the target classes. affinity: each target row the affinity's mix of the "
                        "source rows (CAT's, the default with an --affinity file); random: official init (the baselines')")
    g = p.add_argument_group("model widths (--init scratch; a source model brings its own, and a width given with "
                             "one must equal the source's)")
    g.add_argument("--channels", type=positive_int, default=None, help="G base width (official 64)")
    g.add_argument("--z-dim", type=nonneg_int, default=None, help="noise channels (official 64)")
    g.add_argument("--spade-hidden", type=positive_int, default=None, help="SPADE hidden width (official 128)")
    g.add_argument("--d-channels", type=int_list, default=None,
                   help="D encoder widths, comma separated: 3 (RGB), then one width per encoder block (at least two); "
                        "images must be multiples of 2^blocks (official 3,128,128,256,256,512,512)")
    g.add_argument("--d-last", type=positive_int, default=None, help="width of D's last decoder block (official 64)")
    g = p.add_argument_group("optimisation (official OASIS values unless said otherwise)")
    g.add_argument("--batch", type=positive_int, default=8, help="global batch size, split across torchrun ranks (this "
                   "toolkit's default, for 25 to 100 images on one GPU; official OASIS: 32, 20 for Cityscapes; the supplement gives none)")
    g.add_argument("--lr", type=positive_float, default=None,
                   help="generator learning rate (default: the paper's per target, supplement §C: 4e-4 for Cityscapes, else 1e-4)")
    g.add_argument("--lr-d", type=positive_float, default=None, help="discriminator learning rate (default 4e-4, official OASIS for every dataset)")
    g.add_argument("--lambda-labelmix", type=finite_float, default=None, help="LabelMix weight (default 10; 5 for Cityscapes)")
    g.add_argument("--ema-decay", type=decay_float, default=None,
                   help="EMA decay (default 0.9999 for ADE20K/COCO as the official runs, 0.999 otherwise)")
    g.add_argument("--ema-warmup", action="store_true", help="not official OASIS: decay min(--ema-decay, (1+step)/(10+step)) "
                   "(models/oasis.py ema_decay), so the EMA follows a short run from its start instead of keeping ~61%% of the "
                   "step-0 weights after 5,000 steps at 0.9999")
    g.add_argument("--bn-batches", type=positive_int, default=51, help="batches of the EMA BN-statistics pass (official 51)")
    g.add_argument("--seed", type=seed_int, default=0, help="the run's randomness: init, batch order, augmentation, "
                   "noise, each step's drawn from (seed, step)")
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
    g.add_argument("--amp", default="auto", choices=AMP_MODES, help=AMP_HELP)
    g.add_argument("--compile", action="store_true", help="torch.compile G and D")
    g.add_argument("--workers", type=nonneg_int, default=None, help="data loader workers (default 4 on CUDA, 0 on CPU)")
    args, given = run.parse_with_given(p, argv)
    # every missing flag at once, with a command to copy; --resume: the run's own settings, except what the
    # command line repeats (model and data flags must agree); otherwise the recipe's flags, unless given
    if args.resume:
        run.require_flags(args, ["out"], "python finetune_oasis.py --resume --out runs/cat")
        run.resumed_args(args, given, MODEL_FLAGS, ("oasis-cat",))
    else:
        for k, v in RECIPES[args.recipe].items() if args.init == "source" else ():
            setattr(args, k, getattr(args, k) if k in given else v)
        example = EXAMPLE[args.init].format("--affinity runs/aff/affinity.npy " if args.recipe == "cat" else
                                            f"--recipe {args.recipe} ")
        run.require_flags(args, ["out", "data"] + ["source", "source_ckpt", "affinity"] * (args.init == "source"),
                          "python finetune_oasis.py " + example)
    run.machine_flags(args)  # --device, --workers, --tensorboard
    if args.init == "scratch" and given & SOURCE_FLAGS:
        raise DataError(f"--init scratch trains a new model: --{min(given & SOURCE_FLAGS).replace('_', '-')} does not apply")
    args.lr = LR_BY_TARGET.get(args.data, 1e-4) if args.lr is None else args.lr
    args.lr_d = OASIS_LR_D if args.lr_d is None else args.lr_d
    args.lambda_labelmix = (5.0 if args.data == "cityscapes" else 10.0) if args.lambda_labelmix is None else args.lambda_labelmix
    if args.lambda_labelmix < 0:
        raise DataError(f"--lambda-labelmix {args.lambda_labelmix}: expected a weight >= 0 (0 turns LabelMix off)")
    for k, v in OASIS_WIDTHS.items() if args.init == "scratch" else ():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    d = args.d_channels
    if d is not None and (d[0] != 3 or len(d) < 3 or min(d) < 1):
        raise DataError(f"--d-channels {','.join(map(str, d))}: expected 3 (RGB) then at least two positive widths, "
                        "one per encoder block, e.g. 3,128,128,256,256,512,512")
    args.ema_decay = (0.9999 if args.data in ("ade20k", "coco") else 0.999) if args.ema_decay is None else args.ema_decay
    args.d_head = args.d_head or ("affinity" if args.affinity not in (None, "none", "learned") else "random")
    if args.d_head == "affinity" and args.affinity in (None, "none", "learned"):
        raise DataError("--d-head affinity needs an --affinity file")
    return args, given


def stage_of(step, args):
    """CAT's two finetuning stages: 1 for the first --stage1-steps iterations (CAT layers + SPADE gamma/beta
    convs), then 2 (--g-train's set: the SPADE modules by default). One stage (--stages 1, and --init scratch)
    trains the full set from the start."""
    return 2 if args.init == "scratch" or args.stages == 1 or step >= args.stage1_steps else 1


def stage_parameters(G, stage, args):
    """The generator parameters trained in `stage`: the paper's sets, or all of them (scratch, --g-train all)."""
    everything = stage == 2 and (args.init == "scratch" or args.g_train == "all")
    return list(G.parameters()) if everything else G.stage_parameters(stage, args.g_train)


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
    oasis.check_widths(src, {k: getattr(args, k) for k in OASIS_WIDTHS}, args.source_ckpt)  # none ignored
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


def gan_step(G, D, G_ema, optG, optD, y, real, lambda_labelmix, ema_decay, ctx, scalers=(None, None)):
    """One official iteration; returns the two losses (detached). G, D: the modules that train (DDP and/or
    compiled wrappers); optD's parameters are D's trainable ones; scalers: (G's, D's) models.amp.grad_scaler."""
    G_fwd, D_fwd = (m.module if isinstance(m, DDP) else m for m in (G, D))  # forwards outside DDP's gradient sync
    d_trainable = [p for group in optD.param_groups for p in group["params"]]
    for p in d_trainable:  # D's gradients from the G step would be thrown away: don't compute them
        p.requires_grad_(False)
    with ctx:
        fake = G(y)
        loss_G = oasis_train.generator_loss(D_fwd, fake, y)
    optG.zero_grad(set_to_none=True)
    backward_step(loss_G, optG, scalers[0])
    for p in d_trainable:
        p.requires_grad_(True)
    with ctx:
        with torch.no_grad():
            fake = G_fwd(y)  # train mode, fresh z, as the official D step
        loss_D, _ = oasis_train.discriminator_loss(D, real, fake, y, lambda_labelmix)
    optD.zero_grad(set_to_none=True)
    backward_step(loss_D, optD, scalers[1])
    oasis_train.ema_update(G_ema, getattr(G_fwd, "_orig_mod", G_fwd), ema_decay)  # the plain module under torch.compile
    return loss_G.detach(), loss_D.detach()


def wrap(G, D, stage, args, ddp, device):
    """(G, D) as gan_step trains them in this stage, whose generator parameters alone require grad (DDP
    registers the parameters that require grad)."""
    ids = {id(p) for p in stage_parameters(G, stage, args)}
    for p in G.parameters():
        p.requires_grad_(id(p) in ids)
    g, d = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)
    if ddp:
        ids = [device.index] if device.type == "cuda" else None
        g, d = DDP(g, device_ids=ids), DDP(d, device_ids=ids)
    return g, d


def bn_batches(train_ds, args, step, n_channels, device, mem):
    """One-hot label maps for the EMA BN pass at `step`: shuffled, augmented, full batches (as the official
    training loader), drawn from (--seed, step)."""
    seed = run.step_seed(args.seed, 3, step)
    keys = [run.batch_keys(seed, j, len(train_ds), args.batch) for j in range(args.bn_batches)]
    dl = torch.utils.data.DataLoader(run.Seeded(train_ds), batch_sampler=keys, num_workers=args.workers)
    return (data.onehot(b["label"].to(device), n_channels).contiguous(memory_format=mem) for b in dl)


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    args, given = get_args(argv)
    ddp, rank, world, device = run.init_distributed(args.device, args.batch)
    master, cuda = rank == 0, device.type == "cuda"
    data.check_data_args(args)
    inputs = run.flag_paths(args, INPUT_FLAGS, data.toy.task_root(args.data) if args.data in data.toy.TASKS else None)
    out = run.prepare_out(args.out, args.resume, args.overwrite, inputs) if master else Path(args.out)
    ckpt = run.load(out / "checkpoint.pt", "--resume", kinds=("oasis-cat",)) if args.resume else None
    amp = pick_amp(device, args.amp)  # what --amp means on this machine (a resumed run picks anew)
    ctx, scalers = autocast(device, amp), [grad_scaler(device, amp) for _ in "GD"]
    mem = torch.channels_last if cuda else torch.contiguous_format

    # data: a resumed n-shot run reads the subset it drew
    if ckpt is not None and args.n is not None:
        args.subset_file = str(out / "subset.txt")
    train_ds = data.dataset_from_args(args, "train", augment=True, out_dir=out if master and ckpt is None else None)
    val_ds = data.dataset_from_args(args, "val", augment=False)
    target = train_ds.classes
    data.check_labels(train_ds)
    data_fp = run.data_fingerprint(train_ds)  # a resumed run must train on the same files
    if ckpt is not None:  # the same classes and files as the run's
        run.check_data(ckpt, train_ds.classes, data_fp, args, data.compare_classes)

    # models: a fresh run builds them, a resumed one restores every tensor
    if ckpt is None:
        torch.manual_seed(args.seed)  # the random layers' init (the same on every rank)
        G, D, A, source_info = build_models(args, target, train_ds.size)
        G_ema = copy.deepcopy(G)
    else:
        G, D, G_ema = (oasis.Generator(**ckpt["G_kwargs"]), oasis.Discriminator(**ckpt["D_kwargs"]),
                       oasis.Generator(**ckpt["G_kwargs"]))
        for m, k in ((G, "G"), (D, "D"), (G_ema, "EMA")):
            m.load_state_dict(ckpt[k])
        A, source_info = ckpt["affinity"], ckpt["source"]
    if G.output_hw != train_ds.size:
        raise DataError(f"the generator makes {G.output_hw[0]}x{G.output_hw[1]} images, --data {args.data} gives "
                        f"{train_ds.size[0]}x{train_ds.size[1]} (--size)")
    scratch = args.init == "scratch"  # FreezeD (none from scratch), after D's depth is checked against the images
    D.freeze(0 if scratch else args.freeze_d, train_ds.size, "--d-channels" if scratch else "--source-ckpt")
    if ddp and cuda:  # global batch statistics, as the official multi-GPU runs; the EMA keeps plain BN (rank 0 runs it)
        G = torch.nn.SyncBatchNorm.convert_sync_batchnorm(G)
    G, D, G_ema = (m.to(device, memory_format=mem) for m in (G, D, G_ema))
    optG = torch.optim.Adam(stage_parameters(G, 2, args), lr=args.lr, betas=(0.0, 0.999))
    optD = torch.optim.Adam([p for p in D.parameters() if p.requires_grad], lr=args.lr_d, betas=(0.0, 0.999))
    step, best = 0, run.Best(args.patience)
    if ckpt is not None:
        run.restore_optimizer(optG, ckpt["optG"], args.lr)
        run.restore_optimizer(optD, ckpt["optD"], args.lr_d)
        restore_scalers(scalers, ckpt["scalers"])  # fp16 loss scales continue where they were
        step, best = ckpt["step"], run.Best.resume(ckpt, args)
        if master:
            curves.truncate_log(out / "log.jsonl", step)
    board = curves.Board(out, step) if args.tensorboard and master else None

    # evaluation: samples from metrics' sampler (EMA in eval mode, noise seeded per image, global RNG untouched)
    sample = metrics.oasis_sampler(G_ema, target.n_channels, amp)  # the generator under the run's autocast
    features_amp = "bf16" if cuda and amp == "bf16" else "fp32"  # the FID network's: bf16 on bf16 GPUs, as before
    grid = metrics.fixed_grid(val_ds, args.grid_n, lambda n: metrics.image_seeds(args.seed, 0, n, 0), device)
    fid = metrics.validation_fid(sample, val_ds, args.inception, args.fid_features, args.fid_n, out / "fid_cache",
                                 device, args.batch, args.seed, features_amp) if master else None
    if master:  # subset.txt, the FID cache: what --overwrite may remove
        run.record(out)
        if fid is None:
            run.no_fid_note(out)

    def evaluate_and_save(s):
        """BN pass on the EMA, grid, FID, then run.finish_evaluation (log line, curves, best.pt on a better FID,
        checkpoint.pt) on rank 0; on every rank: True when early stopping says stop."""
        if not master:
            return run.broadcast_stop(False, device)
        entry, better = {"step": s, "grid": f"samples/{s:06d}.png"}, False
        if s > 0:
            with ctx:
                oasis_train.recompute_bn_stats(G_ema, bn_batches(train_ds, args, s, target.n_channels, device, mem))
        metrics.sample_grid(sample, grid, out / "samples" / f"{s:06d}.png")
        if fid is not None:
            entry["fid"] = fid()
            better = best.update(entry["fid"], s)
            tqdm.write(best.line(s, entry["fid"]))
        state = {"kind": "oasis-cat", "format": run.FORMAT, "step": s, "args": vars(args), "amp": amp, "affinity": A,
                 "source": source_info, "data": data_fp, "target": data.table_info(target), "G_kwargs": G.kwargs,
                 "D_kwargs": D.kwargs, "G": G.state_dict(), "D": D.state_dict(), "EMA": G_ema.state_dict(),
                 "optG": optG.state_dict(), "optD": optD.state_dict(), "scalers": [sc.state_dict() for sc in scalers],
                 **best.state()}
        return run.finish_evaluation(out, state, entry, better, best, device, board)  # log, curves, best.pt, checkpoint

    # training
    total = args.stage1_steps + args.stage2_steps
    if master:
        print(f"{args.init}: {target.dataset} ({len(train_ds)} images, {target.n_channels} channels) from "
              f"{source_info['dataset']}; {total} steps, batch {args.batch} on {world} x {device}, {amp}")
        if step == 0:  # the recipe, then the model before training (training-free CAT)
            curves.append_log(out / "log.jsonl", {"step": 0, "recipe": args.recipe, "flags": {
                k: getattr(args, k) for k in ("affinity", "stages", "g_train", "no_residual", "freeze_d", "d_head", "lr")}})
            metrics.sample_grid(sample, grid, out / "samples" / f"{0:06d}.png")
            run.record(out)
        else:
            print(f"resuming from step {step} of {total} ({out / 'checkpoint.pt'})")
    stage, stop, t0, last_saved = None, False, time.time(), step if args.resume else None  # last checkpoint's step
    bar = tqdm(total=total, initial=step, disable=not master, dynamic_ncols=True)
    batches = run.loader(train_ds, args.seed, args.batch, rank, world, step, args.workers, device)
    try:
        for batch in (batches if step < total else ()):
            if stage_of(step, args) != stage:
                stage = stage_of(step, args)
                G_train, D_train = wrap(G, D, stage, args, ddp, device)
            y = data.onehot(batch["label"].to(device, non_blocking=True), target.n_channels).contiguous(memory_format=mem)
            real = batch["image"].to(device, non_blocking=True).contiguous(memory_format=mem)
            run.seed_step(args.seed, step, rank)  # z, LabelMix: from (seed, step), so resumes are exact
            losses = torch.stack(gan_step(G_train, D_train, G_ema, optG, optD, y, real, args.lambda_labelmix,
                                          oasis_train.ema_decay(step, args.ema_decay, args.ema_warmup), ctx, scalers)).float()
            step += 1
            lg, ld = run.mean_over_ranks(losses, world).tolist()  # a NaN anywhere stops every rank at the same step
            if not torch.isfinite(losses).all():
                bar.close()
                where = f"{out / 'checkpoint.pt'} (step {last_saved})" if last_saved is not None else "none saved yet"
                raise DataError(f"loss is not finite at step {step} (G {lg}, D {ld}); stopped. Last good checkpoint: {where}")
            bar.update(1)
            bar.set_postfix(stage=stage, G=f"{lg:.3f}", D=f"{ld:.3f}")
            if master and (step % args.log_every == 0 or step == total):
                curves.append_log(out / "log.jsonl", {"step": step, "stage": stage, "loss_G": lg, "loss_D": ld,
                                                   "sec": round(time.time() - t0, 3)})
            if step % args.eval_every == 0 or step == total:
                stop, last_saved = evaluate_and_save(step), step
                if stop and master:
                    print(f"early stop at step {step}: no better FID in {args.patience} evaluations")
            if stop or step >= total:
                break
    except KeyboardInterrupt:  # Ctrl-C: one line saying where the run can continue from (models.cli prints it)
        raise run.interrupted("finetune_oasis.py", args, given, last_saved) from None
    bar.close()
    if step == 0 and total == 0:  # training-free: save the model as built
        evaluate_and_save(0)
    if master:
        print(f"done: {out / 'checkpoint.pt'} (step {step})" + best.summary(out / "best.pt"))
    run.finish(ddp)
    return G, D, G_ema


if __name__ == "__main__":
    cli(main)
