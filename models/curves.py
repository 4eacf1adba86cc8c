"""Training curves of a run folder, drawn from its log.jsonl (the run's one record): `update(out)` writes
<out>/curves.png (PIL only) -- each loss smoothed over its raw values drawn faint, validation FID/KID where
measured, the stage-1 -> stage-2 boundary and the step of best.pt marked -- and, given a `Board`, the same
scalars and the sample grids as TensorBoard events (--tensorboard of the finetuning scripts). The log itself is
read, appended to and truncated (a resumed run drops the lines past its checkpoint) here too."""
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import DataError
from .figures import GREY, INK, font, text_width

NOT_LOSSES = {"step", "stage", "sec", "sec_per_step", "grid", "recipe", "flags", "fid", "kid"}
TITLES = {"loss_G": "generator loss", "loss_D": "discriminator loss", "loss": "training loss"}
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
BEST, STAGE = (0, 150, 60), (120, 120, 120)
W, PANEL_H, LEFT, RIGHT = 1000, 210, 78, 24


def number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def summary(entries):
    """What the picture shows, from log.jsonl's entries: {'losses': {key: (steps, values)}, 'val': {key: (steps,
    values)}, 'stage2': first step of stage 2 (None), 'best': (step, fid) of best.pt (None), 'last': last step}."""
    train = [e for e in entries if "grid" not in e and "recipe" not in e]
    losses = {}
    for e in train:
        for k, v in e.items():
            if k not in NOT_LOSSES and number(v):
                losses.setdefault(k, ([], []))
                losses[k][0].append(e["step"])
                losses[k][1].append(float(v))
    val = {}
    for e in entries:
        for k in ("fid", "kid"):
            if "grid" in e and number(e.get(k)):
                val.setdefault(k, ([], []))
                val[k][0].append(e["step"])
                val[k][1].append(float(e[k]))
    one = [e["step"] for e in train if e.get("stage") == 1]
    two = [e["step"] for e in train if e.get("stage") == 2]
    best = None  # best.pt is written when the FID improves strictly: the first step reaching the minimum
    if "fid" in val:
        i = int(np.argmin(val["fid"][1]))
        best = (val["fid"][0][i], val["fid"][1][i])
    return {"losses": losses, "val": val, "stage2": max(one) if one and two else None, "best": best,
            "last": max([e.get("step", 0) for e in entries], default=0)}


def smooth(y):
    """Trailing moving mean over about 1/25 of the points (at least 1)."""
    k = max(1, len(y) // 25)
    c = np.cumsum(np.concatenate([[0.0], y]))
    i = np.arange(1, len(y) + 1)
    return (c[i] - c[np.maximum(i - k, 0)]) / np.minimum(i, k)


def ticks(lo, hi, n=5, least=0.0):
    """(round tick values covering [lo, hi] in steps of 1, 2 or 5 x 10^k (at least `least`), the step)."""
    raw = max(hi - lo, 1e-12) / n
    step = max(least, min((m * 10 ** np.floor(np.log10(raw)) for m in (1, 2, 5, 10)),
                          key=lambda s: abs(s - raw) + (s < raw) * 1e9))
    return list(np.arange(np.ceil(lo / step) * step, hi + step * 1e-6, step)), step


def label(v, step):
    """A tick value with the decimals its step needs."""
    if abs(v) >= 1e5 or 0 < abs(v) < 1e-4:
        return f"{v:.2e}"
    return f"{0.0 if abs(v) < step * 1e-6 else v:.{max(0, int(-np.floor(np.log10(step) + 1e-9)))}f}"


def panel(d, y0, title, series, x_max, marks, points=False, log=False):
    """One plot at height y0: series [(name, steps, values, colour)], shared x axis 0..x_max, vertical marks;
    `log`: a logarithmic y axis (positive values only)."""
    f, small = font(14), font(12)
    x0, x1, top, bottom = LEFT, W - RIGHT, y0 + 24, y0 + PANEL_H - 30
    title += " (log scale)" if log else ""
    d.text((x0, y0 + 4), title, font=f, fill=INK)
    if log:
        series = [(n, s, np.log10(np.asarray(v, float)), c) for n, s, v, c in series]
    allv = np.concatenate([np.asarray(v, float) for _, _, v, _ in series])
    lo, hi = (np.percentile(allv, [1, 99]) if len(allv) > 20 else (allv.min(), allv.max()))  # a spike stays in view
    pad = (hi - lo) * 0.08 or abs(hi) * 0.1 or 1.0
    lo, hi = lo - pad, hi + pad
    px = lambda s: x0 + (x1 - x0) * s / max(x_max, 1)
    py = lambda v: bottom - (bottom - top) * (min(max(v, lo), hi) - lo) / (hi - lo)
    d.rectangle([x0, top, x1, bottom], outline=GREY)
    values, step = ticks(lo, hi, 4, least=1.0 if log else 0.0)  # log scale: one tick a decade
    for t in values:
        d.line([x0 - 4, py(t), x0, py(t)], fill=GREY)
        d.line([x0 + 1, py(t), x1 - 1, py(t)], fill=(235, 235, 235))
        d.text((x0 - 7, py(t)), label(10 ** t, 10 ** t) if log else label(t, step), font=small, fill=INK, anchor="rm")
    for t in ticks(0, x_max, 8, least=1.0)[0]:
        d.line([px(t), bottom, px(t), bottom + 4], fill=GREY)
        d.text((px(t), bottom + 6), f"{int(t):,}", font=small, fill=INK, anchor="ma")
    for at, colour, dash in marks:
        for ya in range(top, bottom, 8 if dash else 1000):
            d.line([px(at), ya, px(at), min(ya + (4 if dash else bottom - top), bottom)], fill=colour, width=2)
    x_legend = x0 + text_width(f, title) + 24
    for name, steps, values, colour in series:
        xy = [(px(s), py(v)) for s, v in zip(steps, values)]
        if points or len(xy) == 1:  # evaluations (or a single logged step): dots, joined
            if len(xy) > 1:
                d.line(xy, fill=colour, width=2)
            for x, y in xy:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        else:
            faint = tuple(int(255 - (255 - c) * 0.3) for c in colour)
            d.line(xy, fill=faint, width=1)
            d.line([(px(s), py(v)) for s, v in zip(steps, smooth(np.asarray(values)))], fill=colour, width=2)
        if len(series) > 1:
            d.line([x_legend, y0 + 12, x_legend + 16, y0 + 12], fill=colour, width=3)
            d.text((x_legend + 20, y0 + 4), name, font=small, fill=INK)
            x_legend += text_width(small, name) + 40


def draw(entries, title):
    """The curves picture (a PIL image W px wide) of log.jsonl's entries."""
    s = summary(entries)
    losses, x_max = s["losses"], max(s["last"], 1)
    mains = [k for k in ("loss_G", "loss_D", "loss") if k in losses]
    terms = [k for k in losses if k not in mains and losses[k] not in [losses[m] for m in mains]]  # no copy of a total
    panels = [(TITLES[k], [(k, *losses[k], COLOURS[i])], False, False) for i, k in enumerate(mains)]
    if terms:
        positive = all(min(losses[k][1]) > 0 for k in terms)
        panels.append(("loss terms", [(k, *losses[k], COLOURS[(len(mains) + i) % len(COLOURS)])
                                      for i, k in enumerate(terms)], False, positive))
    for k in s["val"]:
        panels.append((f"validation {k.upper()} (lower is better)", [(k, *s["val"][k], COLOURS[3])], True, False))
    marks = ([(s["stage2"], STAGE, True)] if s["stage2"] is not None else []) + \
            ([(s["best"][0], BEST, False)] if s["best"] else [])
    f, big = font(14), font(18)
    k = max(1, len(next(iter(losses.values()), ((), ()))[1]) // 25)
    notes = ["x: training step; " + (f"faint: every logged value, bold: their moving mean over {k}" if k > 1 else
                                     "every logged value")]
    if s["stage2"] is not None:
        notes.append(f"dashed grey: stage 1 -> stage 2 after step {s['stage2']:,}")
    if s["best"]:
        notes.append(f"green: best.pt, step {s['best'][0]:,} (FID {s['best'][1]:.2f})")
    elif not s["val"]:
        notes.append("no validation FID measured (--inception / --fid-features): no best.pt, use checkpoint.pt")
    head = 34 + 20 * len(notes)
    img = Image.new("RGB", (W, head + PANEL_H * max(len(panels), 1) + 8), "white")
    d = ImageDraw.Draw(img)
    d.text((12, 8), f"{title}: steps 0..{s['last']:,}", font=big, fill=INK)
    for i, n in enumerate(notes):
        d.text((12, 34 + 20 * i), n, font=f, fill=INK if i else GREY)
    if not panels:
        d.text((LEFT, head + 40), "no training steps logged yet", font=f, fill=GREY)
    for i, (name, series, points, log) in enumerate(panels):
        panel(d, head + i * PANEL_H, name, series, x_max, marks, points, log)
    return img


def read_log(path):
    """log.jsonl's entries (dicts), in order; [] when there is none. Only the last line may be torn (a run killed
    while writing it): it is left out; a bad line before it is one DataError line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    entries = []
    for k, ln in enumerate(lines, 1):
        try:
            entries.append(json.loads(ln))
        except ValueError:
            if k < len(lines):
                raise DataError(f"{path}: line {k} is not JSON; expected one JSON object a line") from None
    return entries


def truncate_log(path, step):
    """Drop log.jsonl lines past `step` (written after the checkpoint a resumed run restarts from)."""
    path = Path(path)
    if not path.is_file():
        return
    keep = [json.dumps(e) for e in read_log(path) if e.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def append_log(path, entry):
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def update(out, board=None):
    """Redraw <out>/curves.png from <out>/log.jsonl (written atomically); with a Board, its new lines as events."""
    out = Path(out)
    entries = read_log(out / "log.jsonl")
    tmp = out / "curves.png.tmp"
    draw(entries, out.name).save(tmp, format="PNG")
    os.replace(tmp, out / "curves.png")
    if board is not None:
        board.sync(entries)


def require_tensorboard():
    """torch's SummaryWriter, or one DataError line saying how to install what it needs (checked at the start)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DataError("--tensorboard needs the tensorboard package: pip install tensorboard "
                        "(or drop --tensorboard; curves.png is written either way)") from None
    return SummaryWriter


class Board:
    """--tensorboard: log.jsonl's numbers and the sample grids as TensorBoard events in <out>/tensorboard. Events
    at or past `start` (the step a run resumes from, 0 for a fresh run) left by an earlier run are purged."""

    def __init__(self, out, start=0):
        self.out, self.start, self.done = Path(out), start, None
        self.writer = require_tensorboard()(str(self.out / "tensorboard"), purge_step=start)

    def sync(self, entries):
        """Write the entries not written yet (the first call: those at or past `start`)."""
        new = [e for e in entries if e.get("step", 0) >= self.start] if self.done is None else entries[self.done:]
        self.done = len(entries)
        for e in new:
            step = e.get("step", 0)
            for k, v in e.items():
                if k != "step" and number(v):
                    self.writer.add_scalar(("val/" if k in ("fid", "kid") else "train/") + k, v, step)
            if "grid" in e and (self.out / e["grid"]).is_file():
                with Image.open(self.out / e["grid"]) as im:
                    self.writer.add_image("samples", np.asarray(im.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()
