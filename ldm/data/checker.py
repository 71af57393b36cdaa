"""A rule-based judge of shapes images: does the picture show the prompt's colour and kind?

- foreground: pixels far from the dark background; the largest 4-connected blob is the
  shape (stray specks from an imperfect sample are ignored);
- colour: the blob's median colour, by the nearest palette entry;
- edge: the shape is then cut out again where the image is halfway between background
  and that colour. A blurred edge (VAE decoders blur) is symmetric about that level, so
  the cut neither grows nor shrinks the shape; a low cut would grow it, and a grown
  small triangle fills as much of its box as a circle does;
- kind: the blob's fill of its bounding box: a square fills all of it, a circle pi/4,
  an upright triangle one half. The cut-offs sit halfway between those values.

This is the demo's "prompt adherence": the fraction of images whose colour and kind
both match the prompt.
"""

from collections import deque
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ldm.data.shapes import BACKGROUND, PALETTE, parse_pair

# A pixel is foreground when its RGB distance to the background exceeds this.
FOREGROUND_DISTANCE = 60.0
# Fewer foreground pixels than this fraction of the image: no shape drawn.
MIN_AREA_FRACTION = 0.02
SQUARE_FILL, CIRCLE_FILL, TRIANGLE_FILL = 1.0, np.pi / 4, 0.5


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (BFS; images are small)."""
    seen = np.zeros_like(mask)
    best: list = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, blob = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            blob.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(blob) > len(best):
            best = blob
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(PALETTE)
    distances = [np.linalg.norm(rgb - np.array(PALETTE[n], dtype=np.float64)) for n in names]
    return names[int(np.argmin(distances))]


def kind_from_fill(fill: float) -> str:
    if fill > (SQUARE_FILL + CIRCLE_FILL) / 2:
        return "square"
    return "circle" if fill > (CIRCLE_FILL + TRIANGLE_FILL) / 2 else "triangle"


def classify(image) -> Tuple[Optional[str], Optional[str]]:
    """(colour, kind) seen in a shapes image (PIL or HxWx3 uint8); (None, None) if blank."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    background = np.array(BACKGROUND, dtype=np.float64)
    distance = np.linalg.norm(pixels - background, axis=-1)
    rough = _largest_blob(distance > FOREGROUND_DISTANCE)
    if rough.sum() < MIN_AREA_FRACTION * rough.size:
        return None, None
    fill_rgb = np.median(pixels[rough], axis=0)
    half_contrast = np.linalg.norm(fill_rgb - background) / 2
    blob = _largest_blob(distance > max(FOREGROUND_DISTANCE, half_contrast))
    ys, xs = np.nonzero(blob)
    box_area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return nearest_colour(fill_rgb), kind_from_fill(blob.sum() / box_area)


def foreground_mask(image) -> np.ndarray:
    """Pixels far from the dark background (the checker's FOREGROUND_DISTANCE): where a shape was drawn."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    return np.linalg.norm(pixels - np.array(BACKGROUND, dtype=np.float64), axis=-1) > FOREGROUND_DISTANCE


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def colour_of(image) -> Optional[str]:
    """The palette colour `classify` sees in `image` (None if blank)."""
    return classify(image)[0]


def matches(image, prompt: str) -> bool:
    """True when both the colour and the kind of `image` are those of `prompt`."""
    return classify(image) == parse_pair(prompt)


def adherence(images: Sequence, prompts: Sequence[str]) -> float:
    """Fraction of images that match their prompt (colour and kind both right)."""
    if len(images) != len(prompts) or not images:
        raise ValueError("adherence needs as many prompts as images, and at least one")
    return float(np.mean([matches(im, p) for im, p in zip(images, prompts)]))
