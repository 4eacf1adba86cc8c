"""The official weight files the toolkit loads, by name: where each comes from, how it is checked, and
`fetch(name)`, which finds it in the torch hub cache or downloads it there once (as pytorch-fid and
torch.hub do). A path given by the user is always used as is and never touches the network.

    fetch('fid_inception')               -> <torch hub dir>/checkpoints/pt_inception-2015-12-05-6726825d.pth
    fetch('fid_inception', 'my/file.pth') -> my/file.pth (no network, no hash check)
    resolve('dino_vits16', '--dino-weights') -> a cached/downloaded file; resolve('x.pth', ...) -> 'x.pth'

Verification: a published sha256 (CLIP's URLs embed theirs) is checked in full; files named in torch.hub's
`name-<hex>.ext` convention (pytorch-fid's Inception: 6726825d) carry the first hex digits of their sha256,
which is what torch.hub's check_hash compares; files without a published hash (DINO, UperNet) are checked
by their loaders' strict key and shape tests only. Every failure is one DataError line saying which file
to get, from where, and where to put it. CAT_WEIGHTS_MIRROR=URL (http://, https:// or file://) fetches
the same file names from a mirror instead (a cluster without internet, the tests).
"""
import hashlib
import os
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from models import DataError, no_file

TIMEOUT = 20  # seconds for name lookup, connect and each read: offline fails fast instead of hanging


@dataclass(frozen=True)
class Weight:
    file: str  # the official file name, kept in the cache
    url: str | None  # a direct link, or None: download by hand
    source: str  # where a person finds it
    sha256: str | None = None  # full published digest, or the hex prefix in the file name
    flag: str = ""  # the command-line flag that takes the file

    @property
    def digest(self):
        """The published sha256, or the torch.hub-style prefix in the file name ('name-6726825d.pth')."""
        if self.sha256:
            return self.sha256
        stem = self.file.rsplit(".", 1)[0]
        tail = stem.rsplit("-", 1)[-1] if "-" in stem else ""
        return tail if len(tail) >= 8 and all(c in "0123456789abcdef" for c in tail) else None


_DINO = "https://dl.fbaipublicfiles.com/dino/{0}/{0}.pth"
_UPERNET = "http://sceneparsing.csail.mit.edu/model/pytorch/ade20k-resnet101-upernet/{}_epoch_50.pth"
_CLIP = "https://openaipublic.azureedge.net/clip/models/{}/ViT-B-32.pt"
_CLIP_SHA = "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"  # clip-anytorch's _MODELS['ViT-B/32']

WEIGHTS = {
    "fid_inception": Weight(
        "pt_inception-2015-12-05-6726825d.pth",
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
        "the 'fid_weights' release of mseitzer/pytorch-fid on GitHub", flag="--inception"),
    **{name: Weight(f"{stem}.pth", _DINO.format(stem), f"the facebookresearch/dino README ({name})",
                    flag="--dino-weights")
       for name, stem in (("dino_vits16", "dino_deitsmall16_pretrain"), ("dino_vits8", "dino_deitsmall8_pretrain"),
                          ("dino_vitb16", "dino_vitbase16_pretrain"), ("dino_vitb8", "dino_vitbase8_pretrain"))},
    "clip_vitb32": Weight("ViT-B-32.pt", _CLIP.format(_CLIP_SHA), "OpenAI CLIP (the URL list in clip/clip.py)",
                          sha256=_CLIP_SHA, flag="--clip-weights"),
    "upernet101_encoder": Weight("encoder_epoch_50.pth", _UPERNET.format("encoder"),
                                 "CSAILVision/semantic-segmentation-pytorch, ade20k-resnet101-upernet",
                                 flag="--segmenter-weights"),
    "upernet101_decoder": Weight("decoder_epoch_50.pth", _UPERNET.format("decoder"),
                                 "CSAILVision/semantic-segmentation-pytorch, ade20k-resnet101-upernet",
                                 flag="--segmenter-weights"),
    "deeplabv2_cocostuff": Weight("deeplabv2_resnet101_msc-cocostuff164k-100000.pth", None,
                                  "the kazuto1011/deeplab-pytorch README (COCO-Stuff 164k, 'caffemodel' converted)",
                                  flag="--segmenter-weights"),
    "drn105_cityscapes": Weight("drn-d-105_ms_cityscapes.pth", None, "the fyu/drn README (DRN-D-105, Cityscapes)",
                                flag="--segmenter-weights"),
}


def cache_dir():
    """Where downloads go: torch.hub's own checkpoint folder ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _by_hand(w, why):
    where = f"from {w.url}" if w.url else f"by hand from {w.source}"
    return (f"{w.file}: {why}; download it {where} and put it in {cache_dir()}"
            + (f" (or pass its path with {w.flag})" if w.flag else ""))


def by_hand_missing(name):
    """The one line saying what to get, when weight `name` has no download link and is not in the cache yet
    (a run can refuse before it spends time on anything else); None when fetch(name) can work."""
    w = WEIGHTS[name]
    return None if w.url is not None or (cache_dir() / w.file).is_file() else _by_hand(w, "has no direct download link")


def _url(w):
    mirror = os.environ.get("CAT_WEIGHTS_MIRROR")
    return f"{mirror.rstrip('/')}/{w.file}" if mirror else w.url


def _lookup(host):
    """getaddrinfo with a deadline (a resolver without a network can stall for minutes)."""
    result = {}

    def run():
        try:
            result["ok"] = socket.getaddrinfo(host, None)
        except OSError as e:
            result["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(TIMEOUT)
    if "ok" not in result:
        raise urllib.error.URLError(result.get("error", f"name lookup of {host} timed out after {TIMEOUT} s"))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, dest, progress=True):
    """url -> dest (a temporary name next to it), with a tqdm bar; raises OSError / URLError."""
    host = urllib.parse.urlparse(url).hostname
    if host:
        _lookup(host)
    with urllib.request.urlopen(url, timeout=TIMEOUT) as src, open(dest, "wb") as out:
        size = src.headers.get("Content-Length")
        with tqdm(total=int(size) if size else None, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=Path(dest).name.removesuffix(".part"), disable=not progress) as bar:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                out.write(chunk)
                bar.update(len(chunk))


def fetch(name, path=None, progress=True):
    """The local file of weight `name`: `path` as is when given; else the cached copy; else downloaded once
    into cache_dir(), hash-checked, moved into place atomically. Offline / mismatch: one DataError line."""
    if path is not None:
        return Path(path)
    if name not in WEIGHTS:
        raise DataError(f"weights '{name}': unknown name; known: {', '.join(WEIGHTS)}")
    w = WEIGHTS[name]
    dest = cache_dir() / w.file
    if dest.is_file():
        return dest
    missing = by_hand_missing(name)
    if missing:
        raise DataError(missing)
    url = _url(w)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(_by_hand(w, f"cannot create the cache folder ({e.strerror})"))
    part = dest.with_name(f"{w.file}.{os.getpid()}.part")
    print(f"downloading {w.file} from {url} to {cache_dir()}", flush=True)
    try:
        download(url, part, progress)
    except (OSError, ValueError, urllib.error.URLError) as e:
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        reason = str(reason).splitlines()[0][:120] if str(reason) else type(e).__name__
        raise DataError(_by_hand(w, f"cannot download {'it' if url == w.url else url} ({reason})"))
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if w.digest:
        got = sha256(part)
        if not got.startswith(w.digest):
            part.unlink(missing_ok=True)
            raise DataError(_by_hand(w, f"the download from {url} has sha256 {got[:16]}..., expected "
                                        f"{w.digest[:16]}... (removed; a proxy page or a truncated transfer?)"))
    os.replace(part, dest)
    return dest


def resolve(value, flag):
    """A flag that takes a file or a known weight name -> a local path (names fetched, paths untouched)."""
    if value is None:
        return None
    if str(value) in WEIGHTS and not os.path.exists(str(value)):
        w = WEIGHTS[str(value)]
        if w.flag and w.flag != flag:
            raise DataError(f"{flag} {value}: these are the weights of {w.flag}, not of {flag}")
        return fetch(str(value))
    if Path(value).is_dir():
        raise DataError(f"{flag} {value}: {no_file(value)}")
    return Path(value)


def names(flag):
    """The weight names a flag accepts (for help texts)."""
    return [n for n, w in WEIGHTS.items() if w.flag == flag]
