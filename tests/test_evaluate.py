"""evaluate.py: FID parity with pytorch-fid, KID, mIoU, folder mode and model mode.

The Inception weights are random (built at test time in the exact key format of the pytorch-fid file),
so the tests check parity and plumbing, not magnitudes. pytorch-fid is a test-only dependency.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import metrics
from models import DataError
from models import run as run_folder

REPO = Path(__file__).resolve().parents[1]
INCEPTION = "pt_inception-2015-12-05-6726825d.pth"


def run(*args, cwd=None):
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *map(str, args)], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """Random weights with the keys and shapes of pytorch-fid's file, from pytorch-fid's own graph recipe."""
    import torchvision
    from pytorch_fid import inception as pi
    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    net.Mixed_5b, net.Mixed_5c = pi.FIDInceptionA(192, 32), pi.FIDInceptionA(256, 64)
    net.Mixed_5d = pi.FIDInceptionA(288, 64)
    net.Mixed_6b, net.Mixed_6c = pi.FIDInceptionC(768, 128), pi.FIDInceptionC(768, 160)
    net.Mixed_6d, net.Mixed_6e = pi.FIDInceptionC(768, 160), pi.FIDInceptionC(768, 192)
    net.Mixed_7b, net.Mixed_7c = pi.FIDInceptionE_1(1280), pi.FIDInceptionE_2(2048)
    g = torch.Generator().manual_seed(0)
    sd = net.state_dict()
    for k, v in sd.items():  # scale-preserving random values, so that features differ between images
        if k.endswith("conv.weight") or k == "fc.weight":
            v.copy_(torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5)
        elif k.endswith("bn.weight") or k.endswith("running_var"):
            v.copy_(torch.rand(v.shape, generator=g) + 0.5)
        elif k.endswith("bn.bias") or k.endswith("running_mean") or k == "fc.bias":
            v.copy_(torch.randn(v.shape, generator=g) * 0.1)
    path = tmp_path_factory.mktemp("inception") / INCEPTION
    torch.save(sd, path)
    return path


def write_images(folder, n, size, seed, smooth):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        x = rng.uniform(0, 255, (size[0] // 4, size[1] // 4, 3)) if smooth else rng.uniform(0, 255, (*size, 3))
        im = Image.fromarray(x.astype(np.uint8))
        (im.resize(size[::-1], Image.BICUBIC) if smooth else im).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def image_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return write_images(root / "real", 3, (32, 48), 1, True), write_images(root / "fake", 3, (32, 48), 2, False)


def pytorch_fid_activations(files, inception_file, monkeypatch):
    from pytorch_fid import fid_score, inception as pi
    monkeypatch.setattr(pi, "load_state_dict_from_url",
                        lambda *a, **k: torch.load(inception_file, map_location="cpu", weights_only=True))
    model = pi.InceptionV3([3]).eval()
    return fid_score.get_activations([str(f) for f in files], model, batch_size=3, dims=2048, device="cpu",
                                     num_workers=0)


def rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_features_and_folder_fid_equal_pytorch_fid(inception_file, image_dirs, tmp_path, monkeypatch):
    from pytorch_fid import fid_score
    real_dir, fake_dir = image_dirs
    real_files, fake_files = sorted(real_dir.iterdir()), sorted(fake_dir.iterdir())
    net = metrics.load_feature_net(inception=inception_file)
    ours = metrics.features(net, metrics.image_batches(real_files, 3, "cpu"))
    ref_real = pytorch_fid_activations(real_files, inception_file, monkeypatch)
    ref_fake = pytorch_fid_activations(fake_files, inception_file, monkeypatch)
    assert ours.shape == ref_real.shape == (3, 2048) and ours.dtype == np.float64
    assert rel(ours, ref_real) < 1e-4
    assert np.ptp(ref_real, axis=0).max() > 1e-2  # the random net does tell images apart

    r = run("--real-dir", real_dir, "--fake-dir", fake_dir, "--inception", inception_file, "--out", tmp_path / "o",
            "--batch", 3, "--device", "cpu", "--workers", 0)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    # pytorch-fid's FID of its own features. A sqrtm of 2048x2048 takes minutes on a busy 2-core CPU, so the
    # reference runs in an orthonormal basis of the 5-dimensional affine span of the 6 feature vectors: an
    # isometry of feature space, under which the Frechet distance is unchanged.
    feats = np.concatenate([ref_fake, ref_real])
    basis = np.linalg.qr((feats - feats[0]).T)[0]
    fake, real = (ref_fake - feats[0]) @ basis, (ref_real - feats[0]) @ basis
    ref_fid = fid_score.calculate_frechet_distance(fake.mean(0), np.cov(fake, rowvar=False),
                                                   real.mean(0), np.cov(real, rowvar=False))
    assert ref_fid > 1e-3
    assert abs(res["fid"] - ref_fid) / ref_fid < 1e-4
    assert res["kid_mean"] == pytest.approx(kid_direct(ref_real, ref_fake), rel=1e-4)  # 3 images: one full subset
    assert res["n_real"] == 3 and res["n_fake"] == 3 and res["toy_domain_fid"] is False
    assert [line.split()[0] for line in r.stdout.splitlines()[:2]] == ["fid", "kid"]


def test_frechet_numerics_equal_pytorch_fid():
    """Same sqrtm path as pytorch-fid, also for rank-deficient covariances (fewer images than features)."""
    import warnings
    from pytorch_fid import fid_score
    rng = np.random.default_rng(0)
    for n in (5, 200):
        a, b = rng.normal(size=(n, 64)), rng.normal(0.3, 1.5, size=(n, 64))
        args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy's deprecation of `disp`, singular-matrix notes
            ref = fid_score.calculate_frechet_distance(*args)
        assert metrics.frechet_distance(*args) == pytest.approx(ref, rel=1e-12)


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    s1, s2 = a @ a.T + np.eye(8), b @ b.T + 0.5 * np.eye(8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    # tr sqrt(s1 s2) = sum of the square roots of the (real, positive) eigenvalues of s1 s2
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-9


def kid_direct(x, y):
    """Unbiased MMD^2 written out pair by pair."""
    d, m = x.shape[1], len(x)
    k = lambda u, v: (u @ v / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_against_direct_computation():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.5, 1.2, size=(12, 5))
    direct = kid_direct(x, y)
    mean, std = metrics.kid(x, y, n_subsets=5)  # subsets capped at the sample count: every subset is the full set
    assert mean == pytest.approx(direct, rel=1e-10) and std < 1e-9 * abs(direct)
    # the mean over random subsets estimates the full-sample statistic without bias
    mean, std = metrics.kid(x, y, n_subsets=3000, subset_size=6, seed=1)
    assert std > 0 and abs(mean - direct) < 4 * std / np.sqrt(3000)


def test_miou_against_hand_computed_confusion():
    label = torch.tensor([[[0, 1, 1, 2],
                           [2, 2, 3, 3]]])
    pred = torch.tensor([[[1, 1, 2, 2],
                          [2, 3, 3, 3]]])
    conf = metrics.confusion(pred, label, 5)
    expected = np.zeros((5, 5), np.int64)  # rows: true, columns: predicted; the dontcare pixel is ignored
    expected[1, 1], expected[1, 2], expected[2, 2], expected[2, 3], expected[3, 3] = 1, 1, 2, 1, 2
    assert (conf == expected).all()
    miou, per = metrics.iou(conf, [1, 2, 3, 4])
    # class 1: 1 / (2 + 1 - 1); class 2: 2 / (3 + 3 - 2); class 3: 2 / (2 + 3 - 2); class 4 absent
    assert per[:3] == pytest.approx([0.5, 0.5, 2 / 3]) and per[3] is None
    assert miou == pytest.approx((0.5 + 0.5 + 2 / 3) / 3)
    # scoring a subset (Cityscapes' 19 classes): pixels labelled 2 no longer count, so its 2 -> 3 error vanishes
    miou, per = metrics.iou(conf, [1, 3])
    assert per == pytest.approx([0.5, 1.0]) and miou == pytest.approx(0.75)
    # labels larger than the prediction are nearest-resized (legacy: rows/cols 0 and 2 of a 4x4 map)
    big = torch.arange(16).reshape(1, 4, 4) % 4
    conf = metrics.confusion(torch.full((1, 2, 2), 1), big, 4)
    assert conf[:, 1].tolist() == [0, 0, 2, 0]  # sampled labels: 0, 2, 0, 2 -> two dontcare, two class 2


def test_segment_never_predicts_dontcare_and_checks_channels():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 0] = 5.0  # dontcare has the largest logit everywhere
    logits[0, 2, 0, 0] = 1.0
    seg = lambda x: logits  # noqa: E731
    pred = metrics.segment(seg, torch.zeros(1, 3, 2, 2), 3)
    assert pred.tolist() == [[[2, 1], [1, 1]]]
    with pytest.raises(DataError, match="3 channels; the dataset has 4"):
        metrics.segment(seg, torch.zeros(1, 3, 2, 2), 4, name="seg.pt")


def test_bad_inputs_give_one_line(tmp_path, image_dirs, inception_file):
    real_dir, fake_dir = image_dirs
    missing = tmp_path / INCEPTION
    r = run("--real-dir", real_dir, "--fake-dir", fake_dir, "--inception", missing, "--out", tmp_path / "o")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert INCEPTION in r.stderr and "fid_weights" in r.stderr and "mseitzer/pytorch-fid" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    one = write_images(tmp_path / "one", 1, (32, 48), 3, True)
    with pytest.raises(DataError, match="1 image.* at least 2") as e:
        metrics.folder_images(one, "--fake-dir")
    assert str(one) in str(e.value) and "\n" not in str(e.value)

    mixed = write_images(tmp_path / "mixed", 2, (32, 48), 4, True)
    write_images(tmp_path / "other", 1, (40, 40), 5, True)
    (tmp_path / "other" / "000.png").rename(mixed / "zzz.png")
    with pytest.raises(DataError, match="mixed sizes: 000.png is 48x32, zzz.png is 40x40") as e:
        metrics.folder_images(mixed, "--real-dir")
    assert "\n" not in str(e.value)

    with pytest.raises(DataError, match="at least 2 images, got 1"):
        metrics.stats(np.zeros((1, 8)))

    # files without BatchNorm's num_batches_tracked counters (472 keys) load too, with the same weights
    sd = torch.load(inception_file, weights_only=True)
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, tmp_path / "472.pth")
    net = metrics.load_feature_net(inception=tmp_path / "472.pth")
    assert torch.equal(net.Mixed_7c.branch_pool.bn.running_var, sd["Mixed_7c.branch_pool.bn.running_var"])

    bogus = tmp_path / "bogus.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bogus)
    with pytest.raises(DataError, match="not the FID Inception weights"):
        metrics.load_feature_net(inception=bogus)


# ----------------------------------------------------------------------------------------------
# Model mode on a shrunken toy task with a tiny OASIS generator, a toy feature net and segmenter


class ToyFeatures(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean((2, 3))


class ToySegmenter(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, n, 1)

    def forward(self, x):
        return self.conv(x)


def our_checkpoint(G, table):
    info = {"dataset": table.dataset, "names": table.names, "n_channels": table.n_channels}
    return {"kind": "oasis-cat", "step": 0, "args": {}, "affinity": None, "source": info, "target": info,
            "G_kwargs": G.kwargs, "EMA": G.state_dict(), "D_kwargs": {}, "D": {}}  # D: unused by evaluate.py


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    import data
    import toy as toy_task
    from models.oasis import Generator
    root = tmp_path_factory.mktemp("toy")
    toy_task.write_toy(root / "toy", size=32, splits={"source": {"train": 2, "val": 2}, "target": {"train": 2, "val": 5}})
    src, tgt = data.class_table("toy-source", root / "toy/source"), data.class_table("toy-target", root / "toy/target")
    torch.manual_seed(0)
    kw = dict(z_dim=4, channels=2, spade_hidden=8, crop_size=32)
    G_tgt, G_src = Generator(tgt.n_channels, **kw).eval(), Generator(src.n_channels, **kw).eval()
    for G in (G_tgt, G_src):  # train-mode passes give the BN layers non-trivial running statistics
        G.train()
        with torch.no_grad():
            G(torch.rand(2, G.semantic_nc, 32, 32))
        G.eval()
    torch.save(our_checkpoint(G_tgt, tgt), root / "tgt.pt")
    torch.save(our_checkpoint(G_src, src), root / "src.pt")
    G_cat = Generator(src.n_channels, cat_nc=tgt.n_channels, **kw).eval()  # a finetuned CAT model's layout
    torch.save(our_checkpoint(G_cat, tgt), root / "cat.pt")
    torch.jit.script(ToyFeatures()).save(root / "feat.pt")
    torch.jit.script(ToySegmenter(tgt.n_channels)).save(root / "seg.pt")
    torch.jit.script(ToySegmenter(5)).save(root / "seg5.pt")
    return {"root": root, "src": src, "tgt": tgt, "G_tgt": G_tgt, "G_src": G_src,
            "data": ["--data", "toy-target", "--data-root", root / "toy/target", "--size", 32, "--workers", 0]}


def expected_png(G, label, n_channels, map_index, k=0, seed=0):
    """The documented protocol: z from the seed (seed, map, sample); PNG = round(255 (x+1)/2)."""
    import data
    s = int(np.random.SeedSequence([seed, map_index, k]).generate_state(1)[0])
    z = torch.randn(G.z_dim, generator=torch.Generator().manual_seed(s))[None]
    with torch.no_grad():
        x = G(data.onehot(label[None], n_channels), z)
    return ((x[0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy(), x


def test_model_mode_on_toy_task(toy, tmp_path, capsys):
    import data
    out, cache = tmp_path / "eval", tmp_path / "cache"
    args = ["--ckpt", toy["root"] / "tgt.pt", *toy["data"], "--out", out, "--fid-features", toy["root"] / "feat.pt",
            "--segmenter", toy["root"] / "seg.pt", "--samples-per-map", 2, "--batch", 2, "--stats-cache", cache]
    r = run(*args)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["n_maps"] == 5 and res["n_fake"] == 10 and res["toy_domain_fid"] is True
    assert "not comparable to Inception FID" in res["fid_features"]
    assert list(res["per_class_iou"]) == toy["tgt"].names and 0 <= res["miou"] <= 1
    assert [line.split()[0] for line in r.stdout.splitlines()[:4]] == ["fid", "kid", "miou", "miou_real"]
    assert len(list((out / "images").glob("*.png"))) == 10
    grid = Image.open(out / "grid.png")  # label | 2 samples | real, 32px tiles + 2px gaps, titles, legend
    assert grid.size[0] == 4 * 34 and grid.size[1] > 5 * 34 + 22

    # PNGs follow the documented seeding and rounding; FID follows the OASIS protocol (float fakes)
    ds = data.open_dataset("toy-target", toy["root"] / "toy/target", "val", size=32)
    feat = torch.jit.load(str(toy["root"] / "feat.pt"))
    fakes, reals = [], []
    for i in range(len(ds)):
        item = ds[i]
        for k in range(2):
            png, x = expected_png(toy["G_tgt"], item["label"], ds.n_channels, i, k)
            saved = np.asarray(Image.open(out / "images" / f"{Path(item['path']).stem}_{k}.png"))
            assert np.abs(saved.astype(int) - png).max() <= 1 and (saved == png).mean() > 0.99
            fakes.append(feat((x + 1) / 2)[0].detach().double().numpy())
        reals.append(feat((item["image"][None] + 1) / 2)[0].detach().double().numpy())
    fakes, reals = np.stack(fakes), np.stack(reals)
    s1, s2 = np.cov(fakes, rowvar=False), np.cov(reals, rowvar=False)
    tr = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    fid = ((fakes.mean(0) - reals.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr
    assert res["fid"] == pytest.approx(fid, rel=1e-4, abs=1e-6)

    # the real statistics were cached (keyed by dataset, split, resolution, network) and are reused
    assert len(list(cache.glob("toy-target-val-32x32-features-feat-*.npz"))) == 1
    net = metrics.load_feature_net(fid_features=toy["root"] / "feat.pt")
    mu, sigma, cached = metrics.real_stats(ds, net, cache)
    assert np.allclose(cached, reals, rtol=1e-5, atol=1e-7) and np.allclose(mu, reals.mean(0))
    net.forward = None  # a cache hit never runs the network
    assert np.array_equal(metrics.real_stats(ds, net, cache)[2], cached)
    assert "real statistics: cached" in capsys.readouterr().out
    ds.files = ds.files[:3]  # another image list is another cache entry
    assert len(metrics.real_stats(ds, metrics.load_feature_net(fid_features=toy["root"] / "feat.pt"), cache)[2]) == 3
    assert len(list(cache.glob("*.npz"))) == 2


def test_training_free_mode_equals_source_on_mapped_labels(toy, tmp_path):
    import data
    src, tgt = toy["src"], toy["tgt"]
    pick = np.arange(len(tgt)) % len(src)  # a hard affinity: target class t -> source class pick[t]
    A = np.eye(len(src), dtype=np.float32)[pick]
    np.save(tmp_path / "A.npy", A)
    out = tmp_path / "eval"
    r = run("--ckpt", toy["root"] / "src.pt", "--source", "toy-source", "--source-root", toy["root"] / "toy/source",
            "--affinity", tmp_path / "A.npy", *toy["data"], "--out", out, "--limit", 3, "--no-fid")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["generator"]["kind"] == "oasis-training-free" and res["n_maps"] == 3
    lut = torch.zeros(tgt.n_channels, dtype=torch.long)
    lut[torch.tensor(tgt.channels)] = torch.tensor([src.channels[j] for j in pick])
    ds = data.open_dataset("toy-target", toy["root"] / "toy/target", "val", size=32)
    for i in range(3):
        item = ds[i]
        png, _ = expected_png(toy["G_src"], lut[item["label"]], src.n_channels, i)
        saved = np.asarray(Image.open(out / "images" / f"{Path(item['path']).stem}.png"))
        assert np.abs(saved.astype(int) - png).max() <= 1 and (saved == png).mean() > 0.99


def test_model_mode_bad_inputs(toy, tmp_path):
    r = run("--ckpt", toy["root"] / "tgt.pt", *toy["data"], "--out", tmp_path, "--segmenter", toy["root"] / "seg5.pt",
            "--limit", 2, "--no-fid")
    assert r.returncode != 0 and "5 channels; the dataset has 10" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1

    def refused(match, *args):
        with pytest.raises(DataError, match=match) as e:
            evaluate.main(list(map(str, [*args, *toy["data"], "--out", tmp_path / "o"])))
        assert "\n" not in str(e.value)

    src = ["--ckpt", toy["root"] / "src.pt"]
    # a model of other classes (the toy source's 12 against the target's 9), by name: the first difference
    refused("--data toy-target has 9 classes, --ckpt .*src.pt 12: class 2 is 'grass' in --ckpt .*, 'lawn' in --data",
            *src)
    refused("--data toy-target has 9 classes", *src, "--source", "toy-source")  # its own classes, by --source
    refused("a source model; give --source", "--ckpt", toy["root"] / "toy/source", "--affinity", tmp_path / "x.npy")
    source = ["--source", "toy-source", "--source-root", toy["root"] / "toy/source"]
    refused("nope.npy: file not found", *src, *source, "--affinity", toy["root"] / "nope.npy")
    np.save(tmp_path / "half.npy", np.full((len(toy["tgt"]), len(toy["src"])), 0.5 / len(toy["src"]), np.float32))
    refused("half.npy: row 0 .*sums to 0.5000; expected rows summing to 1", *src, *source, "--affinity", tmp_path / "half.npy")
    # an official OASIS run folder (the golden 'sq' one: 13 label channels) against --source ade20k (151)
    from conftest import golden_path
    np.save(tmp_path / "ade.npy", np.full((len(toy["tgt"]), 150), 1 / 150, np.float32))
    sq = ["--ckpt", golden_path("oasis", "sq"), "--affinity", tmp_path / "ade.npy", "--source", "ade20k"]
    refused("sq: .* label channels.*expects .*151", *sq, "--which", "latest")
    refused("no best_EMA.pth", *sq)
    assert not (tmp_path / "o").exists()  # nothing is written before the inputs are checked


def test_ignored_flags_are_refused(toy, tmp_path, image_dirs):
    """Flags that would have no effect are refused with one line rather than silently ignored."""
    real_dir, fake_dir = image_dirs
    folders = ["--real-dir", real_dir, "--fake-dir", fake_dir, "--fid-features", toy["root"] / "feat.pt"]
    model = ["--ckpt", toy["root"] / "tgt.pt", *toy["data"]]
    np.save(tmp_path / "A.npy", np.full((len(toy["tgt"]), len(toy["src"])), 1 / len(toy["src"]), np.float32))
    for match, args in [
        ("--ckpt: not used in folder mode", [*folders, "--ckpt", toy["root"] / "tgt.pt"]),
        ("--affinity, --source: not used in folder mode", [*folders, "--affinity", tmp_path / "A.npy",
                                                           "--source", "toy-source"]),
        ("--segmenter-weights: not used in folder mode", [*folders, "--segmenter-weights", toy["root"] / "seg.pt"]),
        ("folder mode needs both --real-dir and --fake-dir", ["--real-dir", real_dir]),
        ("--no-fid: not used in folder mode", [*folders, "--no-fid"]),
        ("give --ckpt .* or --real-dir and --fake-dir", toy["data"]),
        # a finetuned CAT checkpoint carries its affinity: --affinity / --source would be ignored
        ("a finetuned CAT model .*; --affinity apply to a source model only",
         ["--ckpt", toy["root"] / "cat.pt", *toy["data"], "--affinity", tmp_path / "A.npy"]),
        ("a finetuned CAT model .*; --source, --source-root apply",
         ["--ckpt", toy["root"] / "cat.pt", *toy["data"], "--source", "toy-source", "--source-root", toy["root"]]),
        ("--batch: '0': expected an integer >= 1", [*model, "--batch", 0]),
        ("--batch: '-2': expected an integer >= 1", [*model, "--batch", -2]),
        ("--limit: '0': expected an integer >= 1", [*model, "--limit", 0]),
        ("--limit: '-1': expected an integer >= 1", [*model, "--limit", -1]),
        ("--grid-n: '-1': expected an integer >= 0", [*model, "--grid-n", -1]),
        ("--samples-per-map: '0': expected an integer >= 1", [*model, "--samples-per-map", 0]),
        ("--workers: '-1': expected an integer >= 0", [*model, "--workers", -1]),
        ("model mode needs --data", ["--ckpt", toy["root"] / "tgt.pt"]),
        ("--classes: the classes.txt of --labels maps", [*model, "--classes", tmp_path / "classes.txt"]),
    ]:
        with pytest.raises(DataError, match=match) as e:
            evaluate.main(list(map(str, [*args, "--out", tmp_path / "o"])))
        assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()
    # the finetuned CAT checkpoint itself evaluates (the refusals above are about the extra flags only)
    evaluate.main(list(map(str, ["--ckpt", toy["root"] / "cat.pt", *toy["data"], "--limit", 2, "--grid-n", 0,
                                 "--out", tmp_path / "cat", "--no-fid"])))
    res = json.loads((tmp_path / "cat" / "results.json").read_text())
    assert res["generator"]["kind"] == "oasis-cat" and res["n_fake"] == 2
    assert not (tmp_path / "cat" / "grid.png").exists()


def test_generator_size_must_match_the_real_images(toy, tmp_path):
    """The toy generator makes 32-px images; without --size the toy data is read at 64 px: refused, not
    scored across resolutions."""
    data_flags = [f for f in toy["data"] if f not in ("--size", 32)]
    assert "--size" not in data_flags
    r = run("--ckpt", toy["root"] / "tgt.pt", *data_flags, "--out", tmp_path / "o", "--limit", 2,
            "--fid-features", toy["root"] / "feat.pt")
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error: --ckpt ") and "makes 32x32 images" in r.stderr and "are 64x64" in r.stderr
    assert "pass --size 32" in r.stderr
    assert not (tmp_path / "o").exists()  # refused before generating: nothing written


def test_stale_real_statistics_are_not_reused(toy, tmp_path, capsys):
    """Replacing the validation images under the same names gives new statistics and a new FID."""
    import shutil
    import data
    root = tmp_path / "target"
    shutil.copytree(toy["root"] / "toy/target", root)
    cache = tmp_path / "cache"
    flags = ["--ckpt", toy["root"] / "tgt.pt", "--data", "toy-target", "--data-root", root, "--size", 32,
             "--workers", 0, "--fid-features", toy["root"] / "feat.pt", "--grid-n", 0, "--batch", 5]

    def fid(name, cache_dir=cache):
        capsys.readouterr()
        evaluate.main(list(map(str, [*flags, "--out", tmp_path / name, "--stats-cache", cache_dir])))
        cached = "real statistics: cached" in capsys.readouterr().out
        return json.loads((tmp_path / name / "results.json").read_text())["fid"], cached

    first, cached = fid("a")
    assert not cached and len(list(cache.glob("*.npz"))) == 1
    again, cached = fid("b")
    assert cached and again == first  # unchanged files: the cache is used

    ds = data.open_dataset("toy-target", root, "val", size=32)
    images = [img for img, _ in ds.files]
    for p in images:  # same names, other pictures (colours inverted)
        Image.fromarray(255 - np.asarray(Image.open(p).convert("RGB"))).save(p)
    net = metrics.load_feature_net(fid_features=toy["root"] / "feat.pt")
    fresh = metrics.real_stats(ds, net)[2]
    capsys.readouterr()
    assert np.allclose(metrics.real_stats(ds, net, cache)[2], fresh, rtol=1e-5, atol=1e-7)
    assert "real statistics: cached" not in capsys.readouterr().out
    new, cached = fid("c")
    assert cached  # the entry real_stats just wrote for the new files
    uncached, was_cached = fid("d", "")
    assert not was_cached and new == pytest.approx(uncached, rel=1e-5) and abs(new - first) > 1e-3 * abs(first)
    assert len(list(cache.glob("*.npz"))) == 2


def test_model_mode_piti_checkpoint(toy, tmp_path):
    """A training-free PITI-CAT checkpoint (finetune_piti.py --steps 0, tiny models) through load_piti_generator."""
    import data
    from models.piti import PITI, load_piti_generator
    tiny = dict(model_channels=32, num_res_blocks=1, attention_ds=[2], num_head_channels=16, xf_width=32, xf_heads=4,
                encoder_layers=2, cnn_widths=[8, 8, 16, 16, 32], n_tokens=16, ref_size=64, transformer_proj_in=32)
    configs = {"base": dict(tiny, image_size=16, channel_mult=[1, 2]),
               "up": dict(tiny, image_size=32, channel_mult=[1, 1])}
    torch.manual_seed(0)
    for part, kw in configs.items():  # tiny files in the official key format
        m = PITI(**kw, super_res=part == "up", source_channels=toy["src"].n_channels)
        torch.save({k: v for k, v in m.state_dict().items() if k in m.official_keys()}, tmp_path / f"{part}.pt")
    np.save(tmp_path / "A.npy", np.full((len(toy["tgt"]), len(toy["src"])), 1 / len(toy["src"]), np.float32))
    cmd = [sys.executable, REPO / "finetune_piti.py", "--out", tmp_path / "run", "--steps", 0,
           "--base", tmp_path / "base.pt", "--upsampler", tmp_path / "up.pt",
           "--base-config", json.dumps(configs["base"]), "--up-config", json.dumps(configs["up"]),
           "--source", "toy-source", "--source-root", toy["root"] / "toy/source", "--affinity", tmp_path / "A.npy",
           "--data", "toy-target", "--data-root", toy["root"] / "toy/target", "--size", 32, "--n", 2,
           "--prompts", 2, "--grid-n", 2, "--sample-steps", 4, "--up-steps", 4, "--device", "cpu"]
    r = subprocess.run(list(map(str, cmd)), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "eval"
    r = run("--ckpt", tmp_path / "run/checkpoint.pt", *toy["data"], "--out", out, "--limit", 2,
            "--sample-steps", 4, "--up-steps", 4, "--segmenter", toy["root"] / "seg.pt", "--no-fid", "--batch", 2)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["generator"]["kind"] == "piti-cat" and res["n_fake"] == 2 and 0 <= res["miou"] <= 1
    # each image has its own noise stream: image i of a batch of 2 is the official cascade run on map i alone,
    # seeded by (seed 0, map i, sample 0), so the images do not depend on --batch
    ds = data.open_dataset("toy-target", toy["root"] / "toy/target", "val", size=32)
    gen = load_piti_generator(str(tmp_path / "run/checkpoint.pt"), "cpu", steps="4", up_steps="4", amp="fp32")
    label = torch.stack([ds[0]["label"], ds[1]["label"]])
    for i in range(2):
        with torch.no_grad():
            x = gen(label[i:i + 1], seed=int(np.random.SeedSequence([0, i, 0]).generate_state(1)[0]))
        png = ((x[0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        saved = np.asarray(Image.open(out / "images" / f"{Path(ds[i]['path']).stem}.png"))
        assert saved.shape == (32, 32, 3) and np.abs(saved.astype(int) - png).max() <= 1
    # the official files moved since finetuning: --base/--upsampler give their new place (same images)
    moved = tmp_path / "moved"
    moved.mkdir()
    for part in ("base", "up"):
        (tmp_path / f"{part}.pt").rename(moved / f"{part}.pt")
    r = run("--ckpt", tmp_path / "run/checkpoint.pt", *toy["data"], "--out", tmp_path / "ev2", "--limit", 2,
            "--sample-steps", 4, "--up-steps", 4, "--no-fid")
    assert r.returncode == 1 and "base.pt" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run("--ckpt", tmp_path / "run/checkpoint.pt", *toy["data"], "--out", tmp_path / "ev2", "--limit", 2,
            "--sample-steps", 4, "--up-steps", 4, "--no-fid", "--base", moved / "base.pt", "--upsampler", moved / "up.pt")
    assert r.returncode == 0, r.stderr
    for name in run_folder.recorded_files(tmp_path / "ev2"):
        if name.startswith("images/"):
            assert np.array_equal(np.asarray(Image.open(tmp_path / "ev2" / name)), np.asarray(Image.open(out / name)))
    for part in ("base", "up"):
        (moved / f"{part}.pt").rename(tmp_path / f"{part}.pt")
    # label maps alone (--labels): map i of the folder (by relative path) gets the same per-image noise stream
    maps = label_dir(toy, tmp_path / "maps", 2)
    r = run("--ckpt", tmp_path / "run/checkpoint.pt", "--labels", maps, "--out", tmp_path / "gen", "--workers", 0,
            "--sample-steps", 4, "--up-steps", 4, "--batch", 3)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "gen" / "results.json").read_text())["generator"]["kind"] == "piti-cat"
    assert Image.open(tmp_path / "gen" / "images" / "wide.png").size == (64, 32)
    for i, (rel, lab) in enumerate(maps_in_order(maps)[:2]):
        with torch.no_grad():
            x = gen(lab[None], seed=int(np.random.SeedSequence([0, i, 0]).generate_state(1)[0]))
        png = ((x[0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        assert np.abs(np.asarray(Image.open(tmp_path / "gen" / "images" / rel)).astype(int) - png).max() <= 1
    # one protocol for a 2:1 dataset (Cityscapes: 256x512 against PITI's square samples): evaluate.py resizes its
    # samples exactly as finetune_piti.py's validation sampler does (metrics.resize_images)
    import argparse
    import types
    args = argparse.Namespace(ckpt=str(tmp_path / "run/checkpoint.pt"), sample_steps="4", up_steps="4", base=None,
                              upsampler=None, affinity=None, source=None, source_root=None, which="best")
    wide = types.SimpleNamespace(size=(32, 64), dataset="toy-target", classes=toy["tgt"], n_channels=toy["tgt"].n_channels)
    sample, info = evaluate.load_generator(args, wide, wide.size, "cpu", "fp32")
    seed = int(np.random.SeedSequence([0, 1, 0]).generate_state(1)[0])
    with torch.no_grad():
        y = sample(label[1:], [seed])
    assert y.shape[-2:] == (32, 64) and "resized to 32x64" in info["resize"]
    assert torch.equal(y, metrics.resize_images(x, (32, 64)))


# ----------------------------------------------------------------------------------------------
# Images from label maps alone (--labels), and what evaluate.py may write and delete


def label_dir(toy, folder, n=None):
    """The toy target's validation label maps in two subfolders (a/, b/), with its classes.txt; plus one map at
    twice the width (nearest), which gets an image of its own 32x64 size."""
    import shutil
    labels = sorted((toy["root"] / "toy/target/val/labels").glob("*.png"))[:n]
    for i, p in enumerate(labels):
        (folder / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, folder / "ab"[i % 2] / p.name)
    wide = Image.open(labels[0])
    wide.resize((64, 32), Image.NEAREST).save(folder / "wide.png")
    shutil.copy(toy["root"] / "toy/target/classes.txt", folder / "classes.txt")
    return folder


def maps_in_order(folder):
    """The maps as evaluate.py numbers them (by relative path) -> [(relative path, channel ids)]."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    return [(r, torch.from_numpy(np.asarray(Image.open(folder / r)).astype(np.int64))) for r in files]


def test_labels_mode_oasis_models(toy, tmp_path):
    """--labels with our OASIS checkpoints (own classes, a finetuned CAT layout), an OASIS source through --source
    (its own classes) and training-free CAT: one image per map at the map's size, under its relative path,
    the documented seeding, the same images whatever --batch; no metric."""
    maps = label_dir(toy, tmp_path / "maps")
    order = maps_in_order(maps)
    assert [r for r, _ in order][:2] == ["a/" + order[0][0][2:], "a/" + order[1][0][2:]]

    def generate(name, *model, batch=2, k=1):
        r = run(*model, "--labels", maps, "--out", tmp_path / name, "--batch", batch, "--samples-per-map", k,
                "--workers", 0, "--grid-n", 2)
        assert r.returncode == 0, r.stderr
        return json.loads((tmp_path / name / "results.json").read_text())

    res = generate("tgt", "--ckpt", toy["root"] / "tgt.pt", batch=3, k=2)
    assert res["mode"] == "labels" and res["n_maps"] == len(order) == 6 and res["n_fake"] == 12
    assert res["classes"] == toy["tgt"].names and "fid" not in res and "miou" not in res
    assert res["outputs"]["wide.png"] == ["images/wide_0.png", "images/wide_1.png"]
    for i, (rel, label) in enumerate(order):
        for k in range(2):
            saved = np.asarray(Image.open(tmp_path / "tgt" / "images" / f"{rel[:-4]}_{k}.png"))
            assert saved.shape[:2] == label.shape  # the map's own size (wide.png: 32x64)
            if label.shape == (32, 32):
                png, _ = expected_png(toy["G_tgt"], label, toy["tgt"].n_channels, i, k)
                assert np.abs(saved.astype(int) - png).max() <= 1 and (saved == png).mean() > 0.99
    assert Image.open(tmp_path / "tgt" / "grid.png").size[0] == 3 * 34  # labels | 2 samples, no real column
    one = generate("tgt1", "--ckpt", toy["root"] / "tgt.pt", batch=1, k=2)
    for name in (n for ns in one["outputs"].values() for n in ns):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "tgt1" / name)), np.asarray(Image.open(tmp_path / "tgt" / name)))

    assert generate("cat", "--ckpt", toy["root"] / "cat.pt")["generator"]["kind"] == "oasis-cat"
    src, tgt = toy["src"], toy["tgt"]
    pick = np.arange(len(tgt)) % len(src)  # a hard affinity: target class t -> source class pick[t]
    np.save(tmp_path / "A.npy", np.eye(len(src), dtype=np.float32)[pick])
    source = ["--source", "toy-source", "--source-root", toy["root"] / "toy/source"]
    res = generate("free", "--ckpt", toy["root"] / "src.pt", *source, "--affinity", tmp_path / "A.npy")
    assert res["generator"]["kind"] == "oasis-training-free"
    lut = torch.zeros(tgt.n_channels, dtype=torch.long)
    lut[torch.tensor(tgt.channels)] = torch.tensor([src.channels[j] for j in pick])
    for i, (rel, label) in enumerate(order[:2]):
        png, _ = expected_png(toy["G_src"], lut[label], src.n_channels, i)
        saved = np.asarray(Image.open(tmp_path / "free" / "images" / rel))
        assert np.abs(saved.astype(int) - png).max() <= 1 and (saved == png).mean() > 0.99

    # the source model in its own label space (--source without --affinity): maps of the source's classes
    src_maps = tmp_path / "src_maps"
    src_maps.mkdir()
    for i, p in enumerate(sorted((toy["root"] / "toy/source/val/labels").glob("*.png"))):
        Image.open(p).save(src_maps / p.name)
    (src_maps / "classes.txt").write_text((toy["root"] / "toy/source/classes.txt").read_text())
    r = run("--ckpt", toy["root"] / "src.pt", *source, "--labels", src_maps, "--out", tmp_path / "own", "--workers", 0)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "own" / "results.json").read_text())
    first = maps_in_order(src_maps)[0]
    png, _ = expected_png(toy["G_src"], first[1], src.n_channels, 0)
    saved = np.asarray(Image.open(tmp_path / "own" / "images" / first[0]))
    assert res["generator"]["kind"] == "oasis" and np.abs(saved.astype(int) - png).max() <= 1


def test_labels_mode_refusals(toy, tmp_path):
    """Every map is checked before the first image: one line naming the file, nothing written to --out."""
    out = tmp_path / "out"
    tgt = ["--ckpt", toy["root"] / "tgt.pt", "--workers", 0]

    def refused(folder, *match, extra=()):  # in-process (fast); the command line's one line: the RGB case below
        with pytest.raises(DataError) as e:
            evaluate.main(list(map(str, [*tgt, "--labels", folder, "--out", out, *extra])))
        for m in match:
            assert m in str(e.value), (m, str(e.value))
        assert "\n" not in str(e.value) and not out.exists()

    def maps(name, n=3):
        return label_dir(toy, tmp_path / name, n)

    refused(tmp_path / "nope", "--labels", "nope", "no such folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "classes.txt").write_text((toy["root"] / "toy/target/classes.txt").read_text())
    refused(empty, "no .png label maps found")
    m = maps("rgb")
    Image.open(m / "wide.png").convert("RGB").save(m / "b" / "colour.png")
    refused(m, "colour.png", "mode-RGB", "palette PNG")
    r = run(*tgt, "--labels", m, "--out", out)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "colour.png" in r.stderr and "Traceback" not in r.stderr and not out.exists()
    m = maps("past")
    Image.fromarray(np.full((32, 32), 10, np.uint8)).save(m / "a" / "ten.png")
    refused(m, "ten.png", "value 10", "outside the 9 classes", "0..9")
    m = maps("bit")  # a 1-bit mask is a valid map of ids 0 and 1
    Image.fromarray(np.eye(32, dtype=bool)).save(m / "b" / "mask.png")
    evaluate.main(list(map(str, [*tgt, "--labels", m, "--out", tmp_path / "bit_out", "--grid-n", 0])))
    assert (tmp_path / "bit_out" / "images" / "b" / "mask.png").is_file()
    m = maps("broken")
    (m / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    refused(m, "broken.png", "unreadable image")
    classes = (toy["root"] / "toy/target/classes.txt").read_text().splitlines()
    m = maps("reordered")
    (m / "classes.txt").write_text("\n".join([classes[1], classes[0], *classes[2:]]) + "\n")
    refused(m, "classes.txt has the classes of --ckpt", "another order", f"class 1 is '{classes[0]}'")
    m = maps("fewer")
    (m / "classes.txt").write_text("\n".join(classes[:-1]) + "\n")
    refused(m, "classes.txt has 8 classes", f"class 9 is '{classes[-1]}'")
    m = maps("noclasses")
    (m / "classes.txt").unlink()
    refused(m, "noclasses/classes.txt", "expected a classes.txt")
    refused(maps("flags"), "--data, --inception: not used with --labels", extra=["--data", "toy-target", "--inception",
                                                                              "x.pth"])


def test_labels_mode_minimum_size(toy, tmp_path):
    """A map smaller than the model's first feature grid is refused (a generator built for 64 px: 2x2)."""
    from models.oasis import Generator
    torch.manual_seed(0)
    G = Generator(toy["tgt"].n_channels, z_dim=4, channels=2, spade_hidden=8, crop_size=64).eval()
    torch.save(our_checkpoint(G, toy["tgt"]), tmp_path / "g64.pt")
    m = label_dir(toy, tmp_path / "maps", 2)
    Image.fromarray(np.ones((1, 5), np.uint8)).save(m / "a" / "strip.png")
    r = run("--ckpt", tmp_path / "g64.pt", "--labels", m, "--out", tmp_path / "out", "--workers", 0)
    assert r.returncode == 1 and "strip.png: 5x1 pixels, smaller than the model's minimum 2x2" in r.stderr
    assert not (tmp_path / "out").exists()


def test_out_never_an_input_and_reruns_remove_only_their_own_files(toy, tmp_path, image_dirs):
    """--out equal to, inside or around an input folder is refused before anything is written (the dataset's PNGs
    survive --out <data root>; F inside O is refused and intact); a rerun removes exactly the files its earlier
    run listed in its manifest (models/run.py), never a file it did not write."""
    import shutil
    root = tmp_path / "target"
    shutil.copytree(toy["root"] / "toy/target", root)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    model = ["--ckpt", toy["root"] / "tgt.pt", "--data", "toy-target", "--size", 32, "--workers", 0, "--no-fid"]
    for out, how in ((root, "is --data-root"), (root / "val", "lies inside --data-root"),
                     (tmp_path, "contains --data-root")):
        with pytest.raises(DataError, match=f"--out {out}: {how}"):
            evaluate.main(list(map(str, [*model, "--data-root", root, "--out", out])))
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    real, fake = image_dirs
    folders = tmp_path / "folders"
    shutil.copytree(real, folders / "real")
    shutil.copytree(fake, folders / "fake")
    kept = sorted((folders / "fake").iterdir())
    r = run("--real-dir", folders / "real", "--fake-dir", folders / "fake", "--out", folders, "--fid-features",
            toy["root"] / "feat.pt")
    assert r.returncode == 1 and "contains --real-dir" in r.stderr and sorted((folders / "fake").iterdir()) == kept
    maps = label_dir(toy, tmp_path / "maps", 2)
    with pytest.raises(DataError, match="lies inside --labels"):
        evaluate.main(list(map(str, ["--ckpt", toy["root"] / "tgt.pt", "--labels", maps, "--out", maps / "gen"])))
    assert not (maps / "gen").exists()
    from conftest import golden_path
    sq = golden_path("oasis", "sq")  # an official OASIS run folder: an input like any other
    with pytest.raises(DataError, match="lies inside --ckpt"):
        evaluate.main(list(map(str, ["--ckpt", sq, "--source", "ade20k", "--labels", maps, "--out", sq / "gen"])))
    assert not (sq / "gen").exists()

    out = tmp_path / "ev"
    (out / "images").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(out / "images" / "mine.png")  # the user's file, in the folder evaluate.py writes
    data = [*model, "--data-root", root, "--limit", 3, "--out", out]
    evaluate.main(list(map(str, [*data, "--samples-per-map", 2])))
    first = run_folder.recorded_files(out)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(["mine.png"] + [Path(f).name for f in first
                                                                                        if f.startswith("images/")])
    evaluate.main(list(map(str, [*data, "--grid-n", 0])))  # one sample per map now: the _0/_1 files go
    names = sorted(p.name for p in (out / "images").iterdir())
    assert len(names) == 4 and "mine.png" in names and not any("_1" in n for n in names)
    assert not (out / "grid.png").exists()  # listed by the first run, not written by the second
    res = json.loads((out / "results.json").read_text())
    assert res["provenance"]["command"].startswith("evaluate.py --ckpt") and "torch" in res["provenance"]["versions"]
    assert any("no segmenter given" in w for w in res["warnings"]) and res["generator"]["step"] == 0


def test_checkpoint_classes_against_the_data(toy, tmp_path):
    """The checkpoint's class names against --data's, by name and order: a classes.txt reordered since training is
    refused naming the first difference; a checkpoint without names (an older run) is evaluated with a note; the
    warnings printed (here: a folder without train/ and val/, so val = train) are recorded in results.json."""
    import shutil
    root = tmp_path / "target"
    shutil.copytree(toy["root"] / "toy/target/val", root)  # images/ + labels/ without splits
    names = toy["tgt"].names
    (root / "classes.txt").write_text("\n".join([names[0], names[2], names[1], *names[3:]]) + "\n")
    flags = ["--data", "folder", "--data-root", root, "--size", 32, "--workers", 0, "--no-fid", "--limit", 2]
    r = run("--ckpt", toy["root"] / "tgt.pt", *flags, "--out", tmp_path / "o")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert f"--data folder has the classes of --ckpt {toy['root'] / 'tgt.pt'} in another order: class 2 is " \
           f"'{names[1]}' in --ckpt" in r.stderr and not (tmp_path / "o").exists()
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    old = torch.load(toy["root"] / "tgt.pt", weights_only=True)
    old["target"] = {k: v for k, v in old["target"].items() if k != "names"}
    torch.save(old, tmp_path / "old.pt")
    r = run("--ckpt", tmp_path / "old.pt", *flags, "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert "records no class names" in r.stdout and any("records no class names" in w for w in res["warnings"])
    assert any(w.startswith("warning: --data-root") and "val split is the training images" in w
               for w in res["warnings"]), res["warnings"]


def test_help_groups_flags_by_mode_and_shows_defaults(capsys, monkeypatch):
    """--help: every flag explained, grouped by mode, every default shown; --data has none (no silent toy data)."""
    made = []

    class Recording(evaluate.ArgumentParser):  # the parser evaluate.py builds, kept for a look at its flags
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(evaluate, "ArgumentParser", Recording)
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    text = capsys.readouterr().out
    flags = [a for a in made[0]._actions if a.option_strings and a.dest != "help"]
    assert len(flags) > 30 and all(a.help for a in flags), [a.dest for a in flags if not a.help]
    assert next(a for a in flags if a.dest == "data").default is None
    for group in ("every mode:", "PITI checkpoints", "label maps alone (--labels)", "evaluation data (model mode",
                  "FID and KID", "mIoU (model mode):", "two folders of images"):
        assert group in text, group
    for default in ("(default: 16)", "(default: 0)", "(default: 8)", "(default: auto)", "(default: best)",
                    "(default: val)"):
        assert default in text, default
    assert "(default: None)" not in text and "(default: False)" not in text


def test_source_model_classes_against_its_source_root(toy, tmp_path):
    """Training-free mode with a source model of ours: its recorded class names against --source-root's
    classes.txt, by name and order (a source dataset reordered since the source model was trained is refused)."""
    import shutil
    import data
    root = tmp_path / "source"
    shutil.copytree(toy["root"] / "toy/source", root)
    (tmp_path / "run").mkdir()  # the source model's run folder (no --out may lie inside it)
    torch.save(our_checkpoint(toy["G_src"], data.class_table("folder", root)), tmp_path / "run" / "src.pt")
    np.save(tmp_path / "A.npy", np.full((len(toy["tgt"]), len(toy["src"])), 1 / len(toy["src"]), np.float32))
    names = (root / "classes.txt").read_text().splitlines()
    (root / "classes.txt").write_text("\n".join([names[1], names[0], *names[2:]]) + "\n")
    flags = ["--ckpt", tmp_path / "run" / "src.pt", "--source", "folder", "--source-root", root, "--affinity",
             tmp_path / "A.npy", *toy["data"], "--no-fid", "--limit", 2]
    with pytest.raises(DataError, match=f"--source folder has the classes of --ckpt .* in another order: class 1 is "
                                        f"'{names[0]}'"):
        evaluate.main(list(map(str, [*flags, "--out", tmp_path / "o"])))
    assert not (tmp_path / "o").exists()
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    evaluate.main(list(map(str, [*flags, "--out", tmp_path / "o"])))
    assert json.loads((tmp_path / "o" / "results.json").read_text())["generator"]["kind"] == "oasis-training-free"
