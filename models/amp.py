"""Mixed precision on any device, one decision for every script (--amp auto|bf16|fp16|fp32):

    pick(device, requested, capability=None) -> 'bf16' | 'fp16' | 'fp32'
    autocast(device, amp)                    -> the autocast context of that mode (nothing for fp32)
    grad_scaler(device, amp)                 -> a torch.amp.GradScaler, enabled for fp16 only
    backward_step(loss, opt, scaler)         -> backward + optimizer step through that scaler
    restore(scalers, states)                 -> a resumed run's fp16 loss scales (enabled scalers only)

auto: bf16 on CUDA GPUs with native bf16 (compute capability >= 8.0: A100, H100, RTX 30xx/40xx, L4),
fp16 with a GradScaler on older ones (V100 7.0, T4 7.5), fp32 on the CPU. bf16 on the CPU (autocast's
CPU bf16 kernels) runs only when asked for (--amp bf16): it is slower than fp32 on many CPUs and changes
the numbers. fp16 is CUDA-only. The capability is read from the device unless passed in (tests).

One name for the mode everywhere: a parameter or field holding 'bf16' | 'fp16' | 'fp32' is called `amp`
(what --amp resolves to), never `bf16`, `precision`, `mode` or `enabled`.
"""
from contextlib import nullcontext

import torch

from models import DataError

MODES = ("auto", "bf16", "fp16", "fp32")
HELP = ("mixed precision: auto (bf16 on GPUs of compute capability >= 8.0, fp16 + GradScaler on older GPUs, "
        "fp32 on CPU), bf16, fp16 (CUDA) or fp32")


def pick(device, requested="auto", capability=None):
    """The precision a run uses on `device` for --amp `requested`; one DataError line when it cannot run."""
    device = torch.device(device)
    if requested not in MODES:
        raise DataError(f"--amp {requested}: expected one of {', '.join(MODES)}")
    if device.type != "cuda":
        if requested == "fp16":
            raise DataError(f"--amp fp16: fp16 autocast with a GradScaler is for CUDA GPUs; on {device.type} "
                            "use --amp bf16 or fp32")
        return "fp32" if requested == "auto" else requested
    major, minor = capability if capability is not None else torch.cuda.get_device_capability(device)
    native_bf16 = (major, minor) >= (8, 0)
    if requested == "auto":
        return "bf16" if native_bf16 else "fp16"
    if requested == "bf16" and not native_bf16:
        raise DataError(f"--amp bf16: this GPU (compute capability {major}.{minor}) has no native bf16; "
                        "use --amp auto (fp16 with a GradScaler) or fp32")
    return requested


def dtype(amp):
    """The autocast dtype of a picked mode: bfloat16, float16, or None for fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


def autocast(device, amp):
    """autocast(device type, bf16/fp16) for a picked mode `amp`; a no-op context for fp32. None: the mode
    pick(device, 'auto') gives (the library functions' default)."""
    device = torch.device(device)
    if amp is None:
        amp = pick(device, "auto")
    if amp not in MODES[1:]:
        raise ValueError(f"amp {amp!r}: expected one of {', '.join(MODES[1:])} (a mode of models.amp.pick) or None")
    return torch.autocast(device.type, dtype=dtype(amp)) if dtype(amp) is not None else nullcontext()


def grad_scaler(device, amp):
    """Loss scaling for fp16 (scale(loss).backward(); step(opt); update()); a pass-through otherwise."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=amp == "fp16")


def backward_step(loss, opt, scaler):
    """scaler.scale(loss).backward(); scaler.step(opt); scaler.update(): fp16 loss scaling (a step whose
    gradients overflow is skipped and the scale lowered); a disabled scaler (or None) is backward(); step()."""
    if scaler is None:
        loss.backward()
        opt.step()
        return
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def restore(scalers, states):
    """Load checkpointed GradScaler states into the enabled scalers (a run resumed in fp16 keeps its scale)."""
    for scaler, state in zip(scalers, states or ()):
        if scaler is not None and scaler.is_enabled() and state:
            scaler.load_state_dict(state)
