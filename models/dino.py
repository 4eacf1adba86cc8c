"""DINO's ViT backbone (facebookresearch/dino) with its key names, loading the released backbone files
(dino_deitsmall16_pretrain.pth and its S/8, B/16, B/8 siblings, or a full checkpoint's teacher) unchanged."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import DataError, weights
from models.amp import autocast
from models.state_dict import load_strict, read_state_dict

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.ModuleDict(dict(qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim)))
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(dim, 4 * dim), fc2=nn.Linear(4 * dim, dim)))

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v, as DINO's Attention
        x = x + self.attn.proj(a.transpose(1, 2).reshape(B, N, D))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class ViT(nn.Module):
    """DINO's ViT backbone with DINO's key names; forward returns the normed patch tokens as a map."""

    def __init__(self, dim, depth, patch, n_pos):
        super().__init__()
        self.kwargs = dict(dim=dim, depth=depth, patch=patch, n_pos=n_pos)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, dim))
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv2d(3, dim, patch, stride=patch)))
        self.blocks = nn.ModuleList(Block(dim, max(1, dim // 64)) for _ in range(depth))  # DINO: 64 dims per head
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def pos(self, h, w):
        """DINO's interpolate_pos_encoding: bicubic resize of the 224-px grid, scale factors with its +0.1 offset."""
        n = self.pos_embed.shape[1] - 1
        if h * w == n and h == w:
            return self.pos_embed
        g, dim = int(math.sqrt(n)), self.pos_embed.shape[-1]
        grid = self.pos_embed[:, 1:].reshape(1, g, g, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic")
        return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)], 1)

    def forward(self, x):
        x = self.patch_embed.proj(x)
        B, D, h, w = x.shape
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.flatten(2).transpose(1, 2)], 1) + self.pos(h, w)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 1:].transpose(1, 2).reshape(B, D, h, w)


def load_dino(path):
    """A DINO backbone file (ViT-S/16, S/8, B/16, B/8, or a full checkpoint's teacher), or one of their names
    (dino_vits16, dino_vits8, dino_vitb16, dino_vitb8: fetched into the torch hub cache); sizes from the keys."""
    if path is None:
        raise DataError("the self-supervised method needs --dino-weights (a DINO ViT file such as "
                        f"dino_deitsmall16_pretrain.pth, or a name: {', '.join(weights.names('--dino-weights'))})")
    path = weights.resolve(path, "--dino-weights")
    sd = read_state_dict(path, "--dino-weights", "a DINO ViT state dict", unwrap=_backbone,
                         fix="get dino_deitsmall16_pretrain.pth (ViT-S/16; also S/8, B/16, B/8) from the "
                             f"facebookresearch/dino release, or give a name ({', '.join(weights.names('--dino-weights'))})")
    if not all(k in sd for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight")):
        raise DataError(f"--dino-weights {path}: not a DINO ViT state dict (expected cls_token, pos_embed, patch_embed.proj.weight, blocks.N.*)")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    vit = ViT(sd["cls_token"].shape[-1], depth, sd["patch_embed.proj.weight"].shape[-1], sd["pos_embed"].shape[1])
    load_strict(vit, sd, f"--dino-weights {path}", f"a DINO ViT of width {vit.kwargs['dim']} and depth {depth}")
    return vit.eval()


def _backbone(obj):
    """A DINO file's backbone: a full checkpoint's teacher, without the 'module.' / 'backbone.' prefixes and the
    projection head (as DINO's load_pretrained_weights strips them); anything else as it is."""
    if not isinstance(obj, dict):
        return obj
    sd = obj.get("teacher", obj)
    if not isinstance(sd, dict):
        return sd
    sd = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


@torch.no_grad()
def class_prototypes(vit, dataset, table, side, device, batch_size, amp=None):
    """Mean unit-norm patch feature over the pixels of each class (a patch counts by its pixel share)."""
    p = vit.kwargs["patch"]
    mean, std = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None], torch.tensor(IMAGENET_STD, device=device)[:, None, None]
    sums, counts = torch.zeros(len(table), vit.kwargs["dim"], dtype=torch.float64), torch.zeros(len(table), dtype=torch.float64)
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        x, label = (batch["image"].to(device) + 1) / 2, batch["label"]
        H, W = x.shape[-2:]
        s = side / min(H, W)  # short side to `side`, both sides multiples of the patch
        size = (max(p, round(H * s / p) * p), max(p, round(W * s / p) * p))
        x = (F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1) - mean) / std
        with autocast(device, amp):  # amp: a mode of models.amp.pick (None: auto for the device)
            feat = vit(x)
        feat = F.normalize(feat.float(), dim=1).cpu()
        share = F.adaptive_avg_pool2d(F.one_hot(label, table.n_channels).permute(0, 3, 1, 2).float(), feat.shape[-2:])  # (B, C, h, w)
        share = share[:, torch.tensor(table.channels)]  # drop dontcare: (B, classes, h, w)
        sums += torch.einsum("bkhw,bdhw->kd", share.double(), feat.double())
        counts += share.double().sum((0, 2, 3))
    present = (counts > 0).numpy()
    return F.normalize((sums / counts.clamp(min=1e-12)[:, None]).float(), dim=1), present
