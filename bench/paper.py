"""A table of the CAT paper, one command: every row's stages (estimate_affinity.py -> finetune_oasis.py /
finetune_piti.py / pretrain_piti.py -> evaluate.py) as subprocesses, then table.md in the paper's layout with our
numbers, the paper's beside them (supplement Tables 3, 4, 7 and 10, as far as the project's notes give them) and the
differences, and table.json with every run's results path.

The rows, the tables, the paper's numbers, the per-target learning rates and segmenters live in bench/rows.py (the
toy long-tail benchmark uses the same rows). Finished stages are skipped when the same command runs again (a half-done
table resumes); an affinity is made once per method, kind, seed (and n where it uses the target images) and shared by
every row and model; the FID reference statistics are computed once per split (the first evaluation; the others
read evaluate.py's --stats-cache).

    # Table 10 (OASIS ablation), COCO-Stuff -> ADE20K, on 2 GPUs
    python bench/paper.py --table 10 --pair coco-ade20k --source-ckpt checkpoints/oasis_coco_pretrained \\
        --data-root data/ADEChallengeData2016 --segmenter-weights upernet101_encoder.pth upernet101_decoder.pth \\
        --inception pt_inception-2015-12-05-6726825d.pth --gpus 0,1 --out runs/paper_t10
    # Table 11 (PITI ablation), the same pair, just the commands and the paper's numbers
    python bench/paper.py --table 11 --pair coco-ade20k --piti-base base_mask.pt --piti-upsampler upsample_mask.pt --dry-run
    # any table on the toy pair (a small source OASIS is pretrained first; toy evaluation nets), minutes on CPU
    python bench/paper.py --table 10 --pair toy --quick --out runs/paper_toy

The toy pair (the long-tailed toy task of bench/toy_longtail.py) uses that benchmark's budgets (bench/rows.py
TOY_PRESETS: gpu on CUDA, else cpu; --quick = tiny) and its toy evaluation nets (toy FID, not Inception FID). Its
source model, trained here unless --source-ckpt is given, is trained again with finetune_oasis.py --seed 1, then 2
when it collapsed (the source's own seed, not this driver's --seeds; bench/pipeline.py train_source; the cpu preset
only, the widths and batch the rule was measured at; the seeds tried are kept in <out>/logs/source_tries.json);
table.md and table.json give the seed used. Every stage made from an earlier source model trained here is made
again (its output older than the source's checkpoint.pt), also after an interrupted redo.

Supervised and combination affinities use the source OASIS discriminator as the segmenter (--source-ckpt); the
training-free PITI rows are finetune_piti.py --steps 0. Rows a pair cannot run are listed with the reason before
anything runs.
"""
import argparse
import json
import os
import queue
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import data  # noqa: E402
import toy as toytasks  # noqa: E402
import rows as R  # noqa: E402
from pipeline import SOURCE_KEY, current, judged, run_step, schedule, source_note, train_source  # noqa: E402

NAMES = {"coco": "COCO-Stuff", "ade20k": "ADE20K", "cityscapes": "Cityscapes"}
LABEL = {"fid": "FID", "miou": "mIoU", "kid": "KID"}


def parse_pair(text):
    """'coco-ade20k' -> ('coco', 'ade20k'); 'toy' -> the long-tailed toy pair; any two data.py dataset names."""
    if text == "toy":
        return "toy-lt-source", "toy-lt-target"
    for i, ch in enumerate(text):
        if ch == "-" and text[:i] in data.DATASETS and text[i + 1:] in data.DATASETS:
            return text[:i], text[i + 1:]
    raise SystemExit(f"--pair {text}: expected SOURCE-TARGET of {', '.join(data.DATASETS)} (e.g. coco-ade20k), or toy")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", required=True, choices=list(R.TABLES), help="the supplement's table (or fig4, baselines)")
    p.add_argument("--pair", required=True, help=f"SOURCE-TARGET: {', '.join(R.PAPER_PAIRS)}, toy, or any two data.py names")
    p.add_argument("--models", nargs="+", default=["oasis", "piti"], choices=["oasis", "piti"], help="which model's rows")
    p.add_argument("--out", default="runs/paper", help="working folder (re-running skips finished stages)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, time estimates and the paper's numbers; run nothing")
    p.add_argument("--quick", action="store_true", help="toy pair: tiny widths and a few steps (the test's setting)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="n-shot subset + training seeds")
    p.add_argument("--n", type=int, default=100, help="target training images (the paper's 100; fig4 sweeps its own)")
    p.add_argument("--jobs", type=int, default=None, help="stages at a time (default: one per --gpus entry, else 1; CPU: cores)")
    p.add_argument("--gpus", default=None, help="comma list of GPU ids: one job per GPU (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g = p.add_argument_group("files (paper pairs; a row whose file is missing is skipped, with the reason)")
    g.add_argument("--data-root", help="the target dataset's folder (ADEChallengeData2016, cityscapes, cocostuff, ...)")
    g.add_argument("--source-root", help="the source dataset's folder (self-supervised affinity; a folder source's classes)")
    g.add_argument("--source-ckpt", help="source OASIS: official run folder / .pth (OASIS rows; supervised, combination A)")
    g.add_argument("--piti-base", help="PITI base file of the source (base_mask.pt)")
    g.add_argument("--piti-upsampler", help="PITI upsampler file of the source (upsample_mask.pt)")
    g.add_argument("--glide-ckpt", help="GLIDE base.pt (the PITI GLIDE-init baseline)")
    g.add_argument("--glide-up-ckpt", help="GLIDE upsample.pt (the GLIDE-init baseline's upsampler; optional)")
    g.add_argument("--segmenter-weights", nargs="+", metavar="PATH", help="the target's paper segmenter for mIoU")
    g.add_argument("--inception", help="FID Inception file (default: evaluate.py's, from the torch hub cache)")
    g.add_argument("--dino-weights", help="DINO ViT file or name (self-supervised affinity)")
    g.add_argument("--clip-weights", help="CLIP file (text affinity; default: estimate_affinity.py's)")
    g.add_argument("--hand", help="hand-designed mapping file (Table 7's hand row)")
    return p


class Plan:
    """The stages of a table: {key: (dependency keys, command, done file, stage name, run folder, made from)}, in
    order.

    A stage is done when its done file exists (an evaluation's results.json, an affinity's affinity.npy, both
    written last, and for a training run, `run` = its folder, whose checkpoint.pt is also written mid-run, the
    marker <out>/done/<key>.json written here after the run exited 0) and is not older than the file it is made
    from that this command may make anew (`made_from`: a toy source model's checkpoint.pt trained here, an
    evaluated run's marker; bench/pipeline.py current). A run interrupted after its first checkpoint (not older
    than that file) continues with --resume."""

    def __init__(self, out):
        self.out, self.tasks = out, {}

    def add(self, key, deps, cmd, done, stage, run=None, made_from=None):
        if key not in self.tasks:
            self.tasks[key] = (list(deps), cmd, self.marker(key) if run else done, stage, run, made_from)
        return key

    def marker(self, key):
        return self.out / "done" / f"{key}.json"


def requirements(row, args, toy):
    """Why `row` cannot run here (a list of reasons, empty when it can). A dry run reports none for missing files."""
    need = []
    if row.model == "piti" and toy:
        return ["no PITI source model for a toy pair (PITI is pretrained from GLIDE: see the baselines' GLIDE row)"]
    if row.model == "oasis" and row.train != "scratch" and not toy:
        need.append("--source-ckpt")
    if row.model == "piti" and row.train != "glide":
        need += ["--piti-base", "--piti-upsampler"]
    if row.train == "glide":
        need.append("--glide-ckpt")
    method = (row.affinity or ("",))[0]
    if method in ("supervised", "combination") and not toy:
        need.append("--source-ckpt")
    if method == "self-supervised":
        need += ["--dino-weights"] + ([] if toy else ["--source-root"])
    if method == "hand":
        need.append("--hand")
    if args.dry_run:
        return []
    return [f"needs {f}" for f in dict.fromkeys(need) if getattr(args, f[2:].replace("-", "_")) is None]


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    source, target = parse_pair(args.pair)
    toy = source.startswith("toy") and target.startswith("toy")
    paper_pair = f"{source}-{target}" in R.PAPER_PAIRS
    spec = R.TABLES[args.table]
    ns = list(spec.get("ns", [args.n]))
    gpus = [g for g in (args.gpus or "").split(",") if g != ""]
    if args.device:
        device = args.device
    elif gpus:
        device = "cuda"
    else:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    jobs = args.jobs or (len(gpus) if gpus else (os.cpu_count() or 1) if device == "cpu" else 1)
    out = Path(args.out).resolve()
    dev = ["--device", device]

    # which rows run, and why the others do not (said before anything runs)
    table_rows, skipped = [], {}
    for model in args.models:
        for rid, label in spec["rows"].get(model, []):
            why = requirements(R.ROWS[rid], args, toy)
            (skipped.__setitem__((model, rid), why) if why else table_rows.append((model, rid, label)))
    by_reason = {}
    for (model, rid), why in skipped.items():
        by_reason.setdefault(", ".join(why), []).append(f"{model} {R.ROWS[rid].label}")
    for why, names in by_reason.items():
        print(f"skipped ({why}): {'; '.join(names)}")
    if not table_rows:
        raise SystemExit(f"--table {args.table} --pair {args.pair}: no row can run here ({len(skipped)} skipped, see above)")
    if not args.dry_run:
        check_files(args, source, target, toy)

    def f(flag):  # a file flag's value, or a placeholder in a dry run
        value = getattr(args, flag[2:].replace("-", "_"))
        return value if value is not None else f"<{flag}>"

    plan = Plan(out)
    cfg = R.TOY_PRESETS["tiny" if args.quick else "gpu" if device == "cuda" else "cpu"] if toy else None
    data_flags = ["--data", target] + ([] if toy else ["--data-root", f("--data-root")])
    src_root = ["--source-root", f("--source-root")] if source == "folder" else []  # a folder source's classes.txt
    src_images = [] if toy else ["--source-root", f("--source-root")]  # the self-supervised prototypes' labelled source images

    # toy: the evaluation nets and a small source OASIS trained here
    if toy:
        evalnets, src_dir = out / "evalnets", out / "source"
        plan.add("evalnets", [], R.toy_segmenter_cmd(toytasks.task_root(target), evalnets, cfg["seg_epochs"], cfg["seg_max"]),
                 evalnets / "features.pt", "toy_segmenter")
        src_ckpt = args.source_ckpt or src_dir / "checkpoint.pt"
        made_src = None if args.source_ckpt else src_ckpt  # a source model trained here: what is older is remade

        def source_cmd(k):  # trained again with --seed 1, then 2 while it collapsed (bench/pipeline.py train_source)
            return R.oasis_cmd(["--init", "scratch", "--data", source, *cfg["width"], "--batch", cfg["batch"], "--stage1-steps",
                                "0", "--stage2-steps", cfg["source_steps"], *cfg["source_opt"], "--seed", k,
                                "--eval-every", cfg["source_steps"], *cfg["extra"]] + dev, src_dir)
        if not args.source_ckpt:
            plan.add("source", [], source_cmd(0), None, "oasis", run=src_dir)
        src_deps = [] if args.source_ckpt else ["source"]
        eval_flags = [*data_flags, "--split", "val", "--fid-features", evalnets / "features.pt", "--segmenter",
                      evalnets / "segmenter.pt", "--workers", "0", *R.evaluate_flags(grid=4, stats_cache="")] + dev
        eval_flags += ["--limit", cfg["limit"]] if cfg["limit"] else []
        eval_deps = ["evalnets"]
    else:
        src_ckpt, src_deps, eval_deps, made_src = f("--source-ckpt"), [], [], None
        seg = R.SEGMENTER.get(target)
        eval_flags = [*data_flags, "--split", "val", *(["--segmenter", seg] if seg else []),
                      *(["--segmenter-weights", *(args.segmenter_weights or ["<--segmenter-weights>"])]),
                      *(["--inception", args.inception] if args.inception else []),
                      *R.evaluate_flags(stats_cache=out / "fid_stats")] + dev

    def affinity(method, kind, n, seed):
        """(task key, affinity.npy): text once per kind, random per seed, the others per n and seed."""
        if method in ("text", "hand"):
            d = out / "aff" / f"{method}_{kind}"
        elif method == "random":
            d = out / "aff" / f"random_{kind}_seed{seed}"
        else:
            d = out / f"n{n}" / f"seed{seed}" / f"aff_{method}_{kind}"
        extra, deps = [], []
        if method in ("text", "combination"):
            extra += ["--text-encoder", "minilm"] if toy else (["--clip-weights", args.clip_weights] if args.clip_weights else [])
        if method in ("supervised", "combination"):
            extra += ["--source-ckpt", src_ckpt, *data_flags, "--n", n, "--subset-seed", seed]
            deps += src_deps
        if method == "self-supervised" or (method == "combination" and args.dino_weights):
            extra += ["--dino-weights", f("--dino-weights"), *src_images, *([] if method == "combination" else data_flags),
                      *([] if method == "combination" else ["--n", n, "--subset-seed", seed])]
        if method == "combination":
            extra += ["--weights", "text=1,supervised=1" + (",self-supervised=1" if args.dino_weights else "")]
        if method == "hand":
            extra += ["--hand", f("--hand")]
        key = str(d.relative_to(out)).replace("/", "_")
        made = made_src if method in ("supervised", "combination") else None
        return plan.add(key, deps, R.estimate_cmd(source, target, method, kind, d, seed, extra) + dev, d / "affinity.npy",
                        "estimate", made_from=made), d / "affinity.npy"

    # the model evaluated: with early stopping on val FID (--inception) the best one, else the last
    final = "best.pt" if args.inception and not toy else "checkpoint.pt"
    entries = []  # (model, row id, label, n, seed, eval folder, run folder or None)
    first_eval = None
    for seed in args.seeds:
        for n in ns:
            sd = out / f"n{n}" / f"seed{seed}"
            common = [*data_flags, "--n", n, "--subset-seed", seed, "--seed", seed]
            for model, rid, label in table_rows:
                row = R.ROWS[rid]
                job, deps, rd, made_from = row.job, list(eval_deps), None, None
                aff_flags, tdeps = [], []
                if row.affinity:
                    key, aff = affinity(*row.affinity, n, seed)
                    aff_flags, tdeps = ["--affinity", aff], [key]
                if model == "oasis":
                    if toy:
                        steps = cfg["steps"]
                        train = ["--batch", cfg["batch"], *cfg["target_opt"], "--eval-every", steps, *cfg["extra"],
                                 "--stage1-steps", steps * 2 // 5, "--stage2-steps", steps - steps * 2 // 5]
                    else:
                        train = ["--lr", R.LR["oasis"][target]] if target in R.LR["oasis"] else []
                        train += ["--inception", args.inception] if args.inception else []
                    if row.train == "free":
                        model_flags = ["--ckpt", src_ckpt, "--source", source, *src_root, *aff_flags]
                        deps, made_from = deps + src_deps + tdeps, made_src
                    else:
                        rd = sd / f"run_{job}"
                        flags = (["--init", "scratch", *(cfg["width"] if toy else [])] if row.train == "scratch" else
                                 ["--source", source, *src_root, "--source-ckpt", src_ckpt, *row.flags, *aff_flags])
                        scratch = row.train == "scratch"  # not made from the source model
                        rkey = plan.add(f"n{n}_seed{seed}_run_{job}", [] if scratch else src_deps + tdeps,
                                        R.oasis_cmd([*flags, *common, *train] + dev, rd), None, "oasis", run=rd,
                                        made_from=None if scratch else made_src)
                        model_flags, deps, made_from = ["--ckpt", rd / final], deps + [rkey], plan.marker(rkey)
                else:
                    # the supplement's rate is CAT's; the GLIDE-init baseline keeps its recipe's (pretrain_piti.RECIPES)
                    train = ["--lr", R.LR["piti"][target]] if target in R.LR["piti"] and row.train != "glide" else []
                    train += ["--inception", args.inception] if args.inception else []
                    rd = sd / f"run_{job}"
                    if row.train == "glide":
                        flags = ["--glide-ckpt", f("--glide-ckpt"), *(["--glide-up-ckpt", args.glide_up_ckpt] if args.glide_up_ckpt else []),
                                 *row.flags]
                        cmd, stage = R.pretrain_piti_cmd([*flags, *common, *train] + dev, rd), "pretrain_piti"
                    else:
                        flags = ["--base", f("--piti-base"), "--upsampler", f("--piti-upsampler"), "--source", source, *src_root,
                                 *aff_flags, *row.flags]
                        cmd, stage = R.piti_cmd([*flags, *common, *train] + dev, rd), "piti"
                    rkey = plan.add(f"n{n}_seed{seed}_run_{job}", tdeps, cmd, None, stage, run=rd)
                    model_flags, deps, made_from = ["--ckpt", rd / final], deps + [rkey], plan.marker(rkey)
                ev = sd / f"eval_{job}"
                ekey = f"n{n}_seed{seed}_eval_{job}"
                if ekey not in plan.tasks and not toy:  # one FID reference statistic per split: the first evaluation's
                    deps += [first_eval] if first_eval else []
                    first_eval = first_eval or ekey
                plan.add(ekey, deps, R.evaluate_cmd(model_flags, eval_flags, ev, seed), ev / "results.json", "evaluate",
                         made_from=made_from)
                entries.append((model, rid, label, n, seed, ev, rd))

    if args.dry_run:
        dry_run(args, plan, table_rows, source, target, paper_pair, ns)
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    free_gpus = queue.Queue()
    for g in gpus:
        free_gpus.put(g)
    logs = out / "logs"

    def step(key, cmd, done, run, made_from, again=False):
        """One stage, skipped when done (`current`: its done file not older than `made_from`), unless `again` (the
        toy source trained with another seed); a run made from an earlier source model starts over (--overwrite)."""
        if current(done, made_from) and not again:
            return
        if run is not None:
            done.unlink(missing_ok=True)  # the marker of a run made before: this one is not finished yet
        gpu = free_gpus.get() if gpus else None
        resume = run is not None and current(run / "checkpoint.pt", made_from) and not again
        todo = [cmd[0], "--resume", "--out", run] if resume else cmd
        try:
            run_step(todo, logs / f"{key}.log", None, threads, env={"CUDA_VISIBLE_DEVICES": gpu} if gpu else None)
        finally:
            if gpu is not None:
                free_gpus.put(gpu)
        if run is not None:
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps({"command": [str(c) for c in todo], "finished": time.strftime("%Y-%m-%d %H:%M:%S")}))

    source_model = {}  # {seed, collapsed}: the toy source model trained here
    judge = toy and judged(cfg["width"], cfg["batch"])

    def runner(key, cmd, done, run, made_from):
        if key == "source" and toy:
            def go():
                seed, why = train_source(lambda k, again: step(key, source_cmd(k), done, run, None, again), run,
                                         cfg["source_steps"], logs / "source_tries.json", judge=judge)
                source_model.update(seed=seed, collapsed=why)
            return go
        return lambda: step(key, cmd, done, run, made_from)

    if toy:
        for name in (source, target):
            toytasks.ensure(name)  # generated once, here, before the jobs start
    t0 = time.time()
    try:
        schedule({k: (deps, runner(k, cmd, done, run, made)) for k, (deps, cmd, done, _, run, made) in plan.tasks.items()},
                 jobs)
    except RuntimeError as e:
        raise SystemExit(str(e))
    write_table(args, spec, entries, skipped, source, target, paper_pair, ns, out, time.time() - t0, device, source_model,
                judge)


def check_files(args, source, target, toy):
    """One line naming the flag when the data or a file given is missing."""
    if not toy and args.data_root is None:
        raise SystemExit(f"--data-root: needed, the {NAMES.get(target, target)} target dataset's folder")
    if not toy and args.segmenter_weights is None and target in R.SEGMENTER:
        raise SystemExit(f"--segmenter-weights: needed for mIoU on {NAMES[target]} (the paper's {R.SEGMENTER[target]})")
    for flag in ("data_root", "source_root", "source_ckpt", "piti_base", "piti_upsampler", "glide_ckpt", "glide_up_ckpt",
                 "inception", "hand", "segmenter_weights"):
        value = getattr(args, flag)
        for path in (value if isinstance(value, list) else [value] if value else []):
            if not Path(path).exists():
                raise SystemExit(f"--{flag.replace('_', '-')} {path}: no such file or folder")


def fmt_s(s):
    return "unmeasured" if s is None else f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"


def dry_run(args, plan, table_rows, source, target, paper_pair, ns):
    spec, pair = R.TABLES[args.table], f"{source}-{target}"
    print(f"{spec['title']}, {NAMES.get(source, source)} -> {NAMES.get(target, target)}, n = {', '.join(map(str, ns))}, "
          f"seeds {args.seeds}")
    for model, rid, label in table_rows:
        paper = R.PAPER.get((args.table, pair, model, rid))
        nums = (", ".join(f"{LABEL[k]} {v}" for k, v in paper.items()) + f" (supplement Table {args.table})" if paper
                else "not in the project's notes" if paper_pair else "none (not one of the paper's pairs)")
        print(f"  {model} {label}: the paper's numbers: {nums}")
    known, unknown = 0.0, 0
    print(f"\n{len(plan.tasks)} stages (estimated time per run on one H100, from BENCHMARKS.md):")
    for key, (deps, cmd, done, stage, run, _) in plan.tasks.items():
        s = R.estimate_s(stage)
        known, unknown = known + (s or 0), unknown + (s is None)
        print(f"[{fmt_s(s)}] python " + shlex.join(str(c) for c in cmd))
    print(f"\ntotal: {fmt_s(known) if known else '0 s'} measured" + (f" + {unknown} stage(s) unmeasured" if unknown else ""))


def mean(vals):
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def write_table(args, spec, entries, skipped, source, target, paper_pair, ns, out, wall, device, source_model,
                judge=True):
    """table.md (the paper's layout: rows, switch columns, per metric ours | paper | difference) and table.json;
    source_model: {seed, collapsed} of a toy source model trained here, else {}; judge: whether it was checked
    for collapse."""
    pair, metrics = f"{source}-{target}", spec["metrics"]
    cells, records = {}, []
    for model, rid, label, n, seed, ev, rd in entries:
        res = json.loads((ev / "results.json").read_text())
        ours = {"fid": res.get("fid"), "miou": None if res.get("miou") is None else 100 * res["miou"], "kid": res.get("kid_mean")}
        cells.setdefault((model, rid, label, n), []).append(ours)
        records.append(dict(model=model, row=rid, label=label, n=n, seed=seed, results=str(ev / "results.json"),
                            run=str(rd) if rd else None, ours={k: ours[k] for k in metrics}))
    cmd = "python bench/paper.py " + " ".join(str(a) for a in args.argv)
    lines = [f"# {spec['title']}: {NAMES.get(source, source)} -> {NAMES.get(target, target)}", "",
             f"{time.strftime('%Y-%m-%d')}, device {device}, seeds {args.seeds}, wall time {wall / 60:.1f} min"
             f"{', ' + source_note(source_model, judge) if source_model else ''}. "
             f"Command: `{cmd}`. mIoU in %; our numbers are the mean over seeds; the paper's are from the supplement's "
             f"Table {args.table} where the project's notes give them (else '-').", ""]
    for model in args.models:
        rows = [(m, rid, label, n) for (m, rid, label, n) in cells if m == model]
        if not rows:
            continue
        switches = spec.get("switches", ()) if model == ("piti" if args.table == "11" else "oasis") else ()
        head = ["row"] + (["n"] if len(ns) > 1 else []) + list(switches)
        for k in metrics:
            head += [f"{LABEL[k]} (ours)", f"{LABEL[k]} (paper)", f"{LABEL[k]} diff"]
        lines += [f"## {model.upper()}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for m, rid, label, n in rows:
            row = [label] + ([str(n)] if len(ns) > 1 else []) + ["x" if on else "" for on in R.SWITCHES.get(rid, ())][:len(switches)]
            paper = R.PAPER.get((args.table, pair, model, rid), {}) if n == 100 else {}
            for k in metrics:
                ours = mean([c[k] for c in cells[m, rid, label, n]])
                theirs = paper.get(k)
                row += ["n/a" if ours is None else f"{ours:.3g}" if abs(ours) < 1 else f"{ours:.2f}", "-" if theirs is None else str(theirs),
                        "-" if ours is None or theirs is None else "%+.1f" % (ours - theirs)]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if skipped:
        lines += ["Skipped rows: " + "; ".join(f"{m} {R.ROWS[r].label} ({', '.join(w)})" for (m, r), w in skipped.items()), ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text("\n".join(lines))
    (out / "table.json").write_text(json.dumps(dict(table=args.table, pair=pair, runs=records,
                                                    skipped={f"{m} {r}": w for (m, r), w in skipped.items()},
                                                    **({SOURCE_KEY: source_model} if source_model else {})), indent=2))
    print("\n".join(lines))
    print(f"table: {out / 'table.md'}\nruns: {out / 'table.json'}")


if __name__ == "__main__":
    main()
