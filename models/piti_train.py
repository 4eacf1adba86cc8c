"""Training PITI itself: GLIDE initialisation, the official stage recipes, the timestep samplers.

PITI released only COCO-Stuff models; a PITI source for another label space (ADE20K, a folder dataset) is
trained the official way, which this module provides for finetune_piti.py (`--init glide`):

  decoder   GLIDE's base.pt / upsample.pt loaded UNCHANGED into `model.decoder` after the official key filter
            (the text tower `transformer.*` is dropped but `transformer_proj` kept, and `padding_embedding`,
            `positional_embedding`, `token_embedding`, `final_ln` are dropped), with strict keys.
  encoder   fresh (PyTorch default init; cls token and positions, which the official code leaves as
            uninitialised `th.empty`, get N(0, width^-1/2) and N(0, 0.01)), or an encoder file: an official
            stage-1 file (encoder keys without prefix) or a full PITI file (its `encoder.*` keys).
  loss      `Diffusion.training_losses` (mse on eps + vb on the learned variance with the mean frozen), at
            timesteps from the official samplers: uniform, or loss-second-moment (importance weights
            1/(T p_t), as the official loss-second-moment resampler).
  recipes   the official mask schedule (base stages 1, 1-cont, 2 and the upsampler) by name.

Checked against the official code's training step in tests/test_piti_glide.py.
"""
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from models import DataError, diffusion, piti
from models.checkpoint import save
from models.state_dict import load_strict, read_state_dict


class CheckpointError(DataError):
    """A GLIDE / encoder file that cannot be used; the message is one line naming the file and the fix."""


# ----------------------------------------------------------------------------------------------
# The official stage schedule. official_batch is the official global batch (8 GPUs x 16 for the
# base); finetune_piti.py applies everything else unless given on the command line.

RECIPES = {
    "piti-stage1": dict(train="encoder", uncond_p=0.0, lr=3.5e-5, steps=200_000, official_batch=128,
                        schedule_sampler="loss-second-moment", ema_decay=0.9999,
                        doc="encoder only, decoder = GLIDE base, no condition dropout"),
    "piti-stage1-cont": dict(train="encoder", uncond_p=0.2, lr=2e-5, steps=60_000, official_batch=128,
                             schedule_sampler="loss-second-moment", ema_decay=0.9999,
                             doc="encoder only from the stage-1 EMA (--encoder), condition dropout 0.2"),
    "piti-stage2": dict(train="all", uncond_p=0.2, lr=3.5e-5, steps=200_000, official_batch=128,
                        schedule_sampler="loss-second-moment", ema_decay=0.9999,
                        doc="everything, decoder = GLIDE base, encoder = stage-1-cont EMA (--encoder); open-ended"),
    "piti-upsample": dict(train="all", uncond_p=0.0, lr=1e-5, steps=200_000, official_batch=4, schedule_sampler="uniform",
                          ema_decay=0.9999, doc="the upsampler: everything from GLIDE upsample.pt, fresh encoder"),
}

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
                              f"start from it with --init piti --base/--upsampler")
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


def trainable(model, mode):
    """Parameters a stage optimises: 'encoder' (stages 1 and 1-cont) or 'all' (stage 2, the upsampler)."""
    if mode == "encoder":
        return {k: p for k, p in model.named_parameters() if k.startswith("encoder.")}
    if mode == "all":
        return dict(model.named_parameters())
    raise ValueError(f"unknown training set '{mode}'; expected encoder or all")


# ----------------------------------------------------------------------------------------------
# Timestep samplers (the official uniform and loss-second-moment ones), with state for exact resumes


class TimestepSampler:
    """uniform, or loss-second-moment: p_t ∝ sqrt(E[loss_t^2]) over the last 10 losses of each t once every t
    has 10, mixed with 0.1% uniform; before that uniform. sample() returns (t, weights = 1 / (T p_t))."""

    def __init__(self, kind, num_timesteps, history=10, uniform_prob=0.001):
        if kind not in ("uniform", "loss-second-moment"):
            raise ValueError(f"unknown timestep sampler '{kind}'; expected uniform or loss-second-moment")
        self.kind, self.T, self.history, self.uniform_prob = kind, num_timesteps, history, uniform_prob
        self.loss_history = np.zeros((num_timesteps, history), dtype=np.float64)
        self.loss_counts = np.zeros(num_timesteps, dtype=np.int64)

    def warmed_up(self):
        return bool((self.loss_counts == self.history).all())

    def weights(self):
        if self.kind == "uniform" or not self.warmed_up():
            return np.ones(self.T, dtype=np.float64)
        w = np.sqrt(np.mean(self.loss_history ** 2, axis=-1))
        w /= np.sum(w)
        w *= 1 - self.uniform_prob
        w += self.uniform_prob / len(w)
        return w

    def sample(self, batch, device, generator=None):
        """(t, weights) on `device`; uniform draws torch.randint (the generator's stream), else multinomial."""
        if self.kind == "uniform":
            t = torch.randint(0, self.T, (batch,), generator=generator, device=generator.device if generator else "cpu")
            return t.to(device), torch.ones(batch, device=device)
        w = self.weights()
        p = w / np.sum(w)
        t = torch.multinomial(torch.from_numpy(p), batch, replacement=True, generator=generator)
        weights = torch.from_numpy(1 / (len(p) * p[t.numpy()])).float()
        return t.to(device), weights.to(device)

    def update(self, ts, losses):
        """Record the per-sample losses of all ranks (the same call on every rank keeps them in step)."""
        if self.kind == "uniform":
            return
        for t, loss in zip(np.asarray(ts).tolist(), np.asarray(losses, dtype=np.float64).tolist()):
            if self.loss_counts[t] == self.history:
                self.loss_history[t, :-1] = self.loss_history[t, 1:]
                self.loss_history[t, -1] = loss
            else:
                self.loss_history[t, self.loss_counts[t]] = loss
                self.loss_counts[t] += 1

    def state_dict(self):
        return {"kind": self.kind, "loss_history": torch.from_numpy(self.loss_history.copy()),
                "loss_counts": torch.from_numpy(self.loss_counts.copy())}

    def load_state_dict(self, state):
        if state["kind"] != self.kind:
            raise ValueError(f"timestep sampler state is '{state['kind']}', this run uses '{self.kind}'")
        self.loss_history = state["loss_history"].numpy().astype(np.float64).copy()
        self.loss_counts = state["loss_counts"].numpy().astype(np.int64).copy()


# ----------------------------------------------------------------------------------------------
# The loss of one batch (the one implementation: finetune_piti.training_loss calls this)


def diffusion_terms(model, diff, x0, ref, t, noise, low_res=None, amp=True):
    """Per-sample official terms {loss, mse, vb} for x0 (B,3,H,W) in [-1,1], conditioning `ref`, timesteps t
    (indices into `diff`), noise; `low_res` for the upsampler (bilinearly resized inside, as the official)."""
    x_t = diff.q_sample(x0, t, noise)
    with diffusion.autocast(x0.device, amp):
        out = model(x_t, diff.model_t(t), ref, low_res=low_res)
    return diff.training_losses(out.float(), x0, x_t, t, noise)


def weighted_means(terms, weights=None):
    """Batch values as the official TrainLoop: mean(term * importance weight)."""
    return {k: (v * weights).mean() if weights is not None else v.mean() for k, v in terms.items()}


# ----------------------------------------------------------------------------------------------
# finetune_piti.py --init glide: flags, models, exported files


def fresh_run_args(args, given):
    """A fresh run's --recipe and --init flags: the recipe's settings unless given, one DataError line otherwise."""
    if args.recipe:  # a named official stage; --batch stays the run's (official: 8 GPUs x 16)
        for k, v in RECIPES[args.recipe].items():
            if k not in ("doc", "official_batch") and k not in given:
                setattr(args, k, v)
    if args.init == "glide":
        if not (args.glide_ckpt or args.glide_up_ckpt):
            raise DataError("--init glide needs --glide-ckpt (GLIDE base.pt) and/or --glide-up-ckpt (upsample.pt)")
        if args.affinity or args.base or ("prompts" in given and args.prompts):
            raise DataError("--init glide trains PITI on --data's own classes: no --affinity, --base or --prompts")
        args.prompts = 0
    else:
        for flag in ("base", "upsampler", "affinity"):
            if getattr(args, flag) is None:
                raise DataError(f"--{flag} is required (see --help)")
    if args.train is None:
        args.train = "all" if args.init == "glide" else "fixdec"
    if args.init == "glide" and args.train == "fixdec":
        raise DataError("--train fixdec is CAT's recipe; --init glide trains 'encoder' or 'all'")
    return args


def glide_models(args, n_channels):
    """--init glide: (base, up, trained models) with decoders from the GLIDE files, in --data's label space;
    --upsampler (a PITI upsampler of this label space) may stand in for an untrained one, for grids and FID."""
    own = {"source_channels": n_channels}
    base = up = None
    if args.glide_ckpt:
        base = glide_model(args.glide_ckpt, False, {**args.base_config, **own}, encoder=args.encoder, seed=args.seed)
    if args.glide_up_ckpt:
        up = glide_model(args.glide_up_ckpt, True, {**args.up_config, **own}, seed=args.seed + 1)
    elif args.upsampler:
        up = piti.load_official(args.upsampler, super_res=True, config={**piti.UP_KWARGS, **args.up_config, **own})
    models = {"base": base} if base is not None else {}
    if args.glide_up_ckpt:
        models["up"] = up
    return base, up, models


EXPORTS = {"base": "base.pt", "up": "upsampler.pt"}  # the trained models as official flat files


def export(models, out):
    """<out>/base.pt, <out>/upsampler.pt of the models as they are (the EMA weights, swapped in by the caller):
    the --base / --upsampler of a later CAT run."""
    for name, m in models.items():
        save(official_state(m), out / EXPORTS[name])


def describe_recipes():
    return "; ".join(f"{name}: {r['doc']} (lr {r['lr']:g}, uncond_p {r['uncond_p']:g}, {r['schedule_sampler']} t)"
                     for name, r in RECIPES.items())


__all__ = ["CheckpointError", "RECIPES", "glide_decoder_state", "load_glide_decoder", "fresh_encoder", "load_encoder",
           "glide_model", "official_state", "trainable", "TimestepSampler", "diffusion_terms", "weighted_means",
           "fresh_run_args", "glide_models", "EXPORTS", "export"]


# ----------------------------------------------------------------------------------------------
# Run mechanics of finetune_piti.py: stateless batch order and draws (exact resume), EMA swap, rank gathering


@contextmanager
def swapped(params, ema):
    """Temporarily put the EMA weights into the model (only the trained tensors are copied)."""
    raw = {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(ema[k])
    try:
        yield
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(raw[k])


def step_seed(seed, what, i):
    """Independent seed for (run seed, what: 0 = a step's draws, 1 = an epoch's order, index)."""
    return int(np.random.SeedSequence([seed, what, i]).generate_state(1)[0])


def batch_indices(step, n, batch, seed):
    """Items of a step: consecutive slices of per-epoch permutations (stateless, so resumes are exact)."""
    out = []
    for pos in range(step * batch, (step + 1) * batch):
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, 1, epoch)))
        out.append(int(perm[i]))
    return out


def gather(x, world):
    """The global-batch order of a per-rank tensor of items rank::world (all ranks get it)."""
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.stack(parts, 1).flatten()
