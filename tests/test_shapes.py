"""The embedded shapes data set and its rule-based checker."""

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.checker import adherence, classify, kind_from_fill, matches
from ldm.data.shapes import BACKGROUND, KINDS, PALETTE, ShapeSpec, ShapesDataset, all_pairs, draw, parse_pair
from ldm.errors import LdmError


def test_palette_background_and_caption_template_are_as_designed():
    assert BACKGROUND == (30, 30, 30)
    assert PALETTE == {
        "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
        "yellow": (230, 210, 40), "purple": (140, 60, 200), "cyan": (40, 200, 220),
    }
    assert KINDS == ("circle", "square", "triangle")
    assert len(all_pairs()) == 18
    ds = ShapesDataset(20, 32, seed=3)
    for i in range(20):
        spec = ds.spec(i)
        assert ds[i]["caption"] == f"a {spec.colour} {spec.kind}"


def test_items_are_deterministic_from_seed_and_index():
    a, b = ShapesDataset(10, 32, seed=7), ShapesDataset(1000, 32, seed=7)
    for i in (0, 5, 9):  # item i does not depend on the data set's length
        assert torch.equal(a[i]["pixel_values"], b[i]["pixel_values"])
    c = ShapesDataset(10, 32, seed=8)
    assert not all(torch.equal(a[i]["pixel_values"], c[i]["pixel_values"]) for i in range(10))


def test_item_shape_range_and_background():
    item = ShapesDataset(4, 32)[0]
    x = item["pixel_values"]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    pixels = ((x + 1) * 127.5).round().permute(1, 2, 0).reshape(-1, 3)
    # the background colour is the most common pixel
    values, counts = torch.unique(pixels, dim=0, return_counts=True)
    assert values[counts.argmax()].tolist() == list(BACKGROUND)


def test_shapes_lie_inside_the_image_with_varied_size_and_position():
    ds = ShapesDataset(300, 32, seed=0)
    sizes, lefts = set(), set()
    for i in range(300):
        left, top, right, bottom = ds.spec(i).box
        assert 0 <= left < right <= 32 and 0 <= top < bottom <= 32
        sizes.add(right - left)
        lefts.add(left)
    assert len(sizes) > 8 and len(lefts) > 8


def test_exclude_holds_out_pairs():
    ds = ShapesDataset(2000, 16, exclude=["green triangle", "a purple circle"])
    seen = {(ds.spec(i).colour, ds.spec(i).kind) for i in range(2000)}
    assert ("green", "triangle") not in seen and ("purple", "circle") not in seen
    assert len(seen) == 16


@pytest.mark.parametrize("bad", ["pink circle", "green hexagon", "green", "a big green circle"])
def test_bad_exclude_names_the_vocabulary(bad):
    with pytest.raises(LdmError, match="COLOUR KIND"):
        ShapesDataset(10, 32, exclude=[bad])


def test_excluding_everything_is_refused():
    with pytest.raises(LdmError, match="every"):
        ShapesDataset(10, 32, exclude=[f"{c} {k}" for c, k in all_pairs()])


def test_parse_pair():
    assert parse_pair("a green triangle") == ("green", "triangle")
    assert parse_pair("Cyan Square") == ("cyan", "square")


@pytest.mark.parametrize("resolution", [32, 64])
def test_checker_is_right_on_drawn_data(resolution):
    ds = ShapesDataset(400, resolution, seed=11)
    for i in range(400):
        spec = ds.spec(i)
        assert classify(ds.image(i)) == (spec.colour, spec.kind), (i, spec)


@pytest.mark.parametrize("radius", [0.6, 0.8])
def test_checker_is_right_on_blurred_shapes(radius):
    """Decoded samples are blurred; a blurred small triangle must not read as a circle."""
    from PIL import ImageFilter

    ds = ShapesDataset(400, 32, seed=5)
    for i in range(400):
        spec = ds.spec(i)
        blurred = ds.image(i).filter(ImageFilter.GaussianBlur(radius))
        assert classify(blurred) == (spec.colour, spec.kind), (i, spec)


def test_checker_kind_thresholds_sit_between_the_ideal_fills():
    assert kind_from_fill(1.0) == "square"
    assert kind_from_fill(np.pi / 4) == "circle"
    assert kind_from_fill(0.5) == "triangle"


def test_checker_ignores_specks_and_reports_blank_images():
    blank = Image.new("RGB", (32, 32), BACKGROUND)
    assert classify(blank) == (None, None)
    image = draw(ShapeSpec("blue", "square", (4, 4, 20, 20)), 32)
    pixels = np.array(image)
    pixels[30, 30] = PALETTE["red"]  # a stray speck far from the shape
    assert classify(pixels) == ("blue", "square")


def test_checker_takes_nearest_palette_colour_of_a_noisy_shape():
    image = np.array(draw(ShapeSpec("yellow", "circle", (2, 2, 28, 28)), 32)).astype(np.int16)
    noise = np.random.default_rng(0).integers(-15, 16, image.shape)
    noisy = np.clip(image + noise, 0, 255).astype(np.uint8)
    assert classify(noisy) == ("yellow", "circle")


def test_adherence_counts_colour_and_kind_both_right():
    red_circle = draw(ShapeSpec("red", "circle", (2, 2, 26, 26)), 32)
    assert matches(red_circle, "a red circle")
    assert not matches(red_circle, "a red square")
    assert not matches(red_circle, "a blue circle")
    assert adherence([red_circle, red_circle], ["a red circle", "a blue circle"]) == 0.5


def test_iou_and_foreground_mask_on_known_masks():
    from ldm.data.checker import foreground_mask, iou

    a = np.zeros((8, 8), bool)
    b = np.zeros((8, 8), bool)
    a[:4, :4] = True  # 16 pixels
    b[2:6, 2:6] = True  # 16 pixels, 4 shared
    assert iou(a, b) == pytest.approx(4 / 28)
    assert iou(a, a) == 1.0 and iou(np.zeros_like(a), np.zeros_like(a)) == 1.0
    image = np.full((8, 8, 3), 30, np.uint8)
    image[1:3, 5:7] = (220, 40, 40)
    image[6, 6] = (60, 60, 60)  # 52 from the background: below the checker's distance
    expected = np.zeros((8, 8), bool)
    expected[1:3, 5:7] = True
    assert (foreground_mask(image) == expected).all()
