"""The diffusion side of PITI: schedules, respacing, the training loss and the samplers.

`Diffusion` holds the float64 tables of one (noise schedule, respacing) pair, looked up as float32 exactly as
the official improved-diffusion code; `training_losses` is PITI's base loss (eps MSE + the variational bound
training the learned variance). `sample` runs the respaced DDPM/DDIM loop with classifier-free guidance (cond
and uncond halves in one batch, the encoder run once per sample); `cascade` chains base -> 8-bit -> upsampler.
The models are `models.piti.PITI` (anything with `encode`, `denoise`, `ref`, `super_res`, `image_size`,
`noise_schedule`). `training_loss` is one batch of the official PITI training step (condition dropout, timesteps
from a `TimestepSampler`, noise), shared by finetune_piti.py and pretrain_piti.py.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from models import DataError
from models.amp import autocast

# The official sampling settings: base 250 steps with guidance 1.3, upsampler fast27 at temperature 0.997.
BASE_STEPS, UP_STEPS, GUIDANCE, UP_TEMP = "250", "fast27", 1.3, 0.997

# ----------------------------------------------------------------------------------------------
# Schedules and respacing: float64 tables, looked up as float32, exactly as improved-diffusion.


def beta_schedule(name, T=1000):
    if name == "linear":
        scale = 1000 / T
        return np.linspace(scale * 0.0001, scale * 0.02, T, dtype=np.float64)
    if name == "squaredcos_cap_v2":
        abar = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=np.float64)
    raise ValueError(f"unknown noise schedule '{name}'; expected linear or squaredcos_cap_v2")


def space_timesteps(T, spec):
    """The kept timesteps of a respacing: "250", "10,10,3,2,2", "ddim50" or "fast27" (improved-diffusion)."""
    if spec.startswith("ddim"):
        want = int(spec[4:])
        for stride in range(1, T):
            if len(range(0, T, stride)) == want:
                return set(range(0, T, stride))
        raise ValueError(f"respacing '{spec}': no integer stride gives {want} steps out of {T}")
    if spec == "fast27":
        steps = space_timesteps(T, "10,10,3,2,2")
        steps.remove(T - 1)
        steps.add(T - 3)
        return steps
    counts = [int(c) for c in spec.split(",")]
    size_per, extra = divmod(T, len(counts))
    start, kept = 0, []
    for i, n in enumerate(counts):
        size = size_per + (i < extra)
        if size < n:
            raise ValueError(f"respacing '{spec}': cannot take {n} steps from a section of {size}")
        stride = (size - 1) / (n - 1) if n > 1 else 1
        cur = 0.0
        for _ in range(n):
            kept.append(start + round(cur))  # Python round: ties to even, on an accumulated float stride
            cur += stride
        start += size
    return set(kept)


RESPACINGS = "a step count ('100'), step counts per section ('10,10,3,2,2'), 'ddimN' (e.g. ddim50) or 'fast27'"


def check_respacing(spec, flag, T=1000):
    """`spec` if space_timesteps takes it (every count >= 1), else one DataError line naming `flag`, what was
    found and the accepted forms."""
    if spec == "fast27":
        return spec
    counts = [spec[4:]] if spec.startswith("ddim") else spec.split(",")
    if not all(c.strip().isdigit() and int(c) >= 1 for c in counts):
        raise DataError(f"{flag} '{spec}': expected {RESPACINGS}")
    try:
        space_timesteps(T, spec)
    except ValueError as e:
        raise DataError(f"{flag} '{spec}': {str(e).split(': ', 1)[-1]}; expected {RESPACINGS} within {T} steps") from None
    return spec


class Diffusion:
    """One (noise schedule, respacing) pair; respacing "" keeps all 1000 steps (training)."""

    def __init__(self, schedule, respacing="", T=1000):
        betas = beta_schedule(schedule, T)
        self.T_orig = T
        if respacing:
            keep = space_timesteps(T, respacing)
            abar, last, new, self.timestep_map = np.cumprod(1.0 - betas), 1.0, [], []
            for i, a in enumerate(abar):
                if i in keep:
                    new.append(1 - a / last)
                    last = a
                    self.timestep_map.append(i)
            betas = np.array(new)
        else:
            self.timestep_map = list(range(T))
        self.betas = betas
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        self._on_device = {}

    def table(self, name, device):
        """A float64 table as a tensor on `device`, copied once."""
        key = (name, str(device))
        if key not in self._on_device:
            self._on_device[key] = torch.as_tensor(np.asarray(getattr(self, name)), device=device)
        return self._on_device[key]

    def at(self, name, t, ndim=4):
        """Table `name` at (respaced) indices t, as float32 broadcastable to an ndim tensor."""
        return self.table(name, t.device)[t].float().view(-1, *([1] * (ndim - 1)))

    def model_t(self, t):
        """What the network sees: timestep_map[t] * 1000 / T as float32 (rescale_timesteps)."""
        return self.table("timestep_map", t.device)[t].float() * (1000.0 / self.T_orig)

    def p_mean_variance(self, out, x, t, clip=True):
        """Learned-range variance and eps prediction -> (mean, log variance, x0)."""
        eps, v = out[:, :3], out[:, 3:]
        min_log = self.at("posterior_log_variance_clipped", t)
        max_log = self.at("log_betas", t)
        frac = (v + 1) / 2
        logvar = frac * max_log + (1 - frac) * min_log
        x0 = self.at("sqrt_recip_alphas_cumprod", t) * x - self.at("sqrt_recipm1_alphas_cumprod", t) * eps
        if clip:
            x0 = x0.clamp(-1, 1)
        mean = self.at("posterior_mean_coef1", t) * x0 + self.at("posterior_mean_coef2", t) * x
        return mean, logvar, x0

    def p_sample(self, out, x, t, noise):
        """One ancestral step; no noise at respaced index 0."""
        mean, logvar, x0 = self.p_mean_variance(out, x, t)
        nonzero = (t != 0).float().view(-1, 1, 1, 1)
        return mean + nonzero * torch.exp(0.5 * logvar) * noise, x0

    def ddim_sample(self, out, x, t, noise, eta=0.0):
        """One DDIM step (eta = 0: deterministic) from the clipped x0 prediction."""
        _, _, x0 = self.p_mean_variance(out, x, t)
        eps = (self.at("sqrt_recip_alphas_cumprod", t) * x - x0) / self.at("sqrt_recipm1_alphas_cumprod", t)
        a, a_prev = self.at("alphas_cumprod", t), self.at("alphas_cumprod_prev", t)
        sigma = eta * torch.sqrt((1 - a_prev) / (1 - a)) * torch.sqrt(1 - a / a_prev)
        mean = x0 * torch.sqrt(a_prev) + torch.sqrt(1 - a_prev - sigma ** 2) * eps
        nonzero = (t != 0).float().view(-1, 1, 1, 1)
        return mean + nonzero * sigma * noise, x0

    def q_sample(self, x0, t, noise):
        return self.at("sqrt_alphas_cumprod", t) * x0 + self.at("sqrt_one_minus_alphas_cumprod", t) * noise

    def training_losses(self, out, x0, x_t, t, noise):
        """PITI's base loss per sample: mse(eps) + vb, the vb term training only the variance channels."""
        eps, v = out[:, :3].float(), out[:, 3:].float()
        mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
        frozen = torch.cat([eps.detach(), v], dim=1)
        mean, logvar, _ = self.p_mean_variance(frozen, x_t, t, clip=False)
        true_mean = self.at("posterior_mean_coef1", t) * x0 + self.at("posterior_mean_coef2", t) * x_t
        true_logvar = self.at("posterior_log_variance_clipped", t)
        kl = 0.5 * (-1.0 + logvar - true_logvar + torch.exp(true_logvar - logvar)
                    + (true_mean - mean) ** 2 * torch.exp(-logvar))
        kl = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).mean(dim=(1, 2, 3)) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl) * (self.num_timesteps / 1000.0)  # RESCALED_MSE
        return {"loss": mse + vb, "mse": mse, "vb": vb}


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of 8-bit data in [-1, 1] under a Gaussian, bins of width 2/255."""
    cdf = lambda z: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))  # noqa: E731
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# ----------------------------------------------------------------------------------------------
# Sampling


@torch.no_grad()
def sample(model, ref, steps=None, guidance=None, low_res=None, x_T=None, noises=None, generator=None,
           ddim=False, eta=0.0, temp=None, amp=None, trace=None, progress=False, official_rng=False):
    """Sample images for conditioning images `ref` (B,3,R,R) (from `model.ref(label)`).

    steps: respacing ("250", "fast27", "ddim50", ...); default the official one for the model.
    guidance: classifier-free scale s (base default 1.3); eps = eps_u + s (eps_c - eps_u) on the eps
      channels, variance from the cond half; cond and uncond run as one 2B batch. None or 1 for
      the upsampler: cond only, as the official code.
    x_T / noises: the initial noise and the per-step noises (for exact replays); else drawn from
      `generator` (initial noise x `temp`, official upsampler temp 0.997).
    trace: a list that receives per-step dicts (x, t, model_out, x0) for tests.
    official_rng: draw the step noise for the whole 2B guidance batch and keep the first half, as the
      official sampler does, so torch.manual_seed(s) reproduces its samples (costs nothing else).
    The encoder runs once per sample (cond and uncond), not once per step.
    """
    steps = steps or (UP_STEPS if model.super_res else BASE_STEPS)
    if guidance is None:
        guidance = 1.0 if model.super_res else GUIDANCE
    if guidance < 0:
        raise ValueError(f"guidance scale {guidance} < 0; expected >= 0 (official base 1.3)")
    temp = temp if temp is not None else (UP_TEMP if model.super_res else 1.0)
    device = ref.device
    diff = Diffusion(model.noise_schedule, steps)
    B, size = ref.shape[0], model.image_size
    guided = guidance != 1.0
    with autocast(device, amp):
        ctx = model.encode(torch.cat([ref, torch.ones_like(ref)]) if guided else ref)
    if low_res is not None:  # bilinear once per sample, not at every step
        low_res = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
        low_res = torch.cat([low_res, low_res]) if guided else low_res
    x = x_T if x_T is not None else torch.randn(B, 3, size, size, generator=generator, device=device) * temp
    n = diff.num_timesteps
    it = range(n - 1, -1, -1)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"sampling {steps}", leave=False)
    for k, i in enumerate(it):
        t = torch.full((B,), i, device=device, dtype=torch.long)
        tm = diff.model_t(t)
        with autocast(device, amp):
            if guided:
                out = model.denoise(torch.cat([x, x]), torch.cat([tm, tm]), *ctx, low_res=low_res).float()
                cond, uncond = out[:B], out[B:]
                eps = uncond[:, :3] + guidance * (cond[:, :3] - uncond[:, :3])
                out = torch.cat([eps, cond[:, 3:]], dim=1)
            else:
                out = model.denoise(x, tm, *ctx, low_res=low_res).float()
        if noises is not None:
            noise = noises[k]
        else:
            shape = (2 * B, *x.shape[1:]) if guided and official_rng else x.shape
            noise = torch.randn(shape, generator=generator, device=device)[:B]
        x_next, x0 = diff.ddim_sample(out, x, t, noise, eta) if ddim else diff.p_sample(out, x, t, noise)
        if trace is not None:
            trace.append({"x": x, "t": i, "model_out": out, "x0": x0})
        x = x_next
    return x


def quantize(x):
    """The official base -> upsampler glue: clamp, then 8 bits by truncation."""
    return (127.5 * (x.clamp(-1, 1) + 1)).int() / 127.5 - 1


@torch.no_grad()
def cascade(base, up, label, generator=None, steps=None, up_steps=None, guidance=None, ddim=False, amp=None,
            progress=False):
    """(B,H,W) channel ids -> (B,3,256,256) images in [-1,1]: base 64x64 with guidance, then the upsampler."""
    low = sample(base, base.ref(label), steps=steps, guidance=guidance, generator=generator, ddim=ddim, amp=amp,
                 progress=progress)
    return sample(up, up.ref(label), steps=up_steps, low_res=quantize(low), generator=generator, amp=amp,
                  progress=progress)


# ----------------------------------------------------------------------------------------------
# Training: the official timestep samplers (with state for exact resumes) and the loss of one batch


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


def diffusion_terms(model, diff, x0, ref, t, noise, low_res=None, amp=None):
    """Per-sample official terms {loss, mse, vb} for x0 (B,3,H,W) in [-1,1], conditioning `ref`, timesteps t
    (indices into `diff`), noise; `low_res` for the upsampler (bilinearly resized inside, as the official)."""
    x_t = diff.q_sample(x0, t, noise)
    with autocast(x0.device, amp):
        out = model(x_t, diff.model_t(t), ref, low_res=low_res)
    return diff.training_losses(out.float(), x0, x_t, t, noise)


def weighted_means(terms, weights=None):
    """Batch values as the official TrainLoop: mean(term * importance weight)."""
    return {k: (v * weights).mean() if weights is not None else v.mean() for k, v in terms.items()}


def training_loss(model, diff, image, label, uncond_p, low_res_side=None, amp=None, sampler=None, gen=None,
                  part=(0, 1)):
    """Official PITI loss on one batch: q_sample at t from `sampler` (None: uniform), model output, mse + vb;
    batch values = mean(term * importance weight), as the official training loop; "per_sample" = (t, losses).

    The condition dropout, t and noise are drawn from `gen` for the whole global batch, of which this process
    holds items rank::world (`part`): any number of torchrun ranks trains on the same draws as one process."""
    rank, world = part
    B, keep, dev = image.shape[0] * world, slice(rank, None, world), image.device
    side = model.image_size
    x0 = F.interpolate(image, (side, side), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
    ref = model.ref(label)
    drop = (torch.rand(B, generator=gen) < uncond_p)[keep].to(dev)
    ref = torch.where(drop[:, None, None, None], torch.ones_like(ref), ref)
    if sampler is None or sampler.kind == "uniform":
        t, weights = torch.randint(0, diff.num_timesteps, (B,), generator=gen)[keep].to(dev), None
    else:
        t, weights = sampler.sample(B, "cpu", generator=gen)
        t, weights = t[keep].to(dev), weights[keep].to(dev)
    noise = torch.randn((B, *x0.shape[1:]), generator=gen)[keep].to(dev, x0.dtype)
    low = None
    if low_res_side:  # upsampler: an 8-bit bicubic low-res version of the target
        low = quantize(F.interpolate(x0, (low_res_side, low_res_side), mode="bicubic", antialias=True,
                                     align_corners=False))
    terms = diffusion_terms(model, diff, x0, ref, t, noise, low_res=low, amp=amp)
    return {**weighted_means(terms, weights), "per_sample": (t.detach(), terms["loss"].detach())}
