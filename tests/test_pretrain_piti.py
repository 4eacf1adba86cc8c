"""pretrain_piti.py: a toy PITI source pretrained from a tiny GLIDE-format file (the official key layout,
tests/golden/piti_train), used as the source of a finetune_piti.py CAT run; the Figure 3 baseline (GLIDE init on a
few-shot target)."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import pretrain_piti
from models import DataError
from models.piti import PITI, load_official, load_piti_generator
from conftest import REPO

GOLD = Path(__file__).resolve().parent / "golden" / "piti_train"
# the tiny GLIDE files' configurations (glide_*_tiny.json) with the small encoder constants
ENC = dict(num_head_channels=16, xf_width=32, xf_heads=4, encoder_layers=2, cnn_widths=[8, 8, 16, 16, 32],
           n_tokens=16, ref_size=64, transformer_proj_in=32)
BASE = dict(ENC, image_size=16, model_channels=32, num_res_blocks=1, channel_mult=[1, 1], attention_ds=[2])
UP = dict(ENC, image_size=8, model_channels=32, num_res_blocks=1, channel_mult=[1], attention_ds=[])
TINY_UP = dict(ENC, image_size=32, model_channels=32, num_res_blocks=1, channel_mult=[1, 1], attention_ds=[2])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs: one torch thread (conftest)


def run(out, *extra, glide=("--glide-ckpt", str(GOLD / "glide_base_tiny.pt"))):
    cmd = [sys.executable, "pretrain_piti.py", "--out", str(out), *glide,
           "--base-config", json.dumps(BASE), "--up-config", json.dumps(UP), "--batch", "2", "--log-every", "1",
           "--grid-n", "2", "--sample-steps", "4", "--up-steps", "4", "--lr", "1e-3", "--device", "cpu", *extra]
    return subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)


def losses(out):
    lines = [json.loads(s) for s in (out / "log.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in lines if "loss" in e}


def test_toy_pretraining_from_glide_is_a_cat_source(tmp_path):
    """20 official stage-1 steps on the toy source (encoder only, loss-second-moment), resumed exactly; its
    exported base.pt is then the --base of a CAT run to the toy target."""
    common = ("--recipe", "piti-stage1", "--data", "toy-source", "--n", "8", "--eval-every", "10")
    full = run(tmp_path / "src", *common, "--steps", "20")
    assert full.returncode == 0, full.stderr[-2000:]
    half = run(tmp_path / "half", *common, "--steps", "10")
    assert half.returncode == 0, half.stderr[-2000:]
    more = subprocess.run([sys.executable, "pretrain_piti.py", "--out", str(tmp_path / "half"), "--resume", "--steps",
                           "20", "--eval-every", "10", "--log-every", "1", "--grid-n", "2", "--sample-steps", "4",
                           "--device", "cpu"], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stderr[-2000:]
    a, b = losses(tmp_path / "src"), losses(tmp_path / "half")
    assert sorted(a) == list(range(1, 21)) and a == b and all(np.isfinite(v) for v in a.values())
    ck = torch.load(tmp_path / "src" / "checkpoint.pt", weights_only=True)
    assert ck["init"] == "glide" and ck["step"] == 20 and ck["args"]["train"] == "encoder"
    assert ck["args"]["uncond_p"] == 0.0 and ck["args"]["schedule_sampler"] == "loss-second-moment"
    assert ck["timestep_samplers"]["base"]["loss_counts"].sum() == 40  # every sample's loss was recorded
    assert all(k.startswith("encoder.") for k in ck["base"])
    for s in (0, 10, 20):
        assert (tmp_path / "src" / "samples" / f"{s:06d}.png").is_file()
    # the export: an official flat file, strict keys; the decoder is still GLIDE's, the encoder trained (EMA)
    exported = torch.load(tmp_path / "src" / "base.pt", weights_only=True)
    src = data.class_table("toy-source")
    model = load_official(str(tmp_path / "src" / "base.pt"), config={**BASE, "source_channels": src.n_channels})
    glide = torch.load(GOLD / "glide_base_tiny.pt", weights_only=True)
    for k, v in model.decoder.state_dict().items():
        assert torch.equal(v, glide[k]), k
    for k, v in ck["base_ema"].items():
        assert torch.equal(exported[k], v), k
    assert not torch.equal(ck["base_ema"]["encoder.cnn.conv1.weight"], ck["base"]["encoder.cnn.conv1.weight"])

    # CAT from the new source: toy-source -> toy-target, with a tiny upsampler of the same label space
    tgt = data.class_table("toy-target")
    torch.manual_seed(0)
    up = PITI(**TINY_UP, super_res=True, source_channels=src.n_channels)
    torch.save({k: v for k, v in up.state_dict().items() if k in up.official_keys()}, tmp_path / "up.pt")
    A = np.zeros((len(tgt), len(src)), np.float32)
    match = {"lawn": "grass", "sea": "water", "street": "road", "house": "building", "bush": "tree", "beach": "sand",
             "boat": "car", "lava": "rock"}
    for i, t in enumerate(tgt.names):
        A[i, src.names.index(match.get(t, t))] = 1
    np.save(tmp_path / "aff.npy", A)
    cat = subprocess.run([sys.executable, "finetune_piti.py", "--out", str(tmp_path / "cat"), "--base",
                          str(tmp_path / "src" / "base.pt"), "--base-config", json.dumps(BASE), "--upsampler",
                          str(tmp_path / "up.pt"), "--up-config", json.dumps(TINY_UP), "--source", "toy-source",
                          "--affinity", str(tmp_path / "aff.npy"), "--data", "toy-target", "--n", "4", "--batch", "2",
                          "--prompts", "2", "--steps", "2", "--eval-every", "2", "--grid-n", "2", "--sample-steps", "4",
                          "--up-steps", "4", "--device", "cpu"], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=300)
    assert cat.returncode == 0, cat.stderr[-2000:]
    gen = load_piti_generator(str(tmp_path / "cat" / "checkpoint.pt"), "cpu", steps="4", up_steps="4")
    x = gen(torch.randint(0, tgt.n_channels, (1, 64, 64), generator=torch.Generator().manual_seed(0)), seed=1)
    assert x.shape == (1, 3, 32, 32) and torch.isfinite(x).all()


def test_figure3_baseline_glide_init_on_few_shot_target(tmp_path):
    """GLIDE init on the few-shot target (stage-2 recipe: everything, condition dropout 0.2), base and upsampler
    from their GLIDE files; the checkpoint samples through load_piti_generator like a CAT one."""
    r = run(tmp_path / "fig3", "--glide-up-ckpt", str(GOLD / "glide_upsample_tiny.pt"), "--recipe", "piti-stage2",
            "--data", "toy-target", "--n", "4", "--steps", "2", "--eval-every", "2", "--batch", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    ck = torch.load(tmp_path / "fig3" / "checkpoint.pt", weights_only=True)
    assert ck["args"]["train"] == "all" and ck["args"]["uncond_p"] == 0.2 and ck["affinity"] is None
    assert any(k.startswith("decoder.") for k in ck["base"]) and any(k.startswith("decoder.") for k in ck["up"])
    assert (tmp_path / "fig3" / "upsampler.pt").is_file() and (tmp_path / "fig3" / "samples" / "000002.png").is_file()
    log = [json.loads(s) for s in (tmp_path / "fig3" / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(e[k]) for e in log if "loss" in e for k in ("base_mse", "base_vb", "up_loss"))
    gen = load_piti_generator(str(tmp_path / "fig3" / "checkpoint.pt"), "cpu", steps="4", up_steps="4")
    tgt = data.class_table("toy-target")
    x = gen(torch.randint(0, tgt.n_channels, (2, 64, 64), generator=torch.Generator().manual_seed(0)), seed=3)
    assert x.shape == (2, 3, 8, 8) and x.abs().max() <= 1


def test_selection_fid_on_the_console(tmp_path):
    """A base-only run with a feature net: the FID that picks best.pt samples with --select-steps (default
    evaluate.py's 250), printed with the best so far at each evaluation; without one, a note says no best.pt."""
    args, _ = pretrain_piti.get_args(["--glide-ckpt", "g.pt", "--data", "toy-target", "--out", str(tmp_path / "x")])
    assert (args.select_steps, args.select_up_steps, args.sample_steps) == ("250", "fast27", "100")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(net).save(str(tmp_path / "feats.pt"))
    r = run(tmp_path / "f", "--data", "toy-target", "--n", "4", "--steps", "1", "--eval-every", "1", "--fid-features",
            str(tmp_path / "feats.pt"), "--fid-n", "3", "--select-steps", "3", "--select-up-steps", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    fids = {e["step"]: e["fid"] for e in map(json.loads, (tmp_path / "f" / "log.jsonl").read_text().splitlines())
            if "fid" in e}
    assert sorted(fids) == [0, 1] and "no best.pt" not in r.stdout
    b = min(fids, key=lambda k: (fids[k], k))
    assert f"step 1: validation FID {fids[1]:.2f} (3+2 steps), best {fids[b]:.2f} at step {b}" in r.stdout, r.stdout
    assert torch.load(tmp_path / "f" / "best.pt", weights_only=True)["step"] == b
    r = run(tmp_path / "g", "--data", "toy-target", "--n", "4", "--steps", "0")
    assert r.returncode == 0 and r.stdout.count("no best.pt") == 1 and not (tmp_path / "g" / "best.pt").exists()


def test_missing_flags_at_once_and_help(tmp_path):
    with pytest.raises(DataError, match=r"^--glide-ckpt .*, --data, --out are required; for example: python "
                                        r"pretrain_piti.py --glide-ckpt glide/base.pt --recipe piti-stage2 --encoder "):
        pretrain_piti.get_args(["--recipe", "piti-stage2"])
    cmd = str(pytest.raises(DataError, pretrain_piti.get_args, ["--recipe", "piti-upsample"]).value)
    args, _ = pretrain_piti.get_args(cmd.split("example: ")[1].split(" (see")[0].split()[2:])  # the example parses
    assert args.glide_up_ckpt and args.recipe == "piti-upsample" and args.data == "ade20k"
    for a in pretrain_piti.build_parser()._actions:
        assert a.help, a.option_strings  # every flag explained
    text = " ".join(subprocess.run([sys.executable, "pretrain_piti.py", "--help"], cwd=REPO, capture_output=True,
                                   text=True).stdout.split())
    for default in ("(default: 5000)", "(default: 500)", "(default: 250)", "(default: 100)", "(default: 0.999)"):
        assert default in text, default


def test_glide_bad_input_one_line(tmp_path):
    r = run(tmp_path / "a", "--steps", "1", "--data", "toy-target", "--n", "4",
            glide=("--glide-ckpt", str(GOLD / "glide_upsample_tiny.pt")))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "GLIDE's upsample.pt" in r.stderr, r.stderr[-1500:]
    assert len(r.stderr.strip().splitlines()) == 1
    common = ["--base-config", json.dumps(BASE), "--data", "toy-target", "--n", "4", "--steps", "1", "--device", "cpu"]
    glide = ["--glide-ckpt", str(GOLD / "glide_base_tiny.pt")]
    up = ["--glide-up-ckpt", str(GOLD / "glide_upsample_tiny.pt")]
    for extra, msg in (([], "--glide-ckpt"), (glide + ["--train", "fixdec"], "invalid choice: 'fixdec'"),
                       (glide + ["--affinity", "a.npy"], "unrecognized arguments: --affinity"),
                       (up + ["--encoder", "enc.pt"], "--encoder initialises the base model's encoder"),
                       (glide + up + ["--upsampler", "u.pt"], "--upsampler stands in"),
                       (up + ["--fid-features", "f.pt"], "FID needs the base model"),
                       (glide + ["--encoder", str(GOLD / "glide_base_tiny.pt")], "not an encoder")):
        with pytest.raises(DataError, match=msg) as e:
            pretrain_piti.main(["--out", str(tmp_path / "b"), *common, *extra])
        assert "\n" not in str(e.value)


def test_scripts_refuse_each_others_runs(tmp_path):
    """A pretraining run is continued by pretrain_piti.py, a CAT run by finetune_piti.py: each script's --resume
    names the other one (one line) instead of reading flags that do not apply."""
    import finetune_piti
    (tmp_path / "glide_run").mkdir()
    (tmp_path / "cat_run").mkdir()
    torch.save({"kind": "piti-cat", "format": 2, "init": "glide", "args": {}}, tmp_path / "glide_run" / "checkpoint.pt")
    torch.save({"kind": "piti-cat", "format": 2, "init": "piti", "args": {}}, tmp_path / "cat_run" / "checkpoint.pt")
    with pytest.raises(DataError, match="continue it with pretrain_piti.py"):
        finetune_piti.main(["--out", str(tmp_path / "glide_run"), "--resume", "--device", "cpu"])
    with pytest.raises(DataError, match="continue it with finetune_piti.py"):
        pretrain_piti.main(["--out", str(tmp_path / "cat_run"), "--resume", "--device", "cpu"])
