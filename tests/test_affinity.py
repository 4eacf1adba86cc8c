"""estimate_affinity.py on hand-built cases, tiny CLIP / DINO / OASIS-D files, and the toy transfer task."""
import json
import subprocess
import sys
import types

import numpy as np
import packaging.version
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
import estimate_affinity as ea
import toy as toy_task
from conftest import REPO, golden_path
from models import DataError, affinity


def folder_dataset(root, classes, labels=(), images=()):
    """A folder dataset: classes.txt plus train/{images,labels} from uint8 arrays."""
    (root / "train" / "images").mkdir(parents=True)
    (root / "train" / "labels").mkdir(parents=True)
    (root / "classes.txt").write_text("".join(c + "\n" for c in classes))
    for i, (lab, img) in enumerate(zip(labels, images)):
        Image.fromarray(img).save(root / "train" / "images" / f"{i:03d}.png")
        Image.fromarray(lab).save(root / "train" / "labels" / f"{i:03d}.png")
    return str(root)


def run(tmp_path, *argv):
    out = tmp_path / "out"
    A = ea.main([*argv, "--out", str(out), "--device", "cpu"])
    meta = json.loads((out / "affinity.json").read_text())
    assert np.array_equal(np.load(out / "affinity.npy"), A) and A.dtype == np.float32
    return A, meta, out


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A small copy of the toy task (source 24 / target 16 training images, 64 px)."""
    root = tmp_path_factory.mktemp("toy")
    toy_task.write_toy(root, splits={"source": {"train": 24, "val": 1}, "target": {"train": 16, "val": 1}})
    return root


# ----------------------------------------------------------------------------------------------
# supervised


class KnownSegmenter(nn.Module):
    """Red pixels predict P1, black pixels P2 (over source channels 1..3); dontcare gets a huge logit."""

    def forward(self, x):
        p1, p2 = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.1, 0.3, 0.6])
        r = x[:, :1]
        logits = r * p1.log()[None, :, None, None] + (1 - r) * p2.log()[None, :, None, None]
        return torch.cat([torch.full_like(r, 50.0), logits], 1)


@pytest.mark.parametrize("stat", ["soft", "argmax"])
def test_supervised_row_is_the_known_mix_of_source_predictions(tmp_path, stat):
    # target class 'a' = left half, 3/4 of it red; 'b' = right half, black; 'c' never appears
    lab = np.zeros((16, 16), np.uint8)
    lab[:, :8], lab[:, 8:] = 1, 2
    lab[0, 8:] = 0  # dontcare pixels are ignored
    img = np.zeros((16, 16, 3), np.uint8)
    img[:12, :8, 0] = 255
    src = folder_dataset(tmp_path / "src", ["grass", "water", "road"])
    tgt = folder_dataset(tmp_path / "tgt", ["lawn", "sea", "street"], [lab, lab], [img, img])
    seg = tmp_path / "seg.pt"
    torch.jit.script(KnownSegmenter()).save(str(seg))
    A, meta, out = run(tmp_path, "--source", src, "--target", tgt, "--size", "16", "--method", "supervised",
                       "--segmenter", str(seg), "--seg-stat", stat, "--soft", "--text-encoder", "minilm")
    p1, p2 = np.array([0.7, 0.2, 0.1]), np.array([0.1, 0.3, 0.6])
    if stat == "argmax":
        p1, p2 = np.eye(3)[0], np.eye(3)[2]
    np.testing.assert_allclose(A[0], 0.75 * p1 + 0.25 * p2, atol=1e-5)
    np.testing.assert_allclose(A[1], p2, atol=1e-5)
    # 'street' is absent from the images: its row is the text row, and the report says so
    assert "absent" in meta["marks"]["street"]
    assert "street | road" in (out / "mapping.md").read_text()
    np.testing.assert_allclose(A.sum(1), 1, atol=1e-5)


def test_oasis_discriminator_as_source_segmenter(tmp_path, toy):
    # the golden 'sq' discriminator has 13 label channels = toy-source's 12 classes + dontcare
    sd = torch.load(golden_path("oasis", "sq", "models", "latest_D.pth"), map_location="cpu", weights_only=True)
    from models.oasis import Discriminator
    kwargs = dict(semantic_nc=13, channels=[3, 4, 4, 8, 8, 16, 16], last_width=4)
    ckpt = tmp_path / "ckpt.pt"
    G_kwargs = dict(crop_size=64, aspect_ratio=1.0, num_res_blocks=6)  # the 64-px generator it was trained with
    torch.save({"kind": "oasis-cat", "G_kwargs": G_kwargs, "D_kwargs": kwargs, "D": sd,
                "target": {"dataset": "folder", "names": [], "n_channels": 13}}, ckpt)  # the fields estimate reads
    A, meta, _ = run(tmp_path, "--source", str(toy / "source"), "--target", str(toy / "target"), "--size", "64",
                     "--n", "2", "--method", "supervised", "--source-ckpt", str(ckpt), "--soft", "--text-encoder", "minilm")
    # reference: softmax over channels 1..12 of logits[:, 1:] (fake channel and dontcare dropped)
    D = Discriminator(**kwargs).eval()
    D.load_state_dict(sd)
    ds = data.open_dataset("folder", toy / "target", n=2, size=64)
    sums, counts = np.zeros((9, 12)), np.zeros(9)
    with torch.no_grad():
        for item in ds:
            p = torch.softmax(D(item["image"][None])[0, 2:], 0).numpy()
            for t in range(9):
                m = item["label"].numpy() == t + 1
                sums[t] += p[:, m].sum(1)
                counts[t] += m.sum()
    present = counts > 0
    np.testing.assert_allclose(A[present], sums[present] / counts[present, None], atol=1e-4)
    assert "OASIS discriminator" in meta["encoders"]["supervised"]


def test_official_discriminator_with_wrong_classes_is_one_clear_line(tmp_path, toy):
    with pytest.raises(DataError, match=r"has 13 label channels, --source ade20k expects 151"):
        ea.main(["--source", "ade20k", "--target", str(toy / "target"), "--method", "supervised",
                 "--source-ckpt", str(golden_path("oasis", "sq")), "--out", str(tmp_path)])


# ----------------------------------------------------------------------------------------------
# self-supervised


def tiny_dino(dim=128, depth=2, patch=8, grid=4, seed=0):
    """A state dict in DINO's backbone key format (2 heads at dim 128)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1
    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, grid * grid + 1, dim),
          "patch_embed.proj.weight": r(dim, 3, patch, patch), "patch_embed.proj.bias": r(dim),
          "norm.weight": 1 + r(dim), "norm.bias": r(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim), b + "norm2.weight": 1 + r(dim),
                   b + "norm2.bias": r(dim), b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
                   b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
                   b + "mlp.fc1.weight": r(4 * dim, dim), b + "mlp.fc1.bias": r(4 * dim),
                   b + "mlp.fc2.weight": r(dim, 4 * dim), b + "mlp.fc2.bias": r(dim)})
    return sd


def reference_vit(sd, x, depth=2, heads=2):
    """Patch tokens written out from the ViT equations (no interpolation: the grid matches pos_embed)."""
    ln = lambda t, k: F.layer_norm(t, t.shape[-1:], sd[k + ".weight"], sd[k + ".bias"], eps=1e-6)
    lin = lambda t, k: t @ sd[k + ".weight"].T + sd[k + ".bias"]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=8).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], 1) + sd["pos_embed"]
    D = t.shape[-1]
    for i in range(depth):
        b = f"blocks.{i}."
        q, k, v = lin(ln(t, b + "norm1"), b + "attn.qkv").split(D, -1)
        outs = []
        for h in range(heads):
            s = slice(h * D // heads, (h + 1) * D // heads)
            w = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / (D // heads) ** 0.5, -1)
            outs.append(w @ v[..., s])
        t = t + lin(torch.cat(outs, -1), b + "attn.proj")
        t = t + lin(F.gelu(lin(ln(t, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
    return ln(t, "norm")[:, 1:]


def test_dino_vit_reads_the_official_key_format(tmp_path):
    sd = tiny_dino()
    path = tmp_path / "dino.pth"
    torch.save(sd, path)
    vit = ea.load_dino(str(path))
    assert vit.kwargs == dict(dim=128, depth=2, patch=8, n_pos=17)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = vit(x).flatten(2).transpose(1, 2)
        torch.testing.assert_close(got, reference_vit(sd, x), atol=1e-4, rtol=1e-4)
        assert vit(torch.randn(1, 3, 48, 64)).shape == (1, 128, 6, 8)  # other sizes: interpolated positions
    # a full training checkpoint (teacher, 'module.backbone.' prefixes, projection head) gives the same backbone
    full = {"teacher": {**{"module.backbone." + k: v for k, v in sd.items()}, "module.head.last_layer.weight": torch.ones(3, 3)}}
    torch.save(full, tmp_path / "full.pth")
    with torch.no_grad():
        torch.testing.assert_close(ea.load_dino(str(tmp_path / "full.pth"))(x), vit(x))
    torch.save({"weight": torch.ones(2)}, tmp_path / "other.pth")
    with pytest.raises(DataError, match="not a DINO ViT"):
        ea.load_dino(str(tmp_path / "other.pth"))
    with pytest.raises(DataError, match="facebookresearch/dino"):
        ea.load_dino(str(tmp_path / "missing.pth"))


def test_identical_prototypes_give_an_identity_like_matrix(tmp_path, toy):
    # the toy source images as both source and target: every class prototype meets its twin
    torch.save(tiny_dino(), tmp_path / "dino.pth")
    src = str(toy / "source")
    A, meta, _ = run(tmp_path, "--source", src, "--target", src, "--size", "64", "--method", "self-supervised",
                     "--dino-weights", str(tmp_path / "dino.pth"), "--dino-size", "32", "--soft", "--temperature", "0.01",
                     "--text-encoder", "minilm")
    np.testing.assert_array_equal(A.argmax(1), np.arange(12))
    assert (np.diag(A) > 0.5).all() and "patch 8" in meta["encoders"]["self-supervised"]
    # the unit: equal prototypes score a cosine of 1, the maximum
    proto = F.normalize(torch.randn(5, 16), dim=1)
    P = affinity.prototype_affinity(proto, proto, np.ones(5, bool), 0.05)
    np.testing.assert_array_equal(P.argmax(1), np.arange(5))
    # a source class missing from the source sample can take no mass
    P = affinity.prototype_affinity(proto, proto, np.array([1, 1, 0, 1, 1], bool), 0.05)
    assert (P[:, 2] == 0).all() and np.allclose(P.sum(1), 1)


# ----------------------------------------------------------------------------------------------
# text


def test_clip_text_tower_from_a_local_file(tmp_path, monkeypatch):
    try:
        import pkg_resources  # noqa: F401
    except ImportError:  # clip-anytorch takes only `packaging` from it; a stand-in for this test alone
        monkeypatch.setitem(sys.modules, "pkg_resources", types.SimpleNamespace(packaging=packaging))
    import clip
    torch.manual_seed(0)
    model = clip.model.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=16,
                            context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                            transformer_layers=2).eval()
    torch.save(model.state_dict(), tmp_path / "tiny_clip.pt")
    with torch.no_grad():  # the OpenAI release files are TorchScript archives: the same model, traced
        torch.jit.trace(model, (torch.randn(1, 3, 32, 32), clip.tokenize(["a dog"]))).save(str(tmp_path / "tiny_clip_jit.pt"))
    src = folder_dataset(tmp_path / "src", ["grass", "water", "road", "car"])
    tgt = folder_dataset(tmp_path / "tgt", ["lawn", "sea", "boat"])

    # reference: the fp16-rounded model as clip.load builds it, prompt ensemble, cosine, softmax
    ref = clip.model.build_model(model.state_dict()).float().eval()
    def embed(names):
        with torch.no_grad():
            e = F.normalize(ref.encode_text(clip.tokenize([p.format(n) for n in names for p in affinity.PROMPTS])).float(), dim=-1)
        return F.normalize(e.reshape(len(names), len(affinity.PROMPTS), -1).mean(1), dim=-1)
    expected = torch.softmax(embed(["lawn", "sea", "boat"]) @ embed(["grass", "water", "road", "car"]).T / 0.1, 1).numpy()
    for name in ("tiny_clip.pt", "tiny_clip_jit.pt"):
        A, meta, _ = run(tmp_path, "--source", src, "--target", tgt, "--method", "text", "--soft", "--temperature", "0.1",
                         "--clip-weights", str(tmp_path / name))
        np.testing.assert_allclose(A, expected, atol=1e-5)
        assert meta["encoders"]["text"].startswith("CLIP") and meta["files"] == [str(tmp_path / name)]
    with pytest.raises(DataError, match="ViT-B-32.pt"):
        ea.main(["--source", src, "--target", tgt, "--method", "text", "--clip-weights", str(tmp_path / "nope.pt"),
                 "--out", str(tmp_path / "o")])


def test_bundled_text_encoder_coco_to_ade20k(tmp_path):
    A, meta, out = run(tmp_path, "--source", "coco", "--target", "ade20k", "--method", "text", "--text-encoder", "minilm")
    assert A.shape == (150, 182) and "all-MiniLM-L6-v2" in meta["encoders"]["text"]
    coco, ade = data.class_table("coco"), data.class_table("ade20k")
    got = {ade.display[t]: coco.names[int(A[t].argmax())] for t in range(150)}
    assert got["sky"] == "sky-other" and got["bus"] == "bus" and got["grass"] == "grass"
    assert got["door"] == "door-stuff"  # the used stuff class wins the tie with the unused thing id 70 'door'
    assert "| signboard | street sign |" in (out / "mapping.md").read_text()


def test_default_text_encoder_is_clip_by_name_and_never_reaches_the_network_silently(tmp_path, monkeypatch):
    """Without --text-encoder / --clip-weights the text method asks for clip_vitb32 (models/weights.py); with an
    empty torch hub cache and no network that is one line naming it, where to put it, and the offline choice."""
    tried = []

    def no_network(*args, **kwargs):
        tried.append(args[0] if isinstance(args[0], str) else args[0].full_url)
        raise OSError("no network in tests")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.delenv("CAT_WEIGHTS_MIRROR", raising=False)
    monkeypatch.setattr("socket.getaddrinfo", no_network)
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    src, tgt = folder_dataset(tmp_path / "src", ["grass", "water"]), folder_dataset(tmp_path / "tgt", ["lawn"])
    with pytest.raises(DataError) as e:
        ea.main(["--source", src, "--target", tgt, "--method", "text", "--out", str(tmp_path / "o")])
    msg = str(e.value)
    assert "\n" not in msg and "--clip-weights clip_vitb32" in msg and "ViT-B-32.pt" in msg, msg
    assert str(tmp_path / "hub") in msg and "--text-encoder minilm" in msg, msg
    assert tried == ["openaipublic.azureedge.net"]  # the one attempt: the name lookup of CLIP's host, refused
    assert not any((tmp_path / "hub").rglob("*.*")) and not (tmp_path / "o" / "affinity.npy").exists()


def test_class_names_clean_and_synonyms():
    ade = data.class_table("ade20k")
    first, mean = affinity.class_names(ade, "first"), affinity.class_names(ade, "mean")
    assert first[ade.ids.index(2)] == ["building"] and mean[ade.ids.index(2)] == ["building", "edifice"]
    coco = data.class_table("coco")
    assert affinity.class_names(coco, "mean")[coco.names.index("building-other")] == ["building"]


# ----------------------------------------------------------------------------------------------
# random / identity / hand / override / hard


def test_random_is_seeded_hard_rows_are_one_hot_at_the_argmax(tmp_path, toy):
    args = ["--source", str(toy / "source"), "--target", str(toy / "target"), "--method", "random"]
    A, meta, _ = run(tmp_path, *args, "--seed", "3")
    estimate = np.array(meta["estimate"])
    np.testing.assert_array_equal(A, np.eye(12)[estimate.argmax(1)])
    assert np.array_equal(run(tmp_path, *args, "--seed", "3")[0], A)
    S, _, _ = run(tmp_path, *args, "--seed", "3", "--soft")
    np.testing.assert_allclose(S, estimate, atol=1e-6)
    np.testing.assert_allclose(S.sum(1), 1, atol=1e-6)
    assert not np.allclose(run(tmp_path, *args, "--seed", "4", "--soft")[0], S)


def test_override_replaces_exactly_the_named_rows(tmp_path, toy):
    args = ["--source", str(toy / "source"), "--target", str(toy / "target"), "--method", "random", "--soft"]
    base = run(tmp_path, *args)[0]
    (tmp_path / "fix.txt").write_text("# fixes\nLava -> rock\nbush -> tree: 3, grass: 1\n")
    A, meta, out = run(tmp_path, *args, "--override", str(tmp_path / "fix.txt"))
    lava, bush = 8, 5
    np.testing.assert_array_equal(A[lava], np.eye(12)[8])
    np.testing.assert_allclose(A[bush], 0.75 * np.eye(12)[5] + 0.25 * np.eye(12)[1])
    keep = [i for i in range(9) if i not in (lava, bush)]
    np.testing.assert_array_equal(A[keep], base[keep])
    assert set(meta["marks"]) == {"lava", "bush"} and "overridden" in (out / "mapping.md").read_text()
    (tmp_path / "bad.txt").write_text("lava -> magma\n")
    with pytest.raises(DataError, match=r"bad.txt:1: unknown class 'magma'"):
        run(tmp_path, *args, "--override", str(tmp_path / "bad.txt"))


def test_hand_and_identity(tmp_path, toy):
    src, tgt = str(toy / "source"), str(toy / "target")
    pairs = dict(sky="sky", lawn="grass", sea="water", street="road", house="building", bush="tree", beach="sand",
                 boat="car", lava="rock")
    (tmp_path / "hand.txt").write_text("".join(f"{t} -> {s}\n" for t, s in pairs.items()))
    A, _, _ = run(tmp_path, "--source", src, "--target", tgt, "--method", "hand", "--hand", str(tmp_path / "hand.txt"))
    source = data.class_table("folder", src)
    np.testing.assert_array_equal(A.argmax(1), [source.names.index(s) for s in pairs.values()])
    (tmp_path / "part.txt").write_text("sky -> sky\n")
    with pytest.raises(DataError, match="maps 1 of 9 target classes; missing: lawn"):
        run(tmp_path, "--source", src, "--target", tgt, "--method", "hand", "--hand", str(tmp_path / "part.txt"))
    np.testing.assert_array_equal(run(tmp_path, "--source", src, "--target", src, "--method", "identity")[0], np.eye(12))
    with pytest.raises(DataError, match="unknown class 'lawn'"):
        run(tmp_path, "--source", src, "--target", tgt, "--method", "identity")


# ----------------------------------------------------------------------------------------------
# the toy task, end to end


class LDASegmenter(nn.Module):
    """Linear discriminant on per-image-normalised colour and 5x5 colour statistics."""

    def __init__(self, W, b):
        super().__init__()
        self.register_buffer("W", W)
        self.register_buffer("b", b)

    def forward(self, x):
        return torch.einsum("cf,bfhw->bchw", self.W, lda_features(x)) + self.b[None, :, None, None]


def lda_features(x):
    x = (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + 1e-3)
    m = F.avg_pool2d(x, 5, 1, 2, count_include_pad=False)
    v = F.avg_pool2d(x * x, 5, 1, 2, count_include_pad=False) - m * m
    return torch.cat([x, m, v.clamp(min=0).sqrt()], 1)


def fit_lda(dataset):
    """Closed-form LDA on the labelled source pixels (the toy source renderings), in a second."""
    x = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    y = torch.stack([dataset[i]["label"] for i in range(len(dataset))]).reshape(-1)
    f = lda_features((x + 1) / 2).permute(0, 2, 3, 1).reshape(-1, 9).double()
    f, y = f[y > 0], y[y > 0]
    n = torch.bincount(y, minlength=dataset.n_channels).double()
    mu = torch.zeros(dataset.n_channels, 9, dtype=torch.float64).index_add_(0, y, f) / n.clamp(min=1)[:, None]
    cov = (f - mu[y]).T @ (f - mu[y]) / len(f) + 1e-3 * torch.eye(9, dtype=torch.float64)
    W = mu @ torch.linalg.inv(cov)
    b = -0.5 * (W * mu).sum(1)
    b[n == 0] = -1e4
    return LDASegmenter(W.float(), b.float())


def test_toy_combination_maps_obvious_counterparts(tmp_path, toy):
    seg = fit_lda(data.open_dataset("folder", toy / "source", size=64))
    torch.jit.script(seg).save(str(tmp_path / "seg.pt"))
    A, meta, out = run(tmp_path, "--source", str(toy / "source"), "--target", str(toy / "target"), "--size", "64",
                       "--method", "combination", "--segmenter", str(tmp_path / "seg.pt"), "--text-encoder", "minilm",
                       "--weights", "text=1,supervised=1")
    source, target = data.class_table("folder", toy / "source"), data.class_table("folder", toy / "target")
    got = {target.names[t]: source.names[int(A[t].argmax())] for t in range(len(target))}
    for t, s in dict(lawn="grass", sea="water", street="road", house="building", bush="tree", beach="sand").items():
        assert got[t] == s, got
    assert set(meta["matrices"]) == {"text", "supervised"} and meta["skipped"] == {}  # the subset --weights names
    assert (out / "affinity.png").stat().st_size > 0 and "| lawn | grass |" in (out / "mapping.md").read_text()


def test_bad_input_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "estimate_affinity.py", "--source", "imagenet", "--target", "ade20k",
                        "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: --source imagenet: neither a dataset "
                                             "(coco, ade20k, cityscapes, toy-source, toy-target, toy-lt-source, "
                                             "toy-lt-target) nor a folder with classes.txt"]
    torch.jit.script(KnownSegmenter()).save(str(tmp_path / "seg.pt"))  # 4 channels: dontcare + 3 classes
    src = folder_dataset(tmp_path / "src", ["x", "y", "z"])
    empty = folder_dataset(tmp_path / "empty", ["a", "b"], [np.zeros((8, 8), np.uint8)], [np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(DataError, match="no pixel carries a target class"):
        run(tmp_path, "--source", src, "--target", empty, "--size", "8", "--method", "supervised", "--segmenter", str(tmp_path / "seg.pt"))
    two = folder_dataset(tmp_path / "two", ["x", "y"])
    with pytest.raises(DataError, match="segmenter outputs 4 channels, --source folder has 3"):
        run(tmp_path, "--source", two, "--target", empty, "--size", "8", "--method", "supervised", "--segmenter", str(tmp_path / "seg.pt"))


# The CAT supplement's Table 5 (Cityscapes -> COCO-Stuff), as printed, with its two misspelt cells written as the
# COCO-Stuff class they name ('builidng-other', 'building': building-other). 'license plate' (labelId -1) never
# appears in labelIds PNGs and has no channel, so it cannot be mapped.
TABLE5 = """unlabeled -> sky-other
ego vehicle -> road
rectification border -> unlabeled
out of roi -> unlabeled
static -> building-other
dynamic -> building-other
ground -> pavement
road -> road
sidewalk -> pavement
parking -> road
rail track -> road
building -> building-other
wall -> building-other
fence -> fence
guard rail -> railing
bridge -> building-other
tunnel -> building-other
pole -> building-other
polegroup -> fence
traffic light -> traffic light
traffic sign -> building-other
vegetation -> tree
terrain -> grass
sky -> sky-other
person -> person
rider -> person
car -> car
truck -> truck
bus -> bus
caravan -> truck
trailer -> truck
train -> bus
motorcycle -> motorcycle
bicycle -> bicycle
"""


def test_cityscapes_unlabelled_rows_of_the_supplement(tmp_path):
    """Cityscapes feeds its 'unlabeled' channel 0 to the generator: the supplement maps it to sky-other, and
    rectification border / out of roi to COCO-Stuff's unlabeled channel. Both directions reach the channel matrix."""
    (tmp_path / "table5.txt").write_text(TABLE5)
    A, meta, out = run(tmp_path, "--source", "coco", "--target", "cityscapes", "--method", "hand",
                       "--hand", str(tmp_path / "table5.txt"))
    city, coco = data.class_table("cityscapes"), data.class_table("coco")
    assert A.shape == (len(city) + 1, len(coco) + 1)  # the extended matrix: channel 0 first on both sides
    M = data.affinity_to_channels(A, city, coco)
    sky, road = coco.ids[coco.names.index("sky-other")] + 1, coco.ids[coco.names.index("road")] + 1
    expect = {0: sky, 2: 0, 3: 0, 7: road, 1: road}  # Cityscapes labelId = channel -> COCO-Stuff channel
    for t, s in expect.items():
        assert M[t, s] == 1 and M[t].sum() == 1, (t, s)
    assert torch.equal(M.sum(1), torch.ones(35).index_fill_(0, torch.tensor([34]), 0))  # 34 has no class
    assert "| unlabelled (channel 0) | sky |" in (out / "mapping.md").read_text()
    A2, M2 = data.load_affinity(out / "affinity.npy", city, coco)  # the one loader takes the extended form
    assert torch.equal(M2, M)


# ----------------------------------------------------------------------------------------------
# the affinity's files agree with each other and with the class tables (issue 31 section 3)


def test_affinity_json_is_tied_to_its_npy(tmp_path):
    a = folder_dataset(tmp_path / "a", ["sky", "grass"])
    b = folder_dataset(tmp_path / "b", ["sky", "grass", "sea"])
    src = folder_dataset(tmp_path / "src", ["x", "y", "z"])
    A, meta, out = run(tmp_path, "--source", src, "--target", a, "--method", "random")
    target, source = data.class_table("folder", a), data.class_table("folder", src)
    assert meta["sha256"] == data.affinity_sha256(A) and meta["target"]["names"] == ["sky", "grass"]
    np.testing.assert_array_equal(data.load_affinity(out / "affinity.npy", target, source)[0], A)
    good = (out / "affinity.json").read_text()
    np.save(out / "affinity.npy", np.eye(2, 3, dtype=np.float32)[::-1].copy())  # rewritten since: stale
    with pytest.raises(DataError, match=r"records another array .* same classes, so the \.npy was rewritten"):
        data.load_affinity(out / "affinity.npy", target, source)
    np.save(out / "affinity.npy", A)
    ea.main(["--source", src, "--target", b, "--method", "random", "--out", str(tmp_path / "ob"), "--device", "cpu"])
    (out / "affinity.json").write_text((tmp_path / "ob" / "affinity.json").read_text())  # another run's json
    with pytest.raises(DataError, match=r"other classes .* two files come from different runs \(a mismatched pair\)"):
        data.load_affinity(out / "affinity.npy", target, source)
    (out / "affinity.json").write_text(good[:-20])  # broken by hand: refused, never skipped
    with pytest.raises(DataError, match=r"affinity\.json beside it is not valid JSON \(line"):
        data.load_affinity(out / "affinity.npy", target, source)
    (out / "affinity.json").write_text(json.dumps({k: v for k, v in json.loads(good).items() if k != "sha256"}))
    with pytest.raises(DataError, match="lacks the class names or the array's sha256"):
        data.load_affinity(out / "affinity.npy", target, source)
    (out / "affinity.json").write_text(good)
    with pytest.raises(DataError, match=r"\(target classes\) has the classes of --target folder in another order: "
                                        r"class 1 is 'grass' in --target folder, 'sky'"):
        data.load_affinity(out / "affinity.npy", data.ClassTable("folder", [1, 2], ["grass", "sky"], ["grass", "sky"],
                                                                 [1, 2], 3), source)


def test_source_images_in_another_class_order_are_refused(tmp_path, toy):
    torch.save(tiny_dino(), tmp_path / "dino.pth")
    names = data.class_table("folder", toy / "source").names
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / "classes.txt").write_text("\n".join([names[1], names[0], *names[2:]]) + "\n")
    for sub in ("train", "val"):
        (swapped / sub).symlink_to(toy / "source" / sub)
    with pytest.raises(DataError, match=rf"the source images \(--source-data {swapped}\) has the classes of --source "
                                        rf".* in another order: class 1 is '{names[0]}' in --source"):
        run(tmp_path, "--source", str(toy / "source"), "--target", str(toy / "target"), "--size", "64", "--method",
            "self-supervised", "--dino-weights", str(tmp_path / "dino.pth"), "--source-data", str(swapped))


class BlueIsSky(nn.Module):
    """A segmenter of the source classes (dontcare, sky, road): blue pixels are sky, the others road."""

    def forward(self, x):
        blue = (x[:, 2:3] > 0.5).float()  # RGB in [0, 1]
        return torch.cat([torch.full_like(blue, -50.0), 20 * blue, 20 * (1 - blue)], 1)


def test_cityscapes_unlabeled_gets_an_estimated_row(tmp_path):
    """Table 5's 'unlabeled -> sky-other': on a Cityscapes layout whose labelId 0 covers the sky, the void row is
    estimated like any class (the default for a Cityscapes target), and reaches the channel matrix."""
    root = tmp_path / "cityscapes"
    for i in range(2):
        img, lab = np.full((64, 128, 3), 90, np.uint8), np.full((64, 128), 7, np.uint8)  # grey road
        img[:32] = (20, 40, 230)  # a blue sky that Cityscapes leaves unlabeled (labelId 0)
        lab[:32] = 0
        for sub, arr, suffix in (("leftImg8bit", img, "leftImg8bit"), ("gtFine", lab, "gtFine_labelIds")):
            (root / sub / "train" / "aachen").mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / sub / "train" / "aachen" / f"aachen_00000{i}_000019_{suffix}.png")
    torch.jit.script(BlueIsSky()).save(str(tmp_path / "seg.pt"))
    src = folder_dataset(tmp_path / "src", ["sky", "road"])
    argv = ["--source", src, "--target", "cityscapes", "--data-root", str(root), "--method", "supervised",
            "--segmenter", str(tmp_path / "seg.pt"), "--text-encoder", "minilm"]
    A, meta, out = run(tmp_path, *argv)
    city, source = data.class_table("cityscapes"), data.class_table("folder", src)
    assert A.shape == (len(city) + 1, 3) and meta["void_row"]  # rows: unlabeled + 33 classes; columns: 0, sky, road
    assert A[0].tolist() == [0, 1, 0] and A[1 + city.ids.index(7)].tolist() == [0, 0, 1]
    M = data.load_affinity(out / "affinity.npy", city, source)[1]
    assert M[0].tolist() == [0, 1, 0] and M[7].tolist() == [0, 0, 1]  # channel 0 (unlabeled) -> sky
    assert "| unlabeled | sky |" in (out / "mapping.md").read_text()
    A, meta, _ = run(tmp_path, *argv, "--void-row", "off")  # the earlier behaviour: channel 0 -> channel 0
    assert A.shape == (len(city), 2) and not meta["void_row"]
    with pytest.raises(DataError, match="--void-row on with --method random"):
        run(tmp_path, *argv[:6], "--method", "random", "--void-row", "on")


def test_design_card_command_names_every_missing_flag_with_an_example():
    r = subprocess.run([sys.executable, "estimate_affinity.py", "--method", "combination"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    for words in ("--source, --target, --out are required", "supervised needs --source-ckpt", "--segmenter FILE",
                  "self-supervised needs --dino-weights", "e.g. python estimate_affinity.py --source ade20k"):
        assert words in r.stderr, r.stderr
    help_text = subprocess.run([sys.executable, "estimate_affinity.py", "--help"], cwd=REPO, capture_output=True,
                               text=True).stdout
    for words in ("(default: combination", "(default: 8)", "default: 0.05)", "(default: auto)", "--workers"):
        assert words in " ".join(help_text.split()), words
