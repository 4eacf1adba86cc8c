"""What the GPU runs depend on, checked on CPU: the stop flag broadcast on the run's device, the collective
timeout, the RNG state of the rank's own GPU, and the contiguous q/k/v that SDPA's fast kernels need."""
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from models import run
from models.piti import AttentionBlock, SelfAttention, group_norm


@pytest.fixture
def one_rank(tmp_path):
    """A 1-rank gloo process group in this process (a file store: no port to pick)."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_broadcast_stop_on_one_rank_group(one_rank):
    assert dist.is_initialized()
    assert run.broadcast_stop(True, torch.device("cpu")) is True
    assert run.broadcast_stop(False, torch.device("cpu")) is False


def test_broadcast_stop_without_torchrun():
    assert not dist.is_initialized()
    assert run.broadcast_stop(True, torch.device("cpu")) is True


def test_init_distributed_waits_long_enough_for_rank0_evaluation(monkeypatch, tmp_path):
    """init_distributed gives the group COLLECTIVE_TIMEOUT (hours: rank 0's FID) instead of the default minutes."""
    calls, real = [], dist.init_process_group

    def recorder(backend, **kw):  # the real init, on a file store, with what init_distributed asked for
        calls.append((backend, kw))
        return real(backend, store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1, **kw)

    monkeypatch.setattr(dist, "init_process_group", recorder)
    monkeypatch.setenv("RANK", "0")
    args = type("Args", (), {"device": "cpu", "batch": 2})()
    try:
        ddp, rank, world, device = run.init_distributed(args)
        assert (ddp, rank, world, device) == (True, 0, 1, torch.device("cpu"))
        assert run.broadcast_stop(True, device) is True
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert calls == [("gloo", {"timeout": run.COLLECTIVE_TIMEOUT})]
    assert run.COLLECTIVE_TIMEOUT.total_seconds() >= 3600


def test_rng_state_round_trip_on_cpu():
    s = run.rng_state(torch.device("cpu"))
    assert s["cuda"] is None
    want = torch.rand(3), np.random.rand(3), random.random()
    run.set_rng_state(s, torch.device("cpu"))
    got = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


def test_rng_state_uses_the_runs_gpu(monkeypatch):
    """On cuda:1 the CUDA generator of cuda:1 is saved and restored (not cuda:0's); on CPU the CUDA API is not
    called. torch.cuda's two functions are recorded (no GPU here)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": calls.append(("get", device)) or
                        torch.zeros(8, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append(("set", device)))
    s = run.rng_state(torch.device("cpu"))
    run.set_rng_state({**s, "cuda": torch.zeros(8, dtype=torch.uint8)}, torch.device("cpu"))
    assert calls == [] and s["cuda"] is None
    s = run.rng_state(torch.device("cuda:1"))
    run.set_rng_state(s, torch.device("cuda:1"))
    assert calls == [("get", torch.device("cuda:1")), ("set", torch.device("cuda:1"))]
    assert torch.equal(s["cuda"], torch.zeros(8, dtype=torch.uint8))


def test_sdpa_gets_contiguous_qkv(monkeypatch):
    """bf16 attention hands SDPA contiguous 4-D q/k/v (the flash/efficient kernels' layout), and the blocks'
    outputs equal the previous formulation, SDPA on the transposed views (up to bf16 rounding)."""
    seen, sdpa = [], F.scaled_dot_product_attention

    def recorder(q, k, v, *a, **kw):
        seen.append([(x.dim(), x.is_contiguous()) for x in (q, k, v)])
        return sdpa(q, k, v, *a, **kw)

    torch.manual_seed(0)
    block, selfattn = AttentionBlock(64, 16, 32), SelfAttention(32, 4)
    x, ctx, tokens = torch.randn(2, 64, 4, 4), torch.randn(2, 32, 5), torch.randn(2, 7, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # float32 weights, bf16 compute: a GPU run
        # the previous formulation, spelt out: SDPA on views of the qkv projections
        B, C, H, W = x.shape
        qkv = block.qkv(group_norm(x, block.norm).reshape(B, C, H * W))
        q, k, v = qkv.reshape(B * 4, 48, H * W).split(16, dim=1)
        ek, ev = block.encoder_kv(ctx).reshape(B * 4, 32, -1).split(16, dim=1)
        k, v = torch.cat([ek, k], dim=-1), torch.cat([ev, v], dim=-1)
        a = sdpa(q.transpose(1, 2)[None], k.transpose(1, 2)[None], v.transpose(1, 2)[None])[0]
        want_block = x + block.proj_out(a.transpose(1, 2).reshape(B, C, H * W)).reshape(B, C, H, W)
        q, k, v = selfattn.c_qkv(tokens).view(2, 7, 4, -1).transpose(1, 2).chunk(3, dim=-1)
        want_self = selfattn.c_proj(sdpa(q, k, v).transpose(1, 2).reshape(2, 7, 32))
        assert q.dtype == torch.bfloat16 and not q.is_contiguous()  # what SDPA got before
        monkeypatch.setattr(F, "scaled_dot_product_attention", recorder)
        got_block, got_self = block(x, ctx), selfattn(tokens)
    assert seen == [[(4, True)] * 3] * 2
    assert torch.equal(got_self, want_self)
    # SDPA's CPU kernel sums in another order for other strides: equal up to bf16 rounding (8 mantissa bits)
    assert (got_block - want_block).abs().max() <= 2 ** -8 * want_block.abs().max()
