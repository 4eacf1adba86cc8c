r"""Evaluate a generator, or two folders of images: FID, KID, mIoU, sample PNGs and a grid; or generate images
from label maps alone.

    # a checkpoint of ours (finetune_oasis.py / finetune_piti.py) on the toy task's validation maps
    python evaluate.py --ckpt runs/x/checkpoint.pt --data toy-target --split val --out out/eval \
        --fid-features toy_features.pt --segmenter toy_segmenter.pt
    # training-free CAT: an official OASIS run dir (or our source checkpoint) + an affinity
    python evaluate.py --ckpt checkpoints/oasis_ade20k_pretrained --source ade20k --affinity affinity.npy \
        --data folder --data-root my_data --out out/eval --inception pt_inception-2015-12-05-6726825d.pth
    # images from label maps alone (no metric): DIR holds label PNGs (flat or in subfolders) and classes.txt
    python evaluate.py --ckpt runs/x/best.pt --labels DIR --out out/gen
    # two folders, no model (pytorch-fid's `fid_score` on two paths, plus KID); without --inception the
    # Inception file comes from the torch hub cache, downloaded there once (models/weights.py)
    python evaluate.py --real-dir A --fake-dir B --out out/fid

Protocol (also written into results.json):
- Generation: the EMA generator in eval mode, one image per label map (K with --samples-per-map); image k
  of map i uses its own noise, seeded by (--seed, i, k), so results do not depend on --batch (PITI too:
  each image has its own noise stream through the base and the upsampler, metrics.piti_sampler).
- FID: the 2048-d pool3 features of the FID Inception (pt_inception-2015-12-05-6726825d.pth, as
  pytorch-fid 0.3.0 and OASIS): input in [0, 1], resized bilinearly (align_corners=False) to 299x299,
  mapped to [-1, 1]; mean and covariance (np.cov, 1/(N-1)) in float64; the Frechet distance with
  scipy's sqrtm, retried with eps*I on non-finite results, the real part kept when the imaginary
  diagonal is below 1e-3 (else an error), exactly as pytorch-fid; scipy's warnings on singular
  covariances (no more images than feature dimensions) become one warning line after the scores. As in
  OASIS, real images are the preprocessed validation images and generated images are scored as floats,
  not quantised PNGs.
  --fid-features FILE replaces Inception by a TorchScript feature net: a toy-domain FID that is not
  comparable to Inception FID (results.json says so).
- KID: unbiased MMD^2 with the kernel (x.y/d + 1)^3, over 100 random subsets of min(1000, N) images
  from each side; mean and std over the subsets. Being unbiased, it can be slightly negative when the two
  sets are close (or few); with N <= 1000 every subset holds all images, so the std is 0 (no spread).
- mIoU: a segmenter on the generated images at the generated resolution: the paper's (--segmenter deeplabv2 /
  upernet101 / drn105, official weights, models/segmenters.py) or a TorchScript file; labels
  nearest-resized (legacy 'nearest') to that resolution; dontcare pixels (channel 0) ignored and
  channel 0 never predicted; one confusion matrix over the whole split; IoU of a class with an empty
  union is undefined and left out of the mean. The same segmenter on the real images gives miou_real.
- PNGs: uint8 = round(255 (x+1)/2), clamped (the official OASIS test.py truncates instead).
- Precision (--amp, models/amp.py): on CUDA the generator and the segmenter run under bf16 autocast, fp16 on
  GPUs without bf16 (compute capability < 8.0); fp32 on the CPU unless --amp bf16. The FID/KID network runs
  in fp32 (cuDNN's default TF32, as pytorch-fid) unless --bf16-features; bench/bench_fid.py measures what
  bf16 does to FID (allowed: 0.1% relative) and the speed-up.
- Sizes: generated and real images must have one size; a generator whose output size differs from the
  preprocessed real images (e.g. a 64-px toy model on folder data read at the default 256 px) is refused
  with a line naming the --size to pass, never scored across resolutions. --labels: each map is
  nearest-resized to the model's size and its image resized back (bilinear, antialiased) to the map's size.
- Real statistics are cached in --stats-cache, keyed by every image and label file's path, size and
  mtime, the preprocessing and the feature network; a cache hit prints "real statistics: cached FILE".
- Files: --out may not be, contain or lie inside an input folder; a rerun removes only the files listed
  in the manifest of the earlier run (manifest.txt), nothing else.

The metrics themselves live in metrics.py (FID, KID, mIoU, generation, label maps, grids), the FID Inception
in models/inception.py.
"""
import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models import ArgumentParser, DataError, HelpFormatter, cli, run, nonneg_int, positive_int
from models.amp import HELP as AMP_HELP, MODES as AMP_MODES, pick as pick_amp
from data import add_data_args, check_labels, class_table, compare_classes, dataset_from_args, load_affinity
from metrics import (LabelMaps, Said, channel_names, check_sizes, confusion,
                     describe_features, embed, fid_lines, fid_metrics, generate, grid_titles, label_maps, legend_of,
                     load_feature_net, load_segmenter, miou_results, model_classes, oasis_sampler, output_names,
                     piti_sampler, provenance, real_stats, resize_images, save_grid, score_folders, segment,
                     to_uint8)
from models.diffusion import check_respacing
from models.inception import INCEPTION_FILE
from models.oasis import Generator, check_state_dict, load_source
from models.palette import palette
from models.segmenters import DEFAULT_SEGMENTER

PROTOCOL = {  # the module docstring in short, written into results.json
    "generation": "EMA generator in eval mode; image k of label map i from noise seeded by (seed, i, k)",
    "fid_inputs": "model mode: the preprocessed real images and the generated images as floats (x+1)/2, not "
                  "quantised (OASIS); folder mode: PNG/JPEG files read with PIL as RGB, uint8/255 (pytorch-fid)",
    "fid": "Inception input resized bilinearly (align_corners=False) to 299x299, mapped to 2x-1, 2048-d pool3 "
           "(or the --fid-features net's output); float64 mean and np.cov; Frechet distance with scipy's sqrtm "
           "as pytorch-fid 0.3.0",
    "kid": "unbiased MMD^2, kernel (x.y/d+1)^3, 100 subsets of min(1000, N) images per side; mean and std (an "
           "unbiased estimate: may be slightly negative; std 0 when every subset holds all N <= 1000 images)",
    "miou": "segmenter on the generated images at the generated resolution; labels nearest-resized; dontcare "
            "(channel 0) ignored and never predicted; one confusion matrix per split; classes with an empty "
            "union left out of the mean; Cityscapes scores its 19 evaluation classes and ignores void pixels",
    "images": "images/<label stem>[_k].png = uint8 round(255 (x+1)/2); grid.png rows: label | samples | real, "
              "with column titles and a legend of the classes shown",
    "labels": "--labels: each map nearest-resized to the model's size, its image resized back to the map's size "
              "(bilinear, antialiased); images/<relative path of the map>[_k].png",
}
SOURCE_FLAGS = ("affinity", "source", "source_root")  # the training-free mode's flags
DATA_FLAGS = ("data", "data_root", "n", "subset_file", "size", "split")  # model mode's evaluation data
SCORE_FLAGS = ("inception", "fid_features", "segmenter", "segmenter_weights")


def flags(args, dests):
    """The command-line spelling of the given options among `dests` that were given (not None / not False)."""
    return [f"--{d.replace('_', '-')}" for d in dests if getattr(args, d) is not None and getattr(args, d) is not False]


def get_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("every mode")
    g.add_argument("--out", required=True, help="output folder: results.json, images/, grid.png, manifest.txt "
                   "(an earlier run's files, as its manifest lists them, are replaced; nothing else is removed)")
    g.add_argument("--seed", type=nonneg_int, default=0, help="noise seed: image k of map i is seeded by (seed, i, k)")
    g.add_argument("--batch", type=positive_int, default=16, help="label maps (or images) per batch; the images do "
                   "not depend on it")
    g.add_argument("--workers", type=nonneg_int, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--amp", default="auto", choices=AMP_MODES, help="generator and segmenter precision: " + AMP_HELP)
    g = p.add_argument_group("a model (--ckpt): model mode with --data, label maps alone with --labels")
    g.add_argument("--ckpt", help="our checkpoint (oasis-cat / piti-cat: best.pt, checkpoint.pt), or an official OASIS "
                   "run folder / .pth (with --source: its own classes; with --source and --affinity: training-free CAT)")
    g.add_argument("--which", default="best", choices=["best", "latest"], help="official OASIS run folder: which "
                   "checkpoint to load")
    g.add_argument("--samples-per-map", type=positive_int, default=1, help="images generated per label map")
    g.add_argument("--grid-n", type=nonneg_int, default=8, help="label maps shown in grid.png (0: no grid)")
    g.add_argument("--limit", type=positive_int, help="only the first N label maps (quick checks; not for reporting)")
    g = p.add_argument_group("PITI checkpoints (finetune_piti.py)")
    g.add_argument("--sample-steps", help="base sampler respacing of the 1000 steps, as finetune_piti.py's flag: 250, "
                   "ddim50, 10,10,3,2,2 or fast27 (default: the official 250; finetune_piti.py previews with 100)")
    g.add_argument("--up-steps", help="upsampler respacing, the same forms (default: the official fast27)")
    g.add_argument("--base", help="the official PITI base file (base_mask.pt) if it moved since finetuning: "
                   "replaces the file the checkpoint records")
    g.add_argument("--upsampler", help="the official PITI upsampler file (upsample_mask.pt) if it moved")
    g = p.add_argument_group("training-free CAT / an official model's own classes")
    g.add_argument("--source", help="the source model's dataset (ade20k, coco, cityscapes, folder, toy-source, ...)")
    g.add_argument("--source-root", help="folder of a folder/toy source dataset (its classes.txt)")
    g.add_argument("--affinity", help="affinity .npy (target classes x source classes) of estimate_affinity.py")
    g = p.add_argument_group("label maps alone (--labels): one image per map, no metric")
    g.add_argument("--labels", help="folder of label PNGs (value k = line k of classes.txt, 0 = unlabelled; flat or "
                   "in subfolders) with its classes.txt; writes images/<relative path>.png at each map's size")
    g.add_argument("--classes", help="the maps' classes.txt if it is not in the --labels folder")
    g = add_data_args(p, default=None)  # model mode: --data, --data-root, --size ...: no silent default dataset
    g.title = "evaluation data (model mode: --ckpt with --data; no default dataset: --data toy-target for the toy)"
    g.add_argument("--split", choices=["train", "val"], help="split whose label maps are scored (default: val)")
    g = p.add_argument_group("FID and KID (model and folder modes)")
    g.add_argument("--inception", help=f"FID Inception weights: the file {INCEPTION_FILE}, or 'fid_inception' "
                   "(default: that file from the torch hub cache, downloaded there once, as pytorch-fid)")
    g.add_argument("--fid-features", help="TorchScript feature net for a toy-domain FID instead of Inception")
    g.add_argument("--no-fid", action="store_true", help="model mode: skip FID and KID (no feature network)")
    g.add_argument("--stats-cache", default="data/fid_stats", help="folder for cached real statistics ('' = off)")
    g.add_argument("--bf16-features", action="store_true",
                   help="FID/KID network under bf16 autocast on CUDA (faster; see BENCHMARKS.md for its effect)")
    g = p.add_argument_group("mIoU (model mode)")
    g.add_argument("--segmenter", help="segmenter for mIoU: deeplabv2 (coco), upernet101 (ade20k), drn105 (cityscapes) "
                   "with --segmenter-weights, or torchscript / a TorchScript file (input [0,1], logits over the "
                   "dataset's channels); default with --segmenter-weights: the dataset's official one")
    g.add_argument("--segmenter-weights", nargs="+", metavar="PATH",
                   help="the segmenter's official weight file(s); upernet101 takes ENCODER DECODER (or the names "
                   "upernet101_encoder upernet101_decoder: downloaded once)")
    g = p.add_argument_group("two folders of images (--real-dir, --fake-dir): FID and KID, no model")
    g.add_argument("--real-dir", help="the real images")
    g.add_argument("--fake-dir", help="the generated images")
    args = p.parse_args(argv)
    run.check_device(args.device)
    model_only = ("ckpt", *SOURCE_FLAGS, "segmenter", "segmenter_weights", "limit", "labels", "classes", "no_fid",
                  "sample_steps", "up_steps", "base", "upsampler", *DATA_FLAGS)
    if args.real_dir or args.fake_dir:
        if not (args.real_dir and args.fake_dir):
            raise DataError("folder mode needs both --real-dir and --fake-dir")
        if flags(args, model_only):
            raise DataError(f"{', '.join(flags(args, model_only))}: not used in folder mode (--real-dir/--fake-dir "
                            "scores two folders of images); drop them, or drop --real-dir/--fake-dir to evaluate a model")
    elif not args.ckpt:
        raise DataError("give --ckpt (with --data: model mode; with --labels: images from label maps) or --real-dir "
                        "and --fake-dir (folder mode)")
    elif args.labels:
        unused = flags(args, (*DATA_FLAGS, *SCORE_FLAGS, "no_fid", "bf16_features"))
        if unused:
            raise DataError(f"{', '.join(unused)}: not used with --labels (images from label maps alone, no metric): "
                            "drop them, or drop --labels to evaluate on --data")
        if not Path(args.labels).is_dir():
            raise DataError(f"--labels {args.labels}: no such folder; expected a folder of label PNGs and its classes.txt")
    elif args.classes:
        raise DataError("--classes: the classes.txt of --labels maps; model mode reads --data's classes")
    elif args.data is None:
        raise DataError("model mode needs --data: the dataset whose label maps are scored (coco, ade20k, cityscapes, "
                        "folder with --data-root, or a toy task by name: --data toy-target); or --labels DIR to "
                        "generate images from label maps alone")
    elif args.no_fid and flags(args, ("inception", "fid_features")):
        raise DataError(f"--no-fid skips FID: {', '.join(flags(args, ('inception', 'fid_features')))} would be ignored")
    for flag, spec in (("--sample-steps", args.sample_steps), ("--up-steps", args.up_steps)):
        if spec is not None:
            check_respacing(spec, flag)
    args.split = args.split or "val"
    if args.n is not None and args.split != "train":
        raise DataError(f"--n {args.n} picks training shots; use --limit to evaluate fewer {args.split} maps")
    inputs = {"--data-root": args.data_root, "--real-dir": args.real_dir, "--fake-dir": args.fake_dir,
              "--labels": args.labels, "--source-root": args.source_root,
              "--ckpt": args.ckpt if args.ckpt and Path(args.ckpt).is_dir() else None}  # an official run folder
    run.check_out_vs_inputs(args.out, inputs)
    run.out_dir(args.out, keep=False)  # a file in the way, read-only: one line before any work
    if args.stats_cache and args.ckpt and not args.no_fid and not args.labels:
        run.out_dir(args.stats_cache, "--stats-cache", keep=False)
    return args


# ----------------------------------------------------------------------------------------------
# Generators from checkpoints


def load_generator(args, target, hw, device, amp):
    """A sampler for `target`'s classes from --ckpt (ours, official OASIS, + affinity, or PITI) -> (sample(label,
    seeds) -> images in [-1,1] at `hw` (None: the model's own size), info: kind, 'classes' (names, channels) the
    model takes or None when unknown, 'size' and 'min_hw' the model makes and needs, 'step')."""
    path = Path(args.ckpt)
    if not path.exists():
        raise DataError(f"--ckpt {path}: not found; expected a checkpoint of ours or an official OASIS run folder")
    ckpt = None
    if path.is_file():
        obj = run.load(path, "--ckpt")  # one line: truncated, empty, pickled, not a torch file
        ckpt = obj if isinstance(obj, dict) and "kind" in obj else None
    if ckpt is not None and ckpt["kind"] not in ("oasis-cat", "piti-cat"):
        raise DataError(f"--ckpt {path}: kind '{ckpt['kind']}', expected 'oasis-cat' or 'piti-cat'")
    given = flags(args, SOURCE_FLAGS)
    has_cat = ckpt is not None and (ckpt["kind"] == "piti-cat" or ckpt["G_kwargs"].get("cat_nc"))
    if has_cat and given:
        raise DataError(f"--ckpt {path}: a finetuned CAT model (it has its CAT layers); {', '.join(given)} apply "
                        "to a source model only (training-free mode): drop them")
    info = {"ckpt": str(path), "step": ckpt.get("step") if ckpt else None}
    piti_flags = flags(args, ("sample_steps", "up_steps", "base", "upsampler"))
    if piti_flags and (ckpt is None or ckpt["kind"] != "piti-cat"):
        raise DataError(f"{', '.join(piti_flags)} appl{'ies' if len(piti_flags) == 1 else 'y'} to PITI checkpoints "
                        f"(piti-cat); --ckpt {path} is an OASIS model: drop {'it' if len(piti_flags) == 1 else 'them'}")
    if ckpt is not None and ckpt["kind"] == "piti-cat":
        steps = args.sample_steps
        from models.piti import load_piti_generator  # only here: an OASIS evaluation never imports PITI
        gen = load_piti_generator(str(path), device, base=args.base, upsampler=args.upsampler, amp=amp)
        piti = piti_sampler(gen.base, gen.upsampler, steps, args.up_steps, str(steps).startswith("ddim"), amp)
        side = gen.upsampler.image_size
        info.update(kind="piti-cat", steps=steps or "official (250)", up_steps=args.up_steps or "official (fast27)",
                    classes=model_classes(ckpt.get("target")), size=(side, side), min_hw=(gen.base.image_size,) * 2)
        if hw is not None and tuple(hw) != (side, side):
            info["resize"] = (f"{side}x{side} samples resized to {hw[0]}x{hw[1]} as finetune_piti.py scores them "
                              "(metrics.resize_images: bilinear, antialiased)")
        return (lambda label, seeds: resize_images(piti(label, seeds), hw or (side, side))), info

    if ckpt is not None and (has_cat or not given):  # a CAT model, or a model of the target classes themselves
        G = Generator(**ckpt["G_kwargs"])
        check_state_dict(G, ckpt["EMA"], path)
        info.update(kind="oasis-cat" if has_cat else "oasis", classes=model_classes(ckpt.get("target")))
    elif args.source is None:
        raise DataError(f"--ckpt {path}: a source model; give --source (its dataset) for its own classes, and "
                        "--affinity (target x source .npy) for the training-free mode")
    else:  # an official / source model: its own classes, or training-free CAT through an affinity
        source = class_table(args.source, args.source_root)
        src = load_source(path, source.dataset, source.n_channels, args.which, parts=("EMA",), flag="--ckpt")
        if ckpt is not None and (ckpt.get("target") or {}).get("names"):  # our source model: its classes, by name
            compare_classes(ckpt["target"]["names"], source.names, f"--ckpt {path}", f"--source {args.source}")
        if args.affinity is None:
            G = Generator(**src["G_kwargs"])
            G.load_source(src["EMA"], path)
            info.update(kind="oasis", source=args.source, classes=(list(source.names), list(source.channels)))
        else:
            _, M = load_affinity(args.affinity, target, source)
            G = Generator(**{**src["G_kwargs"], "cat_nc": target.n_channels})
            G.load_source(src["EMA"], path)
            G.set_affinity(M)
            info.update(kind="oasis-training-free", source=args.source, affinity=str(args.affinity),
                        classes=(list(target.names), list(target.channels)))
        if hw is not None:
            G.resize(hw, f"--ckpt {path}")  # a 256x256 source makes 256x512 Cityscapes images
    takes = G.kwargs.get("cat_nc") or G.kwargs["semantic_nc"]
    info.update(size=G.output_hw, min_hw=G.latent_hw, n_channels=takes)
    return oasis_sampler(G.to(device).eval(), takes, amp), info


def check_classes(info, target, what):
    """The model's classes against the data's, by name and order (one line at the first difference) -> the table
    of `target`'s channel ids -> the model's. An older checkpoint without names: its channel count, and a note."""
    lut = np.zeros(target.n_channels, np.int64)
    if info["classes"] is None:
        if info.get("n_channels", target.n_channels) != target.n_channels:
            raise DataError(f"--ckpt {info['ckpt']}: the generator takes {info['n_channels']} label channels, {what} "
                            f"has {target.n_channels}")
        print(f"note: --ckpt {info['ckpt']} records no class names (an older run): its classes are taken to be "
              f"{what}'s, in that order")
    names, channels = info["classes"] or (target.names, target.channels)
    compare_classes(names, target.names, f"--ckpt {info['ckpt']}", what)
    lut[target.channels] = channels
    return lut


# ----------------------------------------------------------------------------------------------
# Scoring


def generate_and_score(sample, dataset, args, out, net, seg, device, amp, features_amp, names):
    """Generates every image (PNGs named by names(batch item i) -> [K relative paths], grid.png) and accumulates
    what the metrics need (real images: none for --labels maps); seg: metrics.load_segmenter's (segmenter, its
    input from images in [-1,1], name), or None -> (fake features (N, D) or None, confusion of the fakes, of the
    reals, whether a grid was written)."""
    from tqdm import tqdm
    colours = palette(dataset.n_channels).numpy()
    fake_feats, grid, grid_labels = [], [], []
    conf = np.zeros((dataset.n_channels,) * 2, np.int64)
    conf_real = np.zeros_like(conf)
    K = args.samples_per_map
    batches = generate(sample, dataset, device, args.batch, args.seed, K, args.workers)
    for b in tqdm(batches, total=-(-len(dataset) // args.batch), desc="generating", unit="batch", leave=False,
                  disable=None):
        tiles = [to_uint8(x) for x in b["fake"]]
        for i in range(len(b["path"])):
            for k, name in enumerate(names(b["item"], i)):
                hw = tuple(b["item"]["hw"][i].tolist()) if "hw" in b["item"] else None  # --labels: the map's size
                tile = to_uint8(resize_images(b["fake"][k][i:i + 1], hw))[0] if hw else tiles[k][i]
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(tile).save(out / name)
        for fake in b["fake"]:
            if net is not None:
                fake_feats.append(embed(net, (fake + 1) / 2, features_amp))
            if seg is not None:
                conf += confusion(segment(seg[0], seg[1](fake), dataset.n_channels, amp, seg[2]), b["label"],
                                  dataset.n_channels)
        if seg is not None:
            conf_real += confusion(segment(seg[0], seg[1](b["real"]), dataset.n_channels, amp, seg[2]),
                                   b["label"], dataset.n_channels)
        reals = [] if b["real"] is None else to_uint8(b["real"])  # --labels: no real column
        for i in range(min(len(b["path"]), args.grid_n - len(grid))):
            grid_labels.append(b["label"][i].cpu().numpy())
            grid.append([colours[grid_labels[-1]], *[t[i] for t in tiles[:4]], *reals[i:i + 1]])
    if grid:  # column titles and a legend of the classes shown
        titles = grid_titles(min(K, 4))[:len(grid[0])]
        save_grid(grid, out / "grid.png", titles, legend_of(grid_labels, channel_names(dataset.classes), colours))
    return (np.concatenate(fake_feats) if fake_feats else None), conf, conf_real, bool(grid)


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    with contextlib.redirect_stdout(Said(sys.stdout)) as said:  # the warnings printed go to results.json too
        score(args, argv, said)


def score(args, argv, said):
    device = torch.device(args.device)
    amp = pick_amp(device, args.amp)  # the generator's and segmenter's autocast mode
    features_amp = "bf16" if device.type == "cuda" and args.bf16_features else "fp32"
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input sizes: cuDNN picks its fastest kernels
    out = Path(args.out)
    if out.is_dir():  # the earlier run's files, as its manifest lists them, go first (nothing else)
        run.remove_recorded(out)
    files = {k: getattr(args, k) for k in ("inception", "fid_features", "segmenter", "segmenter_weights", "ckpt",
                                           "affinity", "real_dir", "fake_dir", "labels", "classes") if getattr(args, k)}
    results = {"precision": {"generator and segmenter": f"{amp} autocast" if amp != "fp32" else "fp32",
                             "amp": args.amp, "features": f"{features_amp} autocast" if features_amp != "fp32"
                             else "fp32"}, "files": files, "provenance": provenance(argv)}

    if args.real_dir:  # folder mode
        scores, lines = score_folders(args.real_dir, args.fake_dir, args.inception, args.fid_features, device,
                                      args.batch, args.workers, features_amp)
        run.refuse_unrecorded(run.out_dir(out), ["results.json"])
        return finish(out, {**scores, **results, "protocol": {k: PROTOCOL[k] for k in ("fid_inputs", "fid", "kid")}},
                      lines, said, f"wrote {out / 'results.json'}", ["results.json"])

    if args.labels:  # label maps alone: their classes.txt is the target table
        table = Path(args.classes or Path(args.labels) / "classes.txt")
        if table.name != "classes.txt" or not table.is_file():
            raise DataError(f"{'--classes' if args.classes else '--labels'} {table}: expected a classes.txt file (one "
                            "class name a line, line k = label value k) beside the maps, or --classes PATH/classes.txt")
        target, what = class_table("folder", table.parent), str(table)
    else:
        dataset = dataset_from_args(args, args.split)
        run.check_out_vs_inputs(args.out, {"--data-root": dataset.root})  # also a toy task's own folder
        dataset.files = dataset.files[:args.limit]
        check_labels(dataset)  # every map read once: a bad id fails here, in one line
        target, what = dataset.classes, f"--data {dataset.dataset}"
    sample, gen = load_generator(args, target, None if args.labels else dataset.size, device, amp)
    lut = torch.from_numpy(check_classes(gen, target, what)).to(device)  # the data's channels -> the model's
    K, net, seg = args.samples_per_map, None, None
    if args.labels:
        maps = label_maps(args.labels, len(target), gen["min_hw"])[:args.limit]
        dataset = LabelMaps(maps, target, gen["size"])
        outputs = {rel: output_names(rel, K) for _, rel, _ in maps}
    else:
        outputs = {str(img): output_names(Path(img).name, K) for img, _ in dataset.files}
        net = None if args.no_fid else load_feature_net(args.inception, args.fid_features, device)
        seg = load_segmenter(args.segmenter, device, args.segmenter_weights, dataset.dataset)
        if net is None:
            print("note: --no-fid: FID and KID skipped")
        if seg is None:
            paper = DEFAULT_SEGMENTER.get(dataset.dataset)
            how = (f" (--segmenter-weights FILE(S): the paper's {paper} for {dataset.dataset}; or --segmenter FILE: "
                   "a TorchScript one)" if paper else f", and the paper has none for --data {dataset.dataset} "
                   "(--segmenter FILE: a TorchScript segmenter over its channels)")
            print("note: mIoU skipped: no segmenter given" + how)
        if gen["kind"] != "piti-cat":  # PITI's samples are resized to the data's size, as finetune_piti.py scores them
            check_sizes(gen["size"], dataset.size, args.ckpt, dataset)
        if net is not None and len(dataset) < 2:
            raise DataError(f"--data {dataset.dataset} ({args.split}): {len(dataset)} label map(s), FID needs at least 2")

    written = [n for ns in outputs.values() for n in ns] + ["results.json"] + (["grid.png"] if args.grid_n else [])
    run.refuse_unrecorded(run.out_dir(out), written)
    sampler = lambda label, seeds: sample(lut[label], seeds)  # noqa: E731
    fake_feats, conf, conf_real, has_grid = generate_and_score(sampler, dataset, args, out, net, seg, device, amp,
                                                               features_amp, lambda item, i: outputs[item["path"][i]])
    n_fake = len(dataset) * K
    results = {"mode": "labels" if args.labels else "model",
               "generator": {k: v for k, v in gen.items() if k != "classes"}, "n_maps": len(dataset), "n_fake": n_fake,
               "samples_per_map": K, "seed": args.seed, "classes": list(target.names), **results}
    done = f"wrote {out / 'results.json'}" + (f", {out / 'grid.png'}" if has_grid else "") + \
        f" and {n_fake} images in {out / 'images'}"
    if args.labels:
        results.update(labels=str(args.labels), outputs=outputs, protocol={k: PROTOCOL[k] for k in
                                                                           ("generation", "images", "labels")})
        return finish(out, results, [], said, done, written)
    results.update(n_real=len(dataset), dataset={"name": dataset.dataset, "root": str(dataset.root),
                                                 "split": args.split, "size": list(dataset.size), "limit": args.limit})
    lines, notes = [], []  # notes (a few-images FID warning) after the numbers
    if net is not None:
        mu, sigma, rf = real_stats(dataset, net, args.stats_cache or None, device, args.batch, features_amp,
                                   args.workers)
        metrics = fid_metrics(rf, fake_feats, (mu, sigma), notes)
        results.update(metrics, fid_features=describe_features(net), toy_domain_fid=net.toy)
        lines += fid_lines(metrics, net.toy)
    if seg is not None:
        scores, seg_lines = miou_results(conf, conf_real, dataset, seg)
        results.update(scores)
        lines += seg_lines
    results["protocol"] = dict(PROTOCOL, segmenter=getattr(seg[0], "protocol", "TorchScript file")) if seg else PROTOCOL
    finish(out, results, lines + notes, said, done, written)


def finish(out, results, lines, said, done, written):
    """results.json (with the warnings printed during the run), the manifest of the files `written` (what a
    rerun may remove), then the lines and `done` on the console."""
    for line in lines:
        print(line)
    results["warnings"] = list(said.lines)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out / "results.json")
    run.record(out, written)
    print(done)


if __name__ == "__main__":
    cli(main)
