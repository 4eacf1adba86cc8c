"""models/segmenters.py: the mIoU segmenters load official-format weights strictly and match the official code.

Weights are never stored: every tensor comes from `recipe(key, shape)` below, a seeded generator keyed by a hash
of the key name, scaled so activations stay finite (conv weights ~ N(0, 1/fan_in), BatchNorm scales in
[0.5, 1], biases and running means ~ N(0, 0.1^2), running variances in [0.5, 1.5]).

- UperNet-101 is compared live with `mit-semseg` (the CSAIL package on PyPI, a test-only dependency): same
  recipe weights loaded through its own ModelBuilder, same image through its own TestDataset transform.
- DRN-D-105 and DeepLab-v2 MSC are compared with golden files in tests/golden/segmenters/, made OUTSIDE the
  project by running the official code (fyu/drn @ d75db2e `segment.py` DRNSeg, with `async=True` respelled for
  Python 3; kazuto1011/deeplab-pytorch @ 4219467 `libs/models` DeepLabV2_ResNet101_MSC) on these recipe weights:
  `<name>_keys.txt` is the official state dict's key list with shapes, `<name>.pt` holds the 64x64 uint8 RGB
  input `image`, the official output `out` (DRN: the log-softmax of `DRNSeg.forward`; DeepLab: the eval-mode
  MSC logits bilinearly resized to 64x64 as `main.py test` does) subsampled every `step` pixels, and `step`.
  The official input pipelines were used: DRN `data_transforms.ToTensor` + `Normalize` with info.json;
  DeepLab float32 BGR minus the config's means.
"""
import hashlib
import math
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
from models import segmenters as S

GOLDEN = Path(__file__).resolve().parent / "golden" / "segmenters"
torch.set_num_threads(1)


def recipe(key, shape):
    """Deterministic tensor for a state-dict entry from its key name and shape (see the module docstring)."""
    if key.endswith("num_batches_tracked"):
        return torch.zeros((), dtype=torch.long)
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "little"))
    shape = tuple(shape)
    if key.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=g)
    if len(shape) == 1 and key.endswith("weight"):  # BatchNorm scale
        return 0.5 + 0.5 * torch.rand(shape, generator=g)
    if len(shape) == 1:  # biases, running means
        return 0.1 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))


def recipe_state_dict(module):
    return {k: recipe(k, v.shape) for k, v in module.state_dict().items()}


def key_lines(sd):
    """'key<TAB>shape' lines of the keys a file must have (S.OPTIONAL bookkeeping buffers left out)."""
    return [f"{k}\t{'x'.join(map(str, v.shape))}" for k, v in sd.items() if not k.endswith(S.OPTIONAL)]


def rel(a, b):
    """(max abs diff, max abs diff / max abs reference) of per-pixel centred scores (class axis 1): log-probs of
    random nets are nearly flat, so the common offset would hide errors in the part that decides the argmax."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    d = (a - b).abs().max().item()
    return d, d / b.abs().max().item()


def ours_on(seg, image_uint8):
    """Our segmenter on the golden uint8 image, given in our convention ([-1, 1] float)."""
    x = image_uint8.float() / 127.5 - 1
    with torch.no_grad():
        return seg(x)


def test_cityscapes_train_ids_are_the_scored_label_channels():
    table = data.class_table("cityscapes")
    rows = sorted((int(r["train_id"]), int(r["id"])) for r in data._read_tsv("cityscapes.tsv") if r["train_id"] != "255")
    assert [lid for _, lid in rows] == S.CITYSCAPES_TRAIN_TO_LABEL == table.eval_channels
    assert S.drn105_cityscapes().n_channels == table.n_channels
    assert S.upernet101_ade20k().n_channels == data.class_table("ade20k").n_channels
    assert S.deeplabv2_cocostuff().n_channels == data.class_table("coco").n_channels


@pytest.mark.parametrize("name", ["drn105", "deeplabv2"])
def test_matches_official_golden(name):
    seg = {"drn105": S.drn105_cityscapes, "deeplabv2": S.deeplabv2_cocostuff}[name]()
    assert key_lines(seg.net.state_dict()) == (GOLDEN / f"{name}_keys.txt").read_text().splitlines()
    S.check_and_load(seg.net, recipe_state_dict(seg.net), "<recipe>", name)
    gold = torch.load(GOLDEN / f"{name}.pt", weights_only=True)
    out = ours_on(seg.eval(), gold["image"])
    assert out.shape[2:] == gold["image"].shape[2:]
    k = gold["step"]
    logits = out[:, seg.channels][:, :, ::k, ::k]
    if name == "drn105":
        logits = F.log_softmax(out[:, seg.channels], 1)[:, :, ::k, ::k]
    d, r = rel(logits, gold["out"])
    print(f"{name}: max abs diff {d:.3g}, relative {r:.3g}")
    assert r < 1e-4
    others = torch.ones(seg.n_channels, dtype=torch.bool)
    others[seg.channels] = False
    assert (out[:, others] == S.NEG).all()


def test_upernet_matches_mit_semseg(tmp_path):
    from mit_semseg.dataset import TestDataset
    from mit_semseg.models import ModelBuilder, SegmentationModule
    seg = S.upernet101_ade20k().eval()
    enc_sd, dec_sd = recipe_state_dict(seg.net.encoder), recipe_state_dict(seg.net.decoder)
    torch.save(enc_sd, tmp_path / "encoder_epoch_50.pth")
    torch.save(dec_sd, tmp_path / "decoder_epoch_50.pth")
    # the official builder for config/ade20k-resnet101-upernet.yaml (a weights path: nothing is downloaded)
    enc = ModelBuilder.build_encoder("resnet101", fc_dim=2048, weights=str(tmp_path / "encoder_epoch_50.pth"))
    dec = ModelBuilder.build_decoder("upernet", fc_dim=2048, num_class=150,
                                     weights=str(tmp_path / "decoder_epoch_50.pth"), use_softmax=True)
    assert key_lines(enc.state_dict()) == key_lines(seg.net.encoder.state_dict())
    assert key_lines(dec.state_dict()) == key_lines(seg.net.decoder.state_dict())
    official = SegmentationModule(enc, dec, torch.nn.NLLLoss(ignore_index=-1)).eval()
    seg = S.build_segmenter("upernet101", [tmp_path / "encoder_epoch_50.pth", tmp_path / "decoder_epoch_50.pth"])

    image = torch.randint(0, 256, (1, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    opt = types.SimpleNamespace(imgSizes=(64,), imgMaxSize=1000, padding_constant=32)
    ds = TestDataset([{"fpath_img": "unused"}], opt)
    x = ds.img_transform(Image.fromarray(image[0].permute(1, 2, 0).numpy()))[None]
    with torch.no_grad():
        probs = official({"img_data": x}, segSize=(64, 64))  # official inference output: softmax scores
    out = ours_on(seg, image)
    d, r = rel(F.log_softmax(out[:, 1:151], 1), probs.log())
    print(f"upernet101: log-prob max abs diff {d:.3g}, relative {r:.3g}")
    assert r < 1e-4
    assert (out[:, 0] == S.NEG).all()


def tiny_like(module):
    """A state dict with `module`'s keys and 1-element tensors: enough to test key checks, tiny on disk."""
    return {k: torch.zeros(1) for k in module.state_dict()}


@pytest.fixture(scope="module")
def wrong_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("wrong")
    files = {"deeplabv2": tiny_like(S.DeepLabV2MSC(182)), "encoder": tiny_like(S.UperNetEncoder()),
             "decoder": tiny_like(S.UperNetDecoder()), "drn105": tiny_like(S.DRNSeg())}
    for name, sd in files.items():
        torch.save(sd, d / f"{name}.pth")
    (d / "truncated.pth").write_bytes((d / "drn105.pth").read_bytes()[:300])
    return d


@pytest.mark.parametrize("name, paths, match", [
    ("drn105", ["decoder.pth"], "this looks like the UperNet decoder, not DRN-D-105"),
    ("drn105", ["deeplabv2.pth"], "this looks like the DeepLab-v2 checkpoint, not DRN-D-105"),
    ("deeplabv2", ["drn105.pth"], "this looks like the DRN segmenter, not DeepLab-v2"),
    ("upernet101", ["drn105.pth", "decoder.pth"], "this looks like the DRN segmenter, not UperNet-101 encoder"),
    ("upernet101", ["encoder.pth", "deeplabv2.pth"], "looks like the DeepLab-v2 checkpoint, not UperNet-101 decoder"),
    ("upernet101", ["decoder.pth", "encoder.pth"], "encoder and decoder swapped"),
    ("upernet101", ["encoder.pth"], "got 1 weight file"),
    ("drn105", ["truncated.pth"], "is truncated or corrupt"),
    ("deeplabv2", ["truncated.pth"], "is truncated or corrupt"),
    ("upernet101", ["truncated.pth", "decoder.pth"], "is truncated or corrupt"),
    ("drn105", ["missing.pth"], "file not found"),
    ("pspnet", ["drn105.pth"], "unknown segmenter"),
])
def test_wrong_file_gives_one_line(wrong_files, name, paths, match):
    with pytest.raises(ValueError, match=match) as e:
        S.build_segmenter(name, [wrong_files / p for p in paths])
    assert "\n" not in str(e.value)


def test_wrong_class_count_names_the_shape(tmp_path):
    sd = {k: recipe(k, s) for k, s in [("seg.weight", (21, 512, 1, 1)), ("seg.bias", (21,))]}  # a 21-class head
    head = torch.nn.ModuleDict({"seg": torch.nn.Conv2d(512, 19, 1)})
    with pytest.raises(ValueError, match=r"x.pth: not the DRN-D-105 weights: 2 keys of another shape \(seg.weight has "
                                         r"shape \(21, 512, 1, 1\), expected \(19, 512, 1, 1\), \+1 more\); "
                                         r"another class count or variant\?"):
        S.check_and_load(head, {"seg.weight": sd["seg.weight"], "seg.bias": sd["seg.bias"]}, "x.pth", "DRN-D-105")


def test_num_batches_tracked_and_module_prefix_are_accepted(tmp_path):
    net = S.DRNSeg()
    sd = {"module." + k: v for k, v in recipe_state_dict(net).items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": sd}, tmp_path / "drn.pth")
    seg = S.build_segmenter("drn105", tmp_path / "drn.pth")
    assert seg.protocol == S.PROTOCOL["drn105"]
    assert torch.equal(seg.net.seg.weight, recipe("seg.weight", (19, 512, 1, 1)))
    out = seg(torch.zeros(2, 3, 20, 36))  # any size: bilinear to the input size; batch of 2
    assert out.shape == (2, 35, 20, 36) and torch.isfinite(out).all()
    # estimate_affinity.py --method supervised takes the same segmenter for a Cityscapes source
    import estimate_affinity as ea
    args = types.SimpleNamespace(segmenter=None, segmenter_weights=[str(tmp_path / "drn.pth")], source_ckpt=None)
    fn, desc, _, _ = ea.load_segmenter(args, data.class_table("cityscapes"), "cityscapes", "cpu")
    assert "DRN-D-105" in desc and fn(torch.zeros(1, 3, 16, 16)).shape == (1, 35, 16, 16)
    with pytest.raises(ValueError, match="drn105 predicts cityscapes classes; the label maps are ade20k"):
        ea.load_segmenter(types.SimpleNamespace(segmenter="drn105", segmenter_weights=[str(tmp_path / "drn.pth")],
                                                source_ckpt=None), data.class_table("ade20k"), "ade20k", "cpu")


# ----------------------------------------------------------------------------------------------
# The scripts' flags


@pytest.mark.parametrize("name, weights, dataset, expect", [
    (None, None, "coco", (None, [])),
    ("seg.pt", None, "toy-target", ("torchscript", ["seg.pt"])),  # the older --segmenter FILE form
    ("torchscript", ["seg.pt"], "folder", ("torchscript", ["seg.pt"])),
    (None, ["a.pth"], "cityscapes", ("drn105", ["a.pth"])),
    (None, ["e.pth", "d.pth"], "ade20k", ("upernet101", ["e.pth", "d.pth"])),
    ("deeplabv2", ["a.pth"], "coco", ("deeplabv2", ["a.pth"])),
])
def test_resolve_choice(name, weights, dataset, expect):
    assert S.resolve_choice(name, weights, dataset) == expect


@pytest.mark.parametrize("name, weights, dataset, match", [
    ("drn105", ["a.pth"], "ade20k", "drn105 predicts cityscapes classes; the label maps are ade20k"),
    ("drn105", None, "cityscapes", "give its weight file"),
    (None, ["a.pth"], "folder", "no default segmenter for 'folder'"),
    ("torchscript", ["a.pt", "b.pt"], "folder", "takes one file"),
    ("seg.pt", ["a.pth"], "folder", "not one of deeplabv2"),
])
def test_resolve_choice_errors(name, weights, dataset, match):
    with pytest.raises(ValueError, match=match):
        S.resolve_choice(name, weights, dataset)


def test_evaluate_end_to_end_with_drn105(tmp_path):
    """evaluate.py --segmenter drn105 on a tiny Cityscapes layout with a tiny OASIS generator and an
    official-format (random) DRN-D-105 file: mIoU over the 19 scored classes lands in results.json."""
    import json
    import subprocess
    import sys

    import numpy as np

    from models.oasis import Generator
    from tests.test_evaluate import our_checkpoint
    table = data.class_table("cityscapes")
    rng = np.random.default_rng(0)
    for i in range(2):
        for sub, suffix, arr in (("leftImg8bit", "leftImg8bit", rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)),
                                 ("gtFine", "gtFine_labelIds", rng.choice([7, 8, 11, 26], (32, 64)).astype(np.uint8))):
            d = tmp_path / "cs" / sub / "val" / "aachen"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(d / f"aachen_000000_{i:06d}_{suffix}.png")
    torch.manual_seed(0)
    G = Generator(table.n_channels, z_dim=4, channels=2, spade_hidden=8, crop_size=512, aspect_ratio=2.0).eval()
    torch.save(our_checkpoint(G, table), tmp_path / "G.pt")
    torch.save(recipe_state_dict(S.DRNSeg()), tmp_path / "drn-d-105_ms_cityscapes.pth")
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(repo / "evaluate.py"), "--ckpt", tmp_path / "G.pt", "--data", "cityscapes",
                        "--data-root", tmp_path / "cs", "--workers", "0", "--grid-n", "0", "--batch", "2",
                        "--segmenter-weights", tmp_path / "drn-d-105_ms_cityscapes.pth", "--out", tmp_path / "eval", "--no-fid"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["segmenter"] == "drn105" and res["protocol"]["segmenter"] == S.PROTOCOL["drn105"]
    assert len(res["per_class_iou"]) == 19 and 0 <= res["miou"] <= 1 and 0 <= res["miou_real"] <= 1
