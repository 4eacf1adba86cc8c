"""CAT on PITI: training-free equivalence, prompts, the sampler's guidance/caching, and bad input.

The source model is the golden small base (official key format, COCO label space, 183 channels).
"""
import numpy as np
import pytest
import torch

import data
from models.diffusion import sample
from models.palette import palette
from models.piti import PITI, load_official, load_official_state, official_kwargs
from conftest import golden_path
from models import DataError


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs: one torch thread (conftest)


@pytest.fixture(scope="module")
def golden():
    return torch.load(golden_path("piti", "base_small.pt"), map_location="cpu", weights_only=True)


def build(g, **cat):
    model = PITI(**official_kwargs(g["options"], g["shrink"]), **cat).eval()
    load_official_state(model, g["state_dict"])
    return model


def hard_affinity(target, source, seed=0):
    rng = np.random.RandomState(seed)
    A = np.zeros((len(target), len(source)), np.float32)
    A[np.arange(len(target)), rng.randint(0, len(source), len(target))] = 1
    return A


@pytest.mark.parametrize("name", ["base_small.pt", "up_small.pt"])
def test_training_free_equals_source_on_mapped_labels(name):
    g = torch.load(golden_path("piti", name), map_location="cpu", weights_only=True)
    ade, coco = data.class_table("ade20k"), data.class_table("coco")
    M = data.affinity_to_channels(hard_affinity(ade, coco), ade, coco)
    src = build(g)
    cat = build(g, target_channels=ade.n_channels, prompts=0)
    cat.set_affinity(M)
    label = torch.randint(0, ade.n_channels, (2, 48, 40), generator=torch.Generator().manual_seed(1))
    mapped = M.argmax(1)[label]  # each target channel's single source channel (0 -> 0)
    assert torch.equal(cat.ref(label), src.ref(mapped))
    x, t, low = g["x_t"], g["t_model"], g.get("low_res")
    with torch.no_grad():
        assert torch.equal(cat(x, t, cat.ref(label), low_res=low), src(x, t, src.ref(mapped), low_res=low))
    a = sample(cat, cat.ref(label), steps="4", low_res=low, generator=torch.Generator().manual_seed(3))
    b = sample(src, src.ref(mapped), steps="4", low_res=low, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_soft_affinity_mixes_colours_and_trains(golden):
    cat = build(golden, target_channels=3, prompts=0)
    M = torch.zeros(3, 183)
    M[0, 0], M[1, 5], M[2, 7], M[2, 9] = 1, 1, 0.25, 0.75
    cat.set_affinity(M)
    ref = cat.ref(torch.full((1, 8, 8), 2))
    want = (0.25 * palette(183)[7].float() + 0.75 * palette(183)[9].float()) / 127.5 - 1
    assert torch.allclose(ref[0, :, 0, 0], want, atol=1e-6)
    cat.train()
    out = cat(golden["x_t"][:1], golden["t_model"][:1], ref)
    out.square().mean().backward()
    assert cat.cat_map.grad is not None and cat.cat_map.grad[:, 2].abs().sum() > 0
    assert cat.cat_map.grad[:, 1].abs().sum() == 0  # channel 1 is not in the label map


def test_prompts_join_the_context_and_cls_stays_last(golden):
    k = 3
    cat = build(golden, target_channels=183, prompts=k)
    cat.set_affinity(torch.eye(183))
    src = build(golden)
    ref = golden["ref"]
    with torch.no_grad():
        proj, out = cat.encode(ref)
        s_proj, s_out = src.encode(ref)
        assert out.shape[-1] == s_out.shape[-1] + k and proj.shape == s_proj.shape
        assert not torch.allclose(proj, s_proj)  # the prompts are attended to
        # cls last with positional row 0: the encoder input ends with cls + P[0] and the grid has rows 1..N
        seen = {}
        h = cat.encoder.transformer.register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
        cat.encode(ref)
        h.remove()
        enc = cat.encoder
        assert torch.equal(seen["x"][:, -1], (enc.cls_token + enc.positional_embedding[:, 0]).expand(2, -1, -1)[:, 0])
        assert torch.equal(seen["x"][:, -1 - k:-1], cat.prompts.expand(2, -1, -1))
        grid = enc.cnn(ref).flatten(2).transpose(1, 2) + enc.positional_embedding[:, 1:]
        assert torch.equal(seen["x"][:, :-1 - k], grid)
    # prompts 0 and an identity affinity: exactly the source model
    plain = build(golden, target_channels=183, prompts=0)
    plain.set_affinity(torch.eye(183))
    with torch.no_grad():
        assert torch.equal(plain.encode(ref)[0], s_proj)


def test_sampler_guidance_in_one_batch_and_encoder_once(golden):
    model = build(golden)
    ref = golden["ref"]
    calls = []
    h = model.encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    trace = []
    sample(model, ref, steps="4", guidance=2.0, generator=torch.Generator().manual_seed(0), trace=trace)
    h.remove()
    assert calls == [4]  # once per sample: cond and uncond halves together, not once per step
    x, t = trace[1]["x"], torch.full((2,), 666.0)
    with torch.no_grad():
        c = model(x, t, ref)
        u = model(x, t, torch.ones_like(ref))
    want = torch.cat([u[:, :3] + 2.0 * (c[:, :3] - u[:, :3]), c[:, 3:]], 1)
    assert (trace[1]["model_out"] - want).abs().max() < 2e-5


def test_ddim_and_bf16_paths(golden):
    model = build(golden)
    ref = golden["ref"]
    x_T = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = sample(model, ref, steps="ddim4", ddim=True, x_T=x_T, generator=torch.Generator().manual_seed(1))
    b = sample(model, ref, steps="ddim4", ddim=True, x_T=x_T, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and a.abs().max() <= 1  # eta 0: no noise enters
    with torch.no_grad():
        full = model(golden["x_t"], golden["t_model"], ref)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(golden["x_t"], golden["t_model"], ref)
    assert half.dtype == torch.bfloat16
    rel = (half.float() - full).abs().max() / full.abs().max()
    assert 0 < rel < 0.1


def test_bad_input(golden, tmp_path):
    ade, coco = data.class_table("ade20k"), data.class_table("coco")
    cat = build(golden, target_channels=ade.n_channels)
    with pytest.raises(ValueError, match="label ids"):
        cat.ref(torch.full((1, 8, 8), ade.n_channels))
    with pytest.raises(DataError, match="affinity has shape"):
        data.affinity_to_channels(np.ones((len(ade), 10), np.float32) / 10, ade, coco)
    with pytest.raises(ValueError, match="affinity in channel space"):
        cat.set_affinity(torch.zeros(ade.n_channels, 35))
    with pytest.raises(ValueError, match="guidance"):
        sample(cat, cat.ref(torch.zeros(1, 8, 8, dtype=torch.long)), steps="4", guidance=-1)
    with pytest.raises(ValueError, match="multiple of"):
        cat(torch.zeros(1, 3, 30, 30), torch.zeros(1), cat.ref(torch.zeros(1, 8, 8, dtype=torch.long)))
    path = tmp_path / "base.pt"
    torch.save(golden["state_dict"], path)
    kw = official_kwargs(golden["options"], golden["shrink"])
    assert load_official(str(path), config=kw).super_res is False
    with pytest.raises(DataError, match="is a base checkpoint"):
        load_official(str(path), super_res=True, config=dict(kw, super_res=True))
    with pytest.raises(DataError, match="not found"):
        load_official(str(tmp_path / "missing.pt"))
    torch.save({"G": {"w": torch.zeros(1)}}, tmp_path / "foreign.pt")
    with pytest.raises(DataError, match="flat state dict"):
        load_official(str(tmp_path / "foreign.pt"))
    torch.save({"encoder.cls_token": torch.zeros(1)}, tmp_path / "partial.pt")
    with pytest.raises(DataError, match="keys missing"):
        load_official(str(tmp_path / "partial.pt"), config=kw)
