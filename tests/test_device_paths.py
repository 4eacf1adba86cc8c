"""What the GPU runs depend on, checked on CPU: the stop flag broadcast on the run's device, the collective
timeout, the stateless batch order every rank derives alone, and the contiguous q/k/v that SDPA's fast kernels
need."""
import random

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
    try:
        ddp, rank, world, device = run.init_distributed("cpu", 2)
        assert (ddp, rank, world, device) == (True, 0, 1, torch.device("cpu"))
        assert run.broadcast_stop(True, device) is True
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert calls == [("gloo", {"timeout": run.COLLECTIVE_TIMEOUT})]
    assert run.COLLECTIVE_TIMEOUT.total_seconds() >= 3600


def test_batch_order_is_the_same_global_batch_on_any_number_of_ranks():
    """batch_keys(seed, step, ...) alone decides a step's items and their augmentation seeds: two ranks take the
    halves of one process's batch, each epoch visits every item once, another seed gives another order."""
    n, batch = 10, 4
    one = [run.batch_keys(7, s, n, batch) for s in range(5)]  # 20 positions: two epochs
    for s, keys in enumerate(one):
        halves = [run.batch_keys(7, s, n, batch, rank, 2) for rank in (0, 1)]
        assert sorted(halves[0] + halves[1]) == sorted(keys) and halves[0] == keys[0::2]
    items = [i for keys in one for i, _ in keys]
    assert sorted(items[:10]) == sorted(items[10:]) == list(range(10))
    assert len({seed for keys in one for _, seed in keys}) == 20  # one augmentation seed per position
    assert one != [run.batch_keys(8, s, n, batch) for s in range(5)]
    sampler = iter(run.Batches(7, n, batch, start=3))
    assert [next(sampler), next(sampler)] == one[3:5]  # a resumed run continues the same order


def test_seeded_items_repeat_and_leave_the_global_random_alone():
    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return i, random.random()

    ds = run.Seeded(Draws())
    random.seed(1)
    want = random.random()
    random.seed(1)
    a, b = ds[(2, 11)], ds[(2, 11)]
    assert a == b and a[0] == 2 and ds[(2, 12)] != a and random.random() == want


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
