"""The embedded default data set: one captioned filled shape per image.

Drawn by code, deterministic from a seed, so the whole two-stage job runs on a fresh
machine with nothing to download. Each image is one filled circle, square or triangle
in one of six colours on a plain dark background, at a random size and position;
its caption is "a {colour} {kind}". Chosen (colour, kind) pairs can be held out
(`exclude`) to test whether the model composes a colour and a kind it never saw together.

The control image of a shape (ControlNet, Zhang et al. 2023; T2I-Adapter, Mou et al. 2023)
is its outline, an edge map as Canny gives for photos: the shape's mask at the final
resolution (the filled shape drawn white on black at the image's supersampling,
BOX-downsampled, pixels >= 128 kept), then the mask pixels with a 4-neighbour outside
the mask or on the image border; white on black, RGB. `control_for` draws a fresh one
for a given kind, `fresh_controls` one per prompt, each with its filled mask (what a
generated shape is scored against, by IoU); `outline_to_mask` fills an outline back.
"""

from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.transforms.v2 import functional as TF

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
# A pixel belongs to the shape's mask when the shape covers at least half of it.
MASK_THRESHOLD = 128
WHITE = (255, 255, 255)


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


def paint(spec: ShapeSpec, resolution: int, mode: str, background, fill) -> Image.Image:
    """The shape filled with `fill` on `background`, supersampled, then BOX-downsampled to `resolution`.

    The triangle points up and fills half of its bounding box. The image and the mask
    both come from here, so they share one geometry.
    """
    s = SUPERSAMPLE
    image = Image.new(mode, (resolution * s, resolution * s), background)
    left, top, right, bottom = (v * s for v in spec.box)
    pen = ImageDraw.Draw(image)
    if spec.kind == "circle":
        pen.ellipse((left, top, right - 1, bottom - 1), fill=fill)
    elif spec.kind == "square":
        pen.rectangle((left, top, right - 1, bottom - 1), fill=fill)
    else:
        pen.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    return image.resize((resolution, resolution), Image.Resampling.BOX)


def draw(spec: ShapeSpec, resolution: int) -> Image.Image:
    """Render one shape in its colour on the dark background."""
    return paint(spec, resolution, "RGB", BACKGROUND, PALETTE[spec.colour])


def shape_mask(spec: ShapeSpec, resolution: int) -> np.ndarray:
    """Bool (resolution, resolution): the pixels the shape covers at least half of (see the module doc)."""
    return np.array(paint(spec, resolution, "L", 0, 255)) >= MASK_THRESHOLD


def outline_of(mask: np.ndarray) -> np.ndarray:
    """Bool: the mask pixels with at least one 4-neighbour outside the mask (or off the image)."""
    padded = np.pad(mask, 1, constant_values=False)  # off the image counts as outside
    inside = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inside


def outline_to_mask(outline) -> np.ndarray:
    """Bool: the filled shape of an outline (an RGB / L image or a bool array): it and what it encloses.

    Flood-fills the outside from the image border through non-outline pixels (4-connected);
    what the flood does not reach is the shape. For the shapes' (convex) masks this gives
    back the mask exactly: an interior pixel has all four neighbours in the mask, so no
    4-connected path reaches it from outside without crossing the outline.
    """
    edge = np.asarray(outline)
    edge = edge.astype(bool) if edge.ndim == 2 else edge.max(axis=-1) >= MASK_THRESHOLD
    open_ = ~edge
    outside = np.zeros_like(edge)
    outside[0, :], outside[-1, :], outside[:, 0], outside[:, -1] = open_[0, :], open_[-1, :], open_[:, 0], open_[:, -1]
    while True:
        grown = outside.copy()
        grown[1:, :] |= outside[:-1, :]
        grown[:-1, :] |= outside[1:, :]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= open_
        if np.array_equal(grown, outside):
            return ~outside
        outside = grown


def outline_image(mask: np.ndarray) -> Image.Image:
    """The control image of a mask: its outline white (255, 255, 255) on black, RGB."""
    pixels = np.zeros(mask.shape + (3,), np.uint8)
    pixels[outline_of(mask)] = WHITE
    return Image.fromarray(pixels, "RGB")


def random_box(rng: np.random.Generator, resolution: int) -> Tuple[int, int, int, int]:
    """A square box of random size and position inside the image."""
    size = int(round(resolution * rng.uniform(MIN_SIZE, MAX_SIZE)))
    left, top = rng.integers(0, resolution - size + 1, size=2)
    return int(left), int(top), int(left) + size, int(top) + size


@dataclass(frozen=True, eq=False)  # eq=False: arrays do not compare to one bool
class ShapeControl:
    """A control for the shapes: the shape it was drawn from, its outline (RGB image) and filled mask (bool)."""

    spec: ShapeSpec
    outline: Image.Image
    mask: np.ndarray


def control_of(spec: ShapeSpec, resolution: int) -> ShapeControl:
    mask = shape_mask(spec, resolution)
    return ShapeControl(spec, outline_image(mask), mask)


def control_for(kind: str, resolution: int, seed, colour: Optional[str] = None) -> ShapeControl:
    """A fresh control of `kind`, its size and position drawn as the data set draws them.

    `seed`: an int or a sequence of ints (numpy's SeedSequence entropy), or a
    `np.random.Generator` to draw from. The colour does not show in a control; it only
    names the spec (default: the first palette colour).
    """
    if kind not in KINDS or (colour is not None and colour not in PALETTE):
        raise LdmError(
            f"no shapes control for '{f'{colour} ' if colour else ''}{kind}': "
            f"KIND is one of {', '.join(KINDS)}, COLOUR one of {', '.join(PALETTE)}"
        )
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    spec = ShapeSpec(colour or next(iter(PALETTE)), kind, random_box(rng, resolution))
    return control_of(spec, resolution)


def fresh_controls(prompts: Iterable[str], resolution: int, seed: int) -> List[ShapeControl]:
    """One control per shapes prompt ('a red circle'): control i of its prompt's kind, from (seed, i).

    Each prompt gets its own size and position, so a set of prompts tests the controls'
    spatial hold, not one layout. Use a seed other than data.shapes.seed to test on
    controls never trained on.
    """
    controls = []
    for i, prompt in enumerate(prompts):
        colour, kind = parse_pair(prompt)
        controls.append(control_for(kind, resolution, np.random.default_rng([seed, i]), colour))
    return controls


class ShapesDataset(torch.utils.data.Dataset):
    """`num_images` captioned shapes; item i depends only on (seed, i).

    With `conditioning`, items also carry "conditioning_pixel_values": the shape's outline
    as float32 (3, res, res) in [0, 1] (diffusers' ControlNet training examples feed the
    control in [0, 1] and the image in [-1, 1]).
    """

    def __init__(self, num_images: int, resolution: int, seed: int = 0, exclude: Iterable[str] = (),
                 conditioning: bool = False):
        if resolution < 8:
            raise LdmError(f"shapes resolution must be at least 8 pixels, got {resolution}")
        excluded = {parse_pair(e) for e in exclude}
        self.pairs = [p for p in all_pairs() if p not in excluded]
        if not self.pairs:
            raise LdmError("data.shapes.exclude holds out every (colour, kind) pair: keep at least one")
        self.num_images, self.resolution, self.seed = num_images, resolution, seed
        self.conditioning = conditioning

    def __len__(self) -> int:
        return self.num_images

    def spec(self, index: int) -> ShapeSpec:
        # One generator per item: any item can be drawn alone, in any order, on any rank.
        rng = np.random.default_rng([self.seed, index])
        colour, kind = self.pairs[rng.integers(len(self.pairs))]
        return ShapeSpec(colour, kind, random_box(rng, self.resolution))

    def image(self, index: int) -> Image.Image:
        return draw(self.spec(index), self.resolution)

    def control(self, index: int) -> ShapeControl:
        """Item `index`'s control: its outline and filled mask."""
        return control_of(self.spec(index), self.resolution)

    def outline(self, index: int) -> Image.Image:
        """Item `index`'s control image: the outline of its shape."""
        return self.control(index).outline

    def sample(self, index: int) -> Tuple[Image.Image, str, Image.Image]:
        """(image, caption, outline) of item `index`."""
        spec = self.spec(index)
        return draw(spec, self.resolution), spec.caption, control_of(spec, self.resolution).outline

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        pixels = torch.from_numpy(np.array(self.image(index))).permute(2, 0, 1).float()
        item = {"pixel_values": pixels / 127.5 - 1.0, "caption": self.spec(index).caption}
        if self.conditioning:
            item["conditioning_pixel_values"] = control_pixels(self.outline(index))
        return item


def control_pixels(control: Image.Image) -> torch.Tensor:
    """An RGB control image as float32 (3, H, W) in [0, 1], as torchvision scales it (the folder data's path too)."""
    return TF.to_dtype(TF.pil_to_tensor(control), torch.float32, scale=True)
