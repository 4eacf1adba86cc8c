"""models/piti.py and models/diffusion.py against the official PITI code's outputs (tests/golden/piti, README there).

Every base_*.pt / up_*.pt in the folder is discovered and rebuilt from its own options and shrink
widths. Tolerances are the README's: single forwards 2e-5, teacher-forced steps 1e-6, free-running
trajectories 5e-3 (base, cosine) and 1e-4 (upsampler).
"""
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.diffusion import Diffusion, quantize, sample
from models.palette import palette
from models.piti import PITI, load_official_state, official_kwargs, resize_nearest, timestep_embedding
from conftest import GOLDEN, golden_path

FWD, STEP = 2e-5, 1e-6


# Small convs spend their time in thread hand-offs on a shared 2-core box; 1 thread is ~50x faster.
# With 2 threads (the goldens' setting) every small-net output and trajectory here is bit-exact; with
# 1 thread the differences are exactly the README's 1-thread figures (<= 3.2e-6 forwards, 9.7e-4 on
# the base cosine trajectory), well inside the tolerances.
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs: one torch thread (conftest)


def load(name):
    return torch.load(golden_path("piti", name), map_location="cpu", weights_only=True)


def small_sets():
    found = sorted(p.name for p in (GOLDEN / "piti").glob("*.pt") if p.name.startswith(("base_", "up_")))
    return found or ["base_small.pt"]  # an empty folder must fail in golden_path, not skip


def build(g):
    model = PITI(**official_kwargs(g["options"], g["shrink"])).eval()
    load_official_state(model, g["state_dict"])
    return model


def coco_channels(ids):
    ids = ids.long()
    return torch.where(ids < 182, ids + 1, torch.zeros_like(ids))


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def guided_out(model, x, t, ref, low, s):
    """The official cfg_model_fn output: one 2B batch [cond; uncond], eps mixed, variance from cond."""
    if s is None:
        return model(x, t, ref, low_res=low)
    B = x.shape[0]
    two = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([ref, torch.ones_like(ref)]),
                low_res=None if low is None else torch.cat([low, low]))
    eps = two[B:, :3] + s * (two[:B, :3] - two[B:, :3])
    return torch.cat([eps, two[:B, 3:]], 1)


# ---------------------------------------------------------------------------------------------- palette


def test_palette_and_ref():
    g = load("palette.pt")
    assert torch.equal(palette(183)[1:], g["palette_182"])
    assert torch.equal(palette(183)[0], torch.zeros(3, dtype=torch.uint8))
    ch = coco_channels(g["ids_a"])[None]
    assert torch.equal(palette(183)[ch[0]], g["rgb_a"])
    model = PITI(image_size=16, model_channels=32, num_res_blocks=1, channel_mult=[1], attention_ds=[],
                 xf_width=32, xf_heads=4, encoder_layers=1, cnn_widths=[8, 8, 16, 16, 32], n_tokens=256,
                 transformer_proj_in=32)
    assert torch.equal(model.ref(ch), g["ref_a"])  # 16 -> 256 PIL NEAREST, k / 127.5 - 1, bit for bit
    assert torch.equal(torch.arange(256) / 127.5 - 1, g["u8_to_float"])
    H, W = g["example_shape_hw"]
    grid = torch.arange(H)[:, None] * W + torch.arange(W)[None]
    picked = resize_nearest(grid[None], 256)[0]
    assert torch.equal(picked[:, 0] // W, g["example_src_rows"])
    assert torch.equal(picked[0] % W, g["example_src_cols"])


def test_schedules():
    g = load("schedules.pt")
    g.pop("meta", None)
    assert {k.split("/")[0] for k in g} == {"squaredcos_cap_v2", "linear"}
    checked = 0
    for key, want in g.items():
        parts = key.split("/")
        if len(parts) == 2:
            d = Diffusion(parts[0])
            assert np.array_equal(d.betas, want.numpy()), key
            continue
        S, R, name = parts
        d = Diffusion(S, R)
        if name == "timestep_map":
            got = d.timestep_map
        elif name == "use_timesteps_sorted":
            got = sorted(d.timestep_map)
        else:
            got = getattr(d, name)
        np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want.numpy().astype(np.float64),
                                   rtol=1e-13, atol=0, err_msg=key)
        checked += 1
    assert checked >= 8 * 12


# ---------------------------------------------------------------------------------------------- small nets


@pytest.mark.parametrize("name", small_sets())
def test_small_forward(name):
    g = load(name)
    model = build(g)
    assert sum(p.numel() for p in model.parameters()) == g["n_params"]
    assert torch.equal(model.ref(coco_channels(g["ids"])), g["ref"])
    ref, x, t = g["ref"], g["x_t"], g["t_model"]
    low = g.get("low_res")
    with torch.no_grad():
        assert maxdiff(timestep_embedding(t, model.decoder.mc), g["temb"]) <= FWD
        assert maxdiff(model.encoder.cnn(ref), g["cnn_out"]) <= FWD
        xf_proj, xf_out = model.encode(ref)
        assert maxdiff(xf_proj, g["xf_proj"]) <= FWD and maxdiff(xf_out, g["xf_out"]) <= FWD
        u_proj, u_out = model.encode(torch.ones_like(ref))
        assert maxdiff(u_proj, g["xf_proj_uncond"]) <= FWD and maxdiff(u_out, g["xf_out_uncond"]) <= FWD
        emb = model.decoder.time_embed(g["temb"]) + model.decoder.transformer_proj(xf_proj)
        assert maxdiff(emb, g["emb"]) <= FWD
        if model.super_res:
            up = F.interpolate(low, x.shape[-2:], mode="bilinear", align_corners=False)
            assert maxdiff(torch.cat([x, up], 1), g["unet_in"]) <= FWD
        cond = model(x, t, ref, low_res=low)
        uncond = model(x, t, torch.ones_like(ref), low_res=low)
        assert maxdiff(cond, g["out_cond"]) <= FWD
        assert maxdiff(uncond, g["out_uncond"]) <= FWD
        assert maxdiff(guided_out(model, x, t, ref, low, g["guidance_scale"]), g["out_cfg"]) <= FWD


@pytest.mark.parametrize("name", small_sets())
def test_small_trajectories(name):
    g = load(name)
    model = build(g)
    trajs = [k for k in g if k.startswith("traj")]
    assert trajs, f"{name} holds no trajectory"
    guidance = None if model.super_res else g["guidance_scale"]
    tol = 1e-4 if model.super_res else 5e-3
    for key in trajs:
        tr = g[key]
        steps, (n, B) = key[len("traj"):].lstrip("_"), tr["x"].shape[:2]
        diff = Diffusion(g["options"]["noise_schedule"], steps)
        t_idx = tr["t_index"]
        assert t_idx.tolist() == list(range(diff.num_timesteps - 1, -1, -1)) and diff.num_timesteps == n
        assert torch.equal(diff.model_t(t_idx), tr["t_model"])
        ref, low = g["ref"][:B], g["low_res"][:B] if model.super_res else None
        if "model_out" in tr:
            # teacher-forced: the stored model output and noise give the stored next x, bit for bit
            for i in range(n):
                x_next, x0 = diff.p_sample(tr["model_out"][i], tr["x"][i], torch.full((B,), int(t_idx[i])),
                                           tr["noise"][i])
                assert maxdiff(x_next, tr["x"][i + 1] if i + 1 < n else tr["final"]) <= STEP, (key, i)
                if "pred_xstart" in tr:
                    assert maxdiff(x0, tr["pred_xstart"][i]) <= STEP, (key, i)
            # the network alone on every stored x (the CFG-combined output for the base)
            for i in range(n):
                out = guided_out(model, tr["x"][i], diff.model_t(t_idx[i:i + 1]).expand(B), ref, low, guidance)
                assert maxdiff(out, tr["model_out"][i]) <= FWD, (key, i)
        # free-running from the stored initial noise with the stored per-step noises
        trace = []
        final = sample(model, ref, steps=steps, guidance=guidance, low_res=low, x_T=tr["x"][0],
                       noises=list(tr["noise"]), trace=trace)
        for i in range(n):
            assert maxdiff(trace[i]["x"], tr["x"][i]) <= tol, (key, i)
        assert maxdiff(final, tr["final"]) <= tol
        if "low_res_for_upsampler" in tr:
            assert torch.equal(quantize(tr["final"]), tr["low_res_for_upsampler"])
            torch.manual_seed(int(tr.get("seed", 1234)))  # README: the base trajectory uses seed 1234
            x = sample(model, ref, steps=steps, guidance=guidance, official_rng=True)
            assert maxdiff(x, tr["final"]) <= tol  # the official random stream, 2B noise per step
        if "init_randn" in tr:  # the upsampler's official random stream: randn * 0.997, then randn per step
            assert torch.equal(tr["init_randn"] * 0.997, tr["x"][0])
            torch.manual_seed(int(tr.get("seed", 4321)))  # README: the upsampler trajectories use seed 4321
            assert maxdiff(sample(model, ref, steps=steps, low_res=low), tr["final"]) <= tol


# ---------------------------------------------------------------------------------------------- released sizes


def recipe_tensor(name, shape):
    n = int(np.prod(shape))
    z = np.random.RandomState(zlib.crc32(name.encode("utf-8"))).standard_normal(n)
    if name.endswith(("cls_token", "positional_embedding")):
        v = 0.5 * z
    elif len(shape) == 1:
        v = 1 + 0.1 * z if name.endswith(".weight") else 0.1 * z
    else:
        v = z / np.sqrt(n / shape[0])
    return torch.from_numpy(v.astype(np.float32)).reshape(shape)


def stats(x):
    x = x.double()
    return torch.stack([x.sum(), x.abs().sum(), x.abs().max()])


@pytest.mark.parametrize("name", ["full_coco_base64.pt", "full_coco_upsample256.pt"])
def test_released_size(name):
    """The hard-coded full-size constants, with the recipe weights; ~60 s for both on 2 free cores."""
    g = load(name)
    with torch.device("meta"):
        model = PITI(**official_kwargs(g["options"]))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(shapes) == g["recipe_keys"]  # same keys, same order as the official state dict
    sd = {}
    for k, s, a in zip(g["recipe_keys"], g["recipe_sum"].tolist(), g["recipe_abs_sum"].tolist()):
        sd[k] = recipe_tensor(k, shapes[k])
        got = sd[k].double()  # float64 sums depend on the summation order: compare relative to sum|x|
        assert abs(got.sum().item() - s) <= 1e-12 * a and abs(got.abs().sum().item() - a) <= 1e-12 * a, k
    load_official_state(model, sd, name)
    model.eval()
    ref = load("palette.pt")["ref_a"]
    side = model.image_size
    x = torch.from_numpy(np.random.RandomState(g["x_t_seed"]).standard_normal((1, 3, side, side)).astype(np.float32))
    t = g["t_model"]
    with torch.no_grad():
        if model.super_res:
            low = torch.from_numpy(np.random.RandomState(g["low_res_seed"]).randint(0, 256, (1, 3, 64, 64))
                                   .astype(np.int32)) / 127.5 - 1
            xf_proj, xf_out = model.encode(ref)
            out = model.denoise(x, t, xf_proj, xf_out, low_res=low)
            up = F.interpolate(low, (side, side), mode="bilinear", align_corners=False)
            assert torch.allclose(stats(torch.cat([x, up], 1)), g["unet_in_stats"], rtol=1e-6)
            assert maxdiff(out[..., ::8, ::8], g["out_stride8"]) <= FWD
            assert maxdiff(out[..., 120:136, 120:136], g["out_crop_120_136"]) <= FWD
        else:
            xf_proj, xf_out = model.encode(torch.cat([ref, torch.ones_like(ref)]))
            out = model.denoise(torch.cat([x, x]), torch.cat([t, t]), xf_proj, xf_out)
            assert maxdiff(out[..., ::4, ::4], g["out_stride4"]) <= FWD
            assert torch.allclose(stats(out[:1]), g["out_stats_cond"], rtol=1e-5)
            assert torch.allclose(stats(out[1:]), g["out_stats_uncond"], rtol=1e-5)
        assert torch.allclose(stats(out), g["out_stats"], rtol=1e-5)
        emb = model.decoder.time_embed(timestep_embedding(torch.cat([t] * len(xf_proj)), model.decoder.mc)) \
            + model.decoder.transformer_proj(xf_proj)
    assert maxdiff(xf_proj, g["xf_proj"]) <= FWD
    assert maxdiff(xf_out[..., :8], g["xf_out_first8"]) <= FWD
    assert torch.allclose(stats(xf_out), g["xf_out_stats"], rtol=1e-5)
    assert maxdiff(emb, g["emb"]) <= FWD
