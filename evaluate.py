r"""Evaluate a generator, or two folders of images: FID, KID, mIoU, sample PNGs and a grid.

    # a checkpoint of ours (finetune_oasis.py / finetune_piti.py) on the toy task's validation maps
    python evaluate.py --ckpt runs/x/checkpoint.pt --data toy-target --split val --out out/eval \
        --fid-features toy_features.pt --segmenter toy_segmenter.pt
    # training-free CAT: an official OASIS run dir (or our source checkpoint) + an affinity
    python evaluate.py --ckpt checkpoints/oasis_ade20k_pretrained --source ade20k --affinity affinity.npy \
        --data folder --data-root my_data --out out/eval --inception pt_inception-2015-12-05-6726825d.pth
    # two folders, no model (pytorch-fid's `fid_score` on two paths, plus KID); without --inception the
    # Inception file comes from the torch hub cache, downloaded there once (models/weights.py)
    python evaluate.py --real-dir A --fake-dir B --out out/fid

Protocol (also written into results.json):
- Generation: the EMA generator in eval mode, one image per validation label map (K with
  --samples-per-map); image k of map i uses its own noise, seeded by (--seed, i, k), so results do not
  depend on the batch size (PITI samplers take one seed per batch: the first image's).
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
  from each side; mean and std over the subsets.
- mIoU: a segmenter on the generated images at the generated resolution: the paper's (--segmenter deeplabv2 /
  upernet101 / drn105, official weights, models/segmenters.py) or a TorchScript file; labels
  nearest-resized (legacy 'nearest') to that resolution; dontcare pixels (channel 0) ignored and
  channel 0 never predicted; one confusion matrix over the whole split; IoU of a class with an empty
  union is undefined and left out of the mean. The same segmenter on the real images gives miou_real.
- PNGs: uint8 = round(255 (x+1)/2), clamped (the official OASIS test.py truncates instead).
- Precision (--amp, models/amp.py): on CUDA the generator and the segmenter run under bf16 autocast, fp16 on
  GPUs without bf16 (compute capability < 8.0); fp32 on the CPU unless --amp bf16 (--fp32 = --amp fp32).
  The FID/KID network runs in fp32 (cuDNN's default TF32, as pytorch-fid) unless --bf16-features;
  bench/bench_fid.py measures what bf16 does to FID (allowed: 0.1% relative) and the speed-up.

- Sizes: generated and real images must have one size; a generator whose output size differs from the
  preprocessed real images (e.g. a 64-px toy model on folder data read at the default 256 px) is refused
  with a line naming the --size to pass, never scored across resolutions.
- Real statistics are cached in --stats-cache, keyed by every image and label file's path, size and
  mtime, the preprocessing and the feature network; a cache hit prints "real statistics: cached FILE".

The metrics themselves live in metrics.py (FID, KID, mIoU, generation, grids), the FID Inception in
models/inception.py.
"""
import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models import ArgumentParser, DataError, amp, cli, nonneg_int, run
from data import add_data_args, class_table, dataset_from_args, load_affinity
from metrics import (confusion, embed, features, folder_images, frechet_distance, generate, image_batches, iou, kid,
                     load_feature_net, load_segmenter, oasis_sampler, real_stats, resize_images, save_grid, segment,
                     stats, to_uint8, channel_names, grid_titles, legend_of)
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
    "kid": "unbiased MMD^2, kernel (x.y/d+1)^3, 100 subsets of min(1000, N) images per side; mean and std",
    "miou": "segmenter on the generated images at the generated resolution; labels nearest-resized; dontcare "
            "(channel 0) ignored and never predicted; one confusion matrix per split; classes with an empty "
            "union left out of the mean; Cityscapes scores its 19 evaluation classes and ignores void pixels",
    "images": "images/<label stem>[_k].png = uint8 round(255 (x+1)/2); grid.png rows: label | samples | real, "
              "with column titles and a legend of the classes shown",
}
SOURCE_FLAGS = ("affinity", "source", "source_root")  # the training-free mode's flags


def flags(args, dests):
    """The command-line spelling of the given (non-None) options among `dests`."""
    return [f"--{d.replace('_', '-')}" for d in dests if getattr(args, d) is not None]


def get_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder: results.json, grid.png, images/ (an earlier run's "
                   "are replaced; other files are kept)")
    p.add_argument("--inception", help=f"FID Inception weights: the file {INCEPTION_FILE}, or 'fid_inception' "
                   "(default: that file from the torch hub cache, downloaded there once, as pytorch-fid)")
    p.add_argument("--fid-features", help="TorchScript feature net for a toy-domain FID instead of Inception")
    p.add_argument("--no-fid", action="store_true", help="model mode: skip FID and KID (no feature network)")
    p.add_argument("--real-dir", help="folder mode: the real images")
    p.add_argument("--fake-dir", help="folder mode: the generated images")
    p.add_argument("--ckpt", help="our checkpoint (oasis-cat / piti-cat), or an official OASIS run folder / .pth")
    p.add_argument("--which", default="best", help="official OASIS checkpoint to load: best or latest")
    p.add_argument("--source", help="training-free mode: the source model's dataset (ade20k, coco, cityscapes, ...)")
    p.add_argument("--source-root", help="training-free mode: folder of a folder/toy source dataset (classes.txt)")
    p.add_argument("--affinity", help="training-free mode: affinity .npy (target classes x source classes)")
    p.add_argument("--piti-steps", help="PITI checkpoints: base sampler respacing of the 1000 steps: 250, ddim50, "
                   "10,10,3,2,2 or fast27 (default: the official 250 steps)")
    p.add_argument("--piti-up-steps", help="PITI checkpoints: upsampler respacing, same forms (default: the official "
                   "fast27)")
    add_data_args(p)
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--limit", type=int, help="only the first N label maps (quick checks; not for reporting)")
    p.add_argument("--segmenter", help="segmenter for mIoU: deeplabv2 (coco), upernet101 (ade20k), drn105 (cityscapes) "
                   "with --segmenter-weights, or torchscript / a TorchScript file (input [0,1], logits over the "
                   "dataset's channels); default with --segmenter-weights: the dataset's official one")
    p.add_argument("--segmenter-weights", nargs="+", metavar="PATH",
                   help="the segmenter's official weight file(s); upernet101 takes ENCODER DECODER (or the names "
                   "upernet101_encoder upernet101_decoder: downloaded once)")
    p.add_argument("--samples-per-map", type=int, default=1, help="images generated per label map")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    p.add_argument("--grid-rows", type=nonneg_int, default=8, help="label maps shown in grid.png (0: no grid)")
    p.add_argument("--stats-cache", default="data/fid_stats", help="folder for cached real statistics ('' = off)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="auto", choices=amp.MODES, help="generator and segmenter precision: " + amp.HELP)
    p.add_argument("--fp32", action="store_true", help="same as --amp fp32")
    p.add_argument("--bf16-features", action="store_true",
                   help="FID/KID network under bf16 autocast on CUDA (faster; see BENCHMARKS.md for its effect)")
    args = p.parse_args(argv)
    run.check_device(args.device)
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--limit", args.limit, 1),
                               ("--samples-per-map", args.samples_per_map, 1), ("--workers", args.workers, 0)):
        if value is not None and value < least:
            raise DataError(f"{flag} {value}: expected at least {least}")
    if args.real_dir or args.fake_dir:
        if not (args.real_dir and args.fake_dir):
            raise DataError("folder mode needs both --real-dir and --fake-dir")
        unused = flags(args, ("ckpt", *SOURCE_FLAGS, "segmenter", "segmenter_weights", "limit"))
        unused += ["--no-fid"] if args.no_fid else []
        if unused:
            raise DataError(f"{', '.join(unused)}: not used in folder mode (--real-dir/--fake-dir scores two "
                            "folders of images); drop them, or drop --real-dir/--fake-dir to evaluate a model")
    elif not args.ckpt:
        raise DataError("give --ckpt (model mode) or --real-dir and --fake-dir (folder mode)")
    elif args.no_fid and flags(args, ("inception", "fid_features")):
        raise DataError(f"--no-fid skips FID: {', '.join(flags(args, ('inception', 'fid_features')))} would be ignored")
    for flag, spec in (("--piti-steps", args.piti_steps), ("--piti-up-steps", args.piti_up_steps)):
        if spec is not None:
            check_respacing(spec, flag)
    if args.stats_cache and args.ckpt and not args.no_fid:
        run.out_dir(args.stats_cache, "--stats-cache", keep=False)  # a file in the way: one line now
    if args.n is not None and args.split != "train":
        raise DataError(f"--n {args.n} picks training shots; use --limit to evaluate fewer {args.split} maps")
    return args


# ----------------------------------------------------------------------------------------------
# Generators from checkpoints


def load_generator(args, dataset, device, bf16):
    """A sampler for the target dataset from --ckpt (ours, official OASIS + affinity, or PITI), and a description."""
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
    info = {"ckpt": str(path)}
    piti_flags = flags(args, ("piti_steps", "piti_up_steps"))
    if piti_flags and (ckpt is None or ckpt["kind"] != "piti-cat"):
        raise DataError(f"{', '.join(piti_flags)} appl{'ies' if len(piti_flags) == 1 else 'y'} to PITI checkpoints "
                        f"(piti-cat); --ckpt {path} is an OASIS model: drop {'it' if len(piti_flags) == 1 else 'them'}")
    if ckpt is not None and ckpt["kind"] == "piti-cat":
        steps = args.piti_steps
        from models.piti import load_piti_generator  # only here: an OASIS evaluation never imports PITI
        piti = load_piti_generator(str(path), device, steps=steps, up_steps=args.piti_up_steps,
                                   ddim=bool(steps and steps.startswith("ddim")), amp=bf16)
        info.update(kind="piti-cat", steps=steps or "official (250)", up_steps=args.piti_up_steps or "official (fast27)",
                    resize=f"256x256 samples resized to {dataset.size[0]}x{dataset.size[1]} as finetune_piti.py scores "
                           "them (metrics.resize_images: bilinear, antialiased)")
        return (lambda label, seeds: resize_images(piti(label, seeds[0]), dataset.size)), info

    if ckpt is not None and (has_cat or not given):  # a CAT model, or a model of the target classes themselves
        G = Generator(**ckpt["G_kwargs"])
        check_state_dict(G, ckpt["EMA"], path)
        info["kind"] = "oasis-cat" if has_cat else "oasis"
    else:  # training-free CAT: a source generator + an affinity
        if args.affinity is None or args.source is None:
            raise DataError(f"--ckpt {path}: a source model; the training-free mode needs --source (its dataset) "
                            "and --affinity (target x source .npy)")
        source = class_table(args.source, args.source_root)
        src = load_source(path, source.dataset, source.n_channels, args.which, parts=("EMA",), flag="--ckpt")
        _, M = load_affinity(args.affinity, dataset.classes, source)
        G = Generator(**{**src["G_kwargs"], "cat_nc": dataset.n_channels})
        G.load_source(src["EMA"], path)
        G.resize(dataset.size, f"--ckpt {path}")  # a 256x256 source makes 256x512 Cityscapes images
        G.set_affinity(M)
        info.update(kind="oasis-training-free", source=args.source, affinity=str(args.affinity))
    takes = G.kwargs.get("cat_nc") or G.kwargs["semantic_nc"]
    if takes != dataset.n_channels:
        raise DataError(f"--ckpt {path}: the generator takes {takes} label channels, --data {dataset.dataset} "
                         f"has {dataset.n_channels}")
    G = G.to(device).eval()
    return oasis_sampler(G, dataset.n_channels, bf16), info


# ----------------------------------------------------------------------------------------------
# Scoring


def fid_metrics(real_feats, fake_feats, real=None, notes=None):
    """FID (from real (mu, sigma) when given) and KID of two feature sets; a few-images warning goes to `notes`."""
    mu_r, sigma_r = real if real is not None else stats(real_feats)
    mu_f, sigma_f = stats(fake_feats)
    kid_mean, kid_std = kid(real_feats, fake_feats)
    fid = frechet_distance(mu_f, sigma_f, mu_r, sigma_r, n=min(len(real_feats), len(fake_feats)),
                           note=print if notes is None else notes.append)
    return {"fid": fid, "kid_mean": kid_mean, "kid_std": kid_std}


def describe_features(net, args):
    if net.toy:
        return (f"toy-domain FID on the TorchScript feature net {args.fid_features}: "
                "not comparable to Inception FID")
    return f"Inception FID ({INCEPTION_FILE}, 2048-d pool3, as pytorch-fid 0.3.0)"


def fid_lines(metrics, toy):
    return [f"fid {metrics['fid']:.4f}" + (" (toy-domain features)" if toy else ""),
            f"kid {metrics['kid_mean']:.6f} +- {metrics['kid_std']:.6f}"]


def write_results(out, results):
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out / "results.json")


def score_folders(args, device, bf16_features):
    """Folder mode: FID and KID of two folders of images, as pytorch-fid reads them -> (results, lines)."""
    real_files, fake_files = folder_images(args.real_dir, "--real-dir"), folder_images(args.fake_dir, "--fake-dir")
    net = load_feature_net(args.inception, args.fid_features, device)
    real_feats = features(net, image_batches(real_files, args.batch_size, device, args.workers), bf16_features)
    fake_feats = features(net, image_batches(fake_files, args.batch_size, device, args.workers), bf16_features)
    notes = []
    metrics = fid_metrics(real_feats, fake_feats, notes=notes)
    results = {"mode": "folder", **metrics, "n_real": len(real_files), "n_fake": len(fake_files),
               "fid_features": describe_features(net, args), "toy_domain_fid": net.toy}
    return results, fid_lines(metrics, False) + notes


def check_sizes(fake, real, args, dataset):
    """Refuses to score generated images of one size against real images of another."""
    (h, w), (H, W) = fake.shape[-2:], real.shape[-2:]
    if (h, w) != (H, W):
        fix = (f"pass --size {w} to read the real images at the generator's size"
               if (dataset.dataset == "folder" or dataset.dataset.startswith("toy")) and h == w
               else "evaluate it on data of its own resolution")
        raise DataError(f"--ckpt {args.ckpt}: the generator makes {h}x{w} images, --data {dataset.dataset} "
                        f"({args.split}) images are {H}x{W} here; {fix}, so that FID and mIoU compare one size")


def generate_and_score(sample, dataset, args, out, net, seg, device, bf16, bf16_features):
    """Generates every image (PNGs in out/images, grid.png) and accumulates what the metrics need:
    seg: metrics.load_segmenter's (segmenter, its input from images in [-1,1], name), or None
    -> (fake features (N, D) or None, confusion of the fakes, confusion of the reals, whether a grid was written)."""
    colours = palette(dataset.n_channels).numpy()
    fake_feats, grid, grid_labels = [], [], []
    conf = np.zeros((dataset.n_channels,) * 2, np.int64)
    conf_real = np.zeros_like(conf)
    for b in generate(sample, dataset, device, args.batch_size, args.seed, args.samples_per_map, args.workers):
        check_sizes(b["fake"][0], b["real"], args, dataset)
        K = len(b["fake"])
        tiles = [to_uint8(x) for x in b["fake"]]
        for k, fake in enumerate(b["fake"]):
            for i, src in enumerate(b["path"]):
                name = Path(src).stem + (f"_{k}" if K > 1 else "") + ".png"
                Image.fromarray(tiles[k][i]).save(out / "images" / name)
            if net is not None:
                fake_feats.append(embed(net, (fake + 1) / 2, bf16_features))
            if seg is not None:
                conf += confusion(segment(seg[0], seg[1](fake), dataset.n_channels, bf16, seg[2]),
                                  b["label"], dataset.n_channels)
        if seg is not None:
            conf_real += confusion(segment(seg[0], seg[1](b["real"]), dataset.n_channels, bf16, seg[2]),
                                   b["label"], dataset.n_channels)
        reals = to_uint8(b["real"])
        for i in range(min(len(b["path"]), args.grid_rows - len(grid))):
            grid_labels.append(b["label"][i].cpu().numpy())
            grid.append([colours[grid_labels[-1]]] + [t[i] for t in tiles[:4]] + [reals[i]])
    if grid:  # column titles and a legend of the classes shown
        save_grid(grid, out / "grid.png", grid_titles(min(args.samples_per_map, 4)),
                  legend_of(grid_labels, channel_names(dataset.classes), colours))
    return (np.concatenate(fake_feats) if fake_feats else None), conf, conf_real, bool(grid)


def miou_results(conf, conf_real, dataset, seg):
    """mIoU of the generated and of the real images over the dataset's scored classes -> (results, lines)."""
    scored = dataset.classes.eval_channels
    names = [n for n, c in zip(dataset.classes.names, dataset.classes.channels) if c in scored]  # unique names
    miou, per = iou(conf, scored)
    miou_real, per_real = iou(conf_real, scored)
    results = dict(miou=miou, miou_real=miou_real, segmenter=seg[2], per_class_iou=dict(zip(names, per)),
                   per_class_iou_real=dict(zip(names, per_real)))
    return results, [f"miou {miou:.4f}" if miou is not None else "miou undefined (no labelled pixels)",
                     f"miou_real {miou_real:.4f}" if miou_real is not None else "miou_real undefined"]


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    gen_amp = "fp32" if args.fp32 else amp.pick(device, args.amp)  # the generator's and segmenter's autocast mode
    bf16_features = device.type == "cuda" and args.bf16_features
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    # a file in the way, read-only: one line before any work; an earlier run's results, grid and images go now
    out = run.out_dir(args.out, keep=False, replaces=("results.json", "grid.png", "images/*.png"))
    files = {k: getattr(args, k) for k in ("inception", "fid_features", "segmenter", "segmenter_weights", "ckpt",
                                           "affinity", "real_dir", "fake_dir") if getattr(args, k)}
    results = {"precision": {"generator and segmenter": f"{gen_amp} autocast" if gen_amp != "fp32" else "fp32",
                             "amp": args.amp,
                             "features": "bf16 autocast" if bf16_features else "fp32"}, "files": files}

    if args.real_dir:  # folder mode
        scores, lines = score_folders(args, device, bf16_features)
        results = {**scores, **results, "protocol": {k: PROTOCOL[k] for k in ("fid_inputs", "fid", "kid")}}
        out.mkdir(parents=True, exist_ok=True)
        write_results(out, results)
        for line in lines + [f"wrote {out / 'results.json'}"]:
            print(line)
        return

    # model mode: the label maps, the generator, the scoring networks
    dataset = dataset_from_args(args, args.split)
    if args.limit:
        dataset.files = dataset.files[:args.limit]
    sample, gen_info = load_generator(args, dataset, device, gen_amp)
    net = None if args.no_fid else load_feature_net(args.inception, args.fid_features, device)
    seg = load_segmenter(args.segmenter, device, args.segmenter_weights, dataset.dataset)
    if net is None:
        print("--no-fid: FID and KID skipped")
    if seg is None:
        paper = DEFAULT_SEGMENTER.get(dataset.dataset)
        how = (f" (--segmenter-weights FILE(S): the paper's {paper} for {dataset.dataset}; or --segmenter FILE: "
               "a TorchScript one)" if paper else f", and the paper has none for --data {dataset.dataset} "
               "(--segmenter FILE: a TorchScript segmenter over its channels)")
        print("mIoU skipped: no segmenter given" + how)
    if net is not None and len(dataset) < 2:
        raise DataError(f"--data {dataset.dataset} ({args.split}): {len(dataset)} label map(s), FID needs at least 2")

    (out / "images").mkdir(parents=True, exist_ok=True)
    fake_feats, conf, conf_real, has_grid = generate_and_score(sample, dataset, args, out, net, seg, device, gen_amp,
                                                               bf16_features)
    n_fake = len(dataset) * args.samples_per_map
    results = {"mode": "model", "generator": gen_info, "n_real": len(dataset), "n_fake": n_fake,
               "n_maps": len(dataset), "samples_per_map": args.samples_per_map, "seed": args.seed,
               "dataset": {"name": dataset.dataset, "root": str(dataset.root), "split": args.split,
                           "size": list(dataset.size), "limit": args.limit}, **results}
    lines, notes = [], []  # notes (a few-images FID warning) after the numbers
    if net is not None:
        mu, sigma, rf = real_stats(dataset, net, args.stats_cache or None, device, args.batch_size, bf16_features,
                                   args.workers)
        metrics = fid_metrics(rf, fake_feats, (mu, sigma), notes)
        results.update(metrics, fid_features=describe_features(net, args), toy_domain_fid=net.toy)
        lines += fid_lines(metrics, net.toy)
    if seg is not None:
        scores, seg_lines = miou_results(conf, conf_real, dataset, seg)
        results.update(scores)
        lines += seg_lines
    results["protocol"] = dict(PROTOCOL, segmenter=getattr(seg[0], "protocol", "TorchScript file")) if seg else PROTOCOL
    write_results(out, results)
    for line in lines + notes:
        print(line)
    print(f"wrote {out / 'results.json'}" + (f", {out / 'grid.png'}" if has_grid else "") +
          f" and {n_fake} images in {out / 'images'}")


if __name__ == "__main__":
    cli(main)
