"""OASIS training pieces, as the official training code computes them (models/models.py, models/losses.py,
utils/utils.py of boschresearch/OASIS), vectorised over classes: the class-balanced N+1 losses, LabelMix, the
EMA update and the BN-statistics pass of the EMA generator. The networks are in models/oasis.py."""
import torch
import torch.nn.functional as F

from models.oasis import _fp32


def class_balance_weights(y):
    """Per-pixel weights (B, H, W) of the official class balancing, computed over the whole batch:
    w_c = numel(y) / (n_present * C) / occ_c, dontcare weight 0. Same op order as the official code."""
    occ = y.float().sum(dim=(0, 2, 3))
    occ[0] = 0
    n = (occ > 0).sum()
    coeff = torch.reciprocal(occ) * y.numel() / (n * y.shape[1])
    coeff[0] = 0
    return coeff[y.argmax(1)]


def n1_loss(logits, y, for_real):
    """N+1 cross-entropy: real -> target argmax(y)+1 with class-balanced weights, fake -> target 0."""
    with _fp32(logits.device):
        logits = logits.float()
        if for_real:
            ce = F.cross_entropy(logits, y.argmax(1) + 1, reduction='none')
            return torch.mean(ce * class_balance_weights(y))
        target = torch.zeros(logits.shape[0], *logits.shape[2:], dtype=torch.long, device=logits.device)
        return torch.mean(F.cross_entropy(logits, target, reduction='none'))


def labelmix_mask(y):
    """The official generate_labelmix mask (B, 1, H, W) for the one-hot map y, without a loop over classes.

    Official: for each class c of unique(argmax y) in ascending order, draw torch.randint(0, 2, (1,))
    (CPU generator) and write it IN PLACE into the pixels that currently hold c. Only values 0 and 1
    can collide, so the result is: class c gets its own draw, except that class-0 pixels which drew 1
    are overwritten by class 1's draw when class 1 is present. One batched draw equals the per-class
    draws (same CPU RNG stream)."""
    t = y.argmax(1)
    classes = torch.unique(t)  # ascending, as the official loop
    lut = torch.zeros(y.shape[1], dtype=torch.long, device=t.device)
    lut[classes] = torch.randint(0, 2, (len(classes),)).to(t.device)
    if y.shape[1] > 1:
        collide = (classes == 0).any() & (lut[0] == 1) & (classes == 1).any()
        lut[0] = torch.where(collide, lut[1], lut[0])
    return lut[t].unsqueeze(1).float()


def generator_loss(D, fake, y):
    """Official "losses_G" (no VGG): class-balanced N+1 loss of D(fake) against the real targets."""
    return n1_loss(D(fake), y, for_real=True)


def discriminator_loss(D, real, fake, y, lambda_labelmix):
    """Official "losses_D": returns (loss, parts) with parts = {'D_fake', 'D_real', 'D_lm'} (detached,
    D_lm already times lambda). The three D calls are separate, as in the official code (each one does
    its own spectral-norm power iteration). lambda_labelmix = 0 switches LabelMix off."""
    fake = fake.detach()
    d_fake = D(fake)
    loss_fake = n1_loss(d_fake, y, for_real=False)
    d_real = D(real)
    loss_real = n1_loss(d_real, y, for_real=True)
    loss = loss_fake + loss_real
    loss_lm = torch.zeros((), device=real.device)
    if lambda_labelmix:
        mask = labelmix_mask(y)
        d_mixed = D(mask * real + (1 - mask) * fake)
        with _fp32(real.device):
            mixed_pred = mask * d_real.float() + (1 - mask) * d_fake.float()
            loss_lm = lambda_labelmix * F.mse_loss(mixed_pred, d_mixed.float())
        loss = loss + loss_lm
    return loss, {'D_fake': loss_fake.detach(), 'D_real': loss_real.detach(), 'D_lm': loss_lm.detach()}


# ----------------------------------------------------------------------------------------------
# EMA

@torch.no_grad()
def ema_update(ema, G, decay):
    """ema <- decay * ema + (1 - decay) * G for EVERY state-dict entry (parameters, BN running stats,
    spectral-norm u/v), with the official rounding (two products, then a sum)."""
    e_sd, g_sd = ema.state_dict(), G.state_dict()
    floats = [k for k, v in e_sd.items() if v.is_floating_point()]
    ef = [e_sd[k] for k in floats]
    torch._foreach_mul_(ef, decay)
    torch._foreach_add_(ef, torch._foreach_mul([g_sd[k] for k in floats], 1 - decay))
    for k, v in e_sd.items():  # integer counters: float blend copied back (truncates), as official
        if not v.is_floating_point():
            v.copy_(v * decay + g_sd[k] * (1 - decay))


def ema_decay(step, decay, warmup=False):
    """The EMA decay of iteration `step`: `decay`, as official OASIS; with `warmup` (finetune_oasis.py
    --ema-warmup, not official) min(decay, (1 + step) / (10 + step)). A fixed 0.9999 over a 5000-step finetuning
    run leaves ~61% of the step-0 weights in the evaluated model; the warm-up lets the average follow a short
    run from its start and reaches `decay` on long ones."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


@torch.no_grad()
def recompute_bn_stats(ema, batches, n_batches=51):
    """The official BN-statistics pass after the blend: train-mode forwards of the EMA generator on up
    to `n_batches` label maps (the official loop runs 51). Each forward also draws z and does one
    spectral-norm power iteration, as in the official code."""
    was_training = ema.training
    ema.train()
    for done, y in enumerate(batches, 1):
        ema(y)
        if done == n_batches:  # stop before fetching another batch: a loader draw would move the RNG
            break
    ema.train(was_training)


