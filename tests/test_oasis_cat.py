"""The CAT layers of models/oasis.py, checkpoint round trips, bad checkpoints, bf16 autocast.

The source model is the official-format `sq` golden generator (O(1)-scale weights, real BN stats).
"""
import json

import pytest
import torch

from conftest import golden_path
from models import DataError
from models.oasis import Affinity, Discriminator, Generator, check_state_dict, load_official
from models.oasis_train import discriminator_loss, generator_loss, recompute_bn_stats

SRC_NC, TGT_NC = 13, 7  # sq: 12 classes + dontcare; the target: 6 classes + dontcare


def sq_kwargs():
    cfg = json.loads(golden_path('oasis', 'sq', 'config.json').read_text())['golden_cfg']
    g = dict(semantic_nc=cfg['semantic_nc'], z_dim=cfg['z_dim'], channels=cfg['channels_G'],
             spade_hidden=cfg['spade_nhidden'], crop_size=cfg['crop_size'], aspect_ratio=cfg['aspect_ratio'])
    d = dict(semantic_nc=cfg['semantic_nc'], channels=cfg['channels_D_list'], last_width=cfg['channels_D_last'])
    return g, d


def sq_state(part):
    return torch.load(golden_path('oasis', 'sq', 'models', f'latest_{part}.pth'), map_location='cpu',
                      weights_only=True)


def source_G():
    G = Generator(**sq_kwargs()[0])
    check_state_dict(G, sq_state('EMA'))
    return G


def cat_G(M, **cat_kw):
    G = Generator(**sq_kwargs()[0], cat_nc=TGT_NC, **cat_kw)
    G.load_source(sq_state('EMA'))
    G.set_affinity(M)
    return G


def hard_affinity(seed=0):
    """Channel-space M: dontcare -> dontcare, each target class -> one random source class."""
    g = torch.Generator().manual_seed(seed)
    M = torch.zeros(TGT_NC, SRC_NC)
    M[0, 0] = 1
    M[torch.arange(1, TGT_NC), torch.randint(1, SRC_NC, (TGT_NC - 1,), generator=g)] = 1
    return M


def soft_affinity(seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.zeros(TGT_NC, SRC_NC)
    M[0, 0] = 1
    M[1:, 1:] = torch.softmax(3 * torch.randn(TGT_NC - 1, SRC_NC - 1, generator=g), dim=1)
    return M


def target_batch(seed=0, B=2, H=64, W=64):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, TGT_NC, (B, 1, H // 8, W // 8), generator=g)
    label = label.repeat_interleave(8, 2).repeat_interleave(8, 3)
    y = torch.zeros(B, TGT_NC, H, W).scatter_(1, label, 1.0)
    return label, y, torch.randn(B, sq_kwargs()[0]['z_dim'], generator=g)


def to_source(y, M):
    return torch.einsum('bthw,ts->bshw', y, M)


CAT_VARIANTS = [dict(cat_paths='separate'), dict(cat_paths='shared'), dict(cat_residual=False)]


@pytest.mark.parametrize('cat_kw', CAT_VARIANTS, ids=['separate', 'shared', 'no-residual'])
def test_training_free_hard_affinity_is_bit_exact(cat_kw):
    M = hard_affinity()
    label, y, z = target_batch()
    y_src = to_source(y, M)
    mapped = M.argmax(1)[label]  # hard A: the mapped map is exactly the one-hot of the mapped labels
    assert torch.equal(y_src, torch.zeros(2, SRC_NC, 64, 64).scatter_(1, mapped, 1.0))
    with torch.no_grad():
        assert torch.equal(cat_G(M, **cat_kw).eval()(y, z), source_G().eval()(y_src, z))
        cat, src = cat_G(M, **cat_kw).train(), source_G().train()
        assert torch.equal(cat(y, z), src(y_src, z))  # batch statistics + one power iteration
        cat_buffers = dict(cat.named_buffers())
        for k, v in src.named_buffers():
            assert torch.equal(cat_buffers[k], v), k


def test_training_free_soft_affinity_matches_soft_mapped_source():
    M = soft_affinity()
    _, y, z = target_batch(1)
    with torch.no_grad():
        out = cat_G(M).eval()(y, z)
        ref = source_G().eval()(to_source(y, M), z)
    assert (out - ref).abs().max() < 1e-6
    assert (out - source_G().eval()(to_source(y, hard_affinity()), z)).abs().max() > 1e-3


def perturb_cat_layers(G, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in G.cat_modules():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_cat_layers_learn_and_stages():
    G = cat_G(hard_affinity())
    D = Discriminator(**sq_kwargs()[1])
    D.retarget(TGT_NC, hard_affinity())
    _, y, z = target_batch(2)
    generator_loss(D, G.train()(y, z), y).backward()
    names = {id(p): n for n, p in G.named_parameters()}
    cat_params = [p for _, m in G.cat_modules() for p in m.parameters()]
    assert {names[id(p)].rsplit('.', 2)[-2] for p in cat_params} == {'cat_gamma', 'cat_beta', 'res_gamma',
                                                                     'res_beta', 'fc_cat', 'fc_res'}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cat_params)
    stage1 = {names[id(p)] for p in G.stage_parameters(1)}
    stage2 = {names[id(p)] for p in G.stage_parameters(2)}
    assert stage1 == {names[id(p)] for p in cat_params} | {n for n in names.values()
                                                          if '.mlp_gamma.' in n or '.mlp_beta.' in n}
    assert stage1 < stage2
    # stage 2, the supplement's reading: every SPADE module (shared conv, gamma, beta, CAT layers) + fc's CAT layers;
    # the residual blocks' main-path convs stay frozen
    assert stage2 == {n for n in names.values() if '.norm_' in n or n.startswith(('fc_cat', 'fc_res'))}
    assert not any('.conv_' in n for n in stage2) and any('.mlp_shared.' in n for n in stage2)
    blocks = {names[id(p)] for p in G.stage_parameters(2, 'blocks')}  # every SPADE-block layer (the option)
    assert stage2 < blocks == {n for n in names.values() if n.startswith(('body.', 'fc_cat', 'fc_res'))}
    for params in (G.stage_parameters(1), stage2, blocks):
        assert len(params) == len(set(params) if isinstance(params, set) else {id(p) for p in params})
    with torch.no_grad():  # a trained residual moves the output away from the training-free one
        before = G.eval()(y, z)
        perturb_cat_layers(G)
        assert (G(y, z) - before).abs().max() > 1e-3


def test_cat_checkpoint_round_trip(tmp_path):
    G = cat_G(soft_affinity(), cat_paths='shared')
    perturb_cat_layers(G)
    path = tmp_path / 'ckpt.pt'
    torch.save({'G_kwargs': G.kwargs, 'G': G.state_dict()}, path)
    ck = torch.load(path, map_location='cpu', weights_only=True)
    assert json.loads(json.dumps(ck['G_kwargs'])) == G.kwargs
    G2 = Generator(**ck['G_kwargs'])
    check_state_dict(G2, ck['G'], path)
    _, y, z = target_batch(3)
    with torch.no_grad():
        assert torch.equal(G2.eval()(y, z), G.eval()(y, z))


def test_discriminator_retarget_through_affinity():
    M = soft_affinity(4)
    D = Discriminator(**sq_kwargs()[1])
    check_state_dict(D, sq_state('D'))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        old = D.eval()(x)
        D.retarget(TGT_NC, M)
        new = D(x)
    assert new.shape == (2, TGT_NC + 1, 64, 64)
    assert torch.equal(new[:, 0], old[:, 0])  # the fake channel is kept
    assert (new[:, 1:] - torch.einsum('ts,bshw->bthw', M, old[:, 1:])).abs().max() < 1e-4
    D2 = Discriminator(**D.kwargs)
    check_state_dict(D2, D.state_dict())
    D2.retarget(5)
    assert D2.layer_up_last.weight.shape[0] == 6 and D2.kwargs['semantic_nc'] == 5
    assert list(D2.state_dict())[-2:] == ['layer_up_last.weight', 'layer_up_last.bias']


def one_line_exit(fn, match):
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert match in msg and '\n' not in msg, msg


def test_bad_checkpoints_give_one_clear_line(tmp_path):
    g_kw, _ = sq_kwargs()
    small = Generator(**{**g_kw, 'semantic_nc': 6})
    for part in ('sq_G.pth: not an OASIS generator for --source cityscapes: ', 'keys of another shape (',
                 '; has 13 label channels, --source cityscapes expects 6'):  # the file, the keys, OASIS's words
        one_line_exit(lambda: check_state_dict(small, sq_state('G'), 'sq_G.pth', '--source cityscapes'), part)
    one_line_exit(lambda: check_state_dict(Generator(**g_kw), sq_state('D'), 'D.pth'), 'discriminator')
    one_line_exit(lambda: check_state_dict(Discriminator(semantic_nc=6, channels=[3, 4, 4, 8, 8, 16, 16],
                                                         last_width=4), sq_state('D'), 'D.pth'),
                  'has 13 label channels')
    cat = Generator(**g_kw, cat_nc=TGT_NC)
    one_line_exit(lambda: check_state_dict(cat, sq_state('G'), 'G.pth'), 'load_source')
    sd = sq_state('G')
    del sd['body.3.norm_1.mlp_beta.bias']
    one_line_exit(lambda: cat.load_source(sd, 'G.pth'), 'missing')
    one_line_exit(lambda: cat.load_source({**sq_state('G'), 'extra.weight': torch.zeros(1)}, 'G.pth'),
                  'unexpected')
    one_line_exit(lambda: load_official(tmp_path / 'nope.pth'), 'file not found')
    one_line_exit(lambda: load_official(tmp_path), 'best_EMA.pth')
    (tmp_path / 'junk.pth').write_bytes(b'not a torch file')
    one_line_exit(lambda: load_official(tmp_path / 'junk.pth'), 'is not a torch file')
    torch.save({'a': 1}, tmp_path / 'dict.pth')
    one_line_exit(lambda: load_official(tmp_path / 'dict.pth'), 'not an OASIS state dict')
    run = golden_path('oasis', 'sq')
    assert load_official(run, 'G', 'latest').keys() == sq_state('G').keys()
    with pytest.raises(ValueError, match=r'affinity has shape \(3, 13\)'):
        cat.set_affinity(torch.ones(3, SRC_NC))
    with pytest.raises(ValueError, match='expects'):
        cat(torch.zeros(1, SRC_NC, 64, 64))
    with pytest.raises(ValueError, match='multiples of 64'):
        Discriminator(**sq_kwargs()[1])(torch.zeros(1, 3, 64, 96))


def test_bf16_autocast_keeps_norms_and_losses_fp32():
    """Under CPU bf16 autocast: spectral norm is computed in fp32 (same u/v as the fp32 run), BN stats
    stay fp32, the output and the losses are fp32 and close to the fp32 values."""
    _, y, z = target_batch(5)
    M = hard_affinity()
    runs = {}
    for low in (False, True):
        torch.manual_seed(0)
        G, D = cat_G(M).train(), Discriminator(**sq_kwargs()[1])
        D.retarget(TGT_NC, M)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=low):
            fake = G(y, z)
            loss_G = generator_loss(D, fake, y)
            loss_D, _ = discriminator_loss(D, fake * 0.5, fake, y, 10.0)
        runs[low] = fake, loss_G, loss_D, dict(G.named_buffers()), dict(D.named_buffers())
    (f32, lg32, ld32, gb32, db32), (f16, lg16, ld16, gb16, db16) = runs[False], runs[True]
    assert f16.dtype == lg16.dtype == ld16.dtype == torch.float32
    for k, v in gb32.items():
        assert gb16[k].dtype == v.dtype
        if k.endswith(('weight_u', 'weight_v')):
            assert torch.equal(gb16[k], v), k
    assert all(torch.equal(db16[k], v) for k, v in db32.items())
    assert (f16 - f32).abs().max() < 0.1
    assert abs(lg16 - lg32) < 0.05 * abs(lg32) and abs(ld16 - ld32) < 0.05 * abs(ld32)


def test_bn_stats_pass_runs_51_batches():
    G = source_G()
    fetched = []

    def batches():
        for i in range(60):
            fetched.append(i)
            yield torch.zeros(1, SRC_NC, 8, 8).index_fill_(1, torch.tensor([i % SRC_NC]), 1.0)

    G.eval()
    before = G.body[0].norm_0.first_norm.running_mean.clone()
    recompute_bn_stats(G, batches())
    assert len(fetched) == 51 and not G.training
    assert not torch.equal(before, G.body[0].norm_0.first_norm.running_mean)


def test_affinity_layer_is_a_channel_map():
    A = Affinity(TGT_NC, SRC_NC)
    M = soft_affinity(6)
    with torch.no_grad():
        A.weight.copy_(M.t()[:, :, None, None])
    _, y, _ = target_batch(6)
    assert torch.allclose(A(y), to_source(y, M), atol=1e-7)
