"""models/oasis.py against the official OASIS goldens (tests/golden/oasis, see its README).

Every set folder holding config.json + golden_io.pt is discovered (constructor widths from golden_cfg),
and every full/*.pt recipe file. Tolerances are the README's: 1e-5 for the small sets, 1e-4 (and a
relative sum error < 1e-6) for the full-size nets.
"""
import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import GOLDEN, golden_path
from models.oasis import Discriminator, Generator, SNConv2d, check_state_dict, oasis_config
from models.oasis_train import (class_balance_weights, discriminator_loss, ema_update, generator_loss, labelmix_mask,
                                n1_loss, recompute_bn_stats)

TOL = 1e-5
OASIS = GOLDEN / 'oasis'
SETS = sorted(p.parent.relative_to(OASIS).as_posix() for p in OASIS.rglob('golden_io.pt')
              if (p.parent / 'config.json').is_file())
FULL = sorted(p.stem for p in OASIS.glob('full/*.pt'))


def test_goldens_discovered():
    golden_path('oasis')
    assert SETS, f'no golden set (config.json + golden_io.pt) under {OASIS}'
    assert FULL, f'no full/*.pt under {OASIS}'


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


def onehot(label_int, n):
    label = label_int.long()
    return torch.zeros(label.shape[0], n, *label.shape[2:]).scatter_(1, label, 1.0)


@functools.lru_cache(maxsize=None)
def golden_set(name):
    """(config, golden_io, G kwargs, D kwargs) of one small set."""
    cfg = json.loads(golden_path('oasis', name, 'config.json').read_text())
    gc = cfg['golden_cfg']
    # options of the official code that models/oasis.py does not implement (the released models use none)
    unsupported = {k: cfg[k] for k, ok in (('no_3dnoise', False), ('no_spectral_norm', False), ('add_vgg_loss', False),
                                           ('param_free_norm', 'syncbatch'), ('no_balancing_inloss', False),
                                           ('contain_dontcare_label', True)) if cfg.get(k, ok) != ok}
    assert not unsupported, f'golden set {name} uses unsupported official options {unsupported}'
    g_kw = dict(semantic_nc=gc['semantic_nc'], z_dim=gc['z_dim'], channels=gc['channels_G'],
                spade_hidden=gc['spade_nhidden'], num_res_blocks=cfg['num_res_blocks'], crop_size=gc['crop_size'],
                aspect_ratio=gc['aspect_ratio'], spade_ks=cfg['spade_ks'])
    d_kw = dict(semantic_nc=gc['semantic_nc'], channels=gc['channels_D_list'], last_width=gc['channels_D_last'])
    return cfg, load(golden_path('oasis', name, 'golden_io.pt')), g_kw, d_kw


def fresh(name, part):
    """A model freshly loaded (strictly) from <set>/models/latest_<part>.pth."""
    _, _, g_kw, d_kw = golden_set(name)
    model = Discriminator(**d_kw) if part == 'D' else Generator(**g_kw)
    path = golden_path('oasis', name, 'models', f'latest_{part}.pth')
    check_state_dict(model, load(path), path)
    return model


def inputs(name):
    cfg, io, _, _ = golden_set(name)
    return io, onehot(io['label_int'], cfg['golden_cfg']['semantic_nc'])


@pytest.mark.parametrize('name', SETS)
def test_state_dict_keys_in_official_order(name):
    for part in ('G', 'EMA', 'D'):
        sd = load(golden_path('oasis', name, 'models', f'latest_{part}.pth'))
        assert list(fresh(name, part).state_dict()) == list(sd), part


@pytest.mark.parametrize('name', SETS)
def test_eval_outputs_and_losses(name):
    cfg, _, _, _ = golden_set(name)
    io, y = inputs(name)
    if 'label_onehot' in io:
        assert torch.equal(y, io['label_onehot'])
    with torch.no_grad():
        assert maxdiff(fresh(name, 'G').eval()(y, io['z']), io['G_eval']) < TOL
        fake = fresh(name, 'EMA').eval()(y, io['z'])
        assert maxdiff(fake, io['EMA_eval']) < TOL
        D = fresh(name, 'D').eval()
        d_real, d_fake = D(io['image']), D(fake)
        assert maxdiff(d_real, io['D_eval_real']) < TOL
        assert maxdiff(n1_loss(d_fake, y, for_real=False), io['loss_D_fake_eval']) < TOL
        assert maxdiff(n1_loss(d_real, y, for_real=True), io['loss_D_real_eval']) < TOL
        assert maxdiff(n1_loss(d_fake, y, for_real=True), io['loss_G_adv_eval']) < TOL
        assert maxdiff(class_balance_weights(y)[:, None], io['class_weight_map']) < TOL
        if 'n1_target_real' in io:
            assert torch.equal(y.argmax(1) + 1, io['n1_target_real'].long())
            assert not io['n1_target_fake'].any()
        assert torch.equal(torch.unique(y.argmax(1)), io['labelmix_classes'])
        torch.manual_seed(io['seeds']['SEED_LM'])
        assert torch.equal(torch.randint(0, 2, (len(io['labelmix_classes']),)), io['labelmix_draws'])
        torch.manual_seed(io['seeds']['SEED_LM'])
        mask = labelmix_mask(y)
        assert torch.equal(mask, io['labelmix_mask'])
        d_mixed = D(mask * io['image'] + (1 - mask) * fake)
        lm = F.mse_loss(mask * d_real + (1 - mask) * d_fake, d_mixed)
        assert maxdiff(lm, io['loss_labelmix_eval_unweighted']) < TOL


def assert_buffers(model, ref):
    bufs = dict(model.named_buffers())
    assert set(bufs) == set(ref)
    for k, v in ref.items():
        assert maxdiff(bufs[k], v) < TOL, k


@pytest.mark.parametrize('name', SETS)
def test_train_forward_and_buffers(name):
    io, y = inputs(name)
    with torch.no_grad():
        G = fresh(name, 'G').train()
        assert maxdiff(G(y, io['z']), io['G_train']) < TOL
        assert_buffers(G, io['G_buffers_after_train_forward'])
        if 'D_train_real' in io:
            D = fresh(name, 'D').train()
            assert maxdiff(D(io['image']), io['D_train_real']) < TOL
            assert_buffers(D, io['D_buffers_after_train_forward'])


@pytest.mark.parametrize('name', SETS)
def test_composite_training_losses(name):
    """The official OASIS_model.forward 'losses_G' then 'losses_D', all in train mode, z drawn inside G."""
    cfg, _, _, _ = golden_set(name)
    io, y = inputs(name)
    G, D = fresh(name, 'G').train(), fresh(name, 'D').train()
    torch.manual_seed(io['seeds']['SEED_LOSS_G'])
    loss_G = generator_loss(D, G(y), y)
    loss_G.backward()
    assert maxdiff(loss_G, io['model_loss_G']) < TOL
    assert maxdiff(G.fc.weight.grad, io['model_loss_G_grad_fc_weight']) < TOL
    torch.manual_seed(io['seeds']['SEED_LOSS_D'])
    with torch.no_grad():
        fake = G(y)
    lambda_lm = 0.0 if cfg.get('no_labelmix') else cfg['lambda_labelmix']
    loss_D, parts = discriminator_loss(D, io['image'], fake, y, lambda_lm)
    assert maxdiff(loss_D, io['model_loss_D']) < TOL
    assert maxdiff(parts['D_fake'], io['model_loss_D_fake']) < TOL
    assert maxdiff(parts['D_real'], io['model_loss_D_real']) < TOL
    assert maxdiff(parts['D_lm'], io['model_loss_D_lm_weighted']) < TOL
    assert_buffers(G, io['model_buffers_after_losses']['G'])
    assert_buffers(D, io['model_buffers_after_losses']['D'])


@pytest.mark.parametrize('name', SETS)
def test_channels_last_matches_and_stays_channels_last(name):
    """Moved to channels_last, G and D give the golden outputs and every conv sees NHWC input."""
    io, y = inputs(name)
    cl = torch.channels_last
    G, D = fresh(name, 'G').eval().to(memory_format=cl), fresh(name, 'D').eval().to(memory_format=cl)
    formats = []
    for m in [*G.modules(), *D.modules()]:
        if isinstance(m, (torch.nn.Conv2d, SNConv2d)):
            m.register_forward_pre_hook(lambda mod, args: formats.append(args[0].is_contiguous(memory_format=cl)))
    with torch.no_grad():
        assert maxdiff(G(y, io['z']), io['G_eval']) < TOL  # a plain NCHW label map goes in
        assert maxdiff(D(io['image'].contiguous(memory_format=cl)), io['D_eval_real']) < TOL
        formats.clear()  # 1x1 maps (64-pixel D inputs) are ambiguous; check G again and D at 256 pixels
        G(y, io['z'])
        D(torch.zeros(1, 3, 256, 256).contiguous(memory_format=cl))
    assert formats and all(formats)


EMA_SETS = [n for n in SETS if (OASIS / n / 'ema_update_inputs.pt').is_file()]


@pytest.mark.parametrize('name', EMA_SETS)
def test_ema_update_with_bn_stats_pass(name):
    _, _, g_kw, _ = golden_set(name)
    ema = Generator(**g_kw)
    ema.load_state_dict(load(golden_path('oasis', name, 'ema_update_EMA_before.pth')))
    G = fresh(name, 'G')
    ema.train(), G.train()
    extra = load(golden_path('oasis', name, 'ema_update_inputs.pt'))
    ema_update(ema, G, extra['EMA_decay'])
    torch.manual_seed(extra['seed_before_update_EMA'])
    recompute_bn_stats(ema, (onehot(lab, g_kw['semantic_nc']) for lab in extra['stats_labels']))
    ref = load(golden_path('oasis', name, 'models', 'latest_EMA.pth'))
    got = ema.state_dict()
    assert list(got) == list(ref)
    for k, v in ref.items():
        assert maxdiff(got[k], v) < TOL, k


# ---------------------------------------------------------------------------------------------
# LabelMix: vectorised mask == the official sequential in-place loop

def official_labelmix_loop(y):
    """Straight transcription of the official generate_labelmix mask loop (the reference)."""
    target_map = torch.argmax(y, dim=1, keepdim=True)
    for c in torch.unique(target_map):
        target_map[target_map == c] = torch.randint(0, 2, (1,))
    return target_map.float()


def test_labelmix_vectorised_equals_official_loop():
    g = torch.Generator().manual_seed(0)
    pitfalls = 0
    for trial in range(60):
        n = int(torch.randint(2, 9, (1,), generator=g))
        # random subsets of classes, class 0 and 1 often present, sometimes absent
        classes = torch.randperm(n, generator=g)[:int(torch.randint(1, n + 1, (1,), generator=g))]
        label = classes[torch.randint(0, len(classes), (2, 1, 6, 5), generator=g)]
        y = torch.zeros(2, n, 6, 5).scatter_(1, label, 1.0)
        torch.manual_seed(trial)
        ref = official_labelmix_loop(y)
        after_ref = torch.rand(3)
        torch.manual_seed(trial)
        draw0 = torch.randint(0, 2, (1,)).item()
        pitfalls += bool((classes == 0).any() and (classes == 1).any() and draw0 == 1)
        torch.manual_seed(trial)
        got = labelmix_mask(y)
        assert torch.equal(got, ref), trial
        assert torch.equal(torch.rand(3), after_ref), 'RNG stream differs from the official loop'
    assert pitfalls >= 3  # the in-place reassignment case was exercised


def reference_class_balance_loop(y):
    """Class-balancing weights written as a plain loop over classes (the reference)."""
    B, C, H, W = y.shape
    occ = [float(y[:, c].sum()) for c in range(C)]
    occ[0] = 0.0
    n = sum(o > 0 for o in occ)
    k = y.argmax(1)
    w = torch.zeros(B, H, W)
    for c in range(1, C):
        if occ[c] > 0:
            coeff = torch.reciprocal(torch.tensor(occ[c])) * y.numel() / torch.tensor(n * C)
            w[k == c] = coeff
    return w


def test_class_balancing_equals_reference_loop():
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        C = int(torch.randint(2, 12, (1,), generator=g))
        label = torch.randint(0, C, (3, 1, 7, 9), generator=g)
        y = torch.zeros(3, C, 7, 9).scatter_(1, label, 1.0)
        if trial % 2:  # soft maps too: occurrences are channel sums, the weight index is the argmax
            y = 0.7 * y + 0.3 * torch.softmax(torch.randn(3, C, 7, 9, generator=g), dim=1)
        got, ref = class_balance_weights(y), reference_class_balance_loop(y)
        # one-hot sums are exact integers; soft sums may round differently in another reduction order
        assert torch.equal(got, ref) if trial % 2 == 0 else torch.allclose(got, ref, rtol=1e-6, atol=0), trial


# ---------------------------------------------------------------------------------------------
# Full-size default configs, weights from the README's recipe

def recipe_state_dict(keys_file):
    lines = [ln.rstrip('\n') for ln in keys_file.read_text().splitlines() if ln.strip() and not ln.startswith('#')]
    sd = {}
    for i, line in enumerate(lines):
        key, shape, _, _ = line.split('\t')
        shape = tuple(int(s) for s in shape.strip('()').split(',') if s.strip())
        g = torch.Generator().manual_seed(i)
        if key.endswith('num_batches_tracked'):
            sd[key] = torch.zeros((), dtype=torch.int64)
        elif key.endswith('running_mean'):
            sd[key] = torch.zeros(shape)
        elif key.endswith('running_var'):
            sd[key] = torch.ones(shape)
        elif key.endswith(('weight_u', 'weight_v')):
            sd[key] = F.normalize(torch.randn(shape, generator=g), dim=0, eps=1e-12)
        elif len(shape) == 4:
            sd[key] = torch.randn(shape, generator=g) / math.sqrt(shape[1] * shape[2] * shape[3])
        else:
            sd[key] = 0.1 * torch.randn(shape, generator=g)
    return sd


def assert_full(x, ref):
    st, mc = ref['stride'], ref['max_ch']
    sub = x[:, :mc, ::st, ::st] if mc else x[:, :, ::st, ::st]
    assert maxdiff(sub, ref['sub']) < 1e-4
    assert maxdiff(x.mean((2, 3)), ref['chan_mean']) < 1e-4
    assert abs(x.double().sum().item() - ref['sum']) / ref['abs_sum'] < 1e-6


def full_inputs(io):
    B, H, W, C = io['B'], io['H'], io['W'], io['semantic_nc']
    label = torch.randint(0, C, (B, 1, H // 16, W // 16), generator=torch.Generator().manual_seed(7))
    label = label.repeat_interleave(16, 2).repeat_interleave(16, 3)
    img = torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(8)) * 2 - 1
    return onehot(label, C), img


@pytest.mark.parametrize('ds', FULL)
def test_full_generator(ds):
    """Train-mode then eval-mode forward of the full-size G."""
    io = load(golden_path('oasis', 'full', f'{ds}.pt'))
    g_kw, _ = oasis_config(ds)
    G = Generator(**g_kw)
    keys = golden_path('keys', f'keys_{ds}_G.txt')
    check_state_dict(G, recipe_state_dict(keys), keys)
    y, _ = full_inputs(io)
    with torch.no_grad():
        assert_full(G.train()(y, io['z']), io['G_train'])
        assert_full(G.eval()(y, io['z']), io['G_eval'])


@pytest.mark.parametrize('ds', FULL)
def test_full_discriminator(ds):
    """Train-mode then eval-mode forward of the full-size D."""
    io = load(golden_path('oasis', 'full', f'{ds}.pt'))
    _, d_kw = oasis_config(ds)
    D = Discriminator(**d_kw)
    keys = golden_path('keys', f'keys_{ds}_D.txt')
    check_state_dict(D, recipe_state_dict(keys), keys)
    _, img = full_inputs(io)
    with torch.no_grad():
        assert_full(D.train()(img), io['D_train'])
        assert_full(D.eval()(img), io['D_eval'])
