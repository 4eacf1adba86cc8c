"""The toy transfer benchmark: CAT against the paper's baselines on a task anyone can run.

Pipeline (each step is one of the project's scripts, run as a subprocess; finished steps are
skipped when the benchmark is run again with the same --out):
  1. the toy task (toy.py) and its evaluation nets: a segmenter (mIoU) and a feature net (toy FID),
     trained on the FULL toy target training set (bench/toy_segmenter.py);
  2. a small source OASIS pretrained from scratch on the toy source domain (finetune_oasis.py --init scratch),
     trained again with finetune_oasis.py --seed 1, then 2 when it collapsed (the source's own seed, not this
     driver's --seeds; bench/pipeline.py train_source; presets quick and cpu, whose widths and batch the rule
     was measured at); everything made from an earlier source model is made again (its output older than the
     source's checkpoint.pt), also after an interrupted redo;
  3. affinities from n target images (estimate_affinity.py): random, text, supervised (the source
     discriminator as segmenter), combination (text + supervised; no DINO file here), hard and soft;
  4. at n target images and equal step budgets: a random-init OASIS (no source model); finetune with a random
     first layer; FreezeD with a random first layer (the paper's Table 8 "From scratch": CAT's recipe with
     the affinity layers randomly initialised); CAT training-free (random / text / supervised / combination);
     CAT finetuned (text / supervised / combination, hard and soft);
  5. evaluate.py on the target validation maps: toy FID (features of the toy-domain net, NOT
     comparable to Inception FID) and mIoU; a table (mean ± std over seeds), a figure, and results.json:
     {row: {"fid": [one per seed], "miou": [...]}, ..., "source model": {"seed", "collapsed"}} (that last key
     is not a row: the source model used, bench/pipeline.py SOURCE_KEY).

    python bench/toy_transfer.py --quick --out runs/toy_quick       # the README demo: one CAT run, minutes on CPU
    python bench/toy_transfer.py --out runs/toy_bench --seeds 0 1 2 --write-benchmarks
"""
import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks_md import write_section
from pipeline import (EMA_AS_RECORDED, SMALL, SOURCE_KEY, TWO_STAGE_AS_RECORDED, current, judged, lr_opt,
                      run_finetune, run_step, source_note, train_source)

REPO = Path(__file__).resolve().parents[1]

# The sizes: "gpu" trains in minutes on one GPU; "cpu" is the reduced form for a 2-core machine.
# Learning rates and EMA decays are set for short runs (the official 1e-4 / 0.9999 are for 100k+ steps:
# at a few hundred steps the EMA would still be the initial model) and are the same for every target row.
SIZES = {
    "gpu": dict(width=["--channels", "16", "--z-dim", "32", "--spade-hidden", "64", "--d-channels", "3,32,32,64,64,128,128",
                       "--d-last", "32"], batch=16, source_steps=20000, steps=5000, seg_epochs=20,
                source_opt=[*lr_opt("4e-4"), "--ema-decay", "0.999", *EMA_AS_RECORDED],
                target_opt=[*lr_opt("2e-4"), "--ema-decay", "0.999", *EMA_AS_RECORDED]),
    "cpu": dict(width=SMALL, batch=8, source_steps=2000, steps=300, seg_epochs=10,
                source_opt=[*lr_opt("1e-3"), "--ema-decay", "0.999", *EMA_AS_RECORDED],
                target_opt=[*lr_opt("4e-4"), "--ema-decay", "0.99", *EMA_AS_RECORDED]),
    "quick": dict(width=SMALL, batch=8, source_steps=400, steps=150, seg_epochs=3,
                  source_opt=[*lr_opt("1e-3"), "--ema-decay", "0.99", *EMA_AS_RECORDED],
                  target_opt=[*lr_opt("4e-4"), "--ema-decay", "0.99", *EMA_AS_RECORDED]),
}

# One torch thread per stage: on an idle 2-core machine as fast as two, beside two busy processes 3x faster
# (bench/threads_check.py, BENCHMARKS.md "Threads of the toy pipeline").
THREADS = 1

def run(cmd, log, done=None, steps=None, made_from=None, again=False):
    """One stage (skipped when `done` exists and is not older than `made_from`, the file it is made from that this
    benchmark may make anew: bench/pipeline.py current; a finetune_oasis.py run, `steps` given, when `done`'s run
    folder holds its last step; `again`: a run started over, trained with another seed), its output into a log
    file; a failure ends the benchmark."""
    try:
        if steps is None:
            if not current(done, made_from):
                run_step(cmd, log, None, threads=THREADS)
        else:
            run_finetune(cmd, log, Path(done).parent, steps, threads=THREADS, made_from=made_from, again=again)
    except RuntimeError as e:
        raise SystemExit(str(e))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/toy_bench", help="working folder (re-running skips finished steps)")
    p.add_argument("--quick", action="store_true", help="the demo: one seed, combination CAT only, tiny budgets")
    p.add_argument("--size-preset", default=None, choices=list(SIZES), help="budgets (default: gpu on CUDA, else cpu)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="n-shot subset + training seeds")
    p.add_argument("--n", type=int, default=100, help="target training images")
    p.add_argument("--steps", type=int, default=None, help="training budget of every target run (overrides the preset)")
    p.add_argument("--source-steps", type=int, default=None, help="source pretraining steps (overrides the preset)")
    p.add_argument("--seg-epochs", type=int, default=None, help="epochs of the toy evaluation nets (overrides the preset)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--write-benchmarks", action="store_true", help="write the table into BENCHMARKS.md")
    args = p.parse_args()

    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = "quick" if args.quick else args.size_preset or ("gpu" if device == "cuda" else "cpu")
    cfg = SIZES[preset]
    steps = args.steps or cfg["steps"]
    source_steps = args.source_steps or cfg["source_steps"]
    out = Path(args.out).resolve()
    logs = out / "logs"
    dev = ["--device", device]
    t_start = time.time()

    print(f"toy transfer, preset {preset} on {device}: each stage's command, its log (progress every minute), "
          f"its time; finished stages are skipped when run again", flush=True)
    # 1. evaluation nets (the toy data is generated on first use)
    evalnets = out / "evalnets"
    run(["bench/toy_segmenter.py", "--out", evalnets, "--epochs", args.seg_epochs or cfg["seg_epochs"]], logs / "evalnets.log",
        done=evalnets / "features.pt")
    eval_flags = ["--data", "toy-target", "--split", "val", "--fid-features", evalnets / "features.pt",
                  "--segmenter", evalnets / "segmenter.pt", "--stats-cache", out / "fid_stats"] + dev

    # 2. the source model: trained again with finetune_oasis.py --seed 1, then 2 while it collapsed (bench/pipeline.py
    # train_source); what is made from it is made again when older than its checkpoint.pt
    source = out / "source"
    source_ckpt = source / "checkpoint.pt"

    def train(k, again):
        run(["finetune_oasis.py", "--init", "scratch", "--data", "toy-source", *cfg["width"], "--batch",
             cfg["batch"], "--stage1-steps", "0", "--stage2-steps", source_steps, *cfg["source_opt"], "--seed", k,
             "--eval-every", max(source_steps // 4, 50), "--out", source] + dev, logs / "source.log",
            done=source_ckpt, steps=source_steps, again=again)

    judge = judged(cfg["width"], cfg["batch"])
    try:
        source_seed, source_collapsed = train_source(train, source, source_steps, logs / "source_tries.json", judge=judge)
    except RuntimeError as e:
        raise SystemExit(str(e))
    src = ["--source", "toy-source", "--source-ckpt", source_ckpt, *TWO_STAGE_AS_RECORDED]

    rows = {}  # row name -> list of results.json dicts (one per seed)
    for seed in args.seeds:
        sd = out / f"seed{seed}"
        shot = ["--data", "toy-target", "--n", args.n, "--subset-seed", seed]

        # 3. affinities
        methods = ["combination"] if args.quick else ["random", "text", "supervised", "combination"]
        aff = {}
        for method in methods:
            for kind in (["hard"] if method == "random" or args.quick else ["hard", "soft"]):
                d = sd / f"aff_{method}_{kind}"
                run(["estimate_affinity.py", "--source", "toy-source", "--target", "toy-target", "--method", method,
                     f"--{kind}", "--source-ckpt", source / "checkpoint.pt", "--n", args.n, "--subset-seed", seed,
                     "--text-encoder", "minilm", "--weights", "text=1,supervised=1",
                     "--seed", seed, "--out", d] + dev, logs / f"seed{seed}_aff_{method}_{kind}.log",
                    done=d / "affinity.npy", made_from=source_ckpt)
                aff[method, kind] = d / "affinity.npy"

        # 4. the rows: (name, finetune flags or None for training-free, affinity for training-free)
        common = ["--batch", cfg["batch"], *cfg["target_opt"], "--seed", seed, "--eval-every", max(steps // 2, 25)] + shot + dev
        split = ["--stage1-steps", steps * 2 // 5, "--stage2-steps", steps - steps * 2 // 5]
        plan = []
        if not args.quick:
            plan += [
                ("Random-init OASIS (no source model)", ["--init", "scratch", *cfg["width"]] + split, None),
                ("Finetune, random 1x1", [*src, "--affinity", "none", "--freeze-d", "0"] + split, None),
                ("FreezeD, random 1x1 (= Table 8's 'From scratch')", [*src, "--affinity", "none", "--freeze-d", "2"] + split, None),
            ]
            plan += [(f"CAT training-free, {m}", None, aff[m, "hard"]) for m in ("random", "text", "supervised", "combination")]
            plan += [(f"CAT finetuned, {m} ({k})", [*src, "--affinity", aff[m, k]] + split, None)
                     for m in ("text", "supervised", "combination") for k in ("hard", "soft")]
        else:
            plan += [("CAT training-free, combination", None, aff["combination", "hard"]),
                     ("CAT finetuned, combination (hard)", [*src, "--affinity", aff["combination", "hard"]] + split, None)]
        for name, flags, affinity in plan:
            tag = re.sub(r"[^a-z0-9-]+", "_", name.lower()).strip("_")
            ev = sd / f"eval_{tag}"
            if flags is not None:
                run_dir = sd / f"run_{tag}"
                # the random-init row does not use the source model: a source trained again leaves it as it is
                run(["finetune_oasis.py", *flags, *common, "--out", run_dir], logs / f"seed{seed}_{tag}.log",
                    done=run_dir / "checkpoint.pt", steps=steps, made_from=source_ckpt if "--source-ckpt" in flags else None)
                model, made_from = ["--ckpt", run_dir / "checkpoint.pt"], run_dir / "checkpoint.pt"  # run anew: evaluated anew
            else:
                model, made_from = ["--ckpt", source_ckpt, "--source", "toy-source", "--affinity", affinity], source_ckpt
            run(["evaluate.py", *model, *eval_flags, "--seed", seed, "--out", ev], logs / f"seed{seed}_eval_{tag}.log",
                done=ev / "results.json", made_from=made_from)
            rows.setdefault(name, []).append(json.loads((ev / "results.json").read_text()))
            rows[name][-1]["_eval_dir"] = str(ev)

    # 5. table + figure
    source_model = {"seed": source_seed, "collapsed": source_collapsed}
    table = format_table(rows, args, preset, steps, source_steps, source_model, device, judge)
    (out / "table.md").write_text(table)
    figure(rows, out / "figure.png")
    summary = {name: {k: [r.get(k) for r in rs] for k in ("fid", "miou")} for name, rs in rows.items()}
    summary[SOURCE_KEY] = source_model
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(table)
    print(f"total {time.time() - t_start:.0f}s")
    last = rows[list(rows)[-1]][-1]["_eval_dir"]
    print(f"grid: {Path(last) / 'grid.png'}\nnumbers: {out / 'results.json'} (per row, and the source model used), "
          f"{Path(last) / 'results.json'}\n"
          f"figure: {out / 'figure.png'}")
    if args.write_benchmarks:
        write_benchmarks(table, out / "figure.png", list(rows))


def format_table(rows, args, preset, steps, source_steps, source_model, device, judge=True):
    cmd = "python bench/toy_transfer.py " + " ".join(sys.argv[1:])

    def cell(vals, fmt):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "n/a"
        return (fmt % np.mean(vals)) + (f" ± {fmt % np.std(vals)}" if len(vals) > 1 else "")

    lines = [f"Toy transfer, n = {args.n} target images, seeds {args.seeds}, preset `{preset}` "
             f"({steps} steps per target run, source pretrained {source_steps} steps, {source_note(source_model, judge)}), "
             f"device {device}.",
             f"Command: `{cmd}`", "",
             "| method | FID-toy ↓ | mIoU ↑ |", "|---|---|---|"]
    for name, rs in rows.items():
        lines.append(f"| {name} | {cell([r.get('fid') for r in rs], '%.2f')} | {cell([r.get('miou') for r in rs], '%.3f')} |")
    real = [r.get("miou_real") for rs in rows.values() for r in rs if r.get("miou_real") is not None]
    if real:
        lines.append(f"| real target val images | 0 | {np.mean(real):.3f} |")
    return "\n".join(lines) + "\n"


def figure(rows, path, n_maps=4):
    """Columns: label colours, then one generated image per method (in table order, numbered; the key below
    names them), then the real image, for the first validation maps; a legend of the classes shown."""
    val, _ = validation_maps(n_maps)
    tiles = [[np.asarray(Image.open(f).convert("RGB"))
              for f in sorted((Path(rs[0]["_eval_dir"]) / "images").glob("*.png"))[:n_maps]] for rs in rows.values()]
    save_figure([list(r) for r in zip(*tiles)], list(rows), path, n_maps)


def validation_maps(n):
    """(the toy target's val dataset, its first n items)."""
    sys.path.insert(0, str(REPO))
    import data
    val = data.open_dataset("toy-target", split="val")
    return val, [val[i] for i in range(n)]


def save_figure(generated, names, path, n_maps=4):
    """generated: per validation map, one image per method (named by `names`): the figure with column titles
    (labels | 1..K | real), the key of the numbers and the class legend."""
    import metrics
    from models import figures
    from models.palette import palette
    val, items = validation_maps(n_maps)
    colours = palette(val.n_channels).numpy()
    labels = [it["label"].numpy() for it in items]
    rows = [[colours[lab], *gen, metrics.to_uint8(it["image"][None])[0]] for lab, gen, it in zip(labels, generated, items)]
    metrics.save_grid(rows, path, ["labels", *map(str, range(1, len(names) + 1)), "real"],
                      figures.legend_of(labels, figures.channel_names(val.classes), colours),
                      [f"{k}: {name}" for k, name in enumerate(names, 1)])


def write_benchmarks(table, figure_path, names):
    """Replace the toy-transfer section of BENCHMARKS.md with the new table, and keep the figure beside it as
    bench/toy_transfer.png."""
    shutil.copyfile(figure_path, REPO / "bench" / "toy_transfer.png")
    legend = ("Figure `bench/toy_transfer.png` (seed 0, first 4 validation maps), columns: label colours | "
              + " | ".join(f"{k}: {name}" for k, name in enumerate(names, 1)) + " | real image.\n")
    write_section("toy-transfer", f"## Toy transfer benchmark ({time.strftime('%Y-%m-%d')})\n\n{table}\n{legend}")


if __name__ == "__main__":
    main()
