"""The label palette: one RGB colour per label channel. The official PITI encoder eats label maps rendered
with it (models/piti.py), and the sample grids and figures draw label maps with it, so an OASIS path that
draws a label map needs no PITI import."""
from functools import lru_cache

import numpy as np
import torch


@lru_cache(maxsize=None)
def palette(n_channels):
    """(n_channels, 3) uint8: channel c gets pix2pixHD's colour of c (COCO: id + 1); channel 0 is black.

    For COCO channels this is the official `Colorize(182)` of id = c - 1, with unlabeled (255) black.
    """
    rgb = np.zeros((n_channels, 3), dtype=np.uint8)
    for c in range(1, n_channels):
        r = g = b = 0
        v = c
        for j in range(7):  # bit-interleave: bit 0 -> red, bit 1 -> green, bit 2 -> blue, MSB first
            r |= (v & 1) << (7 - j)
            g |= ((v >> 1) & 1) << (7 - j)
            b |= ((v >> 2) & 1) << (7 - j)
            v >>= 3
        rgb[c] = (r, g, b)
    return torch.from_numpy(rgb)
