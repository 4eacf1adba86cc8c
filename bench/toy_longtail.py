"""The long-tailed toy benchmark: CAT against the paper's ablation rows and baselines when few-shot is few-shot.

The task (toy.py, toy-lt-source / toy-lt-target; BENCHMARKS.md gives its design): 30 source classes, 20
target classes of which half are in fewer than 10% of the images. Pipeline (each step is one of the
project's scripts run as a subprocess, --jobs at a time; finished steps are skipped when the benchmark is
run again with the same --out):
  1. the toy evaluation nets (bench/toy_segmenter.py; protocol v3: on a class-balanced pool of 8000 generated
     target images that never overlaps the task's images, v2: on the 500 target training images) and a small
     source OASIS pretrained from scratch on the source domain (finetune_oasis.py --init scratch), trained
     again with finetune_oasis.py --seed 1, then 2 when it collapsed (the source's own seed, not this driver's
     --seeds; bench/pipeline.py train_source; preset cpu only, the widths and batch the rule was measured at;
     the seeds tried are kept in <out>/logs/source_tries.json, so a rerun goes on with the first one not yet
     found collapsed); every step made from an earlier source model is made again (its output older than the
     source's checkpoint.pt), also after an interrupted redo;
  2. affinities (estimate_affinity.py): random (per seed), text (once), supervised and combination (per
     seed and n: the source discriminator on the n target images), hard and soft;
  3. for each n and seed, equal step budgets: a random-init OASIS (no source model), the ablation recipes (the
     paper's Table 8 "From scratch" is freezed-2stage-resid), TransferGAN, cGANTransfer,
     CAT training-free (4 affinities) and finetuned (4 affinities, hard and soft);
  4. evaluate.py on the target validation maps: FID-toy, mIoU, and per-class IoU, from which the rare-class
     mIoU (classes in < 10% of that seed's n training images); a table (mean ± std over seeds), a figure,
     a plot of mIoU against n, the orderings of the paper checked against the numbers, and results.json:
     {"ROW n=N": {metric: [one per seed]}, ..., "source model": {"seed", "collapsed"}} (that last key is not
     a row: the source model used, bench/pipeline.py SOURCE_KEY).

    python bench/toy_longtail.py --out runs/toy_lt_v3 --write-benchmarks --rows ...   # BENCHMARKS.md gives the rows
    python bench/toy_longtail.py --protocol v2 --out runs/toy_lt --write-benchmarks   # the old table (138 min)
    python bench/toy_longtail.py --out runs/lt_try --seeds 0 --ns 25 --rows random-init cat-combination-hard
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data  # noqa: E402
import toy  # noqa: E402
from benchmarks_md import write_section  # noqa: E402
from pipeline import (SOURCE_KEY, TWO_STAGE_AS_RECORDED, current, judged, run_step, schedule, source_note,  # noqa: E402
                      train_source)
from rows import ROWS, TOY_LONGTAIL_ROWS, TOY_METHODS as METHODS, TOY_PRESETS as PRESETS, toy_segmenter_cmd, estimate_cmd, evaluate_cmd, evaluate_flags, oasis_cmd  # noqa: E402

RARE = 0.10  # a class is rare when it is in fewer than this share of the n training images
POOL, POOL_SEED = 8000, 1  # protocol v3's evaluator pool: toy.toy_lt_item("target", "train", i, 64, POOL_SEED), i < POOL


def rare_classes(n, seed):
    """Target class names present in fewer than RARE of the n-shot subset's training images."""
    ds = data.open_dataset("toy-lt-target", n=n, subset_seed=seed)
    names = ds.classes.names
    count = np.zeros(len(names) + 1)
    for _, lbl in ds.files:
        count[np.unique(np.asarray(Image.open(lbl)))] += 1
    return [name for k, name in enumerate(names, 1) if count[k] < RARE * n]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/toy_lt", help="working folder (re-running skips finished steps)")
    p.add_argument("--preset", default=None, choices=list(PRESETS), help="budgets (default: gpu on CUDA, else cpu)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="n-shot subset + training seeds")
    p.add_argument("--ns", type=int, nargs="+", default=[25, 100], help="numbers of target training images")
    p.add_argument("--rows", nargs="+", default=TOY_LONGTAIL_ROWS, choices=TOY_LONGTAIL_ROWS, help="rows to run (default all)")
    p.add_argument("--jobs", type=int, default=None, help="processes at a time (default: the CPU count, 2 on CUDA)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--protocol", default="v3", choices=["v3", "v2"],
                   help="v3 (BENCHMARKS.md's third version): the evaluator trained on a separate class-balanced pool, "
                        "target runs at finetune_oasis.py's defaults for the stage-2 set and lr_D; v2: the old table's "
                        "evaluator (the 500 training images) and its pinned --g-train blocks and lr_D = 4 x lr")
    p.add_argument("--write-benchmarks", action="store_true", help="write the results section of BENCHMARKS.md")
    args = p.parse_args(argv)

    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("gpu" if device == "cuda" else "cpu")
    cfg = PRESETS[preset]
    jobs = args.jobs or (2 if device == "cuda" else os.cpu_count() or 1)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    out, dev, t_start = Path(args.out).resolve(), ["--device", device], time.time()
    logs = out / "logs"
    for name in ("toy-lt-source", "toy-lt-target"):
        toy.ensure(name)  # generated once, here, before the jobs start
    tasks = {}

    def task(key, deps, cmd, done, made_from=None):  # training steps save their checkpoint (`done`) only at the end
        # and pass --overwrite, which then clears only an interrupted attempt or a run made from an earlier source
        def go():  # done: `done` exists, not older than `made_from` (the source's checkpoint, an evaluation's run)
            if not current(done, made_from):
                run_step(cmd, logs / f"{key}.log", None, threads)
        tasks[key] = (deps, go)

    # 1. evaluation nets and the source model (trained again with finetune_oasis.py --seed 1, then 2 while it collapsed)
    evalnets, source = out / "evalnets", out / "source"
    source_ckpt = source / "checkpoint.pt"
    seg_cmd = toy_segmenter_cmd(toy.task_root("toy-lt-target"), evalnets, cfg["seg_epochs"], cfg["seg_max"])
    v3 = args.protocol == "v3"
    task("evalnets", [], seg_cmd + (["--pool", POOL, "--pool-seed", POOL_SEED] if v3 else []), evalnets / "features.pt")
    source_model = {}  # {seed, collapsed}: the source model used

    judge = judged(cfg["width"], cfg["batch"])

    def train(k, again):  # the checkpoint is written only at the end: a seed-k run found there has finished
        run_step(["finetune_oasis.py", "--init", "scratch", "--data", "toy-lt-source", *cfg["width"], "--batch", cfg["batch"],
                  "--stage1-steps", "0", "--stage2-steps", cfg["source_steps"], *cfg["source_opt"], "--seed", k,
                  "--eval-every", cfg["source_steps"], *cfg["extra"], "--overwrite", "--out", source] + dev,
                 logs / "source.log", None if again else source_ckpt, threads)

    def source_task():
        seed, why = train_source(train, source, cfg["source_steps"], logs / "source_tries.json", judge=judge)
        source_model.update(seed=seed, collapsed=why)
    tasks["source"] = ([], source_task)
    src = ["--source", "toy-lt-source", "--source-ckpt", source_ckpt]
    eval_flags = ["--data", "toy-lt-target", "--split", "val", "--fid-features", evalnets / "features.pt",
                  "--segmenter", evalnets / "segmenter.pt", "--workers", "0", *evaluate_flags(grid=4, stats_cache="")] + dev
    eval_flags += ["--limit", cfg["limit"]] if cfg["limit"] else []
    steps = cfg["steps"]
    split = ["--stage1-steps", steps * 2 // 5, "--stage2-steps", steps - steps * 2 // 5]

    # 2. affinities (only those the chosen rows need)
    needed = {ROWS[r].affinity for r in args.rows if ROWS[r].affinity}

    def affinity(method, kind, n, seed):
        """(task key, affinity.npy) of an affinity; text depends on nothing, random on the seed only."""
        if method == "text":
            d = out / "aff" / f"text_{kind}"
        elif method == "random":
            d = out / "aff" / f"random_{kind}_seed{seed}"
        else:
            d = out / f"n{n}" / f"seed{seed}" / f"aff_{method}_{kind}"
        key = str(d.relative_to(out)).replace("/", "_")
        if key not in tasks:
            cmd = estimate_cmd("toy-lt-source", "toy-lt-target", method, kind, d, seed,
                               ["--text-encoder", "minilm", "--weights", "text=1,supervised=1"]) + dev
            if method in ("supervised", "combination"):
                cmd += ["--source-ckpt", source / "checkpoint.pt", "--n", n, "--subset-seed", seed]
            made = method in ("supervised", "combination")
            task(key, ["source"] if made else [], cmd, d / "affinity.npy", source_ckpt if made else None)
        return key, d / "affinity.npy"

    # 3.-4. the runs and their evaluations, seed by seed so that early seeds finish first
    evals = {}  # (n, seed, job) -> eval folder
    for seed in args.seeds:
        for n in args.ns:
            for m, k in sorted(needed):
                affinity(m, k, n, seed)
            sd = out / f"n{n}" / f"seed{seed}"
            common = ["--batch", cfg["batch"], *target_opt(cfg["target_opt"], v3), "--seed", seed, "--eval-every", steps,
                      "--data", "toy-lt-target", "--n", n, "--subset-seed", seed, *cfg["extra"]] + dev
            jobs_rows = {}
            for r in args.rows:  # rows sharing a job share its run
                jobs_rows.setdefault(ROWS[r].job, ROWS[r])
            for job, row in jobs_rows.items():
                ev, deps = sd / f"eval_{job}", ["evalnets"]
                if row.train == "free":
                    key, aff = affinity(*row.affinity, n, seed)
                    model, deps = ["--ckpt", source / "checkpoint.pt", "--source", "toy-lt-source", "--affinity", aff], deps + ["source", key]
                else:
                    if row.train == "scratch":
                        flags, tdeps = ["--init", "scratch", *cfg["width"]], []
                    else:  # the recorded toy runs' stage-2 set on the two-stage rows (bench/pipeline.py)
                        flags, tdeps = [*src, *row.flags], ["source"]
                        if row.affinity:
                            key, aff = affinity(*row.affinity, n, seed)
                            flags, tdeps = flags + ["--affinity", aff], tdeps + [key]
                        flags += TWO_STAGE_AS_RECORDED if row.two_stage and not v3 else []
                    rd = sd / f"run_{job}"
                    task(f"n{n}_seed{seed}_run_{job}", tdeps, oasis_cmd([*flags, *split, *common], rd), rd / "checkpoint.pt",
                         source_ckpt if "source" in tdeps else None)  # random-init: not made from the source model
                    model, deps = ["--ckpt", rd / "checkpoint.pt"], deps + [f"n{n}_seed{seed}_run_{job}"]
                task(f"n{n}_seed{seed}_eval_{job}", deps, evaluate_cmd(model, eval_flags, ev, seed),
                     ev / "results.json", model[1])  # made from the checkpoint evaluated: the run's or the source's
                evals[n, seed, job] = ev
    try:
        schedule(tasks, jobs)
    except RuntimeError as e:
        raise SystemExit(str(e))
    wall = wall_time(out, t_start)

    # 5. numbers, table, figures, orderings
    results, n_rare = gather(args, evals)
    cmd = "python bench/toy_longtail.py " + " ".join(sys.argv[1:] if argv is None else argv)
    table = format_table(results, args, n_rare, preset, device, wall, cmd, source_model, judge)
    verdicts = orderings(results, args)
    (out / "table.md").write_text(table + "\n" + verdicts)
    (out / "results.json").write_text(json.dumps({**{f"{r} n={n}": v for (r, n), v in results.items()},
                                                  SOURCE_KEY: source_model}, indent=2))
    figure(args.rows, evals, min(args.ns), args.seeds[0], out / "figure.png", cfg["limit"])
    plot(results, args, out / "plot.png")
    evaluator = json.loads((evalnets / "evalnets.json").read_text())
    print(table + "\n" + verdicts)
    print(f"total {wall:.0f}s\nfigure: {out / 'figure.png'}\nplot: {out / 'plot.png'}\nnumbers: {out / 'results.json'}")
    if args.write_benchmarks:
        write_benchmarks(table, verdicts, out, args.protocol, evaluator)


def target_opt(opt, defaults):
    """The preset's target-run optimiser flags; at today's defaults without its --lr-d (finetune_oasis.py's default,
    the official OASIS lr_D, applies)."""
    opt = [str(o) for o in opt]
    if defaults and "--lr-d" in opt:
        i = opt.index("--lr-d")
        opt = opt[:i] + opt[i + 2:]
    return opt


def wall_time(out, t_start):
    """Seconds spent by every invocation that ran steps (a run stopped and resumed sums them), kept in wall.json."""
    path = out / "wall.json"
    walls = json.loads(path.read_text()) if path.exists() else []
    if any(log.stat().st_mtime > t_start for log in (out / "logs").glob("*.log")):
        walls.append(round(time.time() - t_start))
        path.write_text(json.dumps(walls))
    return sum(walls)


def gather(args, evals):
    """{(row, n): {metric: [one value per seed]}} from the results.json files, and the rare-class counts.
    rare (rare_real): the mean IoU on generated (real) images over the classes rare in that seed's subset."""
    results, n_rare = {}, {n: [] for n in args.ns}
    for n in args.ns:
        for seed in args.seeds:
            rare = rare_classes(n, seed)
            n_rare[n].append(len(rare))
            for r in args.rows:
                res = json.loads((evals[n, seed, ROWS[r].job] / "results.json").read_text())
                cell = results.setdefault((r, n), {"fid": [], "miou": [], "rare": [], "miou_real": [], "rare_real": []})
                cell["fid"].append(res.get("fid"))
                cell["miou"].append(res.get("miou"))
                cell["miou_real"].append(res.get("miou_real"))
                for key, per in (("rare", res["per_class_iou"]), ("rare_real", res["per_class_iou_real"])):
                    iou = [v for v in (per.get(c) for c in rare) if v is not None]
                    cell[key].append(float(np.mean(iou)) if iou else None)
    return results, n_rare


def mean_std(vals):
    vals = [v for v in vals if v is not None]
    return (float(np.mean(vals)), float(np.std(vals))) if vals else (None, None)


def format_table(results, args, n_rare, preset, device, wall, cmd, source_model, judge=True):
    def cell(vals, fmt):
        m, s = mean_std(vals)
        return "n/a" if m is None else (fmt % m) + (f" ± {fmt % s}" if len([v for v in vals if v is not None]) > 1 else "")

    head = "| method | " + " | ".join(f"n={n} FID-toy ↓ | n={n} mIoU ↑ | n={n} rare mIoU ↑" for n in args.ns) + " |"
    where = f"{device} ({os.cpu_count()} CPU cores)" if device == "cpu" else device
    lines = [f"{time.strftime('%Y-%m-%d')}, device {where}, preset `{preset}`, seeds {args.seeds}, --jobs {args.jobs or 'default'}, "
             f"wall time {wall / 60:.0f} min, {source_note(source_model, judge)}. Command: `{cmd}`", "",
             "Rare classes (in < 10% of the n training images) per seed: "
             + "; ".join(f"n = {n}: {n_rare[n]}" for n in args.ns) + ".", "",
             head, "|---" * (1 + 3 * len(args.ns)) + "|"]
    for r in args.rows:
        cells = [c for n in args.ns for c in (cell(results[r, n]["fid"], "%.2f"), cell(results[r, n]["miou"], "%.3f"),
                                              cell(results[r, n]["rare"], "%.3f"))]
        lines.append(f"| {ROWS[r].label} | " + " | ".join(cells) + " |")
    first = args.rows[0]  # the real images score the same in every row's evaluation
    lines.append("| real target val images | " + " | ".join(
        c for n in args.ns for c in ("0", cell(results[first, n]["miou_real"], "%.3f"), cell(results[first, n]["rare_real"], "%.3f")))
        + " |")
    return "\n".join(lines) + "\n"


# the paper's orderings: (title, [(better row, worse row)], '≫' when the paper reports a large gap)
ORDERINGS = [
    ("CAT finetuned ≫ Table 8's 'From scratch' (the same recipe, affinity layers from a random init)",
     [("cat", "freezed-2stage-resid")]),
    ("CAT finetuned ≫ a random-init OASIS (no source model)", [("cat", "random-init")]),
    ("Training-free CAT: a good affinity ≫ random", [(f"free-{m}", "free-random") for m in METHODS[1:]]),
    ("Finetuned CAT: a good affinity > random", [(f"cat-{m}-hard", "cat-random-hard") for m in METHODS[1:]]),
    ("Combination ≥ the best single method", [("free-combination", "free-text"), ("free-combination", "free-supervised"),
                                               ("cat-combination-hard", "cat-text-hard"),
                                               ("cat-combination-hard", "cat-supervised-hard")]),
    ("Hard ≥ soft (finetuned)", [(f"cat-{m}-hard", f"cat-{m}-soft") for m in METHODS]),
    ("Ablation: each component helps", [("freezed", "finetune"), ("freezed-2stage", "freezed"),
                                         ("freezed-2stage-resid", "freezed-2stage"), ("cat", "freezed-2stage-resid")]),
    ("CAT > TransferGAN and cGANTransfer", [("cat", "transfergan"), ("cat", "cgantransfer")]),
]


LABEL = {"miou": "mIoU", "rare": "rare mIoU", "fid": "FID"}


def verdict(a, b):
    """'holds' / 'within noise' / 'does not hold' for 'a better than b' on one metric (higher is better)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    if ma is None or mb is None:
        return None, "n/a"
    d = ma - mb
    return d, "holds" if d > max(sa, sb) else "within noise" if abs(d) <= max(sa, sb) else "does not hold"


def orderings(results, args):
    """One paragraph per ordering of the paper: each pair on mIoU, rare mIoU and FID, at each n."""
    paras = []
    for title, pairs in ORDERINGS:
        pairs = [(a, b) for a, b in pairs if a in args.rows and b in args.rows]
        if not pairs:
            continue
        parts, tally = [], {}
        for a, b in pairs:
            for n in args.ns:
                bits = []
                for metric, sign, fmt in (("miou", 1, "%+.3f"), ("rare", 1, "%+.3f"), ("fid", -1, "%+.2f")):
                    ra, rb = results[a, n][metric], results[b, n][metric]
                    d, v = verdict([None if x is None else sign * x for x in ra], [None if x is None else sign * x for x in rb])
                    tally[v] = tally.get(v, 0) + 1
                    bits.append(f"{LABEL[metric]} {fmt % (sign * d) if d is not None else 'n/a'} ({v})")
                parts.append(f"{ROWS[a].label} vs {ROWS[b].label}, n = {n}: " + ", ".join(bits))
        total = sum(tally.values())
        summary = ("**holds**" if tally.get("holds", 0) > total / 2 else "**does not hold**" if tally.get("does not hold", 0) > total / 2
                   else "**mixed**")
        paras.append(f"- {title}: {summary} ({', '.join(f'{k} {v}/{total}' for k, v in sorted(tally.items()))}). "
                     + "; ".join(parts) + ".")
    return ("Orderings (differences are the first row minus the second; FID lower is better; a verdict 'holds' needs "
            "a difference larger than the larger standard deviation):\n\n" + "\n".join(paras) + "\n")


def _font(size=11):
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _wrap(text, width, draw, font):
    lines, line = [], ""
    for word in text.split():
        if line and draw.textlength(line + " " + word, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = (line + " " + word).strip()
    return lines + [line]


def figure(rows, evals, n, seed, path, limit=None, n_maps=4, tile=64):
    """Columns with titles: label colours | one image per row's job | real image, for the first validation maps
    that show a tail class (design probability < 0.1), at the smallest n and the first seed."""
    from models.palette import palette
    import metrics
    val = data.open_dataset("toy-lt-target", split="val")
    tail = [k for k, c in enumerate(toy.TOY_LT_TARGET.values(), 1) if c[1] < RARE]
    shown = range(min(len(val), limit or len(val)))  # evaluate.py --limit: only the first maps have images
    picks = [i for i in shown if np.isin(np.asarray(Image.open(val.files[i][1])), tail).any()][:n_maps]
    picks += [i for i in shown if i not in picks][: n_maps - len(picks)]
    items = [val[i] for i in picks]
    colours = palette(val.n_channels).numpy()
    cols = [("labels", [colours[it["label"].numpy()] for it in items])]
    for r in rows:
        ev = evals[n, seed, ROWS[r].job] / "images"
        cols.append((ROWS[r].label, [np.asarray(Image.open(ev / (Path(it["path"]).stem + ".png")).convert("RGB")) for it in items]))
    cols.append(("real", [metrics.to_uint8(it["image"][None])[0] for it in items]))
    font, gap, title_h = _font(10), 4, 56
    canvas = Image.new("RGB", (len(cols) * (tile + gap), title_h + len(items) * (tile + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (title, tiles) in enumerate(cols):
        x = c * (tile + gap)
        for li, line in enumerate(_wrap(title, tile + gap - 2, draw, font)[:5]):
            draw.text((x, 2 + li * 11), line, fill="black", font=font)
        for i, t in enumerate(tiles):
            canvas.paste(Image.fromarray(np.ascontiguousarray(t)).resize((tile, tile), Image.NEAREST), (x, title_h + i * (tile + gap)))
    canvas.save(path)


# the plot's two panels (rows not in the run are left out; random-init OASIS is in neither: at 0.01-0.02 mIoU it
# would squash the zoomed axes) and its short line labels
PLOT_PANELS = (("Table 10 ablation path and transfer baselines",
                ("finetune", "transfergan", "freezed", "freezed-2stage", "freezed-2stage-resid", "cat", "cgantransfer")),
               ("Affinity methods (CAT training-free and finetuned)",
                (*[f"free-{m}" for m in METHODS], *[f"cat-{m}-{k}" for m in METHODS for k in ("hard", "soft")])))
SHORT = {"finetune": "finetune", "transfergan": "TransferGAN", "freezed": "+ FreezeD", "freezed-2stage": "+ 2 stages",
         "freezed-2stage-resid": "+ residual", "cat": "+ CAT (comb., hard)", "cgantransfer": "cGANTransfer",
         **{f"free-{m}": f"free, {m}" for m in METHODS},
         **{f"cat-{m}-{k}": f"CAT {m}, {k}" for m in METHODS for k in ("hard", "soft")}}
LINE_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 128), (128, 64, 0)]


def _nice_range(lo, hi):
    """A y range with round ticks around [lo, hi]: (bottom, top, tick step)."""
    span = max(hi - lo, 0.01)
    step = next(s for s in (0.002, 0.005, 0.01, 0.02, 0.025, 0.05, 0.1, 0.2, 0.25) if span / s <= 6)
    bottom, top = np.floor(lo / step) * step, np.ceil(hi / step) * step
    return bottom, (top if top > bottom else bottom + step), step


def _axis(vals, ceiling):
    """(bottom, top, tick step, off): a y axis zoomed to the rows' values (means ± std); the ceiling values join it
    unless that would more than double its span, else `off` is True and they are drawn above the frame."""
    whole = vals + ceiling
    off = bool(vals) and bool(ceiling) and max(whole) - min(whole) > 2 * max(max(vals) - min(vals), 0.01)
    use = vals if off else whole
    return (*_nice_range(max(min(use), 0.0), min(max(use), 1.0)), off)


def _spread(ys, lo, hi, gap):
    """Label positions near `ys` (sorted in the same order), at least `gap` apart, kept within [lo, hi]."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    pos = [ys[i] for i in order]
    for k in range(1, len(pos)):
        pos[k] = max(pos[k], pos[k - 1] + gap)
    over = pos[-1] - hi if pos else 0
    if over > 0:
        pos = [y - over for y in pos]
        for k in range(len(pos) - 2, -1, -1):
            pos[k] = min(pos[k], pos[k + 1] - gap)
    out = [0.0] * len(ys)
    for k, i in enumerate(order):
        out[i] = max(pos[k], lo) if len(pos) * gap <= hi - lo + gap else pos[k]
    return out


def _dashed(draw, x0, y0, x1, y1, fill, dash=6, width=2):
    length = max(np.hypot(x1 - x0, y1 - y0), 1e-6)
    for s in np.arange(0, length, 2 * dash):
        e = min(s + dash, length)
        draw.line([x0 + (x1 - x0) * s / length, y0 + (y1 - y0) * s / length,
                   x0 + (x1 - x0) * e / length, y0 + (y1 - y0) * e / length], fill=fill, width=width)


def plot(results, args, path, width=800):
    """Two panels (Table 10 ablation path + transfer baselines; affinity methods), each with mIoU (top) and rare mIoU
    (bottom) against n: mean over seeds with std error bars, the y axis zoomed to the data, each line labelled at its
    end, the real validation images' score (the evaluator's ceiling) dashed: on the axis when near the rows, else
    above the frame past an axis break, with its value. Rows sharing a run share a line."""
    ns = sorted(args.ns)
    panels = []
    for title, rows in PLOT_PANELS:
        lines = {}  # job -> [rows]: one line per run
        for r in rows:
            if r in args.rows:
                lines.setdefault(ROWS[r].job, []).append(r)
        if lines:
            panels.append((title, list(lines.values())))
    font, small = _font(13), _font(11)
    pw = width // max(len(panels), 1)
    sub_h, top_h = 300, 46
    canvas = Image.new("RGB", (width, top_h + 2 * sub_h), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 4), f"Long-tailed toy: mean ± std over seeds {args.seeds}; dashed = real validation images",
              fill="black", font=font)
    for pi, (title, lines) in enumerate(panels):
        ox = pi * pw
        draw.text((ox + 8, 24), title, fill="black", font=font)
        for si, (metric, real, name) in enumerate((("miou", "miou_real", "mIoU"), ("rare", "rare_real", "rare mIoU"))):
            oy = top_h + si * sub_h
            stats = {tuple(rows): [mean_std(results[rows[0], n][metric]) for n in ns] for rows in lines}
            ceiling = [mean_std(results[lines[0][0], n][real])[0] for n in ns]
            vals = [v for st in stats.values() for m, s in st if m is not None for v in (m - s, m + s)]
            known = [c for c in ceiling if c is not None]
            if not vals and not known:
                continue
            lo, hi, step, off = _axis(vals, known)
            l, r, t, b = ox + 46, ox + pw - 150, oy + (34 if off else 20), oy + sub_h - 40
            y_of = lambda v: b - (v - lo) / (hi - lo) * (b - t)  # noqa: E731
            x_of = lambda i: l + 25 + i * (r - l - 50) / max(len(ns) - 1, 1)  # noqa: E731
            draw.text((l, oy + 2), name, fill="black", font=font)
            for v in np.arange(lo, hi + step / 2, step):
                draw.line([l - 4, y_of(v), l, y_of(v)], fill="black")
                draw.line([l + 1, y_of(v), r - 1, y_of(v)], fill=(230, 230, 230))
                draw.text((ox + 4, y_of(v) - 7), f"{v:.3f}".rstrip("0").rstrip(".") if step < 0.01 else f"{v:.2f}",
                          fill="black", font=small)
            draw.rectangle([l, t, r, b], outline="black")
            for i, n in enumerate(ns):
                draw.text((x_of(i) - 18, b + 6), f"n = {n}", fill="black", font=small)
            ends, labels = [], []
            if off and len(known) == len(ceiling):
                _dashed(draw, x_of(0), t - 10, x_of(len(ns) - 1) if len(ns) > 1 else r - 5, t - 10, (90, 90, 90))
                for dy in (-8, -4):  # the axis break
                    draw.line([l - 5, t + dy + 2, l + 5, t + dy - 2], fill="black", width=2)
                ends.append(t - 10)
                labels.append(("real images = " + " / ".join(dict.fromkeys(f"{c:.2f}" for c in ceiling)), (90, 90, 90)))
            elif all(c is not None for c in ceiling):
                for i in range(len(ns) - 1):
                    _dashed(draw, x_of(i), y_of(ceiling[i]), x_of(i + 1), y_of(ceiling[i + 1]), (90, 90, 90))
                if len(ns) == 1:
                    _dashed(draw, l + 5, y_of(ceiling[0]), r - 5, y_of(ceiling[0]), (90, 90, 90))
                ends.append(y_of(ceiling[-1]))
                labels.append(("real images", (90, 90, 90)))
            for k, rows in enumerate(lines):
                colour, dx = LINE_COLOURS[k % len(LINE_COLOURS)], (k - len(lines) / 2) * 2.5
                pts = [(x_of(i) + dx, y_of(m), s) for i, (m, s) in enumerate(stats[tuple(rows)]) if m is not None]
                if len(pts) > 1:
                    draw.line([(x, y) for x, y, _ in pts], fill=colour, width=2)
                for x, y, s in pts:
                    ylo, yhi = min(y + s / (hi - lo) * (b - t), b), max(y - s / (hi - lo) * (b - t), t)
                    draw.line([x, ylo, x, yhi], fill=colour, width=1)
                    draw.line([x - 3, ylo, x + 3, ylo], fill=colour)
                    draw.line([x - 3, yhi, x + 3, yhi], fill=colour)
                    draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
                if pts:
                    ends.append(pts[-1][1])
                    labels.append((" = ".join(SHORT.get(r_, r_) for r_ in rows), colour))
            for y_end, y_lab, (text, colour) in zip(ends, _spread(ends, t - 17 if off else t, b - 12, 13), labels):
                draw.line([r + 2, y_end, r + 10, y_lab + 7], fill=colour)
                draw.text((r + 12, y_lab), text, fill=colour, font=small)
    canvas.save(path)


def write_benchmarks(table, verdicts, out, protocol, evaluator):
    """Replace the results part of BENCHMARKS.md's long-tail section of this protocol (between its markers); the
    figure and the plot are kept beside it in bench/ (v3: toy_longtail_v3_*.png; the old ones stay)."""
    stem = "toy_longtail_v3" if protocol == "v3" else "toy_longtail"
    for name in ("figure", "plot"):
        (REPO / "bench" / f"{stem}_{name}.png").write_bytes((out / f"{name}.png").read_bytes())
    tail = evaluator.get("val_tail_miou_real")
    line = (f"Evaluator trained in this run ({evaluator['train_images']} images, {evaluator['epochs']} epochs, "
            f"{evaluator['seconds'] / 60:.0f} min): evaluator on real validation images: mIoU {evaluator['val_miou_real']:.3f}, "
            f"tail mIoU {'n/a' if tail is None else f'{tail:.3f}'}.\n\n")
    section = "toy-longtail-v3" if protocol == "v3" else "toy-longtail"
    what = "third version: the pool evaluator, today's defaults" if protocol == "v3" else "measured with the old evaluator"
    write_section(section, f"### Results ({what})\n\n{line}{table}\n{verdicts}\nFigure `bench/{stem}_figure.png`: the "
                  "first validation maps showing a tail class, at the smallest n and the first seed; columns label "
                  f"colours | each row | real image. Plot `bench/{stem}_plot.png`: mIoU and rare-class mIoU against n, "
                  "two panels (ablation path and baselines; affinity methods), std over seeds as error bars, the real "
                  "images dashed.\n")


if __name__ == "__main__":
    main()
