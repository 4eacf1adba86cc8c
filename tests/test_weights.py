"""models/weights.py: weights by name, cached in the torch hub folder, verified; the real download code
runs against an HTTP server on 127.0.0.1 and file:// URLs (never the internet)."""
import hashlib
import http.server
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import DataError, weights
from models.weights import Weight

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = b"not really weights, but bytes with a known digest\n" * 100
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub folder for this test."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.delenv("CAT_WEIGHTS_MIRROR", raising=False)
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture
def server():
    """A local HTTP server: files {name: bytes}; `hits` counts the requests."""
    files, hits = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            body = files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", files, hits
    srv.shutdown()
    srv.server_close()


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused at once
    return port


def register(monkeypatch, name, **kw):
    monkeypatch.setitem(weights.WEIGHTS, name, Weight(**{"source": "the test", "flag": "--x", **kw}))


def test_download_once_then_cache_hit(hub, server, monkeypatch):
    url, files, hits = server
    files["tiny.pth"] = PAYLOAD
    register(monkeypatch, "tiny", file="tiny.pth", url=f"{url}/tiny.pth", sha256=DIGEST)
    path = weights.fetch("tiny", progress=False)
    assert path == hub / "tiny.pth" and path.read_bytes() == PAYLOAD and len(hits) == 1
    assert weights.fetch("tiny") == path and len(hits) == 1  # cache hit: no second download
    assert not list(hub.glob("*.part"))


def test_hash_prefix_in_the_file_name(hub, server, monkeypatch):
    """torch.hub's convention: name-<first hex digits of the sha256>.ext is checked by that prefix."""
    url, files, hits = server
    good, bad = f"w-{DIGEST[:8]}.pth", "w-0123abcd.pth"
    files[good] = files[bad] = PAYLOAD
    register(monkeypatch, "good", file=good, url=f"{url}/{good}")
    register(monkeypatch, "bad", file=bad, url=f"{url}/{bad}")
    assert weights.WEIGHTS["good"].digest == DIGEST[:8]
    assert weights.fetch("good", progress=False).read_bytes() == PAYLOAD
    with pytest.raises(DataError) as e:
        weights.fetch("bad", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and bad in msg and "expected 0123abcd" in msg and str(hub) in msg
    assert not (hub / bad).exists() and not list(hub.glob("*.part"))  # the bad download is removed


def test_full_sha256_mismatch_removes_the_file(hub, server, monkeypatch):
    url, files, _ = server
    files["x.pth"] = PAYLOAD + b"tampered"
    register(monkeypatch, "x", file="x.pth", url=f"{url}/x.pth", sha256=DIGEST)
    with pytest.raises(DataError, match=r"x.pth: the download .* has sha256 .* expected "):
        weights.fetch("x", progress=False)
    assert not list(hub.iterdir())


def test_unreachable_url_is_one_line_naming_file_and_cache(hub, monkeypatch):
    register(monkeypatch, "far", file="far.pth", url=f"http://127.0.0.1:{closed_port()}/far.pth", flag="--inception")
    t0 = time.time()
    with pytest.raises(DataError) as e:
        weights.fetch("far", progress=False)
    msg = str(e.value)
    assert time.time() - t0 < 10 and "\n" not in msg
    assert msg.startswith("far.pth: cannot download") and f"put it in {hub}" in msg and "--inception" in msg
    assert not hub.exists() or not list(hub.iterdir())


def test_name_lookup_that_stalls_gives_up_after_the_timeout(hub, monkeypatch):
    register(monkeypatch, "slow", file="slow.pth", url="https://weights.example/slow.pth")
    monkeypatch.setattr(weights, "TIMEOUT", 0.3)
    monkeypatch.setattr(weights.socket, "getaddrinfo", lambda *a, **k: time.sleep(30))
    t0 = time.time()
    with pytest.raises(DataError, match="slow.pth: cannot download .*timed out"):
        weights.fetch("slow", progress=False)
    assert time.time() - t0 < 5


def test_file_url_and_mirror(hub, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "m.pth").write_bytes(PAYLOAD)
    register(monkeypatch, "m", file="m.pth", url="https://unused.example/m.pth", sha256=DIGEST)
    monkeypatch.setenv("CAT_WEIGHTS_MIRROR", mirror.as_uri())
    assert weights.fetch("m", progress=False).read_bytes() == PAYLOAD
    register(monkeypatch, "gone", file="gone.pth", url="https://unused.example/gone.pth")
    with pytest.raises(DataError, match="gone.pth: cannot download file://"):
        weights.fetch("gone", progress=False)


def test_given_path_never_touches_the_network(hub, monkeypatch, tmp_path):
    def no_network(*a, **k):
        raise AssertionError("network used")
    monkeypatch.setattr(weights, "download", no_network)
    assert weights.fetch("fid_inception", tmp_path / "mine.pth") == tmp_path / "mine.pth"
    assert weights.resolve(str(tmp_path / "mine.pth"), "--inception") == tmp_path / "mine.pth"
    assert weights.resolve(None, "--inception") is None
    (hub).mkdir(parents=True)
    (hub / weights.WEIGHTS["dino_vits16"].file).write_bytes(b"cached")
    assert weights.resolve("dino_vits16", "--dino-weights") == hub / "dino_deitsmall16_pretrain.pth"


def test_names_flags_and_files_without_a_link(hub):
    with pytest.raises(DataError, match="unknown name; known: fid_inception"):
        weights.fetch("nope")
    with pytest.raises(DataError, match="--inception dino_vits16: these are the weights of --dino-weights"):
        weights.resolve("dino_vits16", "--inception")
    with pytest.raises(DataError) as e:
        weights.fetch("drn105_cityscapes")
    assert "no direct download link; download it by hand from the fyu/drn README" in str(e.value)
    assert str(hub) in str(e.value)
    assert weights.names("--dino-weights") == ["dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8"]


def test_registry_matches_the_reference_packages():
    from importlib.util import find_spec
    fid = weights.WEIGHTS["fid_inception"]
    assert fid.digest == "6726825d" and fid.file == "pt_inception-2015-12-05-6726825d.pth"
    from pytorch_fid.inception import FID_WEIGHTS_URL
    assert fid.url == FID_WEIGHTS_URL
    spec = find_spec("clip")  # clip-anytorch; read its URL list without importing it
    text = (Path(spec.origin).parent / "clip.py").read_text()
    url = re.search(r'"ViT-B/32": "([^"]+)"', text).group(1)
    clip = weights.WEIGHTS["clip_vitb32"]
    assert clip.url == url and clip.sha256 == url.split("/")[-2] and clip.digest == clip.sha256
    assert all(w.url is None or w.url.split("/")[-1] == w.file for w in weights.WEIGHTS.values())
    assert weights.WEIGHTS["dino_vits16"].url == \
        "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"


def test_feature_net_by_default_from_the_cache(hub):
    """metrics.load_feature_net() without a file reads the cached Inception (no network), as pytorch-fid."""
    import metrics
    from models.inception import FIDInception
    hub.mkdir(parents=True)
    torch.manual_seed(0)
    net = FIDInception()
    torch.save(net.state_dict(), hub / metrics.INCEPTION_FILE)
    loaded = metrics.load_feature_net()
    assert torch.equal(loaded.fc.weight, net.fc.weight) and loaded.tag.startswith("inception-")
    assert torch.equal(metrics.load_feature_net(inception="fid_inception").fc.weight, net.fc.weight)


def test_evaluate_offline_without_inception_is_one_line(tmp_path):
    for d in ("real", "fake"):
        (tmp_path / d).mkdir()
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / d / f"{i}.png")
    env = {"TORCH_HOME": str(tmp_path / "th"), "CAT_WEIGHTS_MIRROR": f"http://127.0.0.1:{closed_port()}",
           "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    t0 = time.time()
    r = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--real-dir", tmp_path / "real", "--fake-dir",
                        tmp_path / "fake", "--out", tmp_path / "o", "--workers", "0"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pt_inception-2015-12-05-6726825d.pth: cannot download" in lines[0]
    assert str(tmp_path / "th" / "hub" / "checkpoints") in lines[0] and "mseitzer/pytorch-fid" in lines[0]
    assert time.time() - t0 < 60


def test_dino_and_clip_by_name(hub):
    """--dino-weights NAME reads the cached backbone; a name of another flag is refused in one line."""
    from models.dino import ViT, load_dino
    hub.mkdir(parents=True)
    torch.manual_seed(0)
    vit = ViT(dim=64, depth=1, patch=16, n_pos=197)
    torch.save(vit.state_dict(), hub / "dino_deitsmall8_pretrain.pth")
    loaded = load_dino("dino_vits8")
    assert torch.equal(loaded.pos_embed, vit.pos_embed) and loaded.kwargs["patch"] == 16
    from models.text import load_clip
    with pytest.raises(DataError, match="--clip-weights fid_inception: these are the weights of --inception"):
        load_clip("fid_inception", "cpu")


def test_segmenter_weights_by_name(hub):
    """--segmenter-weights NAME: a file without a direct link is one line saying where to get it by hand."""
    import metrics
    with pytest.raises(DataError) as e:
        metrics.load_segmenter(None, "cpu", ["drn105_cityscapes"], "cityscapes")
    msg = str(e.value)
    assert msg.startswith("drn-d-105_ms_cityscapes.pth: has no direct download link; download it by hand from the "
                          "fyu/drn README") and str(hub) in msg and "\n" not in msg
    assert weights.WEIGHTS["upernet101_encoder"].url.endswith("ade20k-resnet101-upernet/encoder_epoch_50.pth")
