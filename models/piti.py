"""PITI (Wang et al. 2022) re-written lean, loading the official checkpoints unchanged, plus CAT.

One model class, `PITI`, covers the 64x64 base and the 256x256 upsampler: a label-map encoder
(CNN stem + transformer, cls token last with positional row 0) conditions a GLIDE-style UNet
through the time embedding (cls token) and through extra keys/values in every attention block
(grid tokens). State-dict keys are the official ones (`encoder.*`, `decoder.*`), so released files
load with a strict key check.

CAT (Careil et al. 2023) adds two things, both off the official key set:
  cat_map  (S, T)     1x1 conv from the target one-hot map to the source channel space, initialised
                      from the affinity; the FIXED palette rendering of the official code (S -> RGB)
                      follows, so a hard affinity feeds the encoder exactly the source model's input.
  prompts  (1, K, W)  K learned tokens at the transformer input, between the grid and the cls token.

The diffusion schedules, the training loss and the samplers are in `models/diffusion.py`.
"""
import inspect
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import DataError
from models.run import find_recorded_file, load
from models.diffusion import cascade
from models.palette import palette
from models.state_dict import load_strict, read_state_dict

# ----------------------------------------------------------------------------------------------
# The released configurations (base_mask.pt, upsample_mask.pt), as our constructor arguments.

BASE_KWARGS = dict(image_size=64, model_channels=192, num_res_blocks=3, channel_mult=[1, 2, 3, 4],
                   attention_ds=[2, 4, 8], noise_schedule="squaredcos_cap_v2", super_res=False)
UP_KWARGS = dict(image_size=256, model_channels=192, num_res_blocks=2, channel_mult=[1, 1, 2, 2, 4, 4],
                 attention_ds=[8, 16, 32], noise_schedule="linear", super_res=True)
COCO_CHANNELS = 183  # data.class_table('coco').n_channels: channel = COCO-Stuff id + 1, 0 = unlabeled


def official_kwargs(options, shrink=None):
    """Official option dict (+ the golden files' `shrink` dict) -> PITI constructor arguments."""
    size = int(options["image_size"])
    mult = options["channel_mult"]
    if mult == "":
        mult = {64: (1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}.get(size)
        if mult is None:
            raise ValueError(f"image_size {size}: the official default channel_mult exists for 64 and 256 only")
    else:
        mult = tuple(int(m) for m in mult.split(","))
    kw = dict(image_size=size, model_channels=int(options["num_channels"]),
              num_res_blocks=int(options["num_res_blocks"]), channel_mult=list(mult),
              attention_ds=[size // int(r) for r in options["attention_resolutions"].split(",")],
              num_head_channels=int(options["num_head_channels"]), xf_width=int(options["xf_width"]),
              xf_heads=int(options["xf_heads"]), super_res=bool(options["super_res"]),
              in_chans=1 if options.get("mode") == "coco-edge" else 3,
              dropout=float(options["dropout"]), noise_schedule=options["noise_schedule"])
    if shrink:
        kw.update(encoder_layers=shrink["encoder_layers"], cnn_widths=list(shrink["cnn_widths"]),
                  n_tokens=shrink["n_tokens"], ref_size=shrink["ref_size"],
                  transformer_proj_in=shrink["transformer_proj_in"])
    return kw


def config_overrides(text, flag):
    """--base-config / --up-config (finetune_piti.py, pretrain_piti.py): a JSON object of constructor arguments
    (CONFIG_KEYS) overriding a released configuration; a resumed run's is already a dict. DataError otherwise."""
    try:
        config = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError as e:
        raise DataError(f"{flag}: not JSON ({e})") from None
    if not isinstance(config, dict):
        kind = {"list": "array", "str": "string", "int": "number", "float": "number", "bool": "boolean",
                "NoneType": "null"}[type(config).__name__]
        raise DataError(f"{flag} {text}: is a JSON {kind}; expected an object of PITI constructor "
                        f"arguments, e.g. '{{\"dropout\": 0.0}}'")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise DataError(f"{flag}: unknown key(s) {', '.join(unknown)}; known: {', '.join(CONFIG_KEYS)}")
    return config


# ----------------------------------------------------------------------------------------------
# Label map -> conditioning image `ref`: the official palette rendering (models/palette.py), resized to the
# encoder's side


def resize_nearest(label, size):
    """(B,H,W) ids -> (B,size,size) with PIL NEAREST's pixel choice: floor((i + 0.5) * H / size)."""
    H, W = label.shape[-2:]
    rows = (torch.arange(size, device=label.device) * 2 + 1) * H // (2 * size)
    cols = (torch.arange(size, device=label.device) * 2 + 1) * W // (2 * size)
    return label[..., rows[:, None], cols[None, :]]


# ----------------------------------------------------------------------------------------------
# Building blocks


def group_norm(x, norm):
    """GroupNorm in float32 whatever the autocast dtype (GLIDE's GroupNorm32)."""
    return F.group_norm(x.float(), norm.num_groups, norm.weight, norm.bias, norm.eps).to(x.dtype)


def attention(q, k, v):
    """Softmax attention over (..., L, ch) tensors.

    float32: the official op order (q and k each scaled by ch^-1/4, softmax in float32), which
    reproduces the official outputs bit for bit; SDPA's fused scaling alone moves a first cosine
    step by ~8e-3, past the golden tolerance. bf16 (autocast): SDPA's flash kernels, which keep the
    softmax in float32 internally.
    """
    if q.dtype != torch.float32:
        # contiguous (1, N, L, ch) or (B, heads, L, ch), the layout the flash and memory-efficient kernels take:
        # a transposed view (its last dim not of stride 1) sends SDPA to its slow math fallback
        q, k, v = (x.contiguous() for x in (q, k, v))
        return F.scaled_dot_product_attention(q[None], k[None], v[None])[0] if q.dim() == 3 else \
            F.scaled_dot_product_attention(q, k, v)
    scale = q.shape[-1] ** -0.25
    w = torch.softmax((q * scale) @ (k * scale).transpose(-1, -2), dim=-1)
    return w @ v


def timestep_embedding(t, dim, max_period=10000):
    """[cos | sin] sinusoidal embedding of float timesteps (GLIDE's order and op order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """Scale-shift ResBlock; `up`/`down` resample between the in-norm and the in-conv, and on the skip."""

    def __init__(self, ch, emb_ch, out_ch, dropout, up=False, down=False):
        super().__init__()
        self.up, self.down = up, down
        self.in_layers = nn.Sequential(nn.GroupNorm(32, ch), nn.Identity(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, 2 * out_ch))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, out_ch), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x, emb):
        h = F.silu(group_norm(x, self.in_layers[0]))
        if self.up:
            h, x = F.interpolate(h, scale_factor=2, mode="nearest"), F.interpolate(x, scale_factor=2, mode="nearest")
        elif self.down:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        h = self.in_layers[2](h)
        scale, shift = self.emb_layers(emb)[..., None, None].chunk(2, dim=1)
        h = group_norm(h, self.out_layers[0]) * (1 + scale) + shift
        h = self.out_layers[3](self.out_layers[2](F.silu(h)))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention whose keys/values are prefixed by the encoder tokens (legacy per-head [q k v] layout)."""

    def __init__(self, ch, head_ch, ctx_ch):
        super().__init__()
        self.heads = ch // head_ch
        self.norm = nn.GroupNorm(32, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.encoder_kv = nn.Conv1d(ctx_ch, 2 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x, ctx):
        B, C, H, W = x.shape
        n, ch = self.heads, C // self.heads
        qkv = self.qkv(group_norm(x, self.norm).reshape(B, C, H * W))
        q, k, v = qkv.reshape(B * n, 3 * ch, H * W).split(ch, dim=1)
        ek, ev = self.encoder_kv(ctx).reshape(B * n, 2 * ch, -1).split(ch, dim=1)
        k, v = torch.cat([ek, k], dim=-1), torch.cat([ev, v], dim=-1)
        a = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x + self.proj_out(a.transpose(1, 2).reshape(B, C, H * W)).reshape(B, C, H, W)


class Step(nn.ModuleList):
    """GLIDE's TimestepEmbedSequential: ResBlocks get the time embedding, attention the encoder tokens."""

    def forward(self, h, emb, ctx):
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, AttentionBlock):
                h = layer(h, ctx)
            else:
                h = layer(h)
        return h


class UNet(nn.Module):
    """The GLIDE text-conditional UNet as PITI uses it (`decoder.*`)."""

    def __init__(self, in_ch, mc, out_ch, num_res_blocks, channel_mult, attention_ds, head_ch, ctx_ch,
                 proj_in, dropout):
        super().__init__()
        self.mc = mc
        emb_ch = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.input_blocks = nn.ModuleList([Step([nn.Conv2d(in_ch, mc, 3, padding=1)])])
        chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb_ch, mult * mc, dropout)]
                ch = mult * mc
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, head_ch, ctx_ch))
                self.input_blocks.append(Step(layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(Step([ResBlock(ch, emb_ch, ch, dropout, down=True)]))
                chans.append(ch)
                ds *= 2
        self.middle_block = Step([ResBlock(ch, emb_ch, ch, dropout), AttentionBlock(ch, head_ch, ctx_ch),
                                  ResBlock(ch, emb_ch, ch, dropout)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb_ch, mc * mult, dropout)]
                ch = mc * mult
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, head_ch, ctx_ch))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, emb_ch, ch, dropout, up=True))
                    ds //= 2
                self.output_blocks.append(Step(layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.Identity(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.transformer_proj = nn.Linear(proj_in, emb_ch)

    def forward(self, x, t, xf_proj, xf_out):
        emb = self.time_embed(timestep_embedding(t, self.mc)) + self.transformer_proj(xf_proj)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, xf_out)
            hs.append(h)
        h = self.middle_block(h, emb, xf_out)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, xf_out)
        return self.out[2](F.silu(group_norm(h, self.out[0])))


class LayerNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.c_qkv = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x):
        B, L, W = x.shape
        # per head the 3*ch outputs are [q | k | v] (as the official GLIDE transformer), not three W-wide blocks
        q, k, v = self.c_qkv(x).view(B, L, self.heads, -1).transpose(1, 2).chunk(3, dim=-1)
        return self.c_proj(attention(q, k, v).transpose(1, 2).reshape(B, L, W))


class MLP(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.attn = SelfAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = MLP(width)
        self.ln_2 = LayerNorm(width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x):
        for block in self.resblocks:
            x = block(x)
        return x


class CNN(nn.Module):
    """The encoder stem: 7x7 then four stride-2 3x3 convs with InstanceNorm + LeakyReLU, then a bare 3x3."""

    def __init__(self, in_chans, widths):
        super().__init__()
        chans = [in_chans] + list(widths)
        for i in range(5):
            setattr(self, f"conv{i + 1}", nn.Conv2d(chans[i], chans[i + 1], 7 if i == 0 else 3,
                                                    stride=1 if i == 0 else 2, padding=3 if i == 0 else 1))
            setattr(self, f"norm{i + 1}", nn.InstanceNorm2d(chans[i + 1], affine=True))
        self.conv6 = nn.Conv2d(widths[-1], widths[-1], 3, padding=1)

    def forward(self, x):
        for i in range(1, 6):
            x = F.leaky_relu(getattr(self, f"norm{i}")(getattr(self, f"conv{i}")(x)), 0.2)
        return self.conv6(x)


class Encoder(nn.Module):
    """Label-map encoder: CNN grid tokens (+ positional rows 1..N), [prompts], cls token (+ row 0) last."""

    def __init__(self, in_chans, width, layers, heads, cnn_widths, n_tokens):
        super().__init__()
        # the official code leaves these two as uninitialised th.empty; real values come from a checkpoint
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.positional_embedding = nn.Parameter(torch.zeros(1, n_tokens + 1, width))
        self.transformer = Transformer(width, layers, heads)
        self.cnn = CNN(in_chans, cnn_widths)
        self.final_ln = LayerNorm(width)

    def forward(self, ref, prompts=None):
        x = self.cnn(ref).flatten(2).transpose(1, 2)
        if x.shape[1] != self.positional_embedding.shape[1] - 1:
            raise ValueError(f"label map of side {ref.shape[-1]} gives {x.shape[1]} tokens, the encoder has "
                             f"{self.positional_embedding.shape[1] - 1} positions")
        x = x + self.positional_embedding[:, 1:]
        cls = (self.cls_token + self.positional_embedding[:, :1]).expand(x.shape[0], -1, -1)
        parts = [x] if prompts is None else [x, prompts.to(x.dtype).expand(x.shape[0], -1, -1)]
        x = self.final_ln(self.transformer(torch.cat(parts + [cls.to(x.dtype)], dim=1)))
        return x[:, -1], x[:, :-1].transpose(1, 2)  # xf_proj (B, W); xf_out (B, W, tokens)


# ----------------------------------------------------------------------------------------------
# The model


class PITI(nn.Module):
    """PITI base (super_res=False) or upsampler (super_res=True), optionally with the CAT additions.

    Defaults are the released base configuration; the five encoder constants the official code
    hard-codes (encoder_layers, cnn_widths, n_tokens, ref_size, transformer_proj_in) are arguments.
    source_channels: channels of the label space the model was trained on (COCO: 183, channel = id + 1).
    target_channels: if set, the CAT 1x1 conv maps target channel ids to that space; prompts: K tokens.
    """

    def __init__(self, image_size=64, model_channels=192, num_res_blocks=3, channel_mult=(1, 2, 3, 4),
                 attention_ds=(2, 4, 8), num_head_channels=64, xf_width=512, xf_heads=8, super_res=False,
                 in_chans=3, dropout=0.1, noise_schedule="squaredcos_cap_v2", encoder_layers=8,
                 cnn_widths=(32, 64, 128, 256, 512), n_tokens=256, ref_size=256, transformer_proj_in=512,
                 source_channels=COCO_CHANNELS, target_channels=None, prompts=0):
        super().__init__()
        self.kwargs = dict(image_size=image_size, model_channels=model_channels, num_res_blocks=num_res_blocks,
                           channel_mult=list(channel_mult), attention_ds=list(attention_ds),
                           num_head_channels=num_head_channels, xf_width=xf_width, xf_heads=xf_heads,
                           super_res=bool(super_res), in_chans=in_chans, dropout=dropout,
                           noise_schedule=noise_schedule, encoder_layers=encoder_layers,
                           cnn_widths=list(cnn_widths), n_tokens=n_tokens, ref_size=ref_size,
                           transformer_proj_in=transformer_proj_in, source_channels=source_channels,
                           target_channels=target_channels, prompts=prompts)
        if cnn_widths[-1] != xf_width or transformer_proj_in != xf_width:
            raise ValueError(f"the last CNN width ({cnn_widths[-1]}) and transformer_proj_in ({transformer_proj_in}) "
                             f"must equal xf_width ({xf_width})")
        if ref_size // 16 * (ref_size // 16) != n_tokens:
            raise ValueError(f"ref_size {ref_size} gives {(ref_size // 16) ** 2} CNN tokens, n_tokens is {n_tokens}")
        self.image_size, self.super_res, self.ref_size = image_size, bool(super_res), ref_size
        self.stride = 2 ** (len(channel_mult) - 1)  # the UNet halves the side this many times over
        if image_size % self.stride:
            raise ValueError(f"image_size {image_size} is not a multiple of {self.stride} ({len(channel_mult)} levels)")
        self.noise_schedule, self.source_channels = noise_schedule, source_channels
        self.encoder = Encoder(in_chans, xf_width, encoder_layers, xf_heads, cnn_widths, n_tokens)
        self.decoder = UNet(6 if super_res else 3, model_channels, 6, num_res_blocks, channel_mult, attention_ds,
                            num_head_channels, xf_width, transformer_proj_in, dropout)
        self.cat_map = nn.Parameter(torch.empty(source_channels, target_channels)) if target_channels else None
        self.prompts = nn.Parameter(torch.empty(1, prompts, xf_width)) if prompts else None
        self.reset_cat()

    def reset_cat(self):
        """CAT parameters before training: identity-like 1x1 conv (set_affinity replaces it), N(0, 0.02) prompts."""
        if self.encoder.cls_token.is_meta:  # built on the meta device: load_official_state resets later
            return
        with torch.no_grad():
            if self.cat_map is not None:
                self.cat_map.copy_(torch.eye(*self.cat_map.shape))
            if self.prompts is not None:
                self.prompts.normal_(0, 0.02)

    def official_keys(self):
        """The state-dict keys an official checkpoint must hold (all but the CAT additions)."""
        return [k for k in self.state_dict() if k.startswith(("encoder.", "decoder."))]

    def set_affinity(self, M):
        """Initialise the 1x1 conv from the channel-space affinity M (T, S), `data.affinity_to_channels`."""
        if M.shape != self.cat_map.shape[::-1]:
            raise ValueError(f"affinity in channel space is {tuple(M.shape)}, the model expects "
                             f"{tuple(self.cat_map.shape[::-1])} (target channels, source channels)")
        with torch.no_grad():
            self.cat_map.copy_(M.t())

    def random_cat_map(self):
        """The no-CAT baseline: the 1x1 conv gets PyTorch's default init of a Conv2d(T, S, 1) weight (no affinity)."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.cat_map, a=math.sqrt(5))

    def ref(self, label):
        """(B,H,W) long channel ids (target ids with CAT, source ids without) -> encoder input (B,3,R,R).

        = 1x1 conv on the one-hot map, then the fixed palette S -> RGB (k/127.5 - 1), computed as one
        lookup of the composed (T, 3) colour table; with a one-hot cat_map this is exact.
        """
        n = self.cat_map.shape[1] if self.cat_map is not None else self.source_channels
        if label.numel() and (int(label.min()) < 0 or int(label.max()) >= n):
            raise ValueError(f"label ids span {int(label.min())}..{int(label.max())}, the model takes 0..{n - 1}")
        colours = palette(self.source_channels).to(label.device, torch.float32) / 127.5  # (S, 3)
        if self.cat_map is not None:
            colours = self.cat_map.t().float() @ colours  # (T, 3): conv then palette, composed
        label = resize_nearest(label, self.ref_size)
        return F.embedding(label, colours).permute(0, 3, 1, 2) - 1

    def encode(self, ref):
        """Encoder outputs (xf_proj, xf_out) for a conditioning image; the uncond input is ones_like(ref)."""
        return self.encoder(ref, self.prompts)

    def denoise(self, x, t, xf_proj, xf_out, low_res=None):
        """UNet output (B, 6, H, W) = [eps | variance values]; `low_res` for the upsampler (already at H, W ok)."""
        if x.shape[-1] % self.stride or x.shape[-2] % self.stride:
            raise ValueError(f"image side {tuple(x.shape[-2:])} is not a multiple of {self.stride}, which this UNet needs")
        if self.super_res:
            if low_res is None:
                raise ValueError("the upsampler needs low_res")
            if low_res.shape[-2:] != x.shape[-2:]:
                low_res = F.interpolate(low_res, x.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, low_res.to(x.dtype)], dim=1)
        return self.decoder(x, t, xf_proj, xf_out)

    def forward(self, x, t, ref, low_res=None):
        """The official `model(x_t, timesteps, ref=..., low_res=...)`."""
        return self.denoise(x, t, *self.encode(ref), low_res=low_res)


# What a configuration override (config_overrides: --base-config / --up-config) may set: the constructor's
# architecture arguments. super_res follows the file; the label channels and prompts are the run's own.
CONFIG_KEYS = tuple(k for k in inspect.signature(PITI).parameters
                    if k not in ("super_res", "source_channels", "target_channels", "prompts"))


def load_official(path, super_res=False, device="cpu", config=None):
    """A released PITI file (flat state dict, `encoder.*`/`decoder.*`) -> PITI in eval mode, strict keys.

    config: constructor arguments overriding the released configuration (BASE_KWARGS / UP_KWARGS),
    e.g. the CAT arguments or a tiny test model. Problems raise DataError with one line naming the file.
    """
    kw = {**(UP_KWARGS if super_res else BASE_KWARGS), **(config or {})}
    if bool(kw["super_res"]) != super_res:
        raise ValueError(f"config says super_res={kw['super_res']}, loading the {'upsampler' if super_res else 'base'}")
    sd = read_state_dict(path, None, "a flat state dict of tensors (an official PITI file)",
                         fix=f"the PITI {'upsampler' if super_res else 'base'} checkpoint: get the released files "
                             "from the PITI README (github.com/PITI-Synthesis/PITI, 'Pretrained Models': "
                             "base_mask.pt / upsample_mask.pt)")
    with torch.device("meta"):
        model = PITI(**kw)
    load_official_state(model, sd, path)
    return model.to(device).eval()


def load_official_state(model, sd, path="state dict"):
    """Load official-format weights into `model` (built on any device, meta included), strict on keys and shapes."""
    first = sd.get("decoder.input_blocks.0.0.weight")
    if first is not None and first.dim() == 4 and first.shape[1] != (6 if model.super_res else 3):
        found = "an upsampler" if first.shape[1] == 6 else "a base"
        want = "upsampler" if model.super_res else "base"
        raise DataError(f"{path}: is {found} checkpoint ({first.shape[1]} UNet input channels); expected the {want}")
    on_meta = model.encoder.cls_token.is_meta
    official = set(model.official_keys())
    load_strict(model, {k: v.float() for k, v in sd.items()}, path, "a PITI checkpoint of this configuration",
                optional=[k for k in model.state_dict() if k not in official],  # the CAT layers: set below
                hint="an encoder-only stage-1 file?" if any(k.startswith("cnn.") for k in sd) else None,
                assign=on_meta)
    if on_meta:  # the loaded tensors replaced the official parameters; give the CAT ones real storage
        for name in ("cat_map", "prompts"):
            p = getattr(model, name)
            if p is not None:
                setattr(model, name, nn.Parameter(torch.empty(p.shape)))
        model.reset_cat()


# ----------------------------------------------------------------------------------------------
# CAT checkpoints (written by finetune_piti.py)


def load_cat_models(ckpt, device="cpu", base=None, upsampler=None, ema=True, near=()):
    """A 'piti-cat' checkpoint dict -> (base, upsampler) PITI models in eval mode.

    The checkpoint keeps only what CAT trained (1x1 conv, prompts, encoder parts, or all with
    --train all) plus a record of the official files it started from (path as given, size, sha256);
    `base` / `upsampler` name those files when they moved (their sha256 must match), `near` are folders
    where they are looked for by name too (e.g. the checkpoint's own).
    """
    models = []
    for part, path, sr in (("base", base, False), ("up", upsampler, True)):
        record, flag = ckpt[f"{part}_file"], "--upsampler" if sr else "--base"
        if (record is None and path is None) or not ckpt.get(f"{part}_kwargs"):  # a pretrain_piti.py run that trained one of the two
            raise DataError(f"the checkpoint has no {'upsampler' if sr else 'base'} model; pass one of this label "
                            f"space (e.g. the upsampler.pt of a pretrain_piti.py --glide-up-ckpt run)")
        path = str(find_recorded_file(record, path, flag, near)) if record is not None else path
        model = load_official(path, super_res=sr, config=ckpt[f"{part}_kwargs"])
        trained = ckpt.get(f"{part}_ema" if ema else part, {})
        load_strict(model, {**model.state_dict(), **trained}, f"the checkpoint's {part} weights",
                    f"weights of the PITI {'upsampler' if sr else 'base'} model built from {path}")
        model.to(device).eval()
        if torch.device(device).type == "cuda":
            model.to(memory_format=torch.channels_last)
        models.append(model)
    return tuple(models)


def load_piti_generator(ckpt_path, device, upsampler=None, base=None, steps=None, up_steps=None, guidance=None,
                        ddim=False, amp=None, flag="--ckpt"):
    """A PITI-CAT checkpoint -> generator(label, seed) -> images (B,3,256,256) in [-1,1].

    label: (B,H,W) long TARGET channel ids (data.py convention, any H, W); the base samples 64x64
    with classifier-free guidance (official 250 steps, s = 1.3), the upsampler takes it to 256x256
    (fast27). steps / up_steps / guidance / ddim override the defaults (e.g. steps="ddim50", ddim=True).
    upsampler / base: paths of the official files if they moved since finetuning. A missing, truncated or
    foreign file raises one DataError line naming `flag`.
    """
    ckpt = load(ckpt_path, flag, kinds=("piti-cat",))
    base_model, up_model = load_cat_models(ckpt, device, base=base, upsampler=upsampler, near=(Path(ckpt_path).parent,))

    def generate(label, seed=0):
        gen = torch.Generator(device).manual_seed(int(seed))
        return cascade(base_model, up_model, label.to(device), generator=gen, steps=steps, up_steps=up_steps,
                       guidance=guidance, ddim=ddim, amp=amp)

    generate.base, generate.upsampler, generate.checkpoint = base_model, up_model, ckpt
    return generate
