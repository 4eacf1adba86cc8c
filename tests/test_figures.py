"""models/figures.py: the affinity figure at ADE20K x COCO-Stuff size and the titled, legended grids."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import data
import metrics
from models import figures


def ink(a):
    """Pixels that are neither white nor the light row banding."""
    return (np.asarray(a)[..., :3].astype(int).min(-1) < 200)


def test_affinity_figure_labels_every_row_at_ade20k_x_coco():
    target, source = data.class_table("ade20k"), data.class_table("coco")
    T, S = len(target), len(source)
    rng = np.random.default_rng(0)
    est = rng.dirichlet(np.full(S, 0.05), size=T)
    est[5] = 1 / S  # a row with no clear match: flagged as weak
    A = np.eye(S)[est.argmax(1)]
    A[3] = np.eye(S)[(est[3].argmax() + 1) % S]  # an overridden row: its final choice is not the top-1
    img = figures.affinity_figure(est, A, target.display, source.display, "title", "target: ade20k", "source: coco")
    w, h = img.size
    assert (T, S) == (150, 182) and h > 17 * T and h > w and 900 < w < 1600
    a = np.asarray(img)
    red = (a[..., 0] > 150) & (a[..., 1] < 60) & (a[..., 2] < 60)
    orange = (np.abs(a.astype(int) - figures.WEAK).max(-1) < 40)
    weak = set(np.nonzero(est.max(1) < 0.5 * np.median(est.max(1)))[0])  # top-1 below half the median row's
    assert 5 in weak and len(weak) < 10
    L = img.info["layout"]  # names | 4-px columns | 14 px | top-3 text; rows of 17 px from L["top"]
    top, text_x = L["top"], L["text_x"]
    assert L["cw"] == 4 and text_x == L["left"] + 4 * S + 14
    for t in range(T):  # every row: a name on the left and its top-3 text on the right (final choice in red)
        band = slice(top + 17 * t + 1, top + 17 * t + 16)
        assert ink(a[band, : w // 8]).sum() > 20, t
        assert ink(a[band, text_x:]).sum() > 60 and red[band, text_x:].any(), t
        assert orange[band, :L["left"]].any() == (t in weak), t  # the weak rows' mark and name, and only there
    assert red[top: top + 17 * T, w // 8: text_x].sum() > 4 * T  # the chosen cells framed in red
    # the colour scale near the top (under the titles), nothing below the last row
    assert ink(a[L["scale_y"]: L["scale_y"] + 14, 80:320]).sum() > 1000 and L["scale_y"] < 100
    assert h - (top + 17 * T) < 20
    # a readable subset of the columns named: at least one name per 12 px, the columns rows chose among them
    named = L["named"]
    assert 40 <= len(named) < S and min(np.diff(named)) * 4 >= 12
    assert set(named) & set(est.argmax(1)) and ink(a[top - 60: top - 8, L["left"]: text_x - 14]).sum() > 2000


def test_column_labels_prefer_chosen_columns_and_never_overlap():
    picked = figures.column_labels(100, 4, [11, 10, 50, 52])
    assert 11 in picked and 10 not in picked and 50 in picked and 52 not in picked  # first come, first named
    assert all(b - a >= 3 for a, b in zip(picked, picked[1:]))  # 3 columns x 4 px >= 12 px apart
    assert len(picked) >= 100 // 3 - 1
    assert figures.column_labels(10, 12, []) == list(range(10))  # wide columns: every one


def test_small_table_names_its_columns(tmp_path):
    target, source = data.class_table("toy-target"), data.class_table("toy-source")
    est = np.full((len(target), len(source)), 1 / len(source))
    img = figures.affinity_figure(est, np.eye(len(source))[np.zeros(len(target), int)], target.display,
                                  source.display, "t", "target: toy", "source: toy")
    a = np.asarray(img)
    assert img.size[0] > 400 and ink(a[70:150, 60:300]).sum() > 100  # names written above the columns


def test_grid_titles_and_legend(tmp_path):
    table = data.class_table("toy-target")
    names = metrics.channel_names(table)
    assert names[0] == "dontcare" and names[table.channels[0]] == table.display[0]
    label = torch.zeros(2, 32, 32, dtype=torch.long)
    label[0, :16] = table.channels[2]
    label[1, 16:] = table.channels[5]
    colours = metrics.palette(table.n_channels)
    legend = metrics.legend_of(label.numpy(), names, colours.numpy())
    assert [n for n, _ in legend] == ["dontcare", table.display[2], table.display[5]]
    grid = {"label": label, "real": torch.zeros(2, 3, 32, 32), "seeds": [0, 1], "n_channels": table.n_channels,
            "names": names}
    metrics.sample_grid(lambda lab, seeds: torch.zeros(len(lab), 3, 32, 32), grid, tmp_path / "g.png")
    a = np.asarray(Image.open(tmp_path / "g.png"))
    assert a.shape[1] == 3 * 34 and a.shape[0] > 2 * 34 + 22 + 18
    assert ink(a[:20]).sum() > 50  # column titles
    body = a[22:22 + 2 * 34]
    assert (body[:32, :32] == colours[label[0]].numpy()).all()  # the tiles are unchanged below the titles
    legend_band = a[22 + 2 * 34:]
    assert (legend_band == colours[table.channels[5]].numpy()).all(-1).sum() > 50  # its swatch
    del grid["names"]  # without names: titles only
    metrics.sample_grid(lambda lab, seeds: torch.zeros(len(lab), 3, 32, 32), grid, tmp_path / "h.png")
    assert Image.open(tmp_path / "h.png").size == (3 * 34, 2 * 34 + 22)
    assert metrics.grid_titles(2) == ["labels", "generated 1", "generated 2", "real"]


def test_affinity_png_written_by_estimate_affinity(tmp_path):
    """report() draws the labelled figure (the offline text method on the toy tables)."""
    import estimate_affinity
    estimate_affinity.main(["--method", "text", "--source", "toy-source", "--target", "toy-target",
                            "--text-encoder", "minilm", "--out", str(tmp_path)])
    img = Image.open(Path(tmp_path) / "affinity.png")
    assert img.size[0] > 400 and img.size[1] > 9 * 17 + 100
