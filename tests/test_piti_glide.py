"""models/glide.py (GLIDE loading), models/diffusion.py (the training loss, the timestep samplers) and
pretrain_piti.py's parameter sets against the official code: one PITI training step (tests/golden/piti_train).

The goldens (README there) were made by the official PITI training code (its GLIDE loading, its training loop's
forward_backward and optimize_normal) and glide-text2im's model constructor, imported unchanged, in float32 on CPU.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from models.diffusion import Diffusion, TimestepSampler, diffusion_terms, weighted_means
from models.glide import (CheckpointError, glide_decoder_state, glide_model, load_encoder, load_glide_decoder,
                          official_state)
from models.piti import PITI, official_kwargs
from pretrain_piti import trainable

GOLD = Path(__file__).resolve().parent / "golden" / "piti_train"
CASES = ["step_base_stage1.pt", "step_base_stage2.pt", "step_up.pt"]
TERMS, GRAD_REL, STEP = 2e-5, 2e-4, 1e-7  # fp32: terms abs, gradients relative to the tensor's max |grad|, Adam step


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs: one torch thread (conftest)


def gold(name):
    path = GOLD / name
    if not path.is_file():
        pytest.fail(f"golden file missing: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


def build(g):
    model = PITI(**official_kwargs(g["options"], g["shrink"]))
    glide = str(GOLD / ("glide_upsample_tiny.pt" if g["super_res"] else "glide_base_tiny.pt"))
    dropped = load_glide_decoder(model, glide)
    load_encoder(model, str(GOLD / "encoder_init.pt"))  # the official stage-1 format: encoder keys, no prefix
    return model.train(), dropped


def test_glide_file_loads_with_the_official_filter():
    sd = gold("glide_base_tiny.pt")
    g = gold("step_base_stage2.pt")
    model, dropped = build(g)
    assert dropped == g["glide_dropped_keys"]  # the text tower, exactly the keys the official training deletes
    assert "transformer_proj.weight" in glide_decoder_state(sd) and "transformer_proj.weight" not in dropped
    assert {"token_embedding.weight", "padding_embedding", "positional_embedding", "final_ln.weight"} <= set(dropped)
    for k, v in model.decoder.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # the same through glide_model, and its export is an official-format file that loads strictly
    kw = official_kwargs(g["options"], g["shrink"])
    m2 = glide_model(str(GOLD / "glide_base_tiny.pt"), config=kw, encoder=str(GOLD / "encoder_init.pt"))
    exported = official_state(m2)
    assert all(torch.equal(exported[k], v) for k, v in official_state(model).items())


def test_glide_wrong_files_one_line(tmp_path):
    g = gold("step_up.pt")
    up = PITI(**official_kwargs(g["options"], g["shrink"]))
    with pytest.raises(CheckpointError, match="GLIDE's base.pt") as e:
        load_glide_decoder(up, str(GOLD / "glide_base_tiny.pt"))
    assert "\n" not in str(e.value) and "glide_base_tiny.pt" in str(e.value)
    torch.save(official_state(up), tmp_path / "piti.pt")
    with pytest.raises(CheckpointError, match="is a PITI checkpoint"):
        load_glide_decoder(up, str(tmp_path / "piti.pt"))
    with pytest.raises(CheckpointError, match="not found"):
        load_glide_decoder(up, str(tmp_path / "nope.pt"))
    base = PITI(**{**official_kwargs(gold("step_base_stage1.pt")["options"], g["shrink"]), "model_channels": 64})
    with pytest.raises(CheckpointError, match="not GLIDE weights for this decoder configuration: .* of another shape"):
        load_glide_decoder(base, str(GOLD / "glide_base_tiny.pt"))
    with pytest.raises(CheckpointError, match="not an encoder"):
        load_encoder(base, str(GOLD / "glide_base_tiny.pt"))


@pytest.mark.parametrize("name", CASES)
def test_training_step_matches_official(name):
    g = gold(name)
    model, _ = build(g)
    diff = Diffusion(g["options"]["noise_schedule"])
    ref = g["ref_u8"].float() / 127.5 - 1
    ref[g["uncond"]] = 1.0  # condition dropout: ones_like(ref), as the official dataset
    terms = diffusion_terms(model, diff, g["x_start"], ref, g["t"], g["noise"], low_res=g["low_res"], amp="fp32")
    for k in ("mse", "vb", "loss"):
        assert maxdiff(terms[k], g["terms"][k]) <= TERMS, (k, maxdiff(terms[k], g["terms"][k]))
    loss = weighted_means(terms, g["weights"])["loss"]
    assert abs(loss.item() - g["loss"].item()) <= TERMS
    params = trainable(model, "encoder" if g["stage"] == "stage1" else "all")
    assert list(params) == g["optimized_keys"]  # stage 1: the encoder only (the official optimize_model)
    loss.backward()
    for k, want in g["grads"].items():
        got = dict(model.named_parameters())[k].grad
        assert maxdiff(got, want) <= GRAD_REL * want.abs().max().item(), (k, maxdiff(got, want))
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params.values())).item()
    assert abs(norm - g["grad_norm"]) <= GRAD_REL * g["grad_norm"]
    # one official optimiser step (AdamW, weight decay 0) and EMA update, on the optimised set only
    ema = {k: p.detach().clone() for k, p in params.items()}
    torch.optim.AdamW(params.values(), lr=g["lr"], weight_decay=0.0).step()
    for k, p in params.items():
        ema[k].mul_(g["ema_rate"]).add_(p.detach(), alpha=1 - g["ema_rate"])
    named = dict(model.named_parameters())
    for k, want in g["params_after_step"].items():
        assert maxdiff(named[k], want) <= STEP + 1e-6 * want.abs().max().item(), k
    for k, want in g["ema_after_step"].items():
        assert maxdiff(ema[k], want) <= STEP + 1e-6 * want.abs().max().item(), k
    if g["stage"] == "stage1":  # the decoder is left as GLIDE's
        assert torch.equal(named["decoder.out.2.weight"], g["params_after_step"]["decoder.out.2.weight"])


def test_loss_second_moment_sampler():
    g = gold("step_base_stage1.pt")
    s = TimestepSampler("loss-second-moment", 1000)
    assert np.array_equal(s.weights(), np.ones(1000))  # uniform until every t has 10 losses
    ts = np.random.RandomState(7).permutation(np.repeat(np.arange(1000), 11))  # the golden's warm-up feed
    s.update(ts, np.random.RandomState(8).gamma(2.0, 0.05, ts.shape) * (1 + ts / 1000))
    np.testing.assert_allclose(s.weights(), g["sampler_weights_before"].numpy(), rtol=1e-12)
    w = s.weights()
    assert np.allclose(1 / (1000 * w[g["t"].numpy()]), g["weights"].numpy(), rtol=1e-6)  # importance weights
    s.update(g["t"], g["terms"]["loss"])
    np.testing.assert_allclose(s.weights(), g["sampler_weights_after"].numpy(), rtol=1e-9)
    w = s.weights()
    t, weights = s.sample(4096, "cpu", torch.Generator().manual_seed(0))
    assert np.allclose(weights.numpy(), 1 / (1000 * w[t.numpy()]), rtol=1e-6)
    s2 = TimestepSampler("loss-second-moment", 1000)
    s2.load_state_dict(s.state_dict())
    assert np.array_equal(s2.weights(), s.weights())
    t2, _ = TimestepSampler("uniform", 1000).sample(8, "cpu", torch.Generator().manual_seed(3))
    assert torch.equal(t2, torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(3)))
