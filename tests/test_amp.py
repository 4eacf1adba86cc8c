"""models/amp.py: one precision decision per GPU class (capability passed in: no GPU needed), the fp16
GradScaler step, and both finetune scripts under CPU bf16 autocast (--amp bf16 --device cpu)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from models import DataError, oasis
from models.amp import autocast, backward_step, grad_scaler, pick, restore
from tests.test_finetune_piti import files, run as run_piti  # noqa: F401 (files is a fixture)

# compute capability -> what --amp auto runs
GPUS = {"V100": ((7, 0), "fp16"), "T4": ((7, 5), "fp16"), "RTX 2080": ((7, 5), "fp16"), "A100": ((8, 0), "bf16"),
        "RTX 3090": ((8, 6), "bf16"), "L4": ((8, 9), "bf16"), "H100": ((9, 0), "bf16"), "B200": ((10, 0), "bf16")}


@pytest.mark.parametrize("gpu", GPUS)
def test_auto_per_gpu_class(gpu):
    cap, amp = GPUS[gpu]
    assert pick("cuda", "auto", cap) == amp
    assert pick("cuda:1", "fp32", cap) == "fp32" and pick("cuda", "fp16", cap) == "fp16"
    if amp == "bf16":
        assert pick("cuda", "bf16", cap) == "bf16"
    else:
        with pytest.raises(DataError, match=rf"--amp bf16: this GPU \(compute capability {cap[0]}.{cap[1]}\) has no "
                                            "native bf16; use --amp auto"):
            pick("cuda", "bf16", cap)


def test_cpu_is_fp32_unless_bf16_is_asked_for():
    assert pick("cpu") == "fp32" and pick(torch.device("cpu"), "fp32") == "fp32"
    assert pick("cpu", "bf16") == "bf16"
    with pytest.raises(DataError, match="--amp fp16: .* for CUDA GPUs; on cpu use --amp bf16 or fp32"):
        pick("cpu", "fp16")
    with pytest.raises(DataError, match="--amp fp8: expected one of auto, bf16, fp16, fp32"):
        pick("cpu", "fp8")


def test_autocast_modes_on_cpu():
    a = torch.ones(4, 4)
    with autocast("cpu", "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    for amp in ("fp32", None):  # None: what pick('cpu', 'auto') gives, fp32
        with autocast("cpu", amp):
            assert (a @ a).dtype == torch.float32
    for bad in (True, "bf-16", "auto"):  # nothing else runs silently as fp32
        with pytest.raises(ValueError, match="expected one of bf16, fp16, fp32"):
            autocast("cpu", bad)
    assert not grad_scaler("cpu", "bf16").is_enabled() and grad_scaler("cpu", "fp16").is_enabled()


def test_backward_step_with_loss_scaling():
    """An enabled scaler gives the plain step's update (power-of-two scales are exact); an overflowing
    gradient skips the step and halves the scale; a disabled scaler is backward(); step()."""
    def setup():
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(8))
        return w, torch.optim.Adam([w], lr=0.1)

    x = torch.randn(8)
    w0, opt0 = setup()
    opt0.zero_grad()
    (w0 * x).sum().backward()
    opt0.step()
    for scaler in (torch.amp.GradScaler("cpu", init_scale=2.0 ** 16), grad_scaler("cpu", "fp32"), None):
        w, opt = setup()
        backward_step((w * x).sum(), opt, scaler)
        assert torch.equal(w, w0)
    w, opt = setup()
    before = w.detach().clone()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    backward_step((w * x).sum() * float("inf"), opt, scaler)
    assert torch.equal(w, before) and scaler.get_scale() == 2.0 ** 15
    fresh = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 16), grad_scaler("cpu", "bf16")]
    restore(fresh, [scaler.state_dict(), {}])  # a resumed fp16 run continues at the lowered scale
    assert fresh[0].get_scale() == 2.0 ** 15 and not fresh[1].is_enabled()


def test_oasis_train_step_under_fp16_scaling():
    """finetune_oasis.gan_step through two enabled scalers equals the unscaled step (one per network)."""
    import finetune_oasis
    out = []
    for enabled in (False, True):
        torch.manual_seed(0)
        G = oasis.Generator(5, z_dim=4, channels=4, spade_hidden=8, crop_size=64, aspect_ratio=1.0)
        D = oasis.Discriminator(5, channels=(3, 8, 8, 16, 16, 16, 16), last_width=8)
        EMA = oasis.Generator(**G.kwargs)
        EMA.load_state_dict(G.state_dict())
        optG, optD = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)
        scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, enabled=enabled) for _ in "GD"]
        torch.manual_seed(1)
        y = torch.nn.functional.one_hot(torch.randint(0, 5, (2, 64, 64)), 5).permute(0, 3, 1, 2).float()
        real = torch.rand(2, 3, 64, 64) * 2 - 1
        losses = finetune_oasis.gan_step(G, D, EMA, optG, optD, y, real, 10.0, 0.999, autocast("cpu", "fp32"),
                                         scalers)
        out.append((losses, G.state_dict(), D.state_dict()))
    (la, Ga, Da), (lb, Gb, Db) = out
    assert torch.equal(torch.stack(la), torch.stack(lb))
    for a, b in ((Ga, Gb), (Da, Db)):
        for k in a:
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k


def test_finetune_oasis_bf16_on_cpu(tmp_path):
    from tests.test_finetune_oasis import TINY
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "finetune_oasis.py", "--init", "scratch", "--data", "toy-source", "--stage1-steps", "0",
            "--stage2-steps", "2", "--eval-every", "2", "--log-every", "1", *TINY]
    for amp in ("bf16", None):
        out = tmp_path / str(amp)
        r = subprocess.run([*base, "--out", str(out), *(["--amp", amp] if amp else [])], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
        assert ckpt["args"]["amp"] == (amp or "auto") and ckpt["amp"] == (amp or "fp32")  # asked, resolved
        assert "precision" not in ckpt["args"]
        assert all(v.dtype in (torch.float32, torch.int64) for v in ckpt["G"].values())  # autocast: weights stay fp32
        lines = [json.loads(s) for s in (out / "log.jsonl").read_text().splitlines()]
        assert all(np.isfinite([e["loss_G"], e["loss_D"]]).all() for e in lines if "loss_G" in e)
    r = subprocess.run([*base, "--out", str(tmp_path / "fp16"), "--amp", "fp16"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: --amp fp16: fp16 autocast with a GradScaler is for CUDA GPUs; on cpu use --amp bf16 or fp32"]


def test_finetune_piti_bf16_on_cpu(files, tmp_path):  # noqa: F811
    r = run_piti(files, tmp_path / "run", "--steps", "2", "--amp", "bf16")
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["args"]["amp"] == "bf16" and ckpt["amp"] == "bf16" and ckpt["step"] == 2
    lines = [json.loads(s) for s in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines if "loss" in e] == [1, 2] and all(np.isfinite(e["loss"]) for e in lines if "loss" in e)
    assert ckpt["scaler"] == {}  # no loss scaling outside fp16


def test_evaluate_generates_under_the_picked_mode(tmp_path):
    """evaluate.py runs the generator under the autocast --amp resolves to (CPU bf16 here stands for a GPU's bf16
    or fp16: the same code path, models.amp.autocast with the picked mode), and results.json says which."""
    import evaluate
    from data import onehot
    from metrics import image_seeds
    names = ["sky", "grass"]
    maps = tmp_path / "maps"
    maps.mkdir()
    (maps / "classes.txt").write_text("\n".join(names) + "\n")
    label = np.zeros((32, 32), np.uint8)
    label[16:], label[:, :8] = 1, 2
    Image.fromarray(label).save(maps / "m.png")
    torch.manual_seed(0)
    G = oasis.Generator(3, z_dim=4, channels=2, spade_hidden=8, crop_size=32).eval()
    info = {"dataset": "folder", "names": names, "n_channels": 3}
    torch.save({"kind": "oasis-cat", "step": 7, "args": {}, "affinity": None, "source": info, "target": info,
                "G_kwargs": G.kwargs, "EMA": G.state_dict(), "D_kwargs": {}, "D": {}}, tmp_path / "g.pt")
    z = torch.randn(4, generator=torch.Generator().manual_seed(image_seeds(0, 0, 1, 0)[0]))[None]
    for amp in ("fp32", "bf16"):
        evaluate.main([str(a) for a in ("--ckpt", tmp_path / "g.pt", "--labels", maps, "--out", tmp_path / amp,
                                        "--amp", amp, "--device", "cpu", "--workers", 0, "--grid-n", 0)])
        res = json.loads((tmp_path / amp / "results.json").read_text())
        assert res["precision"]["generator and segmenter"] == {"fp32": "fp32", "bf16": "bf16 autocast"}[amp]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            x = G(onehot(torch.from_numpy(label.astype(np.int64))[None], 3), z).float()
        png = ((x[0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        saved = np.asarray(Image.open(tmp_path / amp / "images" / "m.png"))
        assert np.abs(saved.astype(int) - png).max() <= 1 and res["generator"]["step"] == 7


def test_pretrain_piti_records_the_picked_mode(tmp_path):
    """pretrain_piti.py keeps --amp as asked in the checkpoint's args and what it resolved to (fp32 on the CPU for
    auto) under the checkpoint's "amp", as the two finetuning scripts do."""
    from tests.test_pretrain_piti import run as run_pretrain
    r = run_pretrain(tmp_path / "run", "--recipe", "piti-stage1", "--data", "toy-source", "--n", "4", "--steps", "1",
                     "--eval-every", "1", "--grid-n", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["args"]["amp"] == "auto" and ckpt["amp"] == "fp32" and "precision" not in ckpt["args"]
