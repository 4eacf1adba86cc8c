"""finetune_piti.py end to end on the toy task with tiny PITI models saved in the official key format."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data
from models import DataError
from models.piti import PITI, load_piti_generator
from conftest import REPO

TINY = dict(model_channels=32, num_res_blocks=1, attention_ds=[2], num_head_channels=16, xf_width=32, xf_heads=4,
            encoder_layers=2, cnn_widths=[8, 8, 16, 16, 32], n_tokens=16, ref_size=64, transformer_proj_in=32)
BASE = dict(TINY, image_size=16, channel_mult=[1, 2])
UP = dict(TINY, image_size=32, channel_mult=[1, 1])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs: one torch thread (conftest)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny 'official' base and upsampler files for the toy source classes, and a toy affinity."""
    d = tmp_path_factory.mktemp("piti")
    source, target = data.class_table("toy-source"), data.class_table("toy-target")
    torch.manual_seed(0)
    for name, kw, sr in (("base.pt", BASE, False), ("up.pt", UP, True)):
        m = PITI(**kw, super_res=sr, source_channels=source.n_channels)
        torch.save({k: v for k, v in m.state_dict().items() if k in m.official_keys()}, d / name)
    match = {"lawn": "grass", "sea": "water", "street": "road", "house": "building", "bush": "tree",
             "beach": "sand", "boat": "car", "lava": "rock"}
    A = np.zeros((len(target), len(source)), np.float32)
    for i, t in enumerate(target.names):
        A[i, source.names.index(match.get(t, t))] = 1
    np.save(d / "affinity.npy", A)
    return d


def run(files, out, *extra):
    cmd = [sys.executable, "finetune_piti.py", "--out", str(out), "--base", str(files / "base.pt"),
           "--upsampler", str(files / "up.pt"), "--base-config", json.dumps(BASE), "--up-config", json.dumps(UP),
           "--source", "toy-source", "--affinity", str(files / "affinity.npy"), "--data", "toy-target", "--n", "4",
           "--batch", "2", "--prompts", "2", "--eval-every", "2", "--log-every", "1", "--grid-n", "2",
           "--sample-steps", "4", "--up-steps", "4", "--select-steps", "4", "--select-up-steps", "4", "--lr", "1e-3",
           "--device", "cpu", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def resume(out, *extra):
    cmd = [sys.executable, "finetune_piti.py", "--out", str(out), "--resume", *extra]
    return subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)


def losses(out):
    lines = [json.loads(s) for s in (out / "log.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in lines if "loss" in e}


def test_finetune_resume_and_generator(files, tmp_path):
    full = run(files, tmp_path / "full", "--steps", "4")
    assert full.returncode == 0, full.stderr[-2000:]
    half = run(files, tmp_path / "half", "--steps", "2")
    assert half.returncode == 0, half.stderr[-2000:]
    # a model flag changed on resume is refused in one line, before anything is written
    r = resume(tmp_path / "half", "--steps", "4", "--prompts", "3")
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--prompts is 3" in r.stderr and "used 2" in r.stderr
    # a run killed after its step-2 checkpoint had logged steps 3 and 4 (and the step-4 grid) already
    log = tmp_path / "half" / "log.jsonl"
    clean = log.read_text()
    with open(log, "a") as f:
        for entry in ({"step": 3, "loss": 99.0}, {"step": 4, "loss": 99.0}, {"step": 4, "grid": "samples/000004.png"}):
            f.write(json.dumps(entry) + "\n")
    # resuming needs only the run folder: every flag not given comes from the checkpoint
    more = resume(tmp_path / "half", "--steps", "4")
    assert more.returncode == 0, more.stderr[-2000:]
    lines = log.read_text().splitlines()
    assert "".join(ln + "\n" for ln in lines[:clean.count("\n")]) == clean  # the first part untouched
    entries = [json.loads(s) for s in lines]
    assert [e["step"] for e in entries if "loss" in e] == [1, 2, 3, 4]  # each step once, stale lines gone
    assert [e["step"] for e in entries if "grid" in e] == [0, 2, 4]
    a, b = losses(tmp_path / "full"), losses(tmp_path / "half")
    assert sorted(a) == [1, 2, 3, 4] and a == b  # the resumed steps 3 and 4 equal the uninterrupted run's
    assert all(np.isfinite(v) for v in a.values())
    for s in (0, 2, 4):
        assert (tmp_path / "full" / "samples" / f"{s:06d}.png").is_file()
    assert not (tmp_path / "full" / "best.pt").exists()  # no FID, no best
    with Image.open(tmp_path / "full" / "curves.png") as im:  # the training curves, redrawn at every evaluation
        assert im.format == "PNG" and im.size[0] >= 800
    ca = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    cb = torch.load(tmp_path / "half" / "checkpoint.pt", weights_only=True)
    assert ca["kind"] == "piti-cat" and ca["step"] == 4 and cb["step"] == 4
    assert cb["args"]["eval_every"] == 2 and cb["args"]["batch"] == 2  # taken from the run, not the defaults
    trained = set(ca["base"])
    assert "cat_map" in trained and "prompts" in trained and "encoder.cnn.conv1.weight" in trained
    assert "encoder.transformer.resblocks.1.attn.c_qkv.weight" in trained  # the last block
    assert not any(k.startswith(("decoder.", "encoder.transformer.resblocks.0.")) for k in trained)  # FixDec
    for k in ca["base_ema"]:
        assert torch.equal(ca["base_ema"][k], cb["base_ema"][k]), k
    assert ca["base"]["cat_map"].shape == (13, 10) and torch.equal(ca["up"]["cat_map"], ca["up_ema"]["cat_map"])

    gen = load_piti_generator(str(tmp_path / "full" / "checkpoint.pt"), "cpu", steps="4", up_steps="4")
    label = torch.randint(0, 10, (2, 64, 64), generator=torch.Generator().manual_seed(0))
    x = gen(label, seed=5)
    assert x.shape == (2, 3, 32, 32) and x.abs().max() <= 1
    assert torch.equal(x, gen(label, seed=5)) and not torch.equal(x, gen(label, seed=6))


def test_bad_input_one_line(files, tmp_path):
    r = run(files, tmp_path / "none", "--steps", "1", "--resume")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "nothing to resume" in r.stderr
    np.save(tmp_path / "wrong.npy", np.ones((9, 5), np.float32) / 5)
    r = run(files, tmp_path / "a", "--steps", "1", "--affinity", str(tmp_path / "wrong.npy"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "(9, 12)" in r.stderr
    r = run(files, tmp_path / "b", "--steps", "1", "--base", str(files / "up.pt"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "is an upsampler checkpoint" in r.stderr
    assert not (tmp_path / "b" / "checkpoint.pt").exists()
    r = run(files, tmp_path / "c", "--steps", "x")  # argparse's complaint is one line too, exit code 1
    assert r.returncode == 1 and r.stderr.strip().splitlines() == ["error: argument --steps: 'x': expected an integer "
                                                                   ">= 0 (see --help)"]
    # a non-empty --out is refused without --resume or --overwrite; --overwrite starts over
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "log.jsonl").write_text('{"step": 7, "loss": 1.0}\n')
    r = run(files, tmp_path / "d", "--steps", "0")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "folder is not empty" in r.stderr
    assert "--overwrite" in r.stderr and not (tmp_path / "d" / "checkpoint.pt").exists()
    # --overwrite removes only what a run recorded (manifest.txt): a log.jsonl no run recorded is not replaced
    r = run(files, tmp_path / "d", "--steps", "0", "--overwrite")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "log.jsonl was not recorded" in r.stderr
    assert (tmp_path / "d" / "log.jsonl").read_text() == '{"step": 7, "loss": 1.0}\n'
    (tmp_path / "d" / "log.jsonl").rename(tmp_path / "d" / "notes.jsonl")  # the user's own file: kept
    r = run(files, tmp_path / "d", "--steps", "0", "--overwrite")
    assert r.returncode == 0 and "kept 1 file" in r.stdout and (tmp_path / "d" / "notes.jsonl").is_file(), r.stderr
    r = run(files, tmp_path / "d", "--steps", "0", "--overwrite")  # the earlier run's own files are replaced
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[-1] == f"done: 0 steps, checkpoint {tmp_path / 'd' / 'checkpoint.pt'}"  # no FID
    note = [line for line in r.stdout.splitlines() if "no best.pt" in line]  # said once, naming checkpoint.pt
    assert len(note) == 1 and str(tmp_path / "d" / "checkpoint.pt") in note[0], r.stdout
    assert [json.loads(s)["step"] for s in (tmp_path / "d" / "log.jsonl").read_text().splitlines()] == [0]
    assert torch.load(tmp_path / "d" / "checkpoint.pt", weights_only=True)["step"] == 0


def test_ablation_rows_and_upsampler(files, tmp_path):
    """Table 11 rows in one run: finetune all, no prompts, no CAT (random 1x1 conv); upsampler trained too."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with warnings.catch_warnings():  # TorchScript is what evaluate.py reads, deprecated or not
        warnings.simplefilter("ignore", FutureWarning)
        feats = torch.jit.script(net)
    feats.save(str(tmp_path / "feats.pt"))  # a toy FID feature net: (B,3,H,W) in [0,1] -> (B,8)
    r = run(files, tmp_path / "abl", "--steps", "1", "--train", "all", "--prompts", "0", "--affinity", "none",
            "--finetune-upsampler", "--fid-features", str(tmp_path / "feats.pt"), "--fid-n", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    ck = torch.load(tmp_path / "abl" / "checkpoint.pt", weights_only=True)
    assert "prompts" not in ck["base"] and ck["affinity"] is None
    assert any(k.startswith("decoder.") for k in ck["base"]) and any(k.startswith("decoder.") for k in ck["up"])
    for part in ("base", "up"):  # PyTorch's default 1x1-conv init U(-1/sqrt(T), 1/sqrt(T)), T = 10 (+ one step)
        cat_map = ck[part]["cat_map"]
        assert cat_map.shape == (13, 10) and (cat_map < 0).any() and (cat_map.abs() <= 10 ** -0.5 + 0.01).all()
    log = [json.loads(s) for s in (tmp_path / "abl" / "log.jsonl").read_text().splitlines()]
    assert np.isfinite(log[-2]["up_loss"]) and np.isfinite(log[-2]["base_vb"])
    assert [e["step"] for e in log if "fid" in e] == [0, 1] and all(np.isfinite(e["fid"]) for e in log if "fid" in e)
    fids = {e["step"]: e["fid"] for e in log if "fid" in e}
    assert ck["best_fid"] == min(fids.values())
    best = torch.load(tmp_path / "abl" / "best.pt", weights_only=True)  # the state of the best evaluation
    assert best["kind"] == "piti-cat" and fids[best["step"]] == best["best_fid"] == ck["best_fid"]
    assert best["best_step"] == ck["best_step"] == best["step"]
    for s in (0, 1):  # each evaluation's FID on the console, with the best so far
        bs = min((k for k in fids if k <= s), key=lambda k: (fids[k], k))
        assert (f"step {s}: validation FID {fids[s]:.2f} (4+4 steps), best {fids[bs]:.2f} at step {bs}"
                in r.stdout), r.stdout
    assert "no best.pt" not in r.stdout
    assert r.stdout.splitlines()[-1] == (f"done: 1 steps, checkpoint {tmp_path / 'abl' / 'checkpoint.pt'}, best FID "
                                         f"{ck['best_fid']:.2f} at step {best['step']} ({tmp_path / 'abl' / 'best.pt'})")
    if best["step"] == 0:
        assert not torch.equal(best["base_ema"]["cat_map"], ck["base_ema"]["cat_map"])


def test_selection_sampler_is_the_fid_one(files, tmp_path):
    """--select-steps/--select-up-steps set the sampler of the FID that picks best.pt (default: evaluate.py's
    reported 250 + fast27), --sample-steps/--up-steps that of the grids only."""
    import finetune_piti
    args, _ = finetune_piti.get_args(["--base", "b", "--upsampler", "u", "--affinity", "a", "--data", "toy-target",
                                      "--out", str(tmp_path / "x")])
    assert (args.select_steps, args.select_up_steps) == ("250", "fast27") and args.sample_steps == "100"
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(net).save(str(tmp_path / "feats.pt"))
    fid, grid = {}, {}
    for sel in ("4", "2"):
        out = tmp_path / f"sel{sel}"
        r = run(files, out, "--steps", "0", "--fid-features", str(tmp_path / "feats.pt"), "--fid-n", "3",
                "--select-steps", sel, "--select-up-steps", sel)
        assert r.returncode == 0, r.stderr[-2000:]
        fid[sel] = json.loads((out / "log.jsonl").read_text().splitlines()[0])["fid"]
        grid[sel] = np.asarray(Image.open(out / "samples" / "000000.png"))
        assert f"({sel}+{sel} steps)" in r.stdout
    assert fid["4"] != fid["2"] and np.array_equal(grid["4"], grid["2"])
    # a resume that selects with another sampler does not compare its FIDs with the run's: tracking starts anew
    r = resume(tmp_path / "sel4", "--steps", "1", "--eval-every", "1", "--select-steps", "2", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "selected with the 4+4 sampler, this resume with 2+4: best-FID tracking" in r.stdout, r.stdout
    ck = torch.load(tmp_path / "sel4" / "checkpoint.pt", weights_only=True)
    assert ck["best_step"] == 1 and ck["args"]["select_steps"] == "2"


def test_missing_flags_at_once(tmp_path):
    """Every flag a mode needs is named in one line, with a command to copy for that --recipe."""
    import finetune_piti
    with pytest.raises(DataError, match=r"--base, --upsampler, --affinity, --data, --out are required for --recipe "
                                        r"cat; for example: python finetune_piti.py .* --affinity "):
        finetune_piti.get_args([])
    with pytest.raises(DataError, match=r"^--upsampler, --data are required for --recipe fixdec; .* --recipe fixdec "):
        finetune_piti.get_args(["--base", "b", "--recipe", "fixdec", "--out", str(tmp_path / "o")])
    cmd = str(pytest.raises(DataError, finetune_piti.get_args, ["--recipe", "finetune"]).value).split("example: ")[1]
    args, _ = finetune_piti.get_args(cmd.split(" (see")[0].split()[2:])  # the example itself parses
    assert args.recipe == "finetune" and args.data == "folder"


def test_help_shows_every_default():
    r = subprocess.run([sys.executable, "finetune_piti.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0
    import finetune_piti
    for a in finetune_piti.build_parser()._actions:
        assert a.help, a.option_strings  # every flag explained
    text = " ".join(r.stdout.split())
    for default in ("(default: 5000)", "(default: 500)", "(default: 250)", "(default: fast27)", "(default: cat)"):
        assert default in text, default


def test_nan_loss_stops_without_overwriting(files, tmp_path):
    r = run(files, tmp_path / "nan", "--steps", "3", "--train", "all", "--lr", "1e30")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "loss is" in r.stderr, r.stderr[-1500:]
    assert torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)["step"] == 0  # the last good one


def test_paper_defaults(tmp_path):
    """The paper's PITI learning rates per target; a training-free run (--steps 0) is the source model: no
    random prompt tokens unless asked for."""
    import finetune_piti
    base = ["--base", "b.pt", "--upsampler", "u.pt", "--affinity", "a.npy"]
    for i, (target, lr) in enumerate((("cityscapes", 7e-5), ("ade20k", 2e-4), ("coco", 2e-4), ("toy-target", 2e-4))):
        args, _ = finetune_piti.get_args(base + ["--data", target, "--out", str(tmp_path / f"r{i}")])
        assert args.lr == lr and args.prompts == 8
    args, _ = finetune_piti.get_args(base + ["--data", "toy-target", "--steps", "0", "--out", str(tmp_path / "free")])
    assert args.prompts == 0
    args, _ = finetune_piti.get_args(base + ["--data", "toy-target", "--steps", "0", "--prompts", "4", "--out",
                                             str(tmp_path / "free4")])
    assert args.prompts == 4


def test_recipes_are_table_11_rows(tmp_path):
    """--recipe names the rows of the paper's PITI ablation (Table 11: FixDec, Prompts, CAT added one at a time) as
    flag values; a flag given on the command line wins over its recipe's; only the CAT row needs an affinity file."""
    import finetune_piti
    files = ["--base", "b.pt", "--upsampler", "u.pt", "--data", "toy-target"]
    rows = {"finetune": ("all", 0, "none"), "fixdec": ("fixdec", 0, "none"), "fixdec-prompts": ("fixdec", 8, "none")}
    for i, (recipe, want) in enumerate(rows.items()):
        args, _ = finetune_piti.get_args(files + ["--recipe", recipe, "--out", str(tmp_path / f"r{i}")])
        assert (args.train, args.prompts, args.affinity) == want, recipe
    args, _ = finetune_piti.get_args(files + ["--affinity", "a.npy", "--out", str(tmp_path / "cat")])
    assert (args.recipe, args.train, args.prompts, args.affinity) == ("cat", "fixdec", 8, "a.npy")
    args, _ = finetune_piti.get_args(files + ["--recipe", "fixdec", "--prompts", "3", "--out", str(tmp_path / "o")])
    assert (args.train, args.prompts, args.affinity) == ("fixdec", 3, "none")
    with pytest.raises(DataError, match="--affinity is required"):
        finetune_piti.get_args(files + ["--recipe", "cat", "--out", str(tmp_path / "no_aff")])


def test_torchrun_two_ranks_equal_one_process(files, tmp_path):
    """Under torchrun (2 CPU ranks, gloo) each rank trains on its half of the global batch with the global
    batch's draws and averaged gradients: one step of the run equals the single-process one (up to float
    reduction order)."""
    lr = 1e-3
    cfg = ["--base-config", json.dumps(dict(BASE, dropout=0.0)), "--up-config", json.dumps(dict(UP, dropout=0.0)),
           "--steps", "1", "--finetune-upsampler", "--schedule-sampler", "loss-second-moment"]
    one = run(files, tmp_path / "one", *cfg)
    assert one.returncode == 0, one.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--", "finetune_piti.py",
           "--out", str(tmp_path / "two"), "--base", str(files / "base.pt"), "--upsampler", str(files / "up.pt"),
           "--source", "toy-source", "--affinity", str(files / "affinity.npy"), "--data", "toy-target", "--n", "4",
           "--batch", "2", "--prompts", "2", "--eval-every", "2", "--log-every", "1", "--grid-n", "2",
           "--sample-steps", "4", "--up-steps", "4", "--lr", str(lr), "--device", "cpu", *cfg]
    two = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", map_location="cpu", weights_only=True) for d in ("one", "two"))
    assert a["step"] == b["step"] == 1
    # The global batch's gradient, the real check of the DDP equivalence: after one Adam step exp_avg = (1 - beta1) g
    # (the optimizer holds base's then up's trained tensors, in the checkpoint's order). Gradients that are zero in
    # exact arithmetic (conv biases before InstanceNorm, the key part of the attention's qkv bias, which softmax
    # ignores) are float noise, different in the two runs: the tolerance is relative to the largest gradient.
    names = [(part, k) for part in ("base", "up") for k in a[part]]
    beta1, eps = a["opt"]["param_groups"][0]["betas"][0], a["opt"]["param_groups"][0]["eps"]
    grads = [{n: s["exp_avg"] / (1 - beta1) for n, s in zip(names, ck["opt"]["state"].values())} for ck in (a, b)]
    assert len(grads[0]) == len(names) == len(a["opt"]["state"]) == len(b["opt"]["state"])
    scale = max(g.abs().max() for g in grads[0].values())
    for n in names:  # seen: float noise up to 3e-6 x the largest gradient; a wrong split or average moves O(|g|)
        assert torch.allclose(grads[0][n], grads[1][n], rtol=0, atol=1e-5 * scale), n
    # The update. Adam's first step is p -= lr * m / (sqrt(v) + eps) with m = g, v = g^2 after bias correction:
    # each entry moves by lr * |g| / (|g| + eps) < lr, so the runs' weights differ by less than 2 lr anywhere (float
    # noise gradients may take opposite signs). Where both runs' gradients share their sign and exceed `floor`,
    # both moved by lr up to lr * eps / floor: they differ by that and float rounding only.
    floor, clear_entries, decay = 1e3 * eps, 0, a["args"]["ema_decay"]
    for part, k in names:
        ga, gb, diff = grads[0][part, k], grads[1][part, k], (a[part][k] - b[part][k]).abs()
        assert (diff < 2 * lr).all(), (part, k)
        clear = (ga.sign() == gb.sign()) & (ga.abs().minimum(gb.abs()) > floor)
        assert (diff[clear] <= lr * eps / floor + 1e-7).all(), (part, k)
        clear_entries += int(clear.sum())
        # the EMA moved (1 - decay) of the way: (1 - decay) * 2 lr apart at most
        assert ((a[f"{part}_ema"][k] - b[f"{part}_ema"][k]).abs() <= (1 - decay) * 2 * lr + 1e-7).all(), (part, k)
    assert clear_entries > 0.9 * sum(a[part][k].numel() for part, k in names)
    assert losses(tmp_path / "one").keys() == losses(tmp_path / "two").keys() == {1}
    assert abs(losses(tmp_path / "one")[1] - losses(tmp_path / "two")[1]) < 1e-5
    for name, state in a["timestep_samplers"].items():  # every rank's per-sample losses, gathered
        assert torch.equal(state["loss_counts"], b["timestep_samplers"][name]["loss_counts"])
        assert torch.allclose(state["loss_history"], b["timestep_samplers"][name]["loss_history"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("n_shot", [True, False], ids=["n4", "all-images"])
def test_kill_9_then_resume_logs_each_step_once(files, tmp_path, n_shot):
    """SIGKILL in the middle of a run, then --resume: training continues from the last checkpoint and log.jsonl
    holds every step once (the lines written after that checkpoint are dropped), with or without --n."""
    import signal
    import time
    out = tmp_path / "run"
    cmd = [sys.executable, "finetune_piti.py", "--out", str(out), "--base", str(files / "base.pt"),
           "--upsampler", str(files / "up.pt"), "--base-config", json.dumps(BASE), "--up-config", json.dumps(UP),
           "--source", "toy-source", "--affinity", str(files / "affinity.npy"), "--data", "toy-target",
           "--batch", "2", "--prompts", "2", "--steps", "400", "--eval-every", "4", "--log-every", "1", "--grid-n", "1",
           "--sample-steps", "2", "--up-steps", "2", "--device", "cpu", *(["--n", "4"] if n_shot else [])]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:  # step 5 or 6: the step-4 checkpoint is written, the step-8 one is 2+ steps away
        steps = list(losses(out)) if (out / "log.jsonl").exists() else []
        if steps and max(steps) >= 5:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["step"]
    assert saved >= 4 and max(losses(out)) > saved  # killed between two checkpoints
    r = resume(out, "--steps", str(saved + 4))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(s) for s in (out / "log.jsonl").read_text().splitlines()]
    logged = [e["step"] for e in lines if "loss" in e]
    assert logged == list(range(1, saved + 5))
    assert torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["step"] == saved + 4


def test_a_moved_run_and_moved_official_files_resume_and_evaluate(files, tmp_path):
    """The checkpoint records the official files as given plus size and sha256: a run folder moved together with
    (or apart from) them resumes with --base/--upsampler naming the new place, and load_piti_generator (what
    evaluate.py --base/--upsampler use) finds them the same way; another file with the recorded name is refused."""
    import shutil
    here = tmp_path / "files"
    here.mkdir()
    for name in ("base.pt", "up.pt", "affinity.npy"):
        shutil.copy(files / name, here / name)
    r = run(here, tmp_path / "run", "--steps", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["base_file"]["path"] == str(here / "base.pt") and len(ckpt["base_file"]["sha256"]) == 64
    assert ckpt["up_file"]["size"] == (files / "up.pt").stat().st_size
    shutil.move(tmp_path / "run", tmp_path / "moved_run")
    shutil.move(here, tmp_path / "moved_files")
    r = resume(tmp_path / "moved_run", "--steps", "4")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "--base" in r.stderr and "moved?" in r.stderr, r.stderr
    new = tmp_path / "moved_files"
    r = resume(tmp_path / "moved_run", "--steps", "4", "--base", str(new / "base.pt"), "--upsampler", str(new / "up.pt"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(losses(tmp_path / "moved_run")) == [1, 2, 3, 4]
    with pytest.raises(DataError, match="not the file the run used"):
        load_piti_generator(str(tmp_path / "moved_run" / "checkpoint.pt"), "cpu", base=str(new / "up.pt"))
    gen = load_piti_generator(str(tmp_path / "moved_run" / "checkpoint.pt"), "cpu", steps="2", up_steps="2",
                              base=str(new / "base.pt"), upsampler=str(new / "up.pt"))
    assert gen(torch.zeros(1, 64, 64, dtype=torch.long), seed=1).shape == (1, 3, 32, 32)
