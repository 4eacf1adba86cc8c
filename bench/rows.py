"""The rows of the CAT paper's tables as the stage commands they need: ONE place, used by bench/paper.py (the
paper's tables on any pair) and bench/toy_longtail.py (the long-tailed toy table).

A row is a model (OASIS or PITI), how it is trained (from scratch on the target, finetuned from the source, training-
free, or the PITI GLIDE-init baseline), the training script's flags that make it that row (a recipe of
finetune_oasis.py, or finetune_piti.py's switches) and the affinity it needs (method, hard/soft), made by
estimate_affinity.py and shared by every row, model and run that needs the same one. Rows with the same `job` are the
same run (TransferGAN is the Finetune row's flags). The stage commands are built by one function per script
(estimate_cmd, oasis_cmd, piti_cmd, pretrain_piti_cmd, evaluate_cmd): a renamed flag is one line here.

Sources of the numbers: /work/shared/specs/cat_paper.md, paraphrasing the CVPR 2023 supplement (learning rates per
target: §C "Training"; results: Tables 3, 4, 7 and 10). A number that is not in those notes is left out.
"""
from typing import NamedTuple, Optional

from models.segmenters import DEFAULT_SEGMENTER
from pipeline import SMALL, lr_opt

METHODS = ("random", "text", "supervised", "self-supervised", "combination")  # estimate_affinity.py --method
TOY_METHODS = ("random", "text", "supervised", "combination")  # the toy table's (no DINO file for the toy domain)


class Row(NamedTuple):
    label: str                       # the row's name in a table
    model: str                       # "oasis" or "piti"
    job: str                         # run folder name; rows with the same job share one run
    train: str                       # "scratch" (target only), "finetune", "free" (training-free), "glide"
    flags: tuple = ()                # the training script's flags that make the row
    affinity: Optional[tuple] = None  # (method, "hard" | "soft") from estimate_affinity.py, or None

    @property
    def two_stage(self):
        """Whether the row trains in finetune_oasis.py's two stages (its recipe's `stages`)."""
        return self.model == "oasis" and any(r in self.flags for r in ("freezed-2stage", "freezed-2stage-resid", "cat"))


def _oasis_rows():
    rows = {
        "random-init": Row("Random-init OASIS (no source model)", "oasis", "scratch", "scratch"),
        "finetune": Row("Finetune, random 1x1 (ablation row 1)", "oasis", "finetune", "finetune", ("--recipe", "finetune")),
        "freezed": Row("+ FreezeD", "oasis", "freezed", "finetune", ("--recipe", "freezed")),
        "freezed-2stage": Row("+ FreezeD, 2 stages", "oasis", "freezed-2stage", "finetune", ("--recipe", "freezed-2stage")),
        "freezed-2stage-resid": Row("+ FreezeD, 2 stages, residual (= Table 8's 'From scratch')", "oasis",
                                    "freezed-2stage-resid", "finetune", ("--recipe", "freezed-2stage-resid")),
        "cat": Row("+ affinity = CAT (combination, hard)", "oasis", "cat-combination-hard", "finetune", ("--recipe", "cat"),
                   ("combination", "hard")),
        "transfergan": Row("TransferGAN (= the Finetune row's flags)", "oasis", "finetune", "finetune", ("--recipe", "finetune")),
        "cgantransfer": Row("cGANTransfer (learned softmax affinity)", "oasis", "cgantransfer", "finetune",
                            ("--recipe", "cgantransfer")),
    }
    for m in METHODS:
        rows[f"free-{m}"] = Row(f"CAT training-free, {m}", "oasis", f"free-{m}", "free", (), (m, "hard"))
    for m in METHODS:
        for k in ("hard", "soft"):
            rows[f"cat-{m}-{k}"] = Row(f"CAT finetuned, {m} ({k})", "oasis", f"cat-{m}-{k}", "finetune", ("--recipe", "cat"), (m, k))
    rows["cat-shared"] = Row("CAT finetuned, supervised (hard), shared gamma/beta paths", "oasis", "cat-shared", "finetune",
                             ("--recipe", "cat", "--paths", "shared"), ("supervised", "hard"))
    rows["cat-hand"] = Row("CAT finetuned, hand-designed A (--hand FILE)", "oasis", "cat-hand", "finetune", ("--recipe", "cat"),
                           ("hand", "hard"))
    return rows


def _piti_rows():
    rows = {
        # Table 11's first row and Figure 3's "finetune all layers": everything trained, no prompts, a random 1x1
        "piti-all": Row("PITI finetune all layers, random 1x1", "piti", "piti-all", "finetune", ("--train", "all", "--prompts", "0"),
                        ("random", "hard")),
        "piti-fixdec": Row("PITI + FixDec, random 1x1", "piti", "piti-fixdec", "finetune", ("--train", "fixdec", "--prompts", "0"),
                           ("random", "hard")),
        "piti-prompts": Row("PITI + FixDec + prompts, random 1x1", "piti", "piti-prompts", "finetune", ("--train", "fixdec", "--prompts", "8"),
                            ("random", "hard")),
        # Figure 3's GLIDE-init baseline: PITI trained from GLIDE on the few target images (README, "A PITI source")
        "piti-glide": Row("PITI from GLIDE on the target (pretrain_piti.py)", "piti", "piti-glide", "glide", ("--recipe", "piti-stage2")),
    }
    for m in METHODS:
        rows[f"piti-free-{m}"] = Row(f"PITI CAT training-free, {m}", "piti", f"piti-free-{m}", "free", ("--steps", "0"), (m, "hard"))
    for m in METHODS:
        for k in ("hard", "soft"):
            rows[f"piti-cat-{m}-{k}"] = Row(f"PITI CAT finetuned, {m} ({k})", "piti", f"piti-cat-{m}-{k}", "finetune",
                                            ("--train", "fixdec", "--prompts", "8"), (m, k))
    return rows


ROWS = {**_oasis_rows(), **_piti_rows()}

# The toy long-tail table's rows (bench/toy_longtail.py), in its order.
TOY_LONGTAIL_ROWS = ["random-init", "finetune", "freezed", "freezed-2stage", "freezed-2stage-resid", "cat", "transfergan",
                     "cgantransfer", *[f"free-{m}" for m in TOY_METHODS],
                     *[f"cat-{m}-{k}" for m in TOY_METHODS for k in ("hard", "soft")]]

# ---------------------------------------------------------------------------------------------------------------------
# The supplement's tables: per model, the rows as (row id, the paper's row name). The paper's CAT model of Tables 3, 4, 7
# and 10 is one and the same run (OASIS COCO->ADE20K FID 40.9, mIoU 31.4 in all four), and Table 4 says its affinity
# comes from a supervised segmentation network, hard: that row is cat-supervised-hard.
# Table 10's switches per row (FreezeD, 2 stage, Resid., CAT) are checked against finetune_oasis.RECIPES by the tests.

FIG4_NS = (10, 25, 50, 100)  # our choice of n for the n-sweep; the notes do not list the figure's values

TABLES = {
    "3": dict(title="Table 3: shared vs separate gamma/beta paths (OASIS)", metrics=("fid", "miou"),
              rows={"oasis": [("cat-supervised-hard", "Separate"), ("cat-shared", "Shared")]}),
    "4": dict(title="Table 4: hard vs soft affinity (supervised)", metrics=("fid", "miou"),
              rows={"oasis": [("cat-supervised-hard", "Hard"), ("cat-supervised-soft", "Soft")],
                    "piti": [("piti-cat-supervised-hard", "Hard"), ("piti-cat-supervised-soft", "Soft")]}),
    "7": dict(title="Table 7: hand-designed vs computed affinity (OASIS)", metrics=("fid", "miou"),
              rows={"oasis": [("cat-hand", "Hand-designed"), ("cat-supervised-hard", "Computed")]}),
    "8": dict(title="Table 8: affinity methods after finetuning", metrics=("fid", "miou"),
              rows={"oasis": [("freezed-2stage-resid", "From scratch"), ("cat-text-hard", "Text"),
                              ("cat-supervised-hard", "Supervised"), ("cat-self-supervised-hard", "Self-supervised"),
                              ("cat-combination-hard", "Combination")],
                    "piti": [("piti-cat-random-hard", "Random"), ("piti-cat-text-hard", "Text"),
                             ("piti-cat-supervised-hard", "Supervised"), ("piti-cat-self-supervised-hard", "Self-supervised"),
                             ("piti-cat-combination-hard", "Combination")]}),
    "9": dict(title="Table 9: affinity methods, training-free", metrics=("fid", "miou"),
              rows={"oasis": [(f"free-{m}", m.capitalize()) for m in METHODS],
                    "piti": [(f"piti-free-{m}", m.capitalize()) for m in METHODS]}),
    "10": dict(title="Table 10: OASIS ablation", metrics=("fid", "miou"), switches=("FreezeD", "2 stage", "Resid.", "CAT"),
               rows={"oasis": [("finetune", "none"), ("freezed", "+FreezeD"), ("freezed-2stage", "+2 stage"),
                               ("freezed-2stage-resid", "+Resid."), ("cat-supervised-hard", "+CAT")]}),
    "11": dict(title="Table 11: PITI ablation", metrics=("fid", "miou"), switches=("FixDec", "Prompts", "CAT"),
               rows={"piti": [("piti-all", "none"), ("piti-fixdec", "+FixDec"), ("piti-prompts", "+Prompts"),
                              ("piti-cat-supervised-hard", "+CAT")]}),
    "12": dict(title="Table 12: KID, training-free vs finetuned", metrics=("kid",),
               rows={"oasis": [("free-combination", "Training-free"), ("cat-combination-hard", "Finetuned")],
                     "piti": [("piti-free-combination", "Training-free"), ("piti-cat-combination-hard", "Finetuned")]}),
    "fig4": dict(title="Figure 4: CAT against the number of target images", metrics=("fid", "miou"), ns=FIG4_NS,
                 rows={"oasis": [("cat-combination-hard", "CAT")], "piti": [("piti-cat-combination-hard", "CAT")]}),
    "baselines": dict(title="Figures 2-3: transfer baselines", metrics=("fid", "miou"),
                      rows={"oasis": [("transfergan", "TransferGAN"), ("freezed", "FreezeD"), ("cgantransfer", "cGANTransfer"),
                                      ("cat-supervised-hard", "CAT")],
                            "piti": [("piti-all", "Finetune all layers"), ("piti-glide", "GLIDE init"),
                                     ("piti-cat-supervised-hard", "CAT")]}),
}

# Table 10's and 11's switch columns per row (True = the component is on), as the paper's layout prints them
SWITCHES = {
    "finetune": (False, False, False, False), "freezed": (True, False, False, False),
    "freezed-2stage": (True, True, False, False), "freezed-2stage-resid": (True, True, True, False),
    "cat-supervised-hard": (True, True, True, True),
    "piti-all": (False, False, False), "piti-fixdec": (True, False, False), "piti-prompts": (True, True, False),
    "piti-cat-supervised-hard": (True, True, True),
}

# The paper's numbers: (table, pair, model, row id) -> {metric: value}, cited by table. The notes give Table 4's
# numbers without naming the pair; its OASIS row equals Table 3's COCO->ADE20K one, so they are filed under coco-ade20k.
PAPER = {
    ("3", "coco-ade20k", "oasis", "cat-supervised-hard"): {"fid": 40.9, "miou": 31.4},
    ("3", "coco-ade20k", "oasis", "cat-shared"): {"fid": 41.4, "miou": 30.1},
    ("4", "coco-ade20k", "oasis", "cat-supervised-hard"): {"fid": 40.9, "miou": 31.4},
    ("4", "coco-ade20k", "oasis", "cat-supervised-soft"): {"fid": 44.7, "miou": 30.1},
    ("4", "coco-ade20k", "piti", "piti-cat-supervised-hard"): {"fid": 40.7, "miou": 22.3},
    ("4", "coco-ade20k", "piti", "piti-cat-supervised-soft"): {"fid": 43.6, "miou": 19.8},
    ("7", "coco-ade20k", "oasis", "cat-hand"): {"fid": 41.3, "miou": 31.6},
    ("7", "coco-ade20k", "oasis", "cat-supervised-hard"): {"fid": 40.9, "miou": 31.4},
    ("10", "coco-ade20k", "oasis", "finetune"): {"fid": 87.2},
    ("10", "coco-ade20k", "oasis", "freezed"): {"fid": 65.7},
    ("10", "coco-ade20k", "oasis", "freezed-2stage"): {"fid": 55.9},
    ("10", "coco-ade20k", "oasis", "freezed-2stage-resid"): {"fid": 55.2},
    ("10", "coco-ade20k", "oasis", "cat-supervised-hard"): {"fid": 40.9},
}

# ---------------------------------------------------------------------------------------------------------------------
# Per target: the supplement's chosen generator learning rates (§C; the tests check them against finetune_oasis.py's
# LR_BY_TARGET), and the paper's segmenter for mIoU (evaluate.py --segmenter; models/segmenters.py's table).
LR = {"oasis": {"cityscapes": "4e-4", "ade20k": "1e-4", "coco": "1e-4"},
      "piti": {"cityscapes": "7e-5", "ade20k": "2e-4", "coco": "2e-4"}}
SEGMENTER = DEFAULT_SEGMENTER
PAPER_PAIRS = ("coco-ade20k", "ade20k-coco", "ade20k-cityscapes", "coco-cityscapes")

# Seconds per run on one H100, by stage, from BENCHMARKS.md's measured figures. None are measured yet (the GPU
# sections there are pending), so every estimate prints "unmeasured"; fill in a stage when its figure lands.
H100_SECONDS = {}


def estimate_s(stage):
    """Estimated seconds of one `stage` run ("estimate", "oasis", "piti", "pretrain_piti", "evaluate", ...) on one
    H100, or None (unmeasured)."""
    return H100_SECONDS.get(stage)


# ---------------------------------------------------------------------------------------------------------------------
# Toy budgets (bench/toy_longtail.py's presets; bench/paper.py --pair toy uses them too, --quick = tiny).
TOY_PRESETS = {  # the cpu preset was sized for 2 hours on a 2-core CPU (BENCHMARKS.md)
    "gpu": dict(width=["--channels", "16", "--z-dim", "32", "--spade-hidden", "64", "--d-channels", "3,32,32,64,64,128,128",
                       "--d-last", "32"], batch=16, source_steps=20000, steps=2000, seg_epochs=20, seg_max=None, limit=None, extra=[],
                source_opt=[*lr_opt("4e-4"), "--ema-decay", "0.999"], target_opt=[*lr_opt("2e-4"), "--ema-decay", "0.999"]),
    "cpu": dict(width=SMALL, batch=8, source_steps=2000, steps=150, seg_epochs=10, seg_max=None, limit=None, extra=[],
                source_opt=[*lr_opt("1e-3"), "--ema-decay", "0.999"], target_opt=[*lr_opt("4e-4"), "--ema-decay", "0.99"]),
    "tiny": dict(width=["--channels", "4", "--z-dim", "8", "--spade-hidden", "8", "--d-channels", "3,8,8,16,16,16,16", "--d-last", "8"],
                 batch=2, source_steps=2, steps=2, seg_epochs=1, seg_max=16, limit=8, extra=["--bn-batches", "2", "--grid-n", "2"],
                 source_opt=[*lr_opt("1e-3"), "--ema-decay", "0.9"], target_opt=[*lr_opt("4e-4"), "--ema-decay", "0.9"]),
}


# ---------------------------------------------------------------------------------------------------------------------
# One function per script: the stage command (a list; paths may be Path objects).

def estimate_cmd(source, target, method, kind, out, seed=0, extra=()):
    """estimate_affinity.py: one affinity (hard or soft)."""
    return ["estimate_affinity.py", "--source", source, "--target", target, "--method", method, f"--{kind}", "--seed", seed,
            *extra, "--out", out]


def oasis_cmd(flags, out):
    """finetune_oasis.py: a run (its checkpoint.pt is written only at the end; --overwrite clears an interrupted one)."""
    return ["finetune_oasis.py", *flags, "--overwrite", "--out", out]


def piti_cmd(flags, out):
    """finetune_piti.py: a CAT run (or --steps 0: the training-free model)."""
    return ["finetune_piti.py", *flags, "--overwrite", "--out", out]


def pretrain_piti_cmd(flags, out):
    """pretrain_piti.py: PITI trained from GLIDE (the GLIDE-init baseline on a few-shot target)."""
    return ["pretrain_piti.py", *flags, "--overwrite", "--out", out]


def evaluate_cmd(model, flags, out, seed=0):
    """evaluate.py: FID, KID and mIoU of a model (`model`: --ckpt ... [training-free: --source, --affinity])."""
    return ["evaluate.py", *model, *flags, "--seed", seed, "--out", out]


def evaluate_flags(batch=None, grid=None, stats_cache=None):
    """evaluate.py's batch, grid and statistics-cache flags (the names of its flags in one place)."""
    return ([*(["--batch", batch] if batch is not None else []), *(["--grid-n", grid] if grid is not None else []),
             *(["--stats-cache", stats_cache] if stats_cache is not None else [])])


def toy_segmenter_cmd(data_root, out, epochs, max_train=None, size=64):
    """bench/toy_segmenter.py: the toy evaluation nets (segmenter.pt for mIoU, features.pt for the toy FID)."""
    return ["bench/toy_segmenter.py", "--data", "folder", "--data-root", data_root, "--size", size, "--out", out,
            "--epochs", epochs] + (["--max-train", max_train] if max_train else [])
