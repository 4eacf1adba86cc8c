"""finetune_oasis.py end to end on the toy task, with tiny widths: runs, resumes exactly, trains under
torchrun, and refuses bad input in one line."""
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import finetune_oasis
from models import oasis, oasis_train
from models import DataError

REPO = Path(__file__).resolve().parents[1]
TINY = ["--channels", "4", "--z-dim", "8", "--spade-hidden", "8", "--d-channels", "3,8,8,16,16,16,16",
        "--d-last", "8", "--batch", "2", "--n", "4", "--bn-batches", "2", "--grid-n", "2", "--device", "cpu"]
# toy target class -> its source look-alike (lava has none: spread over rock and sand)
PAIRS = {"sky": "sky", "lawn": "grass", "sea": "water", "street": "road", "house": "building", "bush": "tree",
         "beach": "sand", "boat": "car"}


def run(*args, ok=True):
    # one thread per process: the test machine has 2 cores shared with other jobs, and OpenMP spinning
    # under contention makes these tiny models 10x slower
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, env=env,
                       timeout=300)
    if ok and r.returncode != 0:
        pytest.fail(f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return r


def finetune(*args, **kw):
    return run("finetune_oasis.py", *args, **kw)


def log_losses(out):
    lines = [json.loads(s) for s in (Path(out) / "log.jsonl").read_text().splitlines()]
    return {e["step"]: (e["loss_G"], e["loss_D"]) for e in lines if "loss_G" in e}


def hard_affinity(path):
    src, tgt = data.class_table("toy-source"), data.class_table("toy-target")
    A = np.zeros((len(tgt), len(src)), np.float32)
    for t, name in enumerate(tgt.names):
        if name in PAIRS:
            A[t, src.names.index(PAIRS[name])] = 1
        else:
            A[t, src.names.index("rock")] = A[t, src.names.index("sand")] = 0.5
    np.save(path, A)
    return A


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny toy source model trained from scratch for 2 steps (also the --init scratch end-to-end test)."""
    out = tmp_path_factory.mktemp("src")
    finetune("--init", "scratch", "--data", "toy-source", "--out", out, "--stage1-steps", "0",
             "--stage2-steps", "2", "--eval-every", "2", "--log-every", "1", *TINY)
    aff = hard_affinity(out / "affinity.npy")
    # a stand-in feature net for FID (pooled colours: 12 features), as TorchScript like the real ones
    with warnings.catch_warnings():  # torch.jit.script is deprecated, but TorchScript is the format we load
        warnings.simplefilter("ignore", FutureWarning)
        net = torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()))
    net.save(str(out / "features.pt"))
    return out / "checkpoint.pt", out / "affinity.npy", aff, out / "features.pt"


def cat_args(source, out, *extra):
    ckpt, aff, _, features = source
    return ["--source", "toy-source", "--source-ckpt", ckpt, "--affinity", aff, "--data", "toy-target",
            "--out", out, "--log-every", "1", "--fid-features", features, "--fid-n", "48", *TINY, *extra]


def test_scratch_checkpoint(source):
    ckpt = torch.load(source[0], map_location="cpu", weights_only=True)
    assert ckpt["kind"] == "oasis-cat" and ckpt["step"] == 2 and ckpt["affinity"] is None
    assert ckpt["target"]["dataset"] == "toy-source" and ckpt["target"]["n_channels"] == 13
    G = oasis.Generator(**ckpt["G_kwargs"])
    G.load_state_dict(ckpt["EMA"])
    out = G(data.onehot(torch.zeros(1, 64, 64, dtype=torch.long), 13), torch.zeros(1, 8))
    assert out.shape == (1, 3, 64, 64)


@pytest.fixture(scope="module")
def cat_run(source, tmp_path_factory):
    """An uninterrupted CAT run: 2 stage-1 steps, 4 stage-2 steps, saved at steps 3 and 6."""
    out = tmp_path_factory.mktemp("cat")
    finetune(*cat_args(source, out, "--stage1-steps", "2", "--stage2-steps", "4", "--eval-every", "3"))
    return out


def test_cat_end_to_end(source, cat_run):
    tmp_path = cat_run
    ckpt = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["source"]["dataset"] == "toy-source" and ckpt["target"]["dataset"] == "toy-target"
    assert torch.equal(ckpt["affinity"], torch.from_numpy(source[2]))
    assert ckpt["G_kwargs"]["cat_nc"] == 10 and ckpt["D_kwargs"]["semantic_nc"] == 10
    G, D = oasis.Generator(**ckpt["G_kwargs"]), oasis.Discriminator(**ckpt["D_kwargs"])
    G.load_state_dict(ckpt["G"])
    D.load_state_dict(ckpt["D"])
    losses = log_losses(tmp_path)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(np.isfinite(losses[s]).all() for s in losses)
    for s in (0, 3, 6):
        assert Image.open(tmp_path / "samples" / f"{s:06d}.png").size[0] > 3 * 64
    assert (tmp_path / "subset.txt").read_text().count("\n") == 4
    # FID at every evaluation; best.pt holds the best one
    fids = {e["step"]: e["fid"] for e in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "fid" in e}
    assert sorted(fids) == [3, 6] and all(np.isfinite(list(fids.values())))
    best = torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=True)
    assert best["best_fid"] == min(fids.values()) and best["step"] == min(fids, key=fids.get)
    with Image.open(tmp_path / "curves.png") as im:  # the training curves, redrawn at every evaluation
        assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] > 400
    # neither stage trains the layers outside the SPADE modules (fc, conv_img, the blocks' main convs); stage 2
    # moved the SPADE modules' shared convs
    src = torch.load(source[0], map_location="cpu", weights_only=True)
    for k in ("fc.weight", "conv_img.weight", "body.0.conv_0.weight_orig", "body.3.conv_s.weight_orig"):
        assert torch.equal(ckpt["G"][k], src["EMA"][k]), k
    assert not torch.equal(ckpt["G"]["body.0.norm_0.mlp_shared.0.weight"], src["EMA"]["body.0.norm_0.mlp_shared.0.weight"])
    # FreezeD (default 2): the first two encoder blocks of D keep their source weights, the third trains
    for k in ("body_down.0.conv1.0.weight_orig", "body_down.1.conv1.1.weight_orig"):
        assert torch.equal(ckpt["D"][k], src["D"][k]), k
    assert not torch.equal(ckpt["D"]["body_down.2.conv1.1.weight_orig"], src["D"]["body_down.2.conv1.1.weight_orig"])


def test_zero_steps_saves_the_training_free_model(source, tmp_path):
    """0 + 0 steps: the CAT model as built (affinity in every CAT layer, D head through A) is saved, gridded
    and scored, with no BN pass (nothing was trained)."""
    finetune(*cat_args(source, tmp_path, "--stage1-steps", "0", "--stage2-steps", "0"))
    ckpt = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    src = torch.load(source[0], map_location="cpu", weights_only=True)
    M = data.affinity_to_channels(source[2], data.class_table("toy-target"), data.class_table("toy-source"))
    assert ckpt["step"] == 0 and torch.equal(ckpt["EMA"]["fc_cat.weight"][:, :, 0, 0], M.t())
    assert torch.equal(ckpt["EMA"]["body.3.norm_0.first_norm.running_var"],
                       src["EMA"]["body.3.norm_0.first_norm.running_var"])
    head = ckpt["D"]["layer_up_last.weight"][:, :, 0, 0]
    assert torch.equal(head[0], src["D"]["layer_up_last.weight"][0, :, 0, 0])  # the fake row is kept
    assert torch.allclose(head[1:], M @ src["D"]["layer_up_last.weight"][1:, :, 0, 0], atol=1e-6)
    fids = [e for e in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "fid" in e]
    assert fids[0]["step"] == 0 and np.isfinite(fids[0]["fid"]) and (tmp_path / "samples" / "000000.png").is_file()


def changed_params(ckpt, src):
    """Generator parameters that moved away from the source model (CAT-only layers count as changed)."""
    return {k for k in ckpt["G"] if k not in src["EMA"] or not torch.equal(ckpt["G"][k], src["EMA"][k])}


@pytest.mark.parametrize("recipe", list(finetune_oasis.RECIPES))
def test_recipes_build_and_train_what_they_say(source, tmp_path, recipe):
    """Each ablation row / baseline: which layers exist, which G and D parameters train (a 2-step toy run,
    one step per stage), and the recipe recorded in the checkpoint and the log."""
    args = cat_args(source, tmp_path, "--recipe", recipe, "--stage1-steps", "1", "--stage2-steps", "1",
                    "--eval-every", "2", "--fid-n", "4")
    if recipe != "cat":  # the baselines need no affinity file
        i = args.index("--affinity")
        del args[i:i + 2]
    finetune_oasis.main([str(a) for a in args])
    ckpt = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    src = torch.load(source[0], map_location="cpu", weights_only=True)
    flags = {**finetune_oasis.RECIPES[recipe]}
    assert ckpt["args"]["recipe"] == recipe and all(ckpt["args"][k] == v for k, v in flags.items())
    log = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[0]["recipe"] == recipe
    G = oasis.Generator(**ckpt["G_kwargs"])
    has_res = any(k.endswith(("res_gamma.weight", "fc_res.weight", "res.weight")) for k in ckpt["G"])
    assert has_res == (not flags["no_residual"])
    changed = changed_params(ckpt, src)
    if flags["g_train"] == "all":  # one stage over every G parameter, fc and conv_img included
        assert {"fc.weight", "conv_img.weight", "body.0.norm_0.mlp_shared.0.weight"} <= changed
    else:  # the paper's sets: the SPADE modules and CAT layers only (the residual blocks' main convs stay)
        assert "fc.weight" not in changed and "conv_img.weight" not in changed
        assert "body.0.norm_0.mlp_shared.0.weight" in changed and "body.0.conv_0.weight_orig" not in changed
    frozen = [k for k in ckpt["D"] if k.startswith(tuple(f"body_down.{b}." for b in range(flags["freeze_d"])))
              and k.endswith(("weight_orig", "bias"))]  # parameters (spectral-norm u/v buffers move in train mode)
    assert all(torch.equal(ckpt["D"][k], src["D"][k]) for k in frozen)
    assert not torch.equal(ckpt["D"]["body_down.0.conv1.0.weight_orig"], src["D"]["body_down.0.conv1.0.weight_orig"]) \
        or flags["freeze_d"] > 0
    M = data.affinity_to_channels(source[2], data.class_table("toy-target"), data.class_table("toy-source"))
    if recipe == "cgantransfer":  # learned softmax rows, uniform at the start, trained
        assert "fc_cat.logits" in ckpt["G"] and G.kwargs["cat_affinity"] == "learned"
        G0 = oasis.Generator(**ckpt["G_kwargs"])
        row = G0.fc_cat.weight[:, 3, 0, 0]
        assert row[0] == 0 and torch.allclose(row[1:], torch.full_like(row[1:], 1 / (len(row) - 1)))
        assert "fc_cat.logits" in changed
    elif recipe == "cat":
        assert ckpt["affinity"] is not None
    else:  # a random 1x1 input layer, not the affinity
        assert ckpt["affinity"] is None and not torch.allclose(ckpt["G"]["fc_cat.weight"][:, :, 0, 0], M.t(), atol=1e-3)


def test_baseline_recipe_refuses_no_affinity_for_cat(source, tmp_path):
    args = cat_args(source, tmp_path, "--recipe", "cat")
    i = args.index("--affinity")
    del args[i:i + 2]
    bad_input(args, "--affinity")


def test_paper_defaults():
    """The paper's learning rates per target dataset; official OASIS's EMA (no warm-up) unless --ema-warmup, which
    follows a short run from its start."""
    base = ["--source", "ade20k", "--source-ckpt", "x", "--affinity", "a.npy", "--out", "o"]
    for target, lr in (("cityscapes", 4e-4), ("ade20k", 1e-4), ("coco", 1e-4), ("toy-target", 1e-4)):
        args, _ = finetune_oasis.get_args(base + ["--data", target])
        assert args.lr == lr and args.lr_d == 4e-4  # the paper's rate is lr_G; official lr_D is 4e-4 everywhere
        assert args.g_train == "spade" and args.stages == 2
    args, _ = finetune_oasis.get_args(base + ["--data", "cityscapes", "--lr", "2e-4"])
    assert args.lr == 2e-4 and args.lr_d == 4e-4
    args, _ = finetune_oasis.get_args(base + ["--data", "cityscapes", "--lr-d", "1e-3"])
    assert args.lr_d == 1e-3
    assert not args.ema_warmup and all(oasis_train.ema_decay(s, 0.9999) == 0.9999 for s in range(100))
    assert finetune_oasis.get_args(base + ["--data", "coco", "--ema-warmup"])[0].ema_warmup
    # the weight the step-0 model keeps in the EMA after 100 steps at decay 0.9999, with the warm-up
    keep = np.prod([oasis_train.ema_decay(s, 0.9999, warmup=True) for s in range(100)])
    assert keep < 1e-6 and 0.9999 ** 100 > 0.99
    assert oasis_train.ema_decay(10 ** 6, 0.9999, warmup=True) == 0.9999


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_warmup_reaches_training(source, tmp_path, warmup):
    """One training step: the EMA moves (1 - decay) of the way from the source weights to the trained ones,
    decay = --ema-decay 0.999 as official OASIS, or min(0.999, 1/10) with --ema-warmup."""
    args = cat_args(source, tmp_path, "--stage1-steps", "1", "--stage2-steps", "0", "--eval-every", "1",
                    "--ema-decay", "0.999", *(["--ema-warmup"] if warmup else []))
    finetune_oasis.main([str(a) for a in args])
    ckpt = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    src = torch.load(source[0], map_location="cpu", weights_only=True)
    keys = [k for k in changed_params(ckpt, src) if k in src["EMA"] and k.endswith(("weight", "weight_orig", "bias"))]
    assert keys and ckpt["args"]["ema_warmup"] == warmup
    moved, trained = (sum((ckpt[w][k].double() - src["EMA"][k].double()).abs().sum() for k in keys) for w in ("EMA", "G"))
    assert float(moved / trained) == pytest.approx(0.9 if warmup else 0.001, rel=0.02)


def test_d_head_flag(source, tmp_path):
    """--d-head: CAT builds D's class head through the affinity, the baseline recipes initialise it afresh, and
    --d-head random gives CAT the baselines' head (Table 10's +CAT step without the head change)."""
    base = ["--source", "toy-source", "--source-ckpt", "x", "--data", "toy-target", "--out", "o"]
    for recipe in finetune_oasis.RECIPES:
        aff = ["--affinity", "a.npy"] if recipe == "cat" else []
        assert finetune_oasis.get_args(base + aff + ["--recipe", recipe])[0].d_head == (
            "affinity" if recipe == "cat" else "random")
    with pytest.raises(DataError, match="--d-head affinity needs an --affinity file"):
        finetune_oasis.get_args(base + ["--recipe", "freezed", "--d-head", "affinity"])
    finetune_oasis.main([str(a) for a in cat_args(source, tmp_path, "--stage1-steps", "0", "--stage2-steps", "0",
                                                  "--d-head", "random")])
    ckpt = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    src = torch.load(source[0], map_location="cpu", weights_only=True)
    M = data.affinity_to_channels(source[2], data.class_table("toy-target"), data.class_table("toy-source"))
    head, src_head = ckpt["D"]["layer_up_last.weight"][:, :, 0, 0], src["D"]["layer_up_last.weight"][:, :, 0, 0]
    assert ckpt["args"]["d_head"] == "random" and head.shape[0] == 11
    assert not torch.allclose(head[1:], M @ src_head[1:], atol=1e-3)
    assert torch.equal(ckpt["G"]["fc_cat.weight"][:, :, 0, 0], M.t())  # G keeps the affinity


def test_missing_flags_all_at_once():
    """Every missing flag in one line with a command to copy for that mode (the design card's command)."""
    for argv, words in ((["--lr", "1e-4", "--n", "100"], ["--out, --data, --source, --source-ckpt, --affinity",
                                                         "python finetune_oasis.py --source ade20k"]),
                        (["--recipe", "freezed", "--data", "toy-target"], ["missing --out, --source, --source-ckpt;",
                                                                          "--recipe freezed"]),
                        (["--init", "scratch"], ["missing --out, --data;", "--init scratch"]),
                        (["--resume"], ["missing --out;", "--resume --out"])):
        with pytest.raises(DataError) as e:
            finetune_oasis.get_args(argv)
        assert all(w in str(e.value) for w in words), str(e.value)


def test_help_shows_defaults():
    r = run("finetune_oasis.py", "--help")
    text = " ".join(r.stdout.split())
    for default in ("(default: 2000)", "(default: 3000)", "(default: 500)", "(default: 8)", "(default: cat)"):
        assert default in text, default


def test_resume_is_exact(source, cat_run, tmp_path):
    full, part = cat_run, tmp_path / "part"
    finetune(*cat_args(source, part, "--stage1-steps", "2", "--stage2-steps", "1", "--eval-every", "3"))
    finetune(*cat_args(source, part, "--stage1-steps", "2", "--stage2-steps", "4", "--eval-every", "3", "--resume"))
    a, b = log_losses(full), log_losses(part)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]
    ca = torch.load(full / "checkpoint.pt", map_location="cpu", weights_only=True)
    cb = torch.load(part / "checkpoint.pt", map_location="cpu", weights_only=True)
    for k in ca["G"]:
        assert torch.equal(ca["G"][k], cb["G"][k]), k


def test_resume_refuses_an_older_checkpoint_format(cat_run, tmp_path):
    """A checkpoint carries its format version: a current one resumes with its own flags (lr_D is the run's
    own, whatever --lr says); one of format 1 (no 'format' key: the compatibility shims are gone) is refused
    in one line naming the version, before anything is written."""
    ckpt = torch.load(cat_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["format"] == 2 and "rng" not in ckpt  # steps are seeded from (seed, step): no RNG states
    (tmp_path / "new").mkdir()
    torch.save(ckpt, tmp_path / "new" / "checkpoint.pt")
    args, _ = finetune_oasis.get_args(["--out", str(tmp_path / "new"), "--resume", "--lr", "1e-5"])
    assert args.g_train == "spade" and args.lr == 1e-5 and args.lr_d == ckpt["args"]["lr_d"]
    (tmp_path / "old").mkdir()
    torch.save({k: v for k, v in ckpt.items() if k != "format"}, tmp_path / "old" / "checkpoint.pt")
    bad_input(["--out", tmp_path / "old", "--resume"], "checkpoint format 1", "reads format 2", "checkpoint.pt")
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["checkpoint.pt"]


def test_torchrun_two_ranks_agree(source, tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import finetune_oasis\n"
        "G, D, EMA = finetune_oasis.main(sys.argv[1:])\n"
        "torch.save({'G': dict(G.named_parameters()), 'D': dict(D.named_parameters())},"
        f" os.path.join({str(tmp_path)!r}, 'rank%s.pt' % os.environ['RANK']))\n")
    args = cat_args(source, tmp_path / "run")
    args[args.index("--batch") + 1] = "4"
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--", script, *args,
        "--stage1-steps", "2", "--stage2-steps", "2", "--eval-every", "4")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    src = torch.load(source[0], map_location="cpu", weights_only=True)
    for part in ("G", "D"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), (part, k)
    moved = [k for k in src["EMA"] if k in r0["G"] and not torch.equal(r0["G"][k], src["EMA"][k])]
    assert moved, "no generator weight changed in 4 steps"


# ---------------------------------------------------------------------------------------------- bad input
# Checked in-process (main(argv) raises DataError before training starts) to save a Python start-up
# each; the first one also runs as a real subprocess to see what a user sees.


def bad_input(args, *words):
    with pytest.raises(DataError) as e:
        finetune_oasis.main([str(a) for a in args])
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def with_affinity(source, tmp_path, A):
    np.save(tmp_path / "a.npy", A)
    args = cat_args(source, tmp_path / "o", "--stage2-steps", "1")
    args[args.index("--affinity") + 1] = tmp_path / "a.npy"
    return args


def test_bad_affinity_shape_one_line(source, tmp_path):
    r = finetune(*with_affinity(source, tmp_path, np.full((9, 11), 1 / 11, np.float32)), ok=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [s for s in r.stderr.splitlines() if s.strip()]
    assert len(lines) == 1 and all(w in lines[0] for w in ("a.npy", "(9, 11)", "(9, 12)")), r.stderr


@pytest.mark.parametrize("bad", ["nan", "negative", "rows"])
def test_bad_affinity_values(source, tmp_path, bad):
    A = source[2].copy()
    if bad == "nan":
        A[0, 0] = np.nan
    elif bad == "negative":
        A[0, 1] = -0.5
        A[0, 0] = 1.5
    else:
        A[1] *= 3
    bad_input(with_affinity(source, tmp_path, A), "a.npy", {"nan": "NaN", "negative": "negative", "rows": "row 1"}[bad])


def test_checkpoint_of_another_dataset(source, tmp_path):
    args = cat_args(source, tmp_path / "o", "--stage2-steps", "1")
    args[args.index("--source") + 1] = "toy-target"
    bad_input(args, "toy-source", "toy-target")


def test_n_bigger_than_data(source, tmp_path):
    args = cat_args(source, tmp_path / "o", "--stage2-steps", "1")
    args[args.index("--n") + 1] = "100000"
    bad_input(args, "--n 100000")


def test_size_not_multiple_of_64(tmp_path):
    bad_input(["--init", "scratch", "--data", "toy-source", "--out", tmp_path, "--size", "96", "--stage2-steps", "1",
               *TINY], "96x96", "64")


def test_label_out_of_range(tmp_path):
    root = tmp_path / "ds"
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("a\nb\n")
    for i in range(2):
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(np.full((64, 64), 2 + 3 * i, np.uint8)).save(root / "labels" / f"{i}.png")
    args = ["--init", "scratch", "--data", "folder", "--data-root", root, "--size", "64", "--out", tmp_path / "o",
            "--stage2-steps", "1", *TINY]
    args[args.index("--n") + 1] = "2"
    bad_input(args, "1.png", "5")


def test_nan_loss_keeps_last_good_checkpoint(source, cat_run, tmp_path):
    """Continue the 6-step run with an absurd learning rate: it must stop at step 7, naming the step, and
    leave the step-6 checkpoint in place."""
    for name in ("checkpoint.pt", "subset.txt"):
        shutil.copy(cat_run / name, tmp_path / name)
    r = finetune(*cat_args(source, tmp_path, "--stage1-steps", "2", "--stage2-steps", "8", "--eval-every", "3",
                           "--lr", "1e30", "--resume"), ok=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "not finite at step 7" in last and "step 6" in last, r.stderr
    assert torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)["step"] == 6


# ---------------------------------------------------------------------------------------------- into Cityscapes
# Supplement Tables 8-10 transfer 256x256 ADE20K / COCO-Stuff sources into 256x512 Cityscapes: the generator is
# convolutional, so the source weights make the target's width (the fc grid grows from 8x8 to 8x16).


def fake_layout(root, files, size, values, ext="png"):
    """Write (image, label) pairs at the given relative paths: random RGB images, labels of `values` in bands."""
    rng = np.random.default_rng(0)
    for k, (img, lbl) in enumerate(files):
        for p in (root / img, root / lbl):
            p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / img)
        lab = np.zeros(size, np.uint8)
        for i, v in enumerate(values):
            lab[i * size[0] // len(values):, :] = (v + k) % max(values) + 1 if i else v
        Image.fromarray(lab).save(root / lbl)


@pytest.fixture(scope="module")
def square_source(tmp_path_factory):
    """A 256x256 source (a 5-class folder dataset, tiny widths) saved by --init scratch at 0 steps, a fake
    Cityscapes (256x512, labelIds) and a hard affinity between them. (The full ADE20K configuration, 151
    channels, is the same code path at 20x the CPU time; the closing note of issue 21 gives that run.)"""
    w = tmp_path_factory.mktemp("square")
    src = w / "src_data"
    for split, n in (("train", 4), ("val", 2)):
        fake_layout(src, [(f"{split}/images/{i}.png", f"{split}/labels/{i}.png") for i in range(n)], (256, 256), [0, 1, 2, 5])
    (src / "classes.txt").write_text("sky\nroad\nbuilding\ntree\ncar\n")
    finetune_oasis.main([str(a) for a in ["--init", "scratch", "--data", "folder", "--data-root", src, "--size", "256",
                                           "--out", w / "src", "--stage1-steps", "0", "--stage2-steps", "0", *TINY]])
    cs = w / "cityscapes"
    for split, n in (("train", 4), ("val", 2)):
        stems = [f"aachen/aachen_{i:06d}_000019" for i in range(n)]
        fake_layout(cs, [(f"leftImg8bit/{split}/{s}_leftImg8bit.png", f"gtFine/{split}/{s}_gtFine_labelIds.png")
                         for s in stems], (256, 512), [7, 11, 21, 26, 33])
    A = np.zeros((33, 5), np.float32)  # Cityscapes real classes x source classes, one source per row
    A[np.arange(33), np.arange(33) % 5] = 1
    np.save(w / "A.npy", A)
    return w


def test_square_source_into_cityscapes(square_source, tmp_path):
    """Finetune (one step per stage) and evaluate a 256x256-source CAT model on 256x512 Cityscapes; the
    training-free mode of evaluate.py makes the same size; a source of another height is refused."""
    w = square_source
    cs = ["--data", "cityscapes", "--data-root", w / "cityscapes"]
    args = ["--source", "folder", "--source-root", w / "src_data", "--source-ckpt", w / "src" / "checkpoint.pt", "--affinity", w / "A.npy", *cs,
            "--out", tmp_path / "cat", "--stage1-steps", "1", "--stage2-steps", "1", "--eval-every", "2", *TINY]
    G, _, _ = finetune_oasis.main([str(a) for a in args])
    assert G.output_hw == (256, 512) and G.latent_hw == (8, 16)
    ckpt = torch.load(tmp_path / "cat" / "checkpoint.pt", map_location="cpu", weights_only=True)
    src = torch.load(w / "src" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert (ckpt["G_kwargs"]["crop_size"], ckpt["G_kwargs"]["aspect_ratio"]) == (512, 2.0)
    assert src["G_kwargs"]["crop_size"] == 256 and ckpt["G"]["fc.weight"].shape == src["EMA"]["fc.weight"].shape
    assert ckpt["args"]["lr"] == 4e-4 and ckpt["args"]["lr_d"] == 4e-4  # paper's lr_G for Cityscapes, official lr_D
    assert Image.open(tmp_path / "cat" / "samples" / "000002.png").size[0] > 512  # grid of 256x512 samples
    import evaluate
    for model, out in ((["--ckpt", tmp_path / "cat" / "checkpoint.pt"], "ev"),
                       (["--ckpt", w / "src" / "checkpoint.pt", "--source", "folder", "--source-root", w / "src_data",
                         "--affinity", w / "A.npy"], "free")):
        evaluate.main([str(a) for a in [*model, *cs, "--no-fid", "--workers", "0", "--device", "cpu",
                                        "--out", tmp_path / out, "--grid-n", "1"]])
        assert (tmp_path / out / "results.json").is_file()
        shots = sorted((tmp_path / out / "images").rglob("*.png"))
        assert shots and all(Image.open(p).size == (512, 256) for p in shots)
    # a 64-px source cannot make 256-px-high images: one line naming the sizes and --size
    bad = ["--source", "toy-source", "--source-ckpt", w / "toy" / "checkpoint.pt", "--affinity", w / "A.npy"]
    finetune_oasis.main([str(a) for a in ["--init", "scratch", "--data", "toy-source", "--out", w / "toy",
                                           "--stage1-steps", "0", "--stage2-steps", "0", *TINY]])
    with pytest.raises(DataError) as e:
        finetune_oasis.main([str(a) for a in [*bad, *cs, "--out", tmp_path / "bad", "--stage2-steps", "1", *TINY]])
    assert "makes 64x64 images" in str(e.value) and "256x512 (--size)" in str(e.value) and "\n" not in str(e.value)


def test_console_fid_and_no_best_notice(source, tmp_path, capsys):
    """Each evaluation prints the validation FID and the best so far; without a feature network one line at the
    start says that no best.pt will be written and points to checkpoint.pt."""
    steps = ["--stage1-steps", "1", "--stage2-steps", "1", "--eval-every", "1", "--fid-n", "4"]
    finetune_oasis.main([str(a) for a in cat_args(source, tmp_path / "fid", *steps)])
    out = capsys.readouterr().out
    fids = {e["step"]: e["fid"] for e in map(json.loads, (tmp_path / "fid" / "log.jsonl").read_text().splitlines())
            if "fid" in e}
    best = min(fids.values())
    for s in (1, 2):
        assert f"step {s}: validation FID {fids[s]:.2f} (best " in out
    assert f"(best {best:.2f} at step {min(fids, key=fids.get)})" in out and "no best.pt" not in out
    assert out.splitlines()[-1] == (f"done: {tmp_path / 'fid' / 'checkpoint.pt'} (step 2), best FID {best:.2f} at step "
                                    f"{min(fids, key=fids.get)} ({tmp_path / 'fid' / 'best.pt'})")
    args = cat_args(source, tmp_path / "nofid", *steps)
    i = args.index("--fid-features")
    del args[i:i + 2]
    finetune_oasis.main([str(a) for a in args])
    out = capsys.readouterr().out
    assert out.count("no best.pt") == 1 and str(tmp_path / "nofid" / "checkpoint.pt") in out
    assert "validation FID" not in out.replace("no validation FID", "")
    assert out.splitlines()[-1] == f"done: {tmp_path / 'nofid' / 'checkpoint.pt'} (step 2)"  # no best FID to name
    assert not (tmp_path / "nofid" / "best.pt").exists() and (tmp_path / "nofid" / "checkpoint.pt").is_file()
