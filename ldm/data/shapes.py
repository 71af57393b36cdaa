"""The embedded default data set: one captioned filled shape per image.

Drawn by code, deterministic from a seed, so the whole two-stage job runs on a fresh
machine with nothing to download. Each image is one filled circle, square or triangle
in one of six colours on a plain dark background, at a random size and position;
its caption is "a {colour} {kind}". Chosen (colour, kind) pairs can be held out
(`exclude`) to test whether the model composes a colour and a kind it never saw together.
"""

from dataclasses import dataclass
from typing import Iterable, List, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from ldm.errors import LdmError

BACKGROUND = (30, 30, 30)
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 60, 200),
    "cyan": (40, 200, 220),
}
KINDS = ("circle", "square", "triangle")
# Shape side as a fraction of the image side.
MIN_SIZE, MAX_SIZE = 0.35, 0.75
# Draw at this many times the resolution, then downsample: smooth, anti-aliased edges.
SUPERSAMPLE = 4


def caption(colour: str, kind: str) -> str:
    return f"a {colour} {kind}"


def all_pairs() -> List[Tuple[str, str]]:
    """Every (colour, kind) pair, colours in palette order, kinds in KINDS order."""
    return [(c, k) for c in PALETTE for k in KINDS]


def parse_pair(text: str) -> Tuple[str, str]:
    """'green triangle' or 'a green triangle' -> ('green', 'triangle')."""
    words = text.lower().split()
    words = words[1:] if words[:1] == ["a"] else words
    if len(words) != 2 or words[0] not in PALETTE or words[1] not in KINDS:
        raise LdmError(
            f"'{text}' is not a shapes pair: write 'COLOUR KIND' with COLOUR in "
            f"{', '.join(PALETTE)} and KIND in {', '.join(KINDS)}"
        )
    return words[0], words[1]


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    kind: str
    box: Tuple[int, int, int, int]  # left, top, right, bottom, in pixels of the final image

    @property
    def caption(self) -> str:
        return caption(self.colour, self.kind)


def draw(spec: ShapeSpec, resolution: int) -> Image.Image:
    """Render one shape; the triangle points up and fills half of its bounding box."""
    s = SUPERSAMPLE
    image = Image.new("RGB", (resolution * s, resolution * s), BACKGROUND)
    left, top, right, bottom = (v * s for v in spec.box)
    fill = PALETTE[spec.colour]
    pen = ImageDraw.Draw(image)
    if spec.kind == "circle":
        pen.ellipse((left, top, right - 1, bottom - 1), fill=fill)
    elif spec.kind == "square":
        pen.rectangle((left, top, right - 1, bottom - 1), fill=fill)
    else:
        pen.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    return image.resize((resolution, resolution), Image.Resampling.BOX)


class ShapesDataset(torch.utils.data.Dataset):
    """`num_images` captioned shapes; item i depends only on (seed, i)."""

    def __init__(self, num_images: int, resolution: int, seed: int = 0, exclude: Iterable[str] = ()):
        if resolution < 8:
            raise LdmError(f"shapes resolution must be at least 8 pixels, got {resolution}")
        excluded = {parse_pair(e) for e in exclude}
        self.pairs = [p for p in all_pairs() if p not in excluded]
        if not self.pairs:
            raise LdmError("data.shapes.exclude holds out every (colour, kind) pair: keep at least one")
        self.num_images, self.resolution, self.seed = num_images, resolution, seed

    def __len__(self) -> int:
        return self.num_images

    def spec(self, index: int) -> ShapeSpec:
        # One generator per item: any item can be drawn alone, in any order, on any rank.
        rng = np.random.default_rng([self.seed, index])
        colour, kind = self.pairs[rng.integers(len(self.pairs))]
        size = int(round(self.resolution * rng.uniform(MIN_SIZE, MAX_SIZE)))
        left, top = rng.integers(0, self.resolution - size + 1, size=2)
        return ShapeSpec(colour, kind, (int(left), int(top), int(left) + size, int(top) + size))

    def image(self, index: int) -> Image.Image:
        return draw(self.spec(index), self.resolution)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        pixels = torch.from_numpy(np.array(self.image(index))).permute(2, 0, 1).float()
        return {"pixel_values": pixels / 127.5 - 1.0, "caption": self.spec(index).caption}
