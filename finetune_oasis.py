"""Finetune a pretrained OASIS generator on a few target images with Class Affinity Transfer (CAT).

    # CAT: source model + affinity (from estimate_affinity.py) + 100 target images
    python finetune_oasis.py --source ade20k --source-ckpt checkpoints/oasis_ade20k_pretrained \
        --affinity runs/aff/affinity.npy --data folder --data-root my_data --n 100 --out runs/cat
    # the toy task: pretrain a small source model from scratch, then transfer it (issue 6)
    python finetune_oasis.py --init scratch --data toy-source --channels 16 --spade-hidden 32 \
        --d-channels 3,32,32,64,64,128,128 --d-last 32 --stage2-steps 20000 --out runs/toy_source
    python finetune_oasis.py --source toy-source --source-ckpt runs/toy_source/checkpoint.pt \
        --affinity runs/aff/affinity.npy --data toy-target --n 100 --out runs/toy_cat
    # several GPUs (the batch is global and split across the ranks)
    torchrun --nproc_per_node 4 finetune_oasis.py ...

Training follows the official OASIS recipe (Adam betas (0, 0.999), lr_D = 4 lr_G, N+1 class-balanced
loss, LabelMix, EMA with a BN-statistics pass before every evaluation and save; per iteration: G step,
D step, EMA). The paper's schedule: stage 1 trains the CAT layers and the SPADE gamma/beta convs,
stage 2 every SPADE-block layer. Every `--eval-every` steps (and at the end) the EMA's BN statistics
are re-estimated, a sample grid is written, FID is computed when a feature network is given, and
<out>/checkpoint.pt is saved (atomically); `--resume` continues that run exactly.
"""
import argparse
import copy
import hashlib
import json
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from models import DataError, cli
import metrics
from models import oasis

OFFICIAL = ("coco", "ade20k", "cityscapes")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, log.jsonl, samples/, subset.txt")
    p.add_argument("--resume", action="store_true", help="continue <out>/checkpoint.pt exactly (same flags, more steps allowed)")
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
                   help="affinity.npy (target classes x source classes) from estimate_affinity.py, or 'none' for the "
                        "'random first layer' baseline (the CAT 1x1 layers keep their random init)")
    data.add_data_args(p)
    g = p.add_argument_group("CAT variants (paper Table 10)")
    g.add_argument("--paths", default="separate", choices=["separate", "shared"], help="gamma/beta paths of the CAT layers")
    g.add_argument("--no-residual", action="store_true", help="drop the zero-initialised residual layers")
    g.add_argument("--stages", type=int, default=2, choices=[1, 2],
                   help="2: the paper's schedule; 1: stage-1 parameters only, for stage1+stage2 steps (equal budget)")
    g.add_argument("--stage1-steps", type=int, default=2000, help="iterations training the CAT layers + SPADE gamma/beta convs")
    g.add_argument("--stage2-steps", type=int, default=3000, help="iterations training every SPADE-block layer")
    g.add_argument("--freeze-d", type=int, default=2,
                   help="FreezeD: keep the first K encoder blocks of D frozen (not with --init scratch)")
    g.add_argument("--d-head", default=None, choices=["affinity", "reinit"],
                   help="D's N+1 head for the target classes: built through the affinity (default when one is given) or fresh")
    g = p.add_argument_group("model widths (--init scratch only; a source model brings its own)")
    g.add_argument("--channels", type=int, default=64, help="G base width (official 64)")
    g.add_argument("--z-dim", type=int, default=64)
    g.add_argument("--spade-hidden", type=int, default=128)
    g.add_argument("--d-channels", default="3,128,128,256,256,512,512", help="D encoder widths, comma separated")
    g.add_argument("--d-last", type=int, default=64, help="width of D's last decoder block")
    g = p.add_argument_group("optimisation (official OASIS values by default)")
    g.add_argument("--batch", type=int, default=8, help="global batch size (split across torchrun ranks)")
    g.add_argument("--lr", type=float, default=1e-4, help="generator learning rate")
    g.add_argument("--lr-d", type=float, default=None, help="discriminator learning rate (default 4 x --lr)")
    g.add_argument("--lambda-labelmix", type=float, default=None, help="LabelMix weight (default 10; 5 for Cityscapes)")
    g.add_argument("--ema-decay", type=float, default=None,
                   help="EMA decay (default 0.9999 for ADE20K/COCO as the official runs; 0.999 otherwise: short runs)")
    g.add_argument("--bn-batches", type=int, default=51, help="batches of the EMA BN-statistics pass (official 51)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-every", type=int, default=500, help="BN pass + grid + FID + checkpoint every N steps")
    g.add_argument("--log-every", type=int, default=10, help="log.jsonl line every N steps")
    g.add_argument("--grid-n", type=int, default=8, help="rows of the sample grid (fixed val labels and noise)")
    g.add_argument("--inception", default=None, help="pt_inception-2015-12-05-6726825d.pth: early stopping on val FID")
    g.add_argument("--fid-features", default=None, help="TorchScript feature net (toy-domain FID) instead of Inception")
    g.add_argument("--fid-n", type=int, default=None, help="val images used for FID (default all)")
    g.add_argument("--patience", type=int, default=5, help="stop after N evaluations without a better FID")
    g = p.add_argument_group("speed")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--amp", default="bf16", choices=["bf16", "fp32"], help="autocast dtype on CUDA (CPU always fp32)")
    g.add_argument("--compile", action="store_true", help="torch.compile G and D")
    g.add_argument("--workers", type=int, default=None, help="data loader workers (default 4 on CUDA, 0 on CPU)")
    args = p.parse_args(argv)
    if args.init == "source":
        for flag in ("source", "source_ckpt", "affinity"):
            if getattr(args, flag) is None and not args.resume:
                raise DataError(f"--init source needs --{flag.replace('_', '-')} (or use --init scratch)")
    args.lr_d = args.lr_d if args.lr_d is not None else 4 * args.lr
    if args.lambda_labelmix is None:
        args.lambda_labelmix = 5.0 if args.data == "cityscapes" else 10.0
    if args.ema_decay is None:
        args.ema_decay = 0.9999 if args.data in ("ade20k", "coco") else 0.999
    if args.d_head is None:
        args.d_head = "affinity" if args.affinity not in (None, "none") else "reinit"
    if args.d_head == "affinity" and args.affinity in (None, "none"):
        raise DataError("--d-head affinity needs an --affinity file")
    args.d_channels = [int(c) for c in str(args.d_channels).split(",")]
    if args.workers is None:
        args.workers = 4 if args.device.startswith("cuda") else 0
    return args


# ----------------------------------------------------------------------------------------------
# Inputs: source checkpoint, affinity


def load_source(args, source_table):
    """(G kwargs, D kwargs, G state, D state) of the source model, with one-line errors."""
    path = Path(args.source_ckpt)
    if not path.exists():
        raise DataError(f"{path}: source checkpoint not found (the official OASIS checkpoints, oasis_{{ade20k,coco,cityscapes}}_pretrained.zip, are linked in the README of github.com/boschresearch/OASIS)")
    if path.is_file():
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # not a torch file, or pickled objects: one line, not a traceback
            raise DataError(f"{path}: not a weights-only torch checkpoint ({type(e).__name__})")
        if isinstance(ckpt, dict) and "kind" in ckpt:  # ours
            if ckpt["kind"] != "oasis-cat":
                raise DataError(f"{path}: a '{ckpt['kind']}' checkpoint; expected an OASIS model")
            if ckpt["G_kwargs"].get("cat_nc") is not None:
                raise DataError(f"{path}: already has CAT layers; a source model is a plain OASIS model "
                                 f"(continue a CAT run with --resume)")
            got = ckpt["target"]
            if got["dataset"] != source_table.dataset or got["n_channels"] != source_table.n_channels:
                raise DataError(f"{path}: trained on {got['dataset']} ({got['n_channels']} label channels), "
                                 f"--source {source_table.dataset} expects {source_table.n_channels}")
            return ckpt["G_kwargs"], ckpt["D_kwargs"], ckpt["EMA"], ckpt["D"]
    if args.source not in OFFICIAL:
        raise DataError(f"{path}: official OASIS checkpoints exist for {', '.join(OFFICIAL)} only; "
                         f"for --source {args.source} pass a checkpoint.pt of this script")
    G_kwargs, D_kwargs = oasis.oasis_config(args.source)
    if path.is_dir():
        G_sd = oasis.load_official(path, "EMA", args.which)
        D_sd = oasis.load_official(path, "D", args.which)
    else:
        if args.source_d is None:
            raise DataError(f"{path} is a single generator file; pass the run dir or --source-d <..._D.pth> too")
        G_sd, D_sd = oasis.load_official(path), oasis.load_official(args.source_d)
    return G_kwargs, D_kwargs, G_sd, D_sd


def load_affinity(path, target_table, source_table):
    """affinity.npy -> (A float32 tensor, channel-space matrix M)."""
    if not Path(path).is_file():
        raise DataError(f"{path}: affinity file not found (write one with estimate_affinity.py)")
    try:
        A = np.load(path)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a .npy array ({e})")
    if A.ndim != 2:
        raise DataError(f"{path}: affinity has shape {A.shape}, expected ({len(target_table)}, {len(source_table)}) "
                         f"= ({target_table.dataset} classes, {source_table.dataset} classes)")
    try:
        M = data.affinity_to_channels(A, target_table, source_table)
    except data.DataError as e:
        raise DataError(f"{path}: {e}")
    sums = A.sum(1)
    if not np.allclose(sums, 1, atol=1e-3):
        k = int(np.argmax(np.abs(sums - 1)))
        raise DataError(f"{path}: row {k} ({target_table.display[k]}) sums to {sums[k]:.4f}, expected rows summing to 1")
    return torch.as_tensor(A, dtype=torch.float32), M


def check_labels(ds, what):
    """Read every label file once so that a bad id fails here, in one line, not inside a loader worker."""
    for _, lbl in ds.files:
        data.label_channels(np.asarray(Image.open(lbl)), ds.dataset, ds.n_channels, lbl)
    if ds.size[0] % 64 or ds.size[1] % 64:
        raise DataError(f"{what} images are {ds.size[0]}x{ds.size[1]}; OASIS's discriminator needs multiples of 64 (--size)")


def table_info(t):
    return {"dataset": t.dataset, "names": list(t.names), "n_channels": t.n_channels}


# ----------------------------------------------------------------------------------------------
# Data: every batch is a pure function of (seed, epoch, position), so resuming replays nothing.


class Seeded(torch.utils.data.Dataset):
    """Each item's augmentation (Python `random`, as the official loaders) is seeded from its key."""

    def __init__(self, ds, seed):
        self.ds, self.seed = ds, seed

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        salt, i = key
        state = random.getstate()
        random.seed(f"{self.seed}/{salt}/{i}")
        item = self.ds[i]
        random.setstate(state)
        return item


def epoch_batches(n_items, batch, seed, salt, rank, world):
    """This rank's share of one shuffled epoch (drop_last, as the official train loader)."""
    perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(hash_seed(seed, salt))).tolist()
    return [[(salt, i) for i in perm[k * batch:(k + 1) * batch][rank::world]] for k in range(n_items // batch)]


def hash_seed(*parts):
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


class Batches:
    """Endless batches from iteration `start` on: epoch e is epoch_batches(..., salt=e), as if never stopped."""

    def __init__(self, n_items, batch, seed, rank, world, start):
        self.n_items, self.batch, self.seed, self.rank, self.world, self.start = n_items, batch, seed, rank, world, start

    def __iter__(self):
        epoch, k = divmod(self.start, self.n_items // self.batch)
        while True:
            yield from epoch_batches(self.n_items, self.batch, self.seed, epoch, self.rank, self.world)[k:]
            epoch, k = epoch + 1, 0


# ----------------------------------------------------------------------------------------------
# One training iteration: G step, D step, EMA (the official order)


def train_step(nets, optG, optD, d_trainable, y, real, lambda_labelmix, ema_decay, ctx):
    """One official iteration; returns the two losses (detached).

    nets: 'G', 'D' train (DDP and/or compiled wrappers); 'G_fwd', 'D_fwd' the same modules without DDP
    (the D step's fake images, D inside the G loss); 'G_raw' the plain module the EMA follows."""
    G, D, EMA = nets["G"], nets["D"], nets["EMA"]
    for p in d_trainable:  # D's gradients from the G step would be thrown away: don't compute them
        p.requires_grad_(False)
    with ctx:
        fake = G(y)
        loss_G = oasis.generator_loss(nets["D_fwd"], fake, y)
    optG.zero_grad(set_to_none=True)
    loss_G.backward()
    optG.step()
    for p in d_trainable:
        p.requires_grad_(True)
    with ctx:
        with torch.no_grad():
            fake = nets["G_fwd"](y)  # train mode, fresh z, as the official D step
        loss_D, _ = oasis.discriminator_loss(D, real, fake, y, lambda_labelmix)
    optD.zero_grad(set_to_none=True)
    loss_D.backward()
    optD.step()
    oasis.ema_update(EMA, nets["G_raw"], ema_decay)
    return loss_G.detach(), loss_D.detach()


def set_stage(G, stage, scratch):
    """Only this stage's generator parameters require grad (all of them from scratch)."""
    ids = {id(p) for p in (G.parameters() if scratch else G.stage_parameters(stage))}
    for p in G.parameters():
        p.requires_grad_(id(p) in ids)


# ----------------------------------------------------------------------------------------------
# Evaluation helpers


def save_checkpoint(obj, path):
    tmp = str(path) + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    """Every global RNG, as plain lists and tensors (weights_only loading accepts nothing else)."""
    np_state, py_state = np.random.get_state(), random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    np.random.set_state((s["numpy"][0], s["numpy"][1].numpy().astype(np.uint32), *s["numpy"][2:]))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    out = Path(args.out)
    ddp = "RANK" in os.environ
    if ddp:
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    master = rank == 0
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.batch % world:
        raise DataError(f"--batch {args.batch} must be a multiple of the {world} ranks")
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and args.amp == "bf16" else nullcontext()
    mem = torch.channels_last if cuda else torch.contiguous_format

    ckpt = None
    if args.resume:
        path = out / "checkpoint.pt"
        if not path.is_file():
            raise DataError(f"{path}: nothing to resume")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        for k in ("init", "data", "n", "subset_seed", "batch", "seed", "source", "affinity", "stages", "stage1_steps",
                  "freeze_d"):
            if ckpt["args"].get(k) != getattr(args, k) and not (k in ("source", "affinity") and getattr(args, k) is None):
                raise DataError(f"--resume: --{k.replace('_', '-')} is {getattr(args, k)!r}, the run in {out} used "
                                 f"{ckpt['args'].get(k)!r}")
        args.subset_file = str(out / "subset.txt")

    # Data
    train_ds = data.dataset_from_args(args, "train", augment=True, out_dir=out if master and not args.resume else None)
    val_ds = data.dataset_from_args(args, "val", augment=False)
    target = train_ds.classes
    if len(train_ds) < args.batch:
        raise DataError(f"--batch {args.batch} is larger than the {len(train_ds)} training images (--n)")
    check_labels(train_ds, f"--data {args.data}")
    scratch = args.init == "scratch"

    # Models
    A, M = None, None
    if ckpt is not None:
        G = oasis.Generator(**ckpt["G_kwargs"])
        D = oasis.Discriminator(**ckpt["D_kwargs"])
        A = ckpt["affinity"]
        source_info = ckpt["source"]
    elif scratch:
        H, W = train_ds.size
        G = oasis.Generator(target.n_channels, z_dim=args.z_dim, channels=args.channels, spade_hidden=args.spade_hidden,
                            crop_size=W, aspect_ratio=W / H)
        D = oasis.Discriminator(target.n_channels, channels=tuple(args.d_channels), last_width=args.d_last)
        source_info = table_info(target)
    else:
        source_table = data.class_table(args.source, args.source_root)
        G_kwargs, D_kwargs, G_sd, D_sd = load_source(args, source_table)
        G = oasis.Generator(**{**G_kwargs, "cat_nc": target.n_channels, "cat_paths": args.paths,
                               "cat_residual": not args.no_residual})
        G.load_source(G_sd, args.source_ckpt, f"--source {args.source}")
        D = oasis.Discriminator(**D_kwargs)
        oasis.check_state_dict(D, D_sd, args.source_d or args.source_ckpt, f"--source {args.source}")
        if args.affinity != "none":
            A, M = load_affinity(args.affinity, target, source_table)
            G.set_affinity(M)
        D.retarget(target.n_channels, M if args.d_head == "affinity" else None)
        source_info = table_info(source_table)
        del G_sd, D_sd
    if G.output_hw != train_ds.size:
        raise DataError(f"the generator makes {G.output_hw[0]}x{G.output_hw[1]} images, --data {args.data} gives "
                         f"{train_ds.size[0]}x{train_ds.size[1]} (--size)")
    EMA = copy.deepcopy(G) if ckpt is None else oasis.Generator(**ckpt["G_kwargs"])
    if ckpt is not None:
        G.load_state_dict(ckpt["G"])
        D.load_state_dict(ckpt["D"])
        EMA.load_state_dict(ckpt["EMA"])
    frozen = [p for block in D.blocks_for_freeze()[:args.freeze_d] for p in block.parameters()] if not scratch else []
    frozen_ids = {id(p) for p in frozen}
    d_trainable = [p for p in D.parameters() if id(p) not in frozen_ids]
    for p in frozen:
        p.requires_grad_(False)
    if ddp and cuda:  # global batch statistics, as the official multi-GPU runs; EMA keeps plain BN (rank 0 runs it)
        G = torch.nn.SyncBatchNorm.convert_sync_batchnorm(G)
    # (SyncBatchNorm is CUDA-only: under gloo on CPU each rank normalises with its own batch statistics)
    G_raw, D_raw, EMA = (m.to(device, memory_format=mem) for m in (G, D, EMA))
    del G, D  # from here on: G_raw/D_raw are the modules, train_step gets their wrappers
    g_params = list(G_raw.parameters()) if scratch else G_raw.stage_parameters(2)
    optG = torch.optim.Adam(g_params, lr=args.lr, betas=(0.0, 0.999))
    optD = torch.optim.Adam(d_trainable, lr=args.lr_d, betas=(0.0, 0.999))
    step, best_fid, bad_evals = 0, None, 0
    if ckpt is not None:
        optG.load_state_dict(ckpt["optG"])
        optD.load_state_dict(ckpt["optD"])
        for opt, lr in ((optG, args.lr), (optD, args.lr_d)):  # the command line's rates, e.g. to continue slower
            for group in opt.param_groups:
                group["lr"] = lr
        step, best_fid, bad_evals = ckpt["step"], ckpt["best_fid"], ckpt["bad_evals"]
        rngs = ckpt["rng"]
        if len(rngs) == world:  # another number of ranks cannot replay the same draws: keep the fresh seeds
            set_rng_state(rngs[rank])
        ckpt = None
    total = args.stage1_steps + args.stage2_steps

    def stage_of(s):
        return 1 if (args.stages == 1 or s < args.stage1_steps) and not scratch else 2

    def wrap(stage):
        """The networks of train_step for this stage (DDP registers the parameters that require grad)."""
        set_stage(G_raw, stage, scratch)
        g, d = (torch.compile(G_raw), torch.compile(D_raw)) if args.compile else (G_raw, D_raw)
        nets = {"G": g, "D": d, "G_fwd": g, "D_fwd": d, "G_raw": G_raw, "EMA": EMA}
        if ddp:
            nets["G"] = DDP(g, device_ids=[device.index] if cuda else None)
            nets["D"] = DDP(d, device_ids=[device.index] if cuda else None)
        return nets

    # Samples come from the metrics sampler: EMA in eval mode, noise seeded per image, global RNG untouched
    bf16 = cuda and args.amp == "bf16"
    sample = metrics.oasis_sampler(EMA, target.n_channels, bf16)
    grid_items = [val_ds[i] for i in range(min(args.grid_n, len(val_ds)))]
    grid = {"label": torch.stack([it["label"] for it in grid_items]).to(device),
            "real": torch.stack([it["image"] for it in grid_items]), "n_channels": target.n_channels,
            "seeds": metrics.image_seeds(args.seed, 0, len(grid_items), 0)}
    train_items = Seeded(train_ds, args.seed)

    def bn_batches(s):
        """One-hot label maps for the EMA BN pass at step s: shuffled, augmented, full batches (as the
        official training loader), over as many epochs as --bn-batches needs."""
        keys, epoch = [], 0
        while len(keys) < args.bn_batches:
            keys += epoch_batches(len(train_ds), args.batch, args.seed, f"bn{s}.{epoch}", 0, 1)
            epoch += 1
        dl = torch.utils.data.DataLoader(train_items, batch_sampler=keys[:args.bn_batches], num_workers=args.workers,
                                         generator=torch.Generator().manual_seed(s))
        return (data.onehot(b["label"].to(device), target.n_channels).contiguous(memory_format=mem) for b in dl)

    fid = None
    if master and (args.inception or args.fid_features):
        net = metrics.load_feature_net(args.inception, args.fid_features, device)
        fid_ds = copy.copy(val_ds)
        fid_ds.files = val_ds.files[:args.fid_n]
        fid_real = metrics.real_stats(fid_ds, net, cache_dir=out / "fid_cache", device=device, bf16=bf16)[:2]

        def fid():
            return metrics.generator_fid(sample, fid_ds, net, fid_real, device, args.batch, args.seed, bf16)

    def evaluate_and_save(s):
        """BN pass on the EMA, grid, FID, checkpoint; returns True when early stopping says stop."""
        nonlocal best_fid, bad_evals
        stop = False
        if master:
            if s > 0:
                with ctx:
                    oasis.recompute_bn_stats(EMA, bn_batches(s))
            metrics.sample_grid(sample, grid, out / "samples" / f"{s:06d}.png")
            entry = {"step": s, "grid": f"samples/{s:06d}.png"}
            better = False
            if fid is not None:
                entry["fid"] = fid()
                better = best_fid is None or entry["fid"] < best_fid
                best_fid, bad_evals = (entry["fid"], 0) if better else (best_fid, bad_evals + 1)
                stop = bad_evals >= args.patience
        if ddp:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state())
        elif master:
            rngs = [rng_state()]
        if master:
            state = {"kind": "oasis-cat", "step": s, "args": vars(args), "affinity": A, "source": source_info,
                     "target": table_info(target), "G_kwargs": G_raw.kwargs, "D_kwargs": D_raw.kwargs,
                     "G": G_raw.state_dict(), "D": D_raw.state_dict(), "EMA": EMA.state_dict(),
                     "optG": optG.state_dict(), "optD": optD.state_dict(), "rng": rngs,
                     "best_fid": best_fid, "bad_evals": bad_evals}
            save_checkpoint(state, out / "checkpoint.pt")
            if better:
                save_checkpoint(state, out / "best.pt")
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
        if ddp:
            flag = torch.tensor([int(stop)], device=device)
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        return stop

    if master:
        out.mkdir(parents=True, exist_ok=True)
        print(f"{args.init}: {target.dataset} ({len(train_ds)} images, {target.n_channels} channels) from "
              f"{source_info['dataset']}; {total} steps, batch {args.batch} on {world} x {device}")
        if step == 0:
            metrics.sample_grid(sample, grid, out / "samples" / f"{0:06d}.png")  # the model before training (training-free CAT)
    last_saved = step if args.resume else None
    stage = None
    bar = tqdm(total=total, initial=step, disable=not master, dynamic_ncols=True)
    t0 = time.time()
    # One loader for the whole run. Its own generator: a DataLoader iterator otherwise draws a seed from the
    # global RNG, and a resumed run (which opens it after restoring that RNG) would drift from an uninterrupted one.
    batches = Batches(len(train_ds), args.batch, args.seed, rank, world, start=step)
    train_loader = torch.utils.data.DataLoader(train_items, batch_sampler=batches, num_workers=args.workers,
                                               pin_memory=cuda, generator=torch.Generator().manual_seed(args.seed))
    if step < total:
        for batch in train_loader:
            if stage_of(step) != stage:
                stage = stage_of(step)
                nets = wrap(stage)
            y = data.onehot(batch["label"].to(device, non_blocking=True), target.n_channels).contiguous(memory_format=mem)
            real = batch["image"].to(device, non_blocking=True).contiguous(memory_format=mem)
            loss_G, loss_D = train_step(nets, optG, optD, d_trainable, y, real, args.lambda_labelmix,
                                        args.ema_decay, ctx)
            step += 1
            losses = torch.stack([loss_G, loss_D]).float()
            if ddp:  # log the mean over ranks; a NaN anywhere stops every rank at the same step
                dist.all_reduce(losses)
                losses /= world
            lg, ld = losses.tolist()
            if not (math.isfinite(lg) and math.isfinite(ld)):
                bar.close()
                where = f"{out / 'checkpoint.pt'} (step {last_saved})" if last_saved is not None else "none saved yet"
                raise DataError(f"loss is not finite at step {step} (G {lg}, D {ld}); stopped. Last good checkpoint: {where}")
            bar.update(1)
            bar.set_postfix(stage=stage, G=f"{lg:.3f}", D=f"{ld:.3f}")
            if master and (step % args.log_every == 0 or step == total):
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "stage": stage, "loss_G": lg, "loss_D": ld,
                                        "sec": round(time.time() - t0, 3)}) + "\n")
            if step % args.eval_every == 0 or step == total:
                last_saved = step
                if evaluate_and_save(step):
                    if master:
                        print(f"early stop at step {step}: no better FID in {args.patience} evaluations")
                    break
            if step >= total:
                break
    if step == 0 and total == 0:  # training-free: save the model as built
        evaluate_and_save(0)
    bar.close()
    if master:
        print(f"done: {out / 'checkpoint.pt'} (step {step})" + (f", best FID {best_fid:.2f}" if best_fid is not None else ""))
    if ddp:
        dist.destroy_process_group()
    return G_raw, D_raw, EMA


if __name__ == "__main__":
    cli(main)
