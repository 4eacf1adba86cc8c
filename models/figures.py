"""Pictures a person can read: the affinity figure (every target row labelled, its top-3 source classes
written out, a colour scale, axis titles) and the titles and class legend of the sample grids. PIL only."""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

INK, GREY, RED, WEAK = (20, 20, 20), (110, 110, 110), (200, 0, 0), (220, 110, 0)


def font(size):
    """Pillow's bundled scalable font at `size` px (Pillow >= 10.1 with FreeType), else its bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def text_width(f, text):
    return int(np.ceil(f.getlength(text))) if hasattr(f, "getlength") else 6 * len(text)


def shade(v):
    """[0, 1] -> white..dark blue, the heatmap's colour scale."""
    v = np.clip(np.asarray(v, np.float64), 0, 1)[..., None]
    return (255 - v * np.array([215, 160, 60])).round().astype(np.uint8)


def column_labels(S, cw, first, min_gap=12):
    """The source columns to name when not all names fit (cw < min_gap px a column): the columns some row
    chose first (most chosen first), then every other column where a name still fits, no two names closer
    than `min_gap` px."""
    taken, picked = [], []
    for s in [*first, *range(S)]:
        x = s * cw + cw / 2
        if s not in picked and all(abs(x - t) >= min_gap for t in taken):
            picked.append(s)
            taken.append(x)
    return sorted(picked)


def affinity_figure(estimate, A, target_names, source_names, title, target_title, source_title, k=3, weak=0.5):
    """A tall PIL image of a (T, S) affinity estimate: one labelled row per target class, the heatmap (the final
    choice of each row framed in red), the row's top-k source classes with scores beside it (the final choice in
    red, put first when an override or a tie-break made it differ from the estimate's top-1), the colour scale
    at the top, the source names above their columns (when they do not all fit, a readable subset: the columns
    rows chose first, then others where a name fits, each tied to its column by a tick) and weak rows flagged: a
    top-1 score below `weak` x the median row's (an orange mark and name: a row to check by hand). At 150 x 182
    (ADE20K x COCO-Stuff) it is about 1250 x 2900 px, every name 13 px high."""
    T, S = estimate.shape
    f, small, big = font(13), font(11), font(16)
    row = 17  # px per target row: 13-px text with its descent
    cw = max(2, min(row, 900 // S))  # heatmap column width
    names_w = max(text_width(f, n) for n in target_names) + 10
    left = 22 + names_w  # 14 px for the weak-row mark
    order = np.argsort(-estimate, axis=1, kind="stable")[:, :k]
    top1 = estimate.max(1) if S else np.zeros(T)
    weak_rows = top1 < weak * np.median(top1) if T and np.median(top1) > 0 else np.zeros(T, bool)
    tops = []
    for t in range(T):
        chosen, picks = int(A[t].argmax()) if A[t].max() > 0 else None, [int(s) for s in order[t]]
        if picks[0] != chosen:  # an override or a tie-break: the final choice first
            picks = [chosen] + [s for s in picks if s != chosen][:k - 1]
        tops.append([(s, f"{source_names[s]} {estimate[t, s]:.2f}" if s is not None else "unlabelled (by hand)",
                      s == chosen) for s in picks])
    chosen_count = np.bincount(order[:, 0], minlength=S) if T else np.zeros(S, int)
    named = list(range(S)) if cw >= 12 else column_labels(S, cw, [int(s) for s in np.argsort(-chosen_count, kind="stable")
                                                                  if chosen_count[s] > 0])
    scale_y = 66  # the colour scale under the titles
    label_y = scale_y + 44
    top = label_y + max(text_width(small, source_names[s]) for s in named) + 10
    text_x = left + S * cw + 14
    text_w = max(sum(text_width(f, txt) + 18 for _, txt, _ in r) for r in tops) if T else 0
    key = f"top-{k} of each row (score; red: the final choice)"
    width = max(text_x + max(text_w, text_width(f, key)) + 10, left + 420, text_width(big, title) + 16)
    img = Image.new("RGB", (width, top + T * row + 10), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 6), title, font=big, fill=INK)
    d.text((8, 28), f"rows: {target_title}" + (f"; {int(weak_rows.sum())} weak rows (orange: top-1 score below "
                                                f"{weak:g} x the median row's {np.median(top1):.2f}; check them)"
                                                if weak_rows.any() else ""), font=f, fill=INK)
    d.text((8, 46), f"columns: {source_title}, in table order" + ("" if len(named) == S else
           f"; {len(named)} of {S} named (first the columns rows chose)"), font=f, fill=INK)
    d.text((text_x, top - 18), key, font=f, fill=INK)
    # colour scale: 0 .. the largest entry
    bar_w = 240
    d.text((8, scale_y + 2), "affinity", font=f, fill=INK)
    img.paste(Image.fromarray(np.repeat(shade(np.linspace(0, 1, bar_w))[None], 14, 0)), (80, scale_y))
    d.rectangle([80, scale_y, 80 + bar_w - 1, scale_y + 13], outline=GREY)
    for frac in (0, 0.5, 1):
        x = 80 + round(frac * (bar_w - 1))
        d.line([x, scale_y + 14, x, scale_y + 18], fill=GREY)
        d.text((x, scale_y + 20), f"{frac * float(estimate.max()):.2f}", font=small, fill=INK, anchor="ma")
    v = estimate / max(float(estimate.max()), 1e-12)
    cells = np.repeat(np.repeat(shade(v), row, 0), cw, 1)
    img.paste(Image.fromarray(cells), (left, top))
    for t in range(T):
        y = top + t * row
        if t % 2:  # light banding guides the eye from the name to its row's text
            d.rectangle([4, y, left - 4, y + row - 1], fill=(242, 242, 246))
            d.rectangle([text_x - 6, y, width - 1, y + row - 1], fill=(242, 242, 246))
        if weak_rows[t]:
            d.ellipse([6, y + 4, 15, y + 13], fill=WEAK)
        d.text((left - 6, y + 1), target_names[t], font=f, fill=WEAK if weak_rows[t] else INK, anchor="ra")
        s = tops[t][0][0] if tops[t][0][2] else None  # no frame for a row mapped to the unlabelled channel
        if s is not None:
            d.rectangle([left + s * cw - 1, y, left + (s + 1) * cw, y + row - 1], outline=RED)
        x = text_x
        for _, txt, chosen in tops[t]:
            d.text((x, y + 1), txt, font=f, fill=RED if chosen else INK)
            x += text_width(f, txt) + 18
    # source names written upwards above their columns, centred on them (a tick to the column when columns are narrow)
    strip = Image.new("RGB", (top - label_y - 6, S * cw + 12), "white")
    sd = ImageDraw.Draw(strip)
    for s in named:
        sd.text((2, s * cw + cw / 2 + 6), source_names[s], font=small, fill=INK, anchor="lm")
    img.paste(strip.rotate(90, expand=True), (left - 6, label_y))
    for s in named if len(named) < S else ():
        x = left + s * cw + cw // 2
        d.line([x, top - 5, x, top - 1], fill=GREY)
    img.info["layout"] = {"top": top, "row": row, "left": left, "cw": cw, "text_x": text_x, "scale_y": scale_y,
                          "named": named, "weak": [int(t) for t in np.nonzero(weak_rows)[0]]}
    return img


def flow(entries, width):
    """Entries [(..., w)] in lines of at most `width` px, in order."""
    lines, x = [[]], 0
    for e in entries:
        if lines[-1] and x + e[-1] > width - 8:
            lines.append([])
            x = 0
        lines[-1].append(e)
        x += e[-1]
    return lines if entries else []


def annotate_grid(grid, tile_w, gap, titles=None, legend=None, key=None):
    """A grid image (H, W, 3) uint8 with a row of column titles above and a class legend below.

    titles: one per column (tile_w px + gap each); legend: [(name, (r, g, b))] swatches, in rows that fit;
    key: texts written below the grid before the legend (what short column titles stand for), in rows that fit."""
    f = font(13)
    head = 22 if titles else 0
    W = grid.shape[1]
    keys = flow([(t, text_width(f, t) + 22) for t in key or []], W)
    lines = flow([(n, c, text_width(f, n) + 26) for n, c in (legend or [])], W)
    foot = (8 + 18 * (len(keys) + len(lines))) if keys or lines else 0
    img = Image.new("RGB", (W, head + grid.shape[0] + foot), "white")
    img.paste(Image.fromarray(grid), (0, head))
    d = ImageDraw.Draw(img)
    for j, t in enumerate(titles or []):
        d.text((j * (tile_w + gap) + tile_w // 2, 4), t, font=f, fill=INK, anchor="ma")
    y = head + grid.shape[0] + 6
    for line in keys:
        x = 4
        for text, w in line:
            d.text((x, y + 1), text, font=f, fill=INK)
            x += w
        y += 18
    for line in lines:
        x = 4
        for name, colour, w in line:
            d.rectangle([x, y + 2, x + 13, y + 14], fill=tuple(int(c) for c in colour), outline=GREY)
            d.text((x + 18, y + 1), name, font=f, fill=INK)
            x += w
        y += 18
    return np.asarray(img)


def channel_names(table):
    """{channel: display name} of a class table (channel 0: 'dontcare')."""
    return {0: "dontcare", **{int(c): str(n) for c, n in zip(table.channels, table.display)}}


def legend_of(labels, names, colours):
    """[(name, colour)] of the channels present in `labels` (any int array), in channel order."""
    present = np.unique(np.concatenate([np.asarray(x).ravel() for x in labels])) if len(labels) else []
    return [(names.get(int(c), f"channel {int(c)}"), colours[int(c)]) for c in present]
