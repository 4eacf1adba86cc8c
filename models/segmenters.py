"""The three segmenters behind the paper's mIoU column, loading the official released weight files unchanged.

| name | dataset | network | official weights | official preprocessing |
|---|---|---|---|---|
| `deeplabv2` | COCO-Stuff | DeepLab-v2 ResNet-101, MSC (kazuto1011/deeplab-pytorch) | `deeplabv2_resnet101_msc-cocostuff164k-100000.pth` | BGR, 0-255, minus B 104.008 G 116.669 R 122.675, no std |
| `upernet101` | ADE20K | UperNet, ResNet-101 encoder (CSAILVision/semantic-segmentation-pytorch, `ade20k-resnet101-upernet`) | `encoder_epoch_50.pth` + `decoder_epoch_50.pth` | RGB/255, ImageNet mean/std |
| `drn105` | Cityscapes | DRN-D-105 (fyu/drn, `segment.py` DRNSeg) | `drn-d-105_ms_cityscapes.pth` | RGB/255, the `datasets/cityscapes/info.json` mean/std |

This is our own code; the modules keep the official state-dict keys so the files load strictly. A `Segmenter`
takes images as the rest of the toolkit holds them (float RGB in [-1, 1], NCHW, any size), applies its network's
own preprocessing, and returns logits over OUR label channels (data.class_table): COCO-Stuff class v -> channel
v+1 of 183, ADE20K class v (1..150) -> channel v of 151, Cityscapes trainId t -> the labelId channel of that class
of 35. Channels without a class of the segmenter (channel 0, Cityscapes' void labelIds) get the logit `NEG`.
So evaluate.py's argmax over channels 1.. and its confusion/iou code work unchanged.

Protocol (PROTOCOL[name], written into results.json by evaluate.py):
- Evaluation at the input (generated) resolution, as OASIS does (Cityscapes 256x512); the logits are upsampled
  bilinearly (align_corners=False) to the input size, as in all three official test scripts.
- DeepLab-v2: the MSC model's own eval output. In eval mode the official `MSC.forward` returns the pixel-wise
  max of the logits at scales 1, 0.5 and 0.75 (each resized to the scale-1 logit size), and the official
  `main.py test` and `demo.py` interpolate exactly that to the label size. The checkpoint is an MSC checkpoint
  (keys `base.*`) trained with this max as one of its losses, so we keep the max: it IS the released model.
- UperNet: single scale. The official `eval.py` averages softmax scores over short sides 300..600 px; we run
  at the generated size instead (OASIS protocol: the segmenter sees the generated image as it is).
- DRN-D-105: single scale, output upsampled by the checkpoint's own fixed bilinear ConvTranspose (`up.weight`),
  as `segment.py test` does without `--ms`; when the input is not a multiple of 8 the result is resized
  bilinearly to the input size.
Generated images are segmented as floats; the official pipelines read 8-bit files (no rounding here).

Mismatching files raise DataError with one line naming the file, what is missing/unexpected and, when the keys
look like another known network, which one (e.g. "this looks like the UperNet decoder, not DRN-D-105").
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import DataError
from models.state_dict import load_strict, mismatch, read_state_dict

NEG = -1e4  # logit of channels the segmenter has no class for (finite: softmax and bf16 stay finite)

DEFAULT_SEGMENTER = {"coco": "deeplabv2", "ade20k": "upernet101", "cityscapes": "drn105"}
# their official weight files by name (models/weights.py; upernet101: encoder, decoder)
WEIGHT_NAMES = {"deeplabv2": ["deeplabv2_cocostuff"], "upernet101": ["upernet101_encoder", "upernet101_decoder"],
                "drn105": ["drn105_cityscapes"]}
DATASET_OF = {v: k for k, v in DEFAULT_SEGMENTER.items()}

# Cityscapes trainIds 0..18 -> labelIds (mcordts/cityscapesScripts labels.py; checked against classes/ in tests).
CITYSCAPES_TRAIN_TO_LABEL = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]

PROTOCOL = {
    "deeplabv2": "DeepLab-v2 ResNet-101 MSC (kazuto1011/deeplab-pytorch, cocostuff164k): BGR 0-255 minus mean; "
                 "pixel-wise max of the logits at scales 1, 0.5, 0.75 (the MSC eval output); bilinear to the "
                 "generated resolution; 182 classes -> channels 1..182",
    "upernet101": "UperNet ResNet-101 (CSAILVision ade20k-resnet101-upernet): RGB/255, ImageNet mean/std; single "
                  "scale at the generated resolution (official eval averages 5 scales); bilinear; "
                  "150 classes -> channels 1..150",
    "drn105": "DRN-D-105 (fyu/drn, drn-d-105_ms_cityscapes): RGB/255, Cityscapes mean/std; single scale at the "
              "generated resolution; fixed bilinear ConvTranspose x8; 19 trainIds -> their labelId channels",
}

NAMES = {"deeplabv2": "DeepLab-v2 ResNet-101 (COCO-Stuff)", "upernet101": "UperNet-101 (ADE20K)",
         "drn105": "DRN-D-105 (Cityscapes)"}


# ----------------------------------------------------------------------------------------------
# DeepLab-v2 ResNet-101 MSC (keys base.layer1.conv1.conv.weight, ..., base.aspp.c3.bias)


class _ConvBN(nn.Sequential):
    """conv (no bias) + BN [+ ReLU]; the submodule names give the keys `conv.*`, `bn.*`."""

    def __init__(self, cin, cout, k, stride=1, pad=0, dil=1, relu=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, pad, dil, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        if relu:
            self.relu = nn.ReLU()


class _DeepLabBottleneck(nn.Module):
    """MSRA bottleneck: the stride sits on the first 1x1 conv (`reduce`), dilation on the 3x3."""

    def __init__(self, cin, cout, stride, dil, shortcut):
        super().__init__()
        mid = cout // 4
        self.reduce = _ConvBN(cin, mid, 1, stride)
        self.conv3x3 = _ConvBN(mid, mid, 3, 1, dil, dil)
        self.increase = _ConvBN(mid, cout, 1, relu=False)
        self.shortcut = _ConvBN(cin, cout, 1, stride, relu=False) if shortcut else nn.Identity()

    def forward(self, x):
        return F.relu(self.increase(self.conv3x3(self.reduce(x))) + self.shortcut(x))


def _deeplab_layer(n, cin, cout, stride, dil):
    layer = nn.Sequential()
    for i in range(n):
        layer.add_module(f"block{i + 1}", _DeepLabBottleneck(cin if i == 0 else cout, cout,
                                                             stride if i == 0 else 1, dil, i == 0))
    return layer


class _ASPP(nn.Module):
    """Sum of parallel dilated 3x3 convs (DeepLab-v2), each straight to the class logits."""

    def __init__(self, cin, n_classes, rates):
        super().__init__()
        for i, r in enumerate(rates):
            self.add_module(f"c{i}", nn.Conv2d(cin, n_classes, 3, 1, r, r, bias=True))

    def forward(self, x):
        return sum(c(x) for c in self.children())


class DeepLabV2(nn.Sequential):
    """Dilated ResNet-101 (output stride 8) + ASPP: logits at 1/8 resolution."""

    def __init__(self, n_classes, n_blocks=(3, 4, 23, 3), rates=(6, 12, 18, 24)):
        super().__init__()
        self.layer1 = nn.Sequential()
        self.layer1.add_module("conv1", _ConvBN(3, 64, 7, 2, 3))
        self.layer1.add_module("pool", nn.MaxPool2d(3, 2, 1, ceil_mode=True))
        self.layer2 = _deeplab_layer(n_blocks[0], 64, 256, 1, 1)
        self.layer3 = _deeplab_layer(n_blocks[1], 256, 512, 2, 1)
        self.layer4 = _deeplab_layer(n_blocks[2], 512, 1024, 1, 2)
        self.layer5 = _deeplab_layer(n_blocks[3], 1024, 2048, 1, 4)
        self.aspp = _ASPP(2048, n_classes, rates)


class DeepLabV2MSC(nn.Module):
    """Multi-scale inputs: pixel-wise max of the logits at scale 1 and `scales` (the official eval output)."""

    def __init__(self, n_classes, scales=(0.5, 0.75)):
        super().__init__()
        self.base = DeepLabV2(n_classes)
        self.scales = tuple(scales)

    def forward(self, x):
        logits = self.base(x)
        out = logits
        for s in self.scales:
            h = self.base(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False))
            out = torch.maximum(out, F.interpolate(h, size=logits.shape[2:], mode="bilinear", align_corners=False))
        return out


# ----------------------------------------------------------------------------------------------
# UperNet with the CSAIL deep-stem ResNet-101 (encoder keys conv1.weight ... layer4.*; decoder keys ppm_*, fpn_*,
# conv_last.*)


class _Bottleneck(nn.Module):
    """torchvision-style bottleneck (keys conv1..3, bn1..3, downsample.0/1): stride and dilation on the 3x3."""

    def __init__(self, cin, planes, stride=1, dil=1, downsample=False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dil, dil, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False),
                                        nn.BatchNorm2d(planes * 4)) if downsample else None

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def _res_layer(cin, planes, n, stride=1, dil=1, first_dil=None):
    """n bottlenecks; a projection shortcut on the first when the shape changes (as both official codes)."""
    down = stride != 1 or cin != planes * 4
    blocks = [_Bottleneck(cin, planes, stride, dil if first_dil is None else first_dil, down)]
    blocks += [_Bottleneck(planes * 4, planes, 1, dil) for _ in range(n - 1)]
    return nn.Sequential(*blocks)


def _conv_bn_relu(cin, cout, k=3, stride=1, dil=1):
    """Sequential(conv, BN, ReLU): keys `0.weight`, `1.*`."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, dil * (k // 2), dil, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class UperNetEncoder(nn.Module):
    """The CSAIL ResNet-101: three 3x3 stem convs (64, 64, 128), max pool, four stages; returns the 4 stage maps."""

    def __init__(self, n_blocks=(3, 4, 23, 3)):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64)
        self.conv2, self.bn2 = nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        self.conv3, self.bn3 = nn.Conv2d(64, 128, 3, 1, 1, bias=False), nn.BatchNorm2d(128)
        self.layer1 = _res_layer(128, 64, n_blocks[0])
        self.layer2 = _res_layer(256, 128, n_blocks[1], 2)
        self.layer3 = _res_layer(512, 256, n_blocks[2], 2)
        self.layer4 = _res_layer(1024, 512, n_blocks[3], 2)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 3, 2, 1)
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats


class UperNetDecoder(nn.Module):
    """Pyramid pooling on the last map + FPN over all four, fused at 1/4 resolution: logits (no softmax)."""

    def __init__(self, n_classes=150, fc_dim=2048, pool_scales=(1, 2, 3, 6), fpn_in=(256, 512, 1024), fpn_dim=512):
        super().__init__()
        self.pool_scales = tuple(pool_scales)
        self.ppm_conv = nn.ModuleList(_conv_bn_relu(fc_dim, 512, 1) for _ in pool_scales)
        self.ppm_last_conv = _conv_bn_relu(fc_dim + len(pool_scales) * 512, fpn_dim)
        self.fpn_in = nn.ModuleList(_conv_bn_relu(c, fpn_dim, 1) for c in fpn_in)
        self.fpn_out = nn.ModuleList(nn.Sequential(_conv_bn_relu(fpn_dim, fpn_dim)) for _ in fpn_in)
        self.conv_last = nn.Sequential(_conv_bn_relu((len(fpn_in) + 1) * fpn_dim, fpn_dim),
                                       nn.Conv2d(fpn_dim, n_classes, 1))

    def forward(self, feats):
        top = feats[-1]
        up = lambda t, size: F.interpolate(t, size=size, mode="bilinear", align_corners=False)  # noqa: E731
        ppm = [top] + [conv(up(F.adaptive_avg_pool2d(top, s), top.shape[2:]))
                       for s, conv in zip(self.pool_scales, self.ppm_conv)]
        f = self.ppm_last_conv(torch.cat(ppm, 1))
        pyramid = [f]
        for i in reversed(range(len(feats) - 1)):  # top-down: lateral + upsampled coarser level
            f = self.fpn_in[i](feats[i]) + up(f, feats[i].shape[2:])
            pyramid.insert(0, self.fpn_out[i](f))
        size = pyramid[0].shape[2:]
        return self.conv_last(torch.cat([pyramid[0]] + [up(p, size) for p in pyramid[1:]], 1))


class UperNet(nn.Module):
    def __init__(self, n_classes=150):
        super().__init__()
        self.encoder = UperNetEncoder()
        self.decoder = UperNetDecoder(n_classes)

    def forward(self, x):
        return self.decoder(self.encoder(x))


# ----------------------------------------------------------------------------------------------
# DRN-D-105 (keys base.0.0.weight ... base.8.*, seg.weight, seg.bias, up.weight)


def _drn_convs(cin, cout, n, stride=1, dil=1):
    """DRN-D's plain conv stages: n x (3x3 conv, BN, ReLU), stride on the first; keys `0.weight`, `1.*`, `3.weight`..."""
    mods = []
    for i in range(n):
        mods += [nn.Conv2d(cin if i == 0 else cout, cout, 3, stride if i == 0 else 1, dil, dil, bias=False),
                 nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*mods)


class DRNSeg(nn.Module):
    """DRN-D-105 trunk (output stride 8, dilations 2 and 4 instead of strides), a 1x1 classifier and the fixed
    bilinear x8 ConvTranspose whose weights the checkpoint carries."""

    def __init__(self, n_classes=19, layers=(1, 1, 3, 4, 23, 3, 1, 1)):
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, 16, 7, 1, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.base = nn.Sequential(
            stem, _drn_convs(16, 16, layers[0]), _drn_convs(16, 32, layers[1], 2),
            _res_layer(32, 64, layers[2], 2), _res_layer(256, 128, layers[3], 2),
            _res_layer(512, 256, layers[4], dil=2), _res_layer(1024, 512, layers[5], dil=4),
            _drn_convs(2048, 512, layers[6], dil=2), _drn_convs(512, 512, layers[7]))
        self.seg = nn.Conv2d(512, n_classes, 1)
        self.up = nn.ConvTranspose2d(n_classes, n_classes, 16, 8, 4, groups=n_classes, bias=False)

    def forward(self, x):
        return self.up(self.seg(self.base(x)))


# ----------------------------------------------------------------------------------------------
# The wrapper: our image convention in, our label channels out


class Segmenter(nn.Module):
    """images (B,3,H,W) float RGB in [-1,1] -> logits (B, n_channels, H, W) over our label channels.

    `net` maps the official preprocessed input to logits over its own classes; class k goes to channel
    `channels[k]`. Preprocessing: x = (rgb01 * scale [channels reversed if bgr] - mean) / std.
    """

    def __init__(self, net, name, channels, n_channels, mean, std, scale=1.0, bgr=False):
        super().__init__()
        self.net, self.name, self.n_channels, self.scale, self.bgr = net, name, n_channels, scale, bgr
        self.protocol = PROTOCOL[name]
        self.register_buffer("channels", torch.tensor(channels), persistent=False)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images):
        x = (images.float() + 1) * (self.scale / 2)
        if self.bgr:
            x = x.flip(1)
        return (x - self.mean) / self.std

    def forward(self, images):
        logits = self.net(self.preprocess(images))
        if logits.shape[2:] != images.shape[2:]:
            logits = F.interpolate(logits, size=images.shape[2:], mode="bilinear", align_corners=False)
        out = logits.new_full((logits.shape[0], self.n_channels, *logits.shape[2:]), NEG)
        out[:, self.channels] = logits
        return out


def deeplabv2_cocostuff():
    return Segmenter(DeepLabV2MSC(182), "deeplabv2", list(range(1, 183)), 183,
                     mean=(104.008, 116.669, 122.675), std=(1.0, 1.0, 1.0), scale=255.0, bgr=True)


def upernet101_ade20k():
    return Segmenter(UperNet(150), "upernet101", list(range(1, 151)), 151,
                     mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def drn105_cityscapes():
    # fyu/drn datasets/cityscapes/info.json
    return Segmenter(DRNSeg(19), "drn105", CITYSCAPES_TRAIN_TO_LABEL, 35,
                     mean=(0.29010095242892997, 0.32808144844279574, 0.28696394422942517),
                     std=(0.1829540508368939, 0.18656561047509476, 0.18447508988480435))


# ----------------------------------------------------------------------------------------------
# Loading with strict key checks


_FILE_HINT = {"deeplabv2": "deeplabv2_resnet101_msc-cocostuff164k-100000.pth",
              "upernet101": "encoder_epoch_*.pth and decoder_epoch_*.pth of ade20k-resnet101-upernet",
              "drn105": "drn-d-105_ms_cityscapes.pth"}


def _looks_like(sd):
    """Which known network a state dict's keys belong to (for the error line), or None."""
    keys = set(sd)
    if "base.aspp.c0.weight" in keys:
        return "the DeepLab-v2 checkpoint"
    if "conv_last.1.weight" in keys and "ppm_last_conv.0.weight" in keys:
        return "the UperNet decoder"
    if "conv_last.1.weight" in keys or any(k.startswith(("ppm_conv.", "cbr.", "conv_last.")) for k in keys):
        return "a CSAIL decoder of another architecture"
    if "conv3.weight" in keys and "layer4.0.conv1.weight" in keys:
        return "the UperNet (CSAIL ResNet) encoder"
    if "seg.weight" in keys and "base.0.0.weight" in keys:
        return "the DRN segmenter"
    if "fc.weight" in keys and "layer1.0.conv1.weight" in keys:
        return "an ImageNet classifier (torchvision-style ResNet)"
    if any(".weight_orig" in k for k in keys):
        return "an OASIS generator/discriminator"
    return None


def _unwrap(obj):
    """An official file's state dict: inside {'state_dict': ...} (DRN, DeepLab), without DataParallel's 'module.'."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_weights(path):
    """A plain {key: tensor} dict from an official .pth file (weights_only), unwrapped; one DataError line else."""
    return read_state_dict(path, None, "a state dict of tensors", unwrap=_unwrap,
                           fix="give the official weight file's path")


# Bookkeeping buffers that some files carry and others not, never used at inference: BatchNorm's step counter
# (torch >= 0.4.1) and the moving-average buffers of the CSAIL SynchronizedBatchNorm2d (UperNet files).
OPTIONAL = ("num_batches_tracked", "_tmp_running_mean", "_tmp_running_var", "_running_iter")


def check_and_load(module, sd, path, what):
    """Load `sd` into `module` strictly, up to the OPTIONAL bookkeeping buffers; a mismatch raises DataError
    with one line, saying which known network the file looks like when it is another one."""
    def hint(sd):
        guess = _looks_like(sd)
        if guess and guess != _looks_like(module.state_dict()):
            return f"this looks like {guess}, not {what}"
        return "another class count or variant?"
    load_strict(module, sd, path, f"the {what} weights", optional=OPTIONAL, hint=hint)


def build_segmenter(name, weight_paths, device="cpu"):
    """The named segmenter (`deeplabv2`, `upernet101`, `drn105`) with its official weights, in eval mode.

    weight_paths: a path or list of paths; upernet101 takes two (encoder, decoder), the others one.
    Returns a `Segmenter`: images in [-1,1] -> logits over our label channels; `.protocol` says how it scores.
    """
    builders = {"deeplabv2": deeplabv2_cocostuff, "upernet101": upernet101_ade20k, "drn105": drn105_cityscapes}
    if name not in builders:
        raise DataError(f"unknown segmenter '{name}'; expected one of {', '.join(builders)}")
    paths = [weight_paths] if isinstance(weight_paths, (str, Path)) else list(weight_paths)
    need = 2 if name == "upernet101" else 1
    if len(paths) != need:
        raise DataError(f"{name}: got {len(paths)} weight file(s), expected {need}: {_FILE_HINT[name]}")
    seg = builders[name]()
    if name == "upernet101":
        enc, dec = (read_weights(p) for p in paths)
        if _looks_like(enc) == "the UperNet decoder" and _looks_like(dec) == "the UperNet (CSAIL ResNet) encoder":
            raise DataError(f"{paths[0]}, {paths[1]}: encoder and decoder swapped; give the encoder file first")
        what = "UperNet-101 encoder (CSAIL ResNet-101)", "UperNet-101 decoder (ADE20K, 150 classes)"
        for module, sd, path, w in zip((seg.net.encoder, seg.net.decoder), (enc, dec), paths, what):
            if any(mismatch(module.state_dict(), sd, OPTIONAL)[:2]):  # both key sets before any shape
                check_and_load(module, sd, path, w)  # raises, naming the keys
        check_and_load(seg.net.encoder, enc, paths[0], what[0])
        check_and_load(seg.net.decoder, dec, paths[1], what[1])
    else:
        check_and_load(seg.net, read_weights(paths[0]), paths[0], NAMES[name])
    return seg.to(device).eval()


CHOICES = ("deeplabv2", "upernet101", "drn105", "torchscript")


def resolve_choice(name, weights, dataset):
    """(name, weight paths) from the scripts' --segmenter / --segmenter-weights for label maps of `dataset`.

    `name` may be one of CHOICES, a TorchScript file path (the older `--segmenter FILE` form) or None; with
    weights but no name, the dataset's DEFAULT_SEGMENTER. (None, []) when neither is given."""
    weights = [str(w) for w in (weights or [])]
    if name is not None and name not in CHOICES:  # --segmenter FILE
        if weights:
            raise DataError(f"--segmenter {name}: not one of {', '.join(CHOICES)}; give the name with "
                             "--segmenter-weights, or a TorchScript file alone")
        return "torchscript", [name]
    if name is None:
        if not weights:
            return None, []
        if dataset not in DEFAULT_SEGMENTER:
            raise DataError(f"--segmenter-weights: no default segmenter for '{dataset}' label maps; give "
                             f"--segmenter torchscript (a TorchScript file over its channels)")
        name = DEFAULT_SEGMENTER[dataset]
    if not weights:
        raise DataError(f"--segmenter {name}: give its weight file(s) with --segmenter-weights"
                         + (f" ({_FILE_HINT[name]})" if name in _FILE_HINT else ""))
    if name == "torchscript":
        if len(weights) != 1:
            raise DataError(f"--segmenter torchscript: takes one file, got {len(weights)}")
    elif DATASET_OF[name] != dataset:
        raise DataError(f"--segmenter {name} predicts {DATASET_OF[name]} classes; the label maps are {dataset} "
                         f"(use {DEFAULT_SEGMENTER.get(dataset, 'a TorchScript segmenter')} for them)")
    return name, weights
