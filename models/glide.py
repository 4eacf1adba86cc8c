"""GLIDE -> PITI: the official way a PITI model starts from GLIDE's released files (pretrain_piti.py).

PITI released only COCO-Stuff models; a PITI source for another label space (ADE20K, a folder dataset) is
trained from GLIDE (openai/glide-text2im), and this module builds the model that training starts from:

  decoder   GLIDE's base.pt / upsample.pt loaded UNCHANGED into `model.decoder` after the official key filter
            (the text tower `transformer.*` is dropped but `transformer_proj` kept, and `padding_embedding`,
            `positional_embedding`, `token_embedding`, `final_ln` are dropped), with strict keys.
  encoder   fresh (PyTorch default init; cls token and positions, which the official code leaves as
            uninitialised `th.empty`, get N(0, width^-1/2) and N(0, 0.01)), or an encoder file: an official
            stage-1 file (encoder keys without prefix) or a full PITI file (its `encoder.*` keys).
  export    `official_state`: a model as the official flat file (`encoder.*`, `decoder.*`) that --base reads.

The training loss and the timestep samplers are in models/diffusion.py. Checked against the official code's
GLIDE loading and training step in tests/test_piti_glide.py.
"""

import torch

from models import DataError, piti
from models.state_dict import load_strict, read_state_dict


class CheckpointError(DataError):
    """A GLIDE / encoder file that cannot be used; the message is one line naming the file and the fix."""


# GLIDE's text tower: the keys the official training removes before loading GLIDE into the decoder
GLIDE_TEXT_PREFIXES = ("padding_embedding", "positional_embedding", "token_embedding", "final_ln")


def glide_decoder_state(sd):
    """The official filter: GLIDE state dict -> the decoder's (text tower out, transformer_proj kept)."""
    return {k: v for k, v in sd.items()
            if not (k.startswith("transformer") and "transformer_proj" not in k) and not k.startswith(GLIDE_TEXT_PREFIXES)}


def read_flat(path, what, fix):
    """A flat {name: tensor} file, weights_only; CheckpointError otherwise."""
    try:
        return read_state_dict(path, None, f"a flat state dict of tensors ({what})", fix=fix)
    except DataError as e:
        raise CheckpointError(str(e)) from None


GLIDE_FIX = "pass GLIDE's base.pt (base) or upsample.pt (upsampler) from openai/glide-text2im"


def load_glide_decoder(model, path_or_sd, path=None):
    """Put a GLIDE checkpoint into `model.decoder` exactly as the official training does (filter, strict); -> dropped keys."""
    path = path or (path_or_sd if isinstance(path_or_sd, str) else "GLIDE state dict")
    sd = read_flat(path_or_sd, "GLIDE checkpoint", GLIDE_FIX) if isinstance(path_or_sd, str) else path_or_sd
    if any(k.startswith(("encoder.", "decoder.")) for k in sd):
        raise CheckpointError(f"{path}: is a PITI checkpoint (encoder./decoder. keys), not a GLIDE one; "
                              f"use it as finetune_piti.py --base/--upsampler")
    kept = glide_decoder_state(sd)
    dropped = sorted(k for k in sd if k not in kept)
    sd = kept
    first = sd.get("input_blocks.0.0.weight")
    want_in = 6 if model.super_res else 3
    if first is not None and first.dim() == 4 and first.shape[1] != want_in:
        found = "upsample.pt (an upsampler)" if first.shape[1] == 6 else "base.pt (a base model)"
        raise CheckpointError(f"{path}: is GLIDE's {found}; expected the {'upsampler' if model.super_res else 'base'} "
                              f"file ({GLIDE_FIX})")
    try:
        load_strict(model.decoder, {k: v.float() for k, v in sd.items()}, path,
                    "GLIDE weights for this decoder configuration",
                    hint="check --base-config/--up-config against the GLIDE file")
    except DataError as e:
        raise CheckpointError(str(e)) from None
    return dropped


def fresh_encoder(model, generator=None):
    """Reset the encoder to a fresh initialisation (PyTorch defaults; cls N(0, W^-1/2), positions N(0, 0.01))."""
    enc = model.encoder
    for m in enc.modules():
        if m is not enc and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    width = enc.cls_token.shape[-1]
    with torch.no_grad():
        enc.cls_token.copy_(torch.randn(enc.cls_token.shape, generator=generator) * width ** -0.5)
        enc.positional_embedding.copy_(torch.randn(enc.positional_embedding.shape, generator=generator) * 0.01)


def load_encoder(model, path):
    """Encoder weights from an official stage-1 file (no prefix) or a full PITI file (`encoder.*`), strict."""
    sd = read_flat(path, "encoder file", "pass a stage-1 encoder file or a PITI base/upsampler file (e.g. <out>/base.pt)")
    if any(k.startswith("encoder.") for k in sd):
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    try:
        load_strict(model.encoder, {k: v.float() for k, v in sd.items()}, path, "an encoder of this configuration",
                    hint="pass the encoder of a run with the same --base-config/--up-config")
    except DataError as e:
        raise CheckpointError(str(e)) from None


def glide_model(glide_path, super_res=False, config=None, encoder=None, seed=0):
    """PITI with the decoder from a GLIDE file and a fresh encoder (or `encoder`, a file), in train mode."""
    kw = {**(piti.UP_KWARGS if super_res else piti.BASE_KWARGS), **(config or {})}
    if bool(kw["super_res"]) != bool(super_res):
        raise ValueError(f"config says super_res={kw['super_res']}, building the {'upsampler' if super_res else 'base'}")
    torch.manual_seed(seed)
    model = piti.PITI(**kw)
    fresh_encoder(model, torch.Generator().manual_seed(seed))
    load_glide_decoder(model, glide_path)
    if encoder:
        load_encoder(model, encoder)
    return model


def official_state(model):
    """The official flat file of a model (`encoder.*`, `decoder.*`): what load_official / --base read."""
    keep = set(model.official_keys())
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in keep}
