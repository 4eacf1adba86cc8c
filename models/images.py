"""Reading the image and label files of a dataset: an image upright as viewers show it (EXIF orientation), a
16-bit greyscale image scaled rather than clipped, a label checked (single channel, not JPEG data, the image's
size) and JPEG ringing in a label map told apart from real classes. A bad file is one DataError line naming it.
PIL and numpy only; data.py's datasets read through it."""
import re

import numpy as np
from PIL import Image, ImageOps

from models import DataError


def open_image(path, decode=True):
    """A PIL image as viewers show it: turned upright by its EXIF orientation (phone photos); such an image
    says so in .exif_turned (the orientation tag)."""
    try:
        im = Image.open(path)
        if decode:
            im.load()
        # the tag from what is read so far: a PNG's own getexif() would decode the whole image first
        orientation = Image.Image.getexif(im).get(0x0112, 1)
        if orientation != 1:
            im = ImageOps.exif_transpose(im)
            im.exif_turned = orientation
        return im
    except Image.DecompressionBombError as e:  # over twice PIL's MAX_IMAGE_PIXELS: refused before decoding
        n = re.search(r"\((\d+) pixels\)", str(e))
        raise DataError(f"{path}: an image of {n.group(1) if n else 'too many'} pixels is over PIL's decompression-bomb "
                        f"limit of {2 * Image.MAX_IMAGE_PIXELS} pixels; downscale it (the models read 256-pixel "
                        "sides)") from None
    except OSError as e:
        raise DataError(f"{path}: unreadable image ({e})") from None


def to_rgb(image):
    """An 8-bit RGB image: a 16-bit greyscale one (mode I;16 / I, a scientific or medical photo) is scaled from
    0..65535 to 0..255 rather than clipped to white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = np.asarray(image).astype(np.float64) / 257
        image = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8))
    return image.convert("RGB")


LABEL_MODES = ("1", "L", "P", "I;16", "I;16B", "I;16L", "I")  # 1-bit masks, 8-bit, palette, 16-bit: the values are ids


def open_pair(img_path, lbl_path, decode=True):
    """(image, label) PIL images, checked: a single-channel label of the image's own size (else one line)."""
    image, label = open_image(img_path, decode), open_image(lbl_path, decode)
    if label.format == "JPEG":  # a JPEG under a .png name: lossy compression invents ids along every edge
        raise DataError(f"{lbl_path}: is JPEG data under a .png name; JPEG compression changes class ids along region "
                        "edges: expected a losslessly saved PNG of class ids (re-export the labels, not the JPEG)")
    if label.mode in ("RGB", "RGBA", "CMYK", "LA", "PA"):
        raise DataError(f"{lbl_path}: is an {label.mode} image; expected a single-channel PNG of class ids (mode L or P)")
    if label.mode not in LABEL_MODES:
        raise DataError(f"{lbl_path}: label mode {label.mode}; expected a single-channel PNG of class ids (mode L or P)")
    if image.size != label.size:
        turned = [f"{what} turned by its EXIF orientation {im.exif_turned}"
                  for what, im in (("image", image), ("label", label)) if getattr(im, "exif_turned", None)]
        raise DataError(f"{lbl_path}: label is {label.size[0]}x{label.size[1]}, its image {img_path} is "
                        f"{image.size[0]}x{image.size[1]}{' (' + ', '.join(turned) + ')' if turned else ''}; "
                        "expected the same size (they would be resized apart)")
    return image, label


def ringing_ids(values):
    """The ids of a label map that occur only as thin lines along region edges, when the map is mostly flat
    regions: JPEG compression's signature (ringing invents in-between values at every edge). [] when not."""
    v = np.asarray(values)
    if min(v.shape) < 3:
        return []
    c, same = v[1:-1, 1:-1], np.ones((v.shape[0] - 2, v.shape[1] - 2), bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            same &= v[dy:dy + c.shape[0], dx:dx + c.shape[1]] == c
    if same.mean() < 0.5:  # texture-like maps (noise, tiny objects): nothing to tell
        return []
    thin = sorted(set(np.unique(v).tolist()) - set(np.unique(c[same]).tolist()))
    return thin if len(thin) >= 3 else []
