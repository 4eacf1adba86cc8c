"""OASIS (Schoenfeld et al., ICLR 2021) written for CAT: loads the official checkpoints unchanged.

The generator and discriminator keep the official state-dict keys (old-style spectral norm:
weight_orig / weight_u / weight_v; BatchNorm without affine) so that `<run>/models/best_EMA.pth`
loads strictly, and they compute what the official code computes (tests/golden/oasis).
Differences on purpose: the noise z can be passed explicitly, spectral norm and BatchNorm always run
in fp32 (bf16 autocast friendly), and the generator can carry the CAT layers: a class-affinity 1x1
conv on the label channels in front of every conv that eats the label map, plus zero-initialised
residual convs, so that at step 0 G_cat(z, y) == G_src(z, A^T y) exactly (training-free mode).

Losses, LabelMix, the EMA update and the BN-statistics pass are in models/oasis_train.py.
"""
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import DataError, run
from models.state_dict import load_strict, read_state_dict


def _fp32(device):
    """Context that switches autocast off: spectral norm, BatchNorm and loss reductions need fp32."""
    return torch.autocast(device.type, enabled=False)


def _official_init(module):
    """The official init_networks: xavier_normal(gain 0.02) conv weights, zero biases. CAT layers keep
    their own init (zero residuals, affinity)."""
    for m in module.modules():
        if isinstance(m, (Residual, Affinity)):
            continue
        w = getattr(m, 'weight_orig', None)
        if w is None and isinstance(m, nn.Conv2d):
            w = m.weight
        if w is not None:
            nn.init.xavier_normal_(w, gain=0.02)
        if isinstance(getattr(m, 'bias', None), nn.Parameter):
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------
# Layers

class SNConv2d(nn.Module):
    """Conv2d under torch.nn.utils.spectral_norm (1 power iteration, eps 1e-12), same keys and order
    (bias, weight_orig, weight_u, weight_v). Train mode updates u, v in place before use; eval mode
    uses the stored vectors. sigma = u . (W v) is computed in fp32 even under autocast."""

    def __init__(self, cin, cout, kernel_size, padding=0, bias=True):
        super().__init__()
        self.padding = padding
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.weight_orig = nn.Parameter(torch.empty(cout, cin, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight_orig, a=math.sqrt(5))
        self.register_buffer('weight_u', F.normalize(torch.randn(cout), dim=0, eps=1e-12))
        self.register_buffer('weight_v', F.normalize(torch.randn(cin * kernel_size ** 2), dim=0, eps=1e-12))

    def normalized_weight(self):
        w = self.weight_orig
        with _fp32(w.device):
            mat = w.flatten(1)
            u, v = self.weight_u, self.weight_v
            if self.training:
                with torch.no_grad():
                    v = F.normalize(torch.mv(mat.t(), u), dim=0, eps=1e-12)
                    u = F.normalize(torch.mv(mat, v), dim=0, eps=1e-12)
                    self.weight_v.copy_(v)
                    self.weight_u.copy_(u)
            sigma = torch.dot(u, torch.mv(mat, v))
            return w / sigma

    def forward(self, x):
        return F.conv2d(x, self.normalized_weight(), self.bias, padding=self.padding)


class ParamFreeBN(nn.BatchNorm2d):
    """BatchNorm2d(affine=False) as the official SynchronizedBatchNorm2d runs it outside DataParallel:
    fixed momentum 0.1 and `num_batches_tracked` never counted, so saved buffers match official files.
    (nn.SyncBatchNorm.convert_sync_batchnorm may replace it for DDP; only that counter then differs.)"""

    def __init__(self, num_features):
        super().__init__(num_features, affine=False)

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, None, None, self.training,
                            self.momentum, self.eps)


class Residual(nn.Conv2d):
    """CAT residual: a zero-initialised conv on the target one-hot map, added to the pretrained conv's
    output; zero at step 0, so the CAT model starts exactly as the source model fed A^T y."""

    def __init__(self, cin, cout, ks):
        super().__init__(cin, cout, ks, padding=ks // 2)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


class Affinity(nn.Module):
    """CAT input layer: the channel-space affinity M (cat_nc x semantic_nc) as a bias-free 1x1 conv that
    maps a target label map (cat_nc channels) to the source label space: y_src[s] = sum_t M[t, s] y[t]."""

    def __init__(self, cat_nc, semantic_nc):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(semantic_nc, cat_nc, 1, 1))
        nn.init.xavier_normal_(self.weight, gain=0.02)  # a random layer until set_affinity is called

    def forward(self, y):
        return F.conv2d(y, self.weight)


class LearnedAffinity(nn.Module):
    """The cGANTransfer adaptation: every target channel a *learned* convex combination of the source classes.
    The rows are a softmax over the real source channels of free logits, initialised to zero (uniform rows)
    and trained with the rest; target dontcare maps to source dontcare. Used by the 'cgantransfer' recipe."""

    def __init__(self, cat_nc, semantic_nc):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(cat_nc, semantic_nc))
        mask = torch.zeros(cat_nc, semantic_nc)
        mask[:, 0] = mask[0, :] = float('-inf')
        mask[0, 0] = 0.0
        self.register_buffer('mask', mask, persistent=False)

    @property
    def weight(self):
        return torch.softmax(self.logits.float() + self.mask, dim=1).T[:, :, None, None]

    def forward(self, y):
        return F.conv2d(y, self.weight.to(y.dtype))


def _conv_dtype(t):
    """The dtype convolutions run in: the autocast dtype inside autocast, else t's own."""
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


def _resize(y, hw):
    """Legacy nearest resize (source index floor(i * in / out), as the official F.interpolate default); no copy when already hw."""
    return y if tuple(y.shape[2:]) == tuple(hw) else F.interpolate(y, size=tuple(hw), mode='nearest')


def _memory_format(t):
    """channels_last when t is stored NHWC (and not trivially both), else the default layout."""
    return torch.channels_last if t.dim() == 4 and not t.is_contiguous() and \
        t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def _noise_and_labels(z, y):
    """The official SPADE input: z broadcast over H x W, concatenated BEFORE the label channels.
    Written into one buffer in y's memory format (torch.cat with a broadcast z would fall back to NCHW)."""
    b, c, h, w = y.shape
    seg = torch.empty((b, z.shape[1] + c, h, w), dtype=y.dtype, device=y.device, memory_format=_memory_format(y))
    seg[:, :z.shape[1]] = z[:, :, None, None]
    seg[:, z.shape[1]:] = y
    return seg


class SPADE(nn.Module):
    """out = BN(x) * (1 + gamma) + beta, with gamma/beta from mlp_shared(cat(z, y)).

    With `cat_nc`, y is the target one-hot map: an Affinity layer maps it to the source label space in
    front of the pretrained mlp_shared conv, and a zero-initialised residual conv on the target map is
    added to that conv's output (before its ReLU). 'separate' paths give gamma and beta each their own
    affinity + residual while sharing the pretrained conv; 'shared' uses one of each."""

    def __init__(self, norm_nc, semantic_nc, z_dim, hidden=128, ks=3, cat_nc=None, cat_paths='separate',
                 cat_residual=True, cat_affinity='fixed'):
        super().__init__()
        self.first_norm = ParamFreeBN(norm_nc)
        self.mlp_shared = nn.Sequential(nn.Conv2d(z_dim + semantic_nc, hidden, ks, padding=ks // 2), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, norm_nc, ks, padding=ks // 2)
        self.mlp_beta = nn.Conv2d(hidden, norm_nc, ks, padding=ks // 2)
        self.paths = () if cat_nc is None else ('gamma', 'beta') if cat_paths == 'separate' else ('',)
        for p in self.paths:
            layer = LearnedAffinity if cat_affinity == 'learned' else Affinity
            setattr(self, 'cat_' + p if p else 'cat', layer(cat_nc, semantic_nc))
            setattr(self, 'res_' + p if p else 'res',
                    Residual(cat_nc, hidden, ks) if cat_residual else None)

    def _hidden(self, z, y, path):
        affinity = getattr(self, 'cat_' + path if path else 'cat')
        residual = getattr(self, 'res_' + path if path else 'res')
        a = self.mlp_shared[0](_noise_and_labels(z, affinity(y)))
        if residual is not None:
            a = a + residual(y)
        return F.relu(a)

    def forward(self, x, z, y, seg=None):
        """x: features; z: (B, z_dim); y: label map; seg: cat(z, y) at x's size when the caller already
        built it (the non-CAT SPADEs of a block share one, so autograd keeps one copy)."""
        with _fp32(x.device):
            normalized = self.first_norm(x.float())
        y = _resize(y, x.shape[2:])
        if not self.paths:
            a = self.mlp_shared(seg if seg is not None else _noise_and_labels(z, y))
            gamma, beta = self.mlp_gamma(a), self.mlp_beta(a)
        elif self.paths == ('',):
            a = self._hidden(z, y, '')
            gamma, beta = self.mlp_gamma(a), self.mlp_beta(a)
        else:
            gamma = self.mlp_gamma(self._hidden(z, y, 'gamma'))
            beta = self.mlp_beta(self._hidden(z, y, 'beta'))
        # statistics in fp32; the modulation runs in the conv dtype (bf16 under autocast: half the memory)
        return normalized.to(gamma.dtype) * (1 + gamma) + beta


class SPADEResBlock(nn.Module):
    """The official ResnetBlock_with_SPADE (keys conv_0, conv_1, conv_s, norm_0, norm_1, norm_s)."""

    def __init__(self, fin, fout, semantic_nc, z_dim, **spade_kw):
        super().__init__()
        self.learned_shortcut = fin != fout
        fmid = min(fin, fout)
        self.conv_0 = SNConv2d(fin, fmid, 3, padding=1)
        self.conv_1 = SNConv2d(fmid, fout, 3, padding=1)
        if self.learned_shortcut:
            self.conv_s = SNConv2d(fin, fout, 1, bias=False)
        self.norm_0 = SPADE(fin, semantic_nc, z_dim, **spade_kw)
        self.norm_1 = SPADE(fmid, semantic_nc, z_dim, **spade_kw)
        if self.learned_shortcut:
            self.norm_s = SPADE(fin, semantic_nc, z_dim, **spade_kw)

    def forward(self, x, z, y):
        seg = None if self.norm_0.paths else _noise_and_labels(z, y)
        x_s = self.conv_s(self.norm_s(x, z, y, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, z, y, seg), 0.2, inplace=True))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, z, y, seg), 0.2, inplace=True))
        return x_s + dx


# ----------------------------------------------------------------------------------------------
# Generator

def latent_hw(crop_size, aspect_ratio, num_res_blocks=6):
    """(H0, W0) of the generator's first (fc) grid: W0 = crop_size // 2^(blocks-1), H0 = round(W0 / aspect),
    with Python's banker's rounding as the official code."""
    w0 = crop_size // 2 ** (num_res_blocks - 1)
    return round(w0 / aspect_ratio), w0


def resize_kwargs(G_kwargs, hw, what='the source generator'):
    """G_kwargs of a (source) generator rebuilt to make (H, W) images: the same weights serve any width,
    since every layer is convolutional and fc runs on a grid of (H/32, W/32). This is how a 256x256 ADE20K or
    COCO-Stuff source makes 256x512 Cityscapes images (supplement Tables 8-10). The height stays: it is the
    scale the layers learnt, so a source of another height is refused (DataError naming `what`)."""
    H, W = hw
    step = 2 ** (G_kwargs['num_res_blocks'] - 1)
    h0, w0 = latent_hw(G_kwargs['crop_size'], G_kwargs['aspect_ratio'], G_kwargs['num_res_blocks'])
    if H != step * h0 or W % step or W <= 0:
        raise DataError(f'{what} makes {step * h0}x{step * w0} images; the target data gives {H}x{W} (--size): '
                        f'the height must stay {step * h0} (the width may be any multiple of {step})')
    kw = {**G_kwargs, 'crop_size': W, 'aspect_ratio': W / H}
    assert latent_hw(kw['crop_size'], kw['aspect_ratio'], kw['num_res_blocks']) == (h0, W // step)
    return kw


class Generator(nn.Module):
    """The official OASIS_Generator with an explicit z and optional CAT layers.

    semantic_nc: label channels of the (source) checkpoint, dontcare = channel 0.
    channels: channels_G (widths 16ch,16ch,16ch,8ch,4ch,2ch,ch); spade_hidden: SPADE hidden width (128);
    crop_size, aspect_ratio: output is (32*H0, 32*W0) with W0 = crop_size // 32, H0 = round(W0 / aspect).
    cat_nc: target label channels when CAT is on (forward then takes target one-hot maps);
    cat_paths: 'separate' (gamma/beta get their own affinity + residual) or 'shared';
    cat_residual: add the zero-initialised residual convs;
    cat_affinity: 'fixed' (CAT: 1x1 convs set from the affinity, then finetuned freely) or 'learned' (each
    row a softmax over source classes, uniform at start: the cGANTransfer adaptation).
    """

    def __init__(self, semantic_nc, z_dim=64, channels=64, spade_hidden=128, num_res_blocks=6, crop_size=256,
                 aspect_ratio=1.0, spade_ks=3, cat_nc=None, cat_paths='separate', cat_residual=True,
                 cat_affinity='fixed'):
        super().__init__()
        if num_res_blocks != 6:
            raise ValueError(f'num_res_blocks={num_res_blocks}: the OASIS generator has 6 SPADE blocks')
        if cat_affinity not in ('fixed', 'learned'):
            raise ValueError(f"cat_affinity={cat_affinity!r}: expected 'fixed' or 'learned'")
        if cat_paths not in ('separate', 'shared'):
            raise ValueError(f"cat_paths={cat_paths!r}: expected 'separate' or 'shared'")
        self.kwargs = dict(semantic_nc=semantic_nc, z_dim=z_dim, channels=channels, spade_hidden=spade_hidden,
                           num_res_blocks=num_res_blocks, crop_size=crop_size, aspect_ratio=aspect_ratio,
                           spade_ks=spade_ks, cat_nc=cat_nc, cat_paths=cat_paths, cat_residual=cat_residual,
                           cat_affinity=cat_affinity)
        self.semantic_nc, self.z_dim, self.cat_nc = semantic_nc, z_dim, cat_nc
        self.latent_hw = latent_hw(crop_size, aspect_ratio, num_res_blocks)
        widths = [16 * channels, 16 * channels, 16 * channels, 8 * channels, 4 * channels, 2 * channels, channels]
        spade_kw = dict(hidden=spade_hidden, ks=spade_ks, cat_nc=cat_nc, cat_paths=cat_paths,
                        cat_residual=cat_residual, cat_affinity=cat_affinity)
        self.conv_img = nn.Conv2d(channels, 3, 3, padding=1)
        self.body = nn.ModuleList(SPADEResBlock(widths[i], widths[i + 1], semantic_nc, z_dim, **spade_kw)
                                  for i in range(6))
        self.fc = nn.Conv2d(z_dim + semantic_nc, 16 * channels, 3, padding=1)
        _official_init(self)
        if cat_nc is not None:  # fc also eats the label map, so it gets its own CAT layers
            self.fc_cat = (LearnedAffinity if cat_affinity == 'learned' else Affinity)(cat_nc, semantic_nc)
            self.fc_res = Residual(cat_nc, 16 * channels, 3) if cat_residual else None

    @property
    def output_hw(self):
        return (32 * self.latent_hw[0], 32 * self.latent_hw[1])

    def forward(self, y, z=None):
        """y: (B, semantic_nc or cat_nc, H, W) float label map; z: (B, z_dim) or None (drawn like the
        official code: torch.randn on y's device). Returns (B, 3, 32*H0, 32*W0) in (-1, 1), fp32."""
        nc = self.semantic_nc if self.cat_nc is None else self.cat_nc
        if y.dim() != 4 or y.shape[1] != nc:
            raise ValueError(f'label map has shape {tuple(y.shape)}, the generator expects (B, {nc}, H, W)')
        if z is None:
            z = torch.randn(y.shape[0], self.z_dim, dtype=torch.float32, device=y.device)
        # label maps in the dtype and memory format the convs run in (bf16 under autocast, channels_last
        # when the model was moved to it), so no conv converts its input again
        y = y.to(_conv_dtype(y), memory_format=_memory_format(self.fc.weight))
        y_lat = _resize(y, self.latent_hw)
        if self.cat_nc is None:
            x = self.fc(_noise_and_labels(z, y_lat))
        else:
            x = self.fc(_noise_and_labels(z, self.fc_cat(y_lat)))
            if self.fc_res is not None:
                x = x + self.fc_res(y_lat)
        for i, block in enumerate(self.body):
            # resize the label map once per block (nearest from full size, as the official SPADE does)
            x = block(x, z, _resize(y, x.shape[2:]))
            if i < len(self.body) - 1:
                x = F.interpolate(x, scale_factor=2, mode='nearest')
        x = self.conv_img(F.leaky_relu(x, 0.2))
        return torch.tanh(x.float())

    # --- CAT helpers -------------------------------------------------------------------------

    def cat_modules(self):
        """(name, module) of every CAT layer (affinity and residual convs)."""
        out = [] if self.cat_nc is None else [('fc_cat', self.fc_cat), ('fc_res', self.fc_res)]
        for name, m in self.named_modules():
            if isinstance(m, SPADE):
                for p in m.paths:
                    for kind in ('cat', 'res'):
                        attr = kind + '_' + p if p else kind
                        out.append((f'{name}.{attr}', getattr(m, attr)))
        return [(n, m) for n, m in out if m is not None]

    def set_affinity(self, M):
        """Load the channel-space affinity M (cat_nc x semantic_nc, see data.affinity_to_channels) into
        every CAT affinity conv."""
        M = torch.as_tensor(M, dtype=torch.float32)
        if self.cat_nc is None:
            raise ValueError('set_affinity: this generator has no CAT layers (built without cat_nc)')
        if tuple(M.shape) != (self.cat_nc, self.semantic_nc):
            raise ValueError(f'affinity has shape {tuple(M.shape)}, the generator expects '
                             f'({self.cat_nc}, {self.semantic_nc}) (target x source channels)')
        if not torch.isfinite(M).all():
            raise ValueError('affinity contains NaN or inf values')
        with torch.no_grad():
            for _, m in self.cat_modules():
                if isinstance(m, Affinity):
                    m.weight.copy_(M.t()[:, :, None, None])

    def stage_parameters(self, stage, stage2='spade'):
        """Parameters trained in CAT stage 1 or 2, each list without repeats.

        Stage 1: the CAT layers + the SPADE gamma/beta convs (the supplement's "open padlock" layers).
        Stage 2, `stage2`: 'spade' (the supplement's reading: "all layers in the SPADE blocks", where its
        Figure 1 calls the normalisation module, shared 3x3 conv -> gamma/beta convs, the SPADE block: every
        SPADE module, i.e. mlp_shared + mlp_gamma + mlp_beta + its CAT layers, plus fc's CAT layers), or
        'blocks' (every layer of the SPADE residual blocks, body.* with conv_0/conv_1/conv_s, plus fc's CAT
        layers: this toolkit's default before 2026-12)."""
        cat = [p for _, m in self.cat_modules() for p in m.parameters()]
        spades = [m for m in self.modules() if isinstance(m, SPADE)]
        if stage == 1:
            own = [p for m in spades for p in (*m.mlp_gamma.parameters(), *m.mlp_beta.parameters())]
        elif stage == 2 and stage2 == 'spade':
            own = [p for m in spades for p in m.parameters()]
        elif stage == 2 and stage2 == 'blocks':
            own = list(self.body.parameters())
        else:
            raise ValueError(f"stage={stage}, stage2={stage2!r}: expected stage 1 or 2 and stage2 'spade' or 'blocks'")
        ids = {id(p) for p in own}
        return own + [p for p in cat if id(p) not in ids]

    def resize(self, hw, what='the source generator'):
        """Make (H, W) images with the same weights (`resize_kwargs` says which sizes can be made); call it
        after loading, so that a file of the wrong classes is named as such before its size is."""
        self.kwargs = resize_kwargs(self.kwargs, hw, what)
        self.latent_hw = latent_hw(self.kwargs['crop_size'], self.kwargs['aspect_ratio'], self.kwargs['num_res_blocks'])
        return self

    def load_source(self, sd, path='<state dict>', name=None):
        """Load an official (source) generator state dict. Every source key must be present with its
        shape; only the CAT layers may be missing (they keep their init / set_affinity values)."""
        check_state_dict(self, sd, path, name, optional=[f'{n}.{k}' for n, m in self.cat_modules()
                                                         for k in m.state_dict()])


# ----------------------------------------------------------------------------------------------
# Discriminator

class DBlock(nn.Module):
    """The official residual_block_D; Sequential indices give the keys conv1.0 / conv1.1 / conv1.2."""

    def __init__(self, fin, fout, up, first=False):
        super().__init__()
        self.up, self.first = up, first
        self.learned_shortcut = fin != fout
        if first:
            self.conv1 = nn.Sequential(SNConv2d(fin, fout, 3, padding=1))
        elif up:
            self.conv1 = nn.Sequential(nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2),
                                       SNConv2d(fin, fout, 3, padding=1))
        else:
            self.conv1 = nn.Sequential(nn.LeakyReLU(0.2), SNConv2d(fin, fout, 3, padding=1))
        self.conv2 = nn.Sequential(nn.LeakyReLU(0.2), SNConv2d(fout, fout, 3, padding=1))
        if self.learned_shortcut:
            self.conv_s = SNConv2d(fin, fout, 1)

    def forward(self, x):
        # shortcut as official: the first block pools then convs, other down blocks conv then pool,
        # up blocks upsample then conv
        s = x
        if self.up:
            s = F.interpolate(s, scale_factor=2, mode='nearest')
        elif self.first:
            s = F.avg_pool2d(s, 2)
        if self.learned_shortcut:
            s = self.conv_s(s)
        if not self.up and not self.first:
            s = F.avg_pool2d(s, 2)
        dx = self.conv2(self.conv1(x))
        if not self.up:
            dx = F.avg_pool2d(dx, 2)
        return s + dx


class Discriminator(nn.Module):
    """The official OASIS_Discriminator: a U-Net whose N+1 head gives logits (B, semantic_nc+1, H, W),
    channel 0 = fake, channel k+1 = semantic channel k. channels / last_width are hard-coded in the
    official code ([3,128,128,256,256,512,512] and 64) and exposed here for small test configs."""

    def __init__(self, semantic_nc, channels=(3, 128, 128, 256, 256, 512, 512), last_width=64):
        super().__init__()
        ch = list(channels)
        self.kwargs = dict(semantic_nc=semantic_nc, channels=ch, last_width=last_width)
        n = len(ch) - 1
        self.body_up = nn.ModuleList([DBlock(ch[-1], ch[-2], up=True)])
        self.body_up.extend(DBlock(2 * ch[-1 - i], ch[-2 - i], up=True) for i in range(1, n - 1))
        self.body_up.append(DBlock(2 * ch[1], last_width, up=True))
        self.body_down = nn.ModuleList(DBlock(ch[i], ch[i + 1], up=False, first=i == 0) for i in range(n))
        self.layer_up_last = nn.Conv2d(last_width, semantic_nc + 1, 1)
        _official_init(self)

    def forward(self, x):
        k = 2 ** len(self.body_down)
        if x.shape[2] % k or x.shape[3] % k:
            raise ValueError(f'image size {tuple(x.shape[2:])}: the discriminator needs H and W multiples of {k}')
        skips = []
        for block in self.body_down:
            x = block(x)
            skips.append(x)
        x = self.body_up[0](x)
        for i in range(1, len(self.body_down)):
            x = self.body_up[i](torch.cat([skips[-i - 1], x], dim=1))  # skip first, then x
        return self.layer_up_last(x)

    def blocks_for_freeze(self):
        """Encoder blocks from the input side (FreezeD freezes the first K)."""
        return list(self.body_down)

    def freeze(self, k, size, depth_flag):
        """FreezeD: the first k encoder blocks stop training (requires_grad False, every other parameter True).
        Refused in one line: image sides (`size`, H x W) that are not multiples of 2^blocks (`depth_flag`: the
        flag that set D's depth) and a k past the encoder's blocks (--freeze-d)."""
        blocks = self.blocks_for_freeze()
        n = len(blocks)
        if any(side % 2 ** n for side in size):
            raise DataError(f'{depth_flag}: the discriminator has {n} encoder blocks and needs image sides that are '
                            f'multiples of {2 ** n}; --size gives {size[0]}x{size[1]}')
        if k > n:
            raise DataError(f'--freeze-d {k}: the discriminator has {n} encoder blocks; expected at most {n}')
        frozen = {id(p) for block in blocks[:k] for p in block.parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) not in frozen)

    def retarget(self, new_nc, M=None):
        """Rebuild the N+1 head for `new_nc` label channels. With M (new_nc x old semantic_nc) the row of
        target channel t is sum_s M[t, s] * (row of source channel s) and the fake row is kept; with
        None the head is freshly initialised (official init)."""
        old = self.layer_up_last
        old_nc = old.out_channels - 1
        new = nn.Conv2d(old.in_channels, new_nc + 1, 1).to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            if M is None:
                _official_init(new)
            else:
                M = torch.as_tensor(M, dtype=old.weight.dtype, device=old.weight.device)
                if tuple(M.shape) != (new_nc, old_nc):
                    raise ValueError(f'retarget: M has shape {tuple(M.shape)}, expected ({new_nc}, {old_nc})')
                new.weight[0] = old.weight[0]
                new.bias[0] = old.bias[0]
                new.weight[1:] = torch.einsum('ts,scij->tcij', M, old.weight[1:])
                new.bias[1:] = M @ old.bias[1:]
        self.layer_up_last = new
        self.kwargs['semantic_nc'] = new_nc


# ----------------------------------------------------------------------------------------------
# Official configs and checkpoints

_DATASETS = {'ade20k': (151, 256, 1.0), 'coco': (183, 256, 1.0), 'cityscapes': (35, 512, 2.0)}


def oasis_config(dataset):
    """(G kwargs, D kwargs) of the released OASIS checkpoints for 'ade20k' | 'coco' | 'cityscapes'."""
    if dataset not in _DATASETS:
        raise ValueError(f'no official OASIS config for {dataset!r}; expected one of {sorted(_DATASETS)}')
    nc, crop, aspect = _DATASETS[dataset]
    g = dict(semantic_nc=nc, z_dim=64, channels=64, spade_hidden=128, num_res_blocks=6, crop_size=crop,
             aspect_ratio=aspect, spade_ks=3)
    d = dict(semantic_nc=nc, channels=[3, 128, 128, 256, 256, 512, 512], last_width=64)
    return g, d


_WHERE = ('the official OASIS checkpoints come from the oasis_<dataset>_pretrained zips linked in the '
          'boschresearch/OASIS README (unpack: <dir>/models/best_EMA.pth)')


def load_official(path, part='EMA', which='best'):
    """State dict of an official OASIS file. `path` is a run dir (<dir>/models/{which}_{part}.pth, or
    <dir>/{which}_{part}.pth) or a single .pth. A finetuned CAT checkpoint (our dict) gives its `part`."""
    p = Path(path)
    if p.is_dir():
        found = [t for t in (p / 'models' / f'{which}_{part}.pth', p / f'{which}_{part}.pth') if t.is_file()]
        if not found:
            have = sorted(f.name for d in (p, p / 'models') if d.is_dir() for f in d.glob('*.pth'))
            raise DataError(f'{p}: no {which}_{part}.pth in it or in {p / "models"} (found: '
                             f'{", ".join(have) or "no .pth files"}); {_WHERE}')
        p = found[0]
    return read_state_dict(p, None, 'an OASIS state dict (a dict of tensors, as the official save_networks writes)',
                           unwrap=lambda sd: sd[part] if isinstance(sd, dict) and isinstance(sd.get('kind'), str)
                           and part in sd else sd, fix=_WHERE)  # a CAT checkpoint of ours gives its `part`


def check_widths(src, given, path):
    """A source model (load_source's dict, read from `path`) brings its own widths: a width flag given with it
    (`given`: channels, z_dim, spade_hidden, d_channels, d_last; None = not given) would be ignored, so only the
    source's own value may be repeated; another is refused in one line naming the flag."""
    have = {**{k: src['G_kwargs'][k] for k in ('channels', 'z_dim', 'spade_hidden')},
            'd_channels': list(src['D_kwargs']['channels']), 'd_last': src['D_kwargs']['last_width']}
    for k, v in have.items():
        if given.get(k) not in (None, v):
            flag, text = '--' + k.replace('_', '-'), lambda x: ','.join(map(str, x)) if isinstance(x, list) else x
            raise DataError(f'{flag} {text(given[k])}: the source model {path} has {flag} {text(v)}; a source '
                            f'model brings its own widths (drop {flag})')


def load_source(path, dataset, n_channels, which='best', d_path=None, parts=('EMA', 'D'), flag='--source-ckpt'):
    """The one resolver of a source (non-CAT) OASIS model -> {'G_kwargs', 'D_kwargs', 'EMA', 'D'}.

    `path` is an official run folder (<dir>/models/{which}_{EMA,D}.pth), an official generator .pth (its
    discriminator in `d_path`), or a checkpoint.pt of ours (kind 'oasis-cat', e.g. a toy source pretrained
    with --init scratch). `dataset`/`n_channels` are the source label space the caller expects; `parts`
    says which state dicts to read (a missing one is None). Every mismatch is one DataError line."""
    p = Path(path)
    if not p.exists():
        raise DataError(f'{flag} {p}: not found; {_WHERE}')
    if p.is_file():
        obj = run.torch_load(p, flag, mmap=True)  # one line: truncated, empty, pickled, not a torch file
        run.require_dict(obj, p, flag, 'an official OASIS .pth, its run folder or a checkpoint.pt of ours')
        if isinstance(obj.get('kind'), str):  # a checkpoint of ours
            if obj['kind'] != 'oasis-cat':
                what = 'finetune_piti.py' if obj['kind'] == 'piti-cat' else f"'{obj['kind']}'"
                raise DataError(f"{flag} {p}: a {what} checkpoint (kind {obj['kind']}); expected an OASIS model: an "
                                'official OASIS run folder / .pth or a checkpoint.pt of finetune_oasis.py')
            if obj['G_kwargs'].get('cat_nc') is not None:
                raise DataError(f'{flag} {p}: already has CAT layers; a source model is a plain OASIS model '
                                '(continue a CAT run with --resume)')
            got = obj['target']
            if got['n_channels'] != n_channels or got['dataset'] != dataset:
                raise DataError(f"{flag} {p}: trained on {got['dataset']} ({got['n_channels']} label channels), "
                                f'--source {dataset} expects {n_channels}')
            return {'G_kwargs': dict(obj['G_kwargs']), 'D_kwargs': dict(obj['D_kwargs']),
                    'EMA': obj['EMA'] if 'EMA' in parts else None, 'D': obj['D'] if 'D' in parts else None}
    if dataset not in _DATASETS:
        raise DataError(f'{flag} {p}: official OASIS checkpoints exist for {", ".join(sorted(_DATASETS))} only; '
                        f'for --source {dataset} pass a checkpoint.pt of finetune_oasis.py')
    G_kwargs, D_kwargs = oasis_config(dataset)
    if p.is_dir():
        sds = {part: load_official(p, part, which) if part in parts else None for part in ('EMA', 'D')}
    else:
        if 'EMA' in parts and 'D' in parts and d_path is None:
            raise DataError(f'{flag} {p}: a single generator file; pass the run folder, or --source-d <..._D.pth> too')
        sds = {'EMA': load_official(p) if 'EMA' in parts else None,  # a single file is the part asked for
               'D': load_official(d_path or p) if 'D' in parts else None}
    return {'G_kwargs': G_kwargs, 'D_kwargs': D_kwargs, **sds}


def _explain(model, sd, name):
    """Why `sd` does not fit `model` in OASIS terms (its kind, label channels, widths), or None."""
    want, gen = name or 'the model', isinstance(model, Generator)
    if ('layer_up_last.weight' if gen else 'fc.weight') in sd:
        return f"is a {'discriminator' if gen else 'generator'} state dict, expected a " + (
            'generator (G or EMA)' if gen else 'discriminator (D)')
    first = sd.get('fc.weight' if gen else 'layer_up_last.weight')
    if first is None or first.dim() < 2:
        return None
    zd = model.z_dim if gen else 1  # the generator's input: z + label channels; D's output: fake + classes
    got_nc, exp_nc = first.shape[1 if gen else 0] - zd, model.semantic_nc if gen else model.kwargs['semantic_nc']
    if gen and got_nc < 1:  # the noise width differs too: say what the input holds rather than a negative count
        return f'takes {first.shape[1]} input channels (z_dim + label channels), {want} expects {zd} + {exp_nc}'
    if got_nc != exp_nc:
        return f'has {got_nc} label channels, {want} expects {exp_nc}'
    if gen and first.shape[0] != model.fc.weight.shape[0]:
        return f'has channels_G={first.shape[0] // 16}, {want} expects {model.fc.weight.shape[0] // 16}'


def check_state_dict(model, sd, path='<state dict>', name=None, optional=()):
    """Load `sd` into `model` strictly; a mismatch raises DataError with one line, e.g. "x.pth: not an OASIS
    generator for --source cityscapes: 1 key of another shape (fc.weight ...); has 151 label channels,
    --source cityscapes expects 35". `name` words the model; `optional`: keys `sd` may lack (G.load_source's
    CAT layers, which then keep their values)."""
    gen = isinstance(model, Generator)
    if gen and model.cat_nc is not None and not optional and not any(k.startswith('fc_cat.') for k in sd):
        raise DataError(f'{path}: is a source (non-CAT) generator state dict; load it with G.load_source')
    what = f"an OASIS {'generator' if gen else 'discriminator'} {f'for {name}' if name else 'of this configuration'}"
    load_strict(model, sd, path, what, optional, hint=lambda sd: _explain(model, sd, name))
