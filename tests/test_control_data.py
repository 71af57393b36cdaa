"""Control images for ControlNet / T2I-Adapter training (data.conditioning): every source, the transform, the cache."""

import hashlib
import io
import json
import logging

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import ldm.cache
from ldm.autoencoder import load_vae
from ldm.cli.cache import main as cache_main
from ldm.cli.train_unet import main as train_main
from ldm.config import DataConfig, ShapesConfig, UNetStageConfig, load_config
from ldm.data import build_dataset
from ldm.data.cached import Cached, CachedLatents, Encoded
from ldm.data.checker import kind_from_fill
from ldm.data.folder import ImageFolderDataset
from ldm.data.shapes import (
    BACKGROUND, KINDS, PALETTE, SUPERSAMPLE, ShapesDataset, all_pairs, caption, control_for, fresh_controls,
    outline_of, outline_to_mask,
)
from ldm.data.transforms import image_transform, paired_transform
from ldm.data.webdataset import ShardStream, expand_shards
from ldm.errors import LdmError
from test_train_unet import one_line_error, tiny

RES = 16
CONTROL = "conditioning_pixel_values"


def error_of(fn, *args):
    with pytest.raises(LdmError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- shapes: the outline, as DESIGN.md defines it


def mask_by_definition(spec, resolution) -> np.ndarray:
    """The filled shape white on black at the supersampling, BOX-downsampled (a mean over each s x s block), >= 128."""
    s = SUPERSAMPLE
    big = Image.new("L", (resolution * s, resolution * s), 0)
    left, top, right, bottom = (v * s for v in spec.box)
    pen = ImageDraw.Draw(big)
    if spec.kind == "circle":
        pen.ellipse((left, top, right - 1, bottom - 1), fill=255)
    elif spec.kind == "square":
        pen.rectangle((left, top, right - 1, bottom - 1), fill=255)
    else:
        pen.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=255)
    box_mean = np.array(big, np.float64).reshape(resolution, s, resolution, s).mean(axis=(1, 3))
    return np.floor(box_mean + 0.5) >= 128  # the 8-bit value PIL's BOX filter rounds to


def outline_by_definition(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask or off the image, pixel by pixel."""
    h, w = mask.shape
    edge = np.zeros_like(mask)
    for y in range(h):
        for x in range(w):
            if mask[y, x]:
                edge[y, x] = any(
                    not (0 <= y + dy < h and 0 <= x + dx < w) or not mask[y + dy, x + dx]
                    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0))
                )
    return edge


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_outline_is_exactly_the_boundary_of_the_mask(resolution):
    ds = ShapesDataset(120, resolution, seed=4)
    touching = 0
    for i in range(120):
        spec, control = ds.spec(i), ds.control(i)
        mask = mask_by_definition(spec, resolution)
        assert np.array_equal(control.mask, mask), i
        edge = outline_by_definition(mask)
        outline = np.array(ds.outline(i))
        assert ds.outline(i).mode == "RGB" and ds.outline(i).size == (resolution, resolution)
        assert np.array_equal(outline, np.repeat(edge[..., None], 3, axis=-1).astype(np.uint8) * 255), i  # white on black
        assert edge.sum() < mask.sum()  # an outline, not the filled shape
        touching += bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
    assert touching > 0  # shapes at the border were covered: off the image counts as outside


def test_outline_of_a_hand_made_mask():
    mask = np.zeros((5, 6), bool)
    mask[0:4, 1:5] = True  # touches the top border
    expected = np.array([
        [0, 1, 1, 1, 1, 0],
        [0, 1, 0, 0, 1, 0],
        [0, 1, 0, 0, 1, 0],
        [0, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0],
    ], bool)
    assert np.array_equal(outline_of(mask), expected)
    assert np.array_equal(outline_to_mask(expected), mask)


@pytest.mark.parametrize("resolution", [32, 64])
def test_the_shapes_pixels_in_the_image_are_the_mask(resolution):
    """A pixel the shape covers at least half of (BOX average of the supersampled fill) is in the mask, and only those."""
    ds = ShapesDataset(150, resolution, seed=9)
    for i in range(150):
        spec = ds.spec(i)
        image = np.array(ds.image(i)).astype(np.float64)
        fill, background = np.array(PALETTE[spec.colour], np.float64), np.array(BACKGROUND, np.float64)
        c = np.abs(fill - background).argmax()  # the channel that tells the coverage best
        coverage = (image[..., c] - background[c]) / (fill[c] - background[c])
        sixteenths = np.round(coverage * SUPERSAMPLE ** 2)
        assert np.array_equal(ds.control(i).mask, sixteenths >= SUPERSAMPLE ** 2 / 2), i


def test_outline_to_mask_fills_every_outline_back_to_its_mask():
    for resolution in (16, 32, 64):
        ds = ShapesDataset(300, resolution, seed=1)
        for i in range(300):
            control = ds.control(i)
            assert np.array_equal(outline_to_mask(control.outline), control.mask), (resolution, i)  # from the RGB image
            assert np.array_equal(outline_to_mask(outline_of(control.mask)), control.mask)  # from a bool array


def test_the_image_stream_is_unchanged_by_controls():
    """Checksums of the images before controls existed: the same seed still draws the same images."""
    expected = {16: "503f23dbb113df0fb2287264bfbaaa8266b8ed93eb0307583de0dee1239ba921",
                32: "f500b66d13c574201507eb5ea601bb75b804c74ab6a7fa57b8d600894ef3c628"}
    for resolution, digest in expected.items():
        ds = ShapesDataset(40, resolution, seed=0, conditioning=True)
        h = hashlib.sha256()
        for i in range(40):
            h.update(np.array(ds.image(i)).tobytes())
        assert h.hexdigest() == digest


def test_shapes_items_carry_the_outline_in_zero_one():
    plain = ShapesDataset(12, RES, seed=2)
    ds = ShapesDataset(12, RES, seed=2, conditioning=True)
    assert CONTROL not in plain[0]
    for i in range(12):
        item = ds[i]
        assert torch.equal(item["pixel_values"], plain[i]["pixel_values"]) and item["caption"] == plain[i]["caption"]
        control = item[CONTROL]
        assert control.shape == (3, RES, RES) and control.dtype == torch.float32
        assert set(control.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(control, torch.from_numpy(np.array(ds.outline(i))).permute(2, 0, 1).float() / 255)
        image, text, outline = ds.sample(i)
        assert np.array_equal(np.array(image), np.array(ds.image(i))) and text == ds.spec(i).caption
        assert np.array_equal(np.array(outline), np.array(ds.outline(i)))


def test_build_dataset_gives_shapes_controls_when_asked():
    cfg = DataConfig(source="shapes", resolution=RES, num_validation=2, conditioning=True, shapes=ShapesConfig(num_images=6))
    for split in ("train", "validation"):
        batch = next(iter(torch.utils.data.DataLoader(build_dataset(cfg, split), batch_size=2)))
        assert batch[CONTROL].shape == (2, 3, RES, RES)
    assert DataConfig().conditioning is False
    assert CONTROL not in build_dataset(DataConfig(source="shapes", resolution=RES, shapes=ShapesConfig(num_images=80)))[0]


def test_fresh_controls_follow_their_prompts_and_seed():
    prompts = [caption(c, k) for c, k in all_pairs()]
    controls = fresh_controls(prompts, 32, seed=1234)
    assert len(controls) == 18
    for prompt, control in zip(prompts, controls):
        assert control.spec.caption == prompt
        assert control.outline.size == (32, 32) and control.outline.mode == "RGB"
        assert np.array_equal(control.mask, mask_by_definition(control.spec, 32))
        assert np.array_equal(outline_to_mask(control.outline), control.mask)
        ys, xs = np.nonzero(control.mask)  # the filled mask reads as its kind by the checker's rule
        fill = control.mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        assert kind_from_fill(fill) == control.spec.kind
    again = fresh_controls(prompts, 32, seed=1234)
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(controls, again))
    assert len({c.spec.box for c in controls}) > 10  # each prompt its own size and position
    other = fresh_controls(prompts, 32, seed=1235)
    assert any(a.spec.box != b.spec.box for a, b in zip(controls, other))
    assert control_for("circle", 32, 5).spec.kind == "circle"
    assert np.array_equal(control_for("square", 32, 5).mask, control_for("square", 32, 5).mask)
    assert "KIND" in error_of(control_for, "hexagon", 32, 0)
    assert "COLOUR KIND" in error_of(fresh_controls, ["a pink circle"], 32, 0)
    assert KINDS == ("circle", "square", "triangle")


# ---------------------------------------------------------------- the paired transform


def random_pixels(width=40, height=30, seed=0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.mark.parametrize("center_crop, random_flip", [(True, False), (False, False), (False, True), (True, True)])
def test_paired_transform_crops_and_flips_image_and_control_alike(center_crop, random_flip):
    """The image comes out as image_transform makes it; the control as image_transform makes it from the same RNG state."""
    image, control = random_pixels(seed=0), random_pixels(seed=1)
    outputs = set()
    for seed in range(12):
        torch.manual_seed(seed)
        x, c = paired_transform(RES, center_crop, random_flip)(image, control)
        torch.manual_seed(seed)
        alone = image_transform(RES, center_crop, random_flip)(image)
        torch.manual_seed(seed)
        control_alone = image_transform(RES, center_crop, random_flip)(control)
        assert torch.equal(x, alone)
        torch.testing.assert_close(c, control_alone * 0.5 + 0.5, atol=1e-6, rtol=0)
        assert c.dtype == torch.float32 and c.min() >= 0 and c.max() <= 1 and type(c) is torch.Tensor
        outputs.add(tuple(x.flatten().tolist()))
    assert (len(outputs) > 1) == (not center_crop or random_flip)  # the random cases did vary


def test_paired_transform_refuses_sizes_that_differ():
    with pytest.raises(ValueError, match="30x20"):
        paired_transform(RES)(random_pixels(), random_pixels(30, 20))


# ---------------------------------------------------------------- folder data


def control_folder(root, conditioning_of=lambda name: f"conditioning/{name}", lines=None):
    """x.png and sub/y.png with controls under conditioning/: each control is its image's pixels, upside down."""
    for i, name in enumerate(("x.png", "sub/y.png")):
        image = random_pixels(seed=i)
        for path, picture in ((root / name, image), (root / "conditioning" / name, image.rotate(180))):
            path.parent.mkdir(parents=True, exist_ok=True)
            picture.save(path)
    lines = lines or [
        {"file_name": "x.png", "text": "an x", "conditioning_image": conditioning_of("x.png")},
        {"file_name": "sub/y.png", "text": "a y", "conditioning_image": conditioning_of("sub/y.png")},
    ]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return root


def folder_cfg(root, **kw):
    return DataConfig(source="folder", path=str(root), resolution=RES, num_validation=0, conditioning=True, **kw)


def test_folder_items_carry_their_control_cropped_and_flipped_alike(tmp_path):
    """Replaying the RNG, the image and the control each come out as the one-image transform makes them: one box, one flip."""
    ds = build_dataset(folder_cfg(control_folder(tmp_path), center_crop=False, random_flip=True))
    assert [p.relative_to(tmp_path).as_posix() for p in ds.dataset.controls] == ["conditioning/sub/y.png", "conditioning/x.png"]
    assert len(ds) == 2  # the control files are not training images
    image, control = Image.open(tmp_path / "x.png").convert("RGB"), Image.open(tmp_path / "conditioning/x.png").convert("RGB")
    outputs = set()
    for seed in range(10):
        torch.manual_seed(seed)
        item = ds[1]
        assert item["caption"] == "an x" and item[CONTROL].shape == (3, RES, RES)
        torch.manual_seed(seed)
        image_alone = image_transform(RES, center_crop=False, random_flip=True)(image)
        torch.manual_seed(seed)
        control_alone = image_transform(RES, center_crop=False, random_flip=True)(control)
        assert torch.equal(item["pixel_values"], image_alone)
        torch.testing.assert_close(item[CONTROL], control_alone * 0.5 + 0.5, atol=1e-6, rtol=0)
        outputs.add(tuple(item["pixel_values"].flatten().tolist()))
    assert len(outputs) > 2


def test_folder_control_equal_to_its_image_stays_equal_under_random_crops_and_flips(tmp_path):
    """An asymmetric control that is its image's own pixels: crops and flips applied alike keep the two equal."""
    root = control_folder(tmp_path)
    random_pixels(seed=0).save(root / "conditioning/x.png")  # x's control: x itself
    ds = build_dataset(folder_cfg(root, center_crop=False, random_flip=True))
    torch.manual_seed(0)
    outputs = set()
    for _ in range(30):
        item = ds[1]
        torch.testing.assert_close(item[CONTROL] * 2 - 1, item["pixel_values"], atol=1e-6, rtol=0)
        outputs.add(tuple(item["pixel_values"].flatten().tolist()))
    assert len(outputs) > 2  # several crop boxes and flips were drawn


def test_folder_without_conditioning_ignores_the_controls(tmp_path):
    ds = build_dataset(DataConfig(source="folder", path=str(control_folder(tmp_path)), resolution=RES, num_validation=0))
    assert len(ds) == 2 and CONTROL not in ds[0]


def test_metadata_csv_names_controls_in_a_column(tmp_path):
    control_folder(tmp_path)
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text(
        "file_name,text,conditioning_image\nx.png,an x,conditioning/x.png\nsub/y.png,a y,conditioning/sub/y.png\n"
    )
    ds = ImageFolderDataset(tmp_path, paired_transform(RES), conditioning=True)
    assert [c for _, c in ds.samples] == ["a y", "an x"]
    assert ds[0][CONTROL].shape == (3, RES, RES)


def test_folder_control_errors_are_one_line_and_raised_when_built(tmp_path):
    root = control_folder(tmp_path, lines=[
        {"file_name": "x.png", "text": "an x", "conditioning_image": "conditioning/x.png"},
        {"file_name": "sub/y.png", "text": "a y"},
    ])
    message = error_of(build_dataset, folder_cfg(root))  # y's control, named by no line, counts as an image
    assert "2 of 3 images" in message and "sub/y.png:" in message and "line 2 of" in message
    assert "conditioning_image" in message and "data.conditioning=false" in message

    (root / "metadata.jsonl").unlink()  # layout (a): no metadata line at all
    for name in ("x.png", "sub/y.png"):
        (root / name).with_suffix(".txt").write_text("a caption")
    message = error_of(build_dataset, folder_cfg(root))
    assert "4 of 4 images" in message and "metadata.jsonl has no line for it" in message and "conditioning_image" in message

    control_folder(root, conditioning_of=lambda name: f"edges/{name}")  # named, but not there
    message = error_of(build_dataset, folder_cfg(root))
    assert "line 2" in message and "edges/sub/y.png" in message and "not a file" in message

    control_folder(root)
    random_pixels(41, 30).save(root / "conditioning/x.png")
    message = error_of(build_dataset, folder_cfg(root))
    assert "41x30" in message and "40x30" in message and "conditioning/x.png" in message

    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "an x", "conditioning_image": 3}) + "\n")
    assert "malformed" in error_of(build_dataset, folder_cfg(root))


def test_control_sizes_are_read_from_the_headers(tmp_path, monkeypatch):
    """Building the data set decodes no pixels; the sizes are the upright ones (EXIF rotation, as load_image turns it)."""
    from PIL import ImageFile

    root = control_folder(tmp_path)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees": stored 40x30, loaded 30x40
    random_pixels(seed=5).save(root / "x.jpg", exif=exif.tobytes())
    random_pixels(30, 40, seed=6).save(root / "conditioning/x.jpg.png")
    with open(root / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "x.jpg", "text": "turned", "conditioning_image": "conditioning/x.jpg.png"}) + "\n")

    def no_decoding(self):
        raise AssertionError(f"{self.filename} was decoded")

    with monkeypatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", no_decoding)
        ds = ImageFolderDataset(root, paired_transform(RES), conditioning=True)
    assert len(ds.controls) == 3
    assert ds[1]["caption"] == "turned" and ds[1][CONTROL].shape == (3, RES, RES)
    random_pixels(40, 30, seed=6).save(root / "conditioning/x.jpg.png")  # the stored, not the upright, size
    message = error_of(ImageFolderDataset, root, paired_transform(RES), True)
    assert "40x30" in message and "30x40" in message


def test_an_unreadable_control_skips_its_sample(tmp_path, caplog):
    root = control_folder(tmp_path)
    ds = ImageFolderDataset(root, paired_transform(RES), conditioning=True)
    (root / "conditioning/sub/y.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # broken after the check
    with caplog.at_level(logging.WARNING, logger="ldm.data.folder"):
        item = ds[0]
    assert item["caption"] == "an x" and ds.num_skipped == 1 and "conditioning/sub/y.png" in caplog.text


# ---------------------------------------------------------------- webdataset


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def write_control_shards(folder, per_shard=3, drop=None, wrong_size=None):
    """Two shards; sample i is random pixels with its own pixels as cond.png (except `drop` / `wrong_size`)."""
    for s in range(2):
        with wds.TarWriter(str(folder / f"shard-{s}.tar")) as sink:
            for j in range(per_shard):
                i = s * per_shard + j
                image = random_pixels(24, 20, seed=i)
                sample = {"__key__": f"{i:04d}", "png": png_bytes(image), "txt": f"img {i}".encode()}
                if i != drop:
                    sample["cond.png"] = png_bytes(random_pixels(20, 20) if i == wrong_size else image)
                sink.write(sample)
    return str(folder / "shard-{0..1}.tar")


def test_webdataset_items_carry_cond_png_cropped_and_flipped_alike(tmp_path):
    pattern = write_control_shards(tmp_path)
    cfg = DataConfig(source="webdataset", path=pattern, num_samples=6, resolution=RES, conditioning=True,
                     center_crop=False, random_flip=True)
    stream = build_dataset(cfg)
    torch.manual_seed(0)
    items = [item for _ in range(3) for item in stream]
    assert len(items) == 18
    outputs = set()
    for item in items:
        assert item[CONTROL].shape == (3, RES, RES) and item[CONTROL].min() >= 0
        torch.testing.assert_close(item[CONTROL] * 2 - 1, item["pixel_values"], atol=1e-6, rtol=0)  # cond.png = the image
        outputs.add(tuple(item["pixel_values"].flatten().tolist()))
    assert len(outputs) > 6  # crops and flips varied between epochs
    assert CONTROL not in next(iter(build_dataset(DataConfig(source="webdataset", path=pattern, num_samples=6, resolution=RES))))


@pytest.mark.parametrize("problem", ["drop", "wrong_size"])
def test_webdataset_sample_without_a_fitting_cond_png_stops_with_one_line(tmp_path, problem):
    pattern = write_control_shards(tmp_path, **{problem: 4})
    stream = ShardStream(expand_shards(pattern), 6, paired_transform(RES), shuffle_buffer=0)
    with pytest.raises(LdmError) as info:
        list(stream)
    message = str(info.value)
    assert "\n" not in message and "shard-1.tar" in message and "0004" in message and stream.num_skipped == 0
    if problem == "drop":
        assert "no cond.png" in message and "data.conditioning=false" in message
    else:
        assert "20x20" in message and "24x20" in message


# ---------------------------------------------------------------- ldm-cache


@pytest.fixture
def small_units(monkeypatch):
    monkeypatch.setattr(ldm.cache, "UNIT_SIZE", 8)  # 20 training items -> shards of 8, 8 and 4


def test_cache_stores_the_controls_and_serves_them_as_the_data_set_does(tmp_path, vae_dir, small_units, capsys):
    out = tmp_path / "cache"
    extra = ["data.random_flip=true", "data.conditioning=true"]
    assert cache_main(tiny(tmp_path / "unused", vae_dir, *extra) + ["--out", str(out)]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["config"]["conditioning"] is True
    stored = torch.cat([load_file(str(out / s["file"]))["conditioning"] for s in index["shards"]])
    assert stored.shape == (20, 3, RES, RES) and stored.dtype == torch.uint8

    cfg = load_config(UNetStageConfig, None, tiny(tmp_path / "unused", vae_dir, *extra))
    items = build_dataset(cfg.data, "train", augment=False)
    controls = torch.stack([items[i][CONTROL] for i in range(len(items))])
    assert torch.equal(stored, (controls * 255).round().to(torch.uint8))
    cached = CachedLatents(out, index, flips=True, context=True, conditioning=True)
    for i in (0, 9, 19):
        assert torch.equal(cached[i][CONTROL], items[i][CONTROL])  # the same floats as the uncached data
        assert "conditioning" not in cached[i]
    assert CONTROL not in CachedLatents(out, index, flips=True, context=True)[0]

    # The cache serves a run with controls, and one without them.
    cfg.data.cache = str(out)
    assert ldm.cache.check_cache(cfg, load_vae(vae_dir))["num_samples"] == 20
    cfg.data.conditioning = False
    assert ldm.cache.check_cache(cfg, load_vae(vae_dir))["num_samples"] == 20


def test_cache_without_controls_is_refused_when_they_are_asked_for(tmp_path, vae_dir, capsys):
    out = tmp_path / "cache"
    assert cache_main(tiny(tmp_path / "unused", vae_dir) + ["--out", str(out)]) == 0
    assert "conditioning" not in json.loads((out / "index.json").read_text())["config"]  # as before controls existed
    capsys.readouterr()
    err = one_line_error(capsys, tiny(tmp_path / "unet", vae_dir, f"data.cache={out}", "data.conditioning=true"))
    assert "no control images" in err and "data.conditioning" in err and "ldm-cache" in err


def test_ldm_cache_refuses_shards_without_cond_png_at_the_first_one(tmp_path, vae_dir, capsys):
    pattern = write_control_shards(tmp_path, drop=1)
    argv = tiny(tmp_path / "unused", vae_dir, "data.source=webdataset", f"data.path={pattern}", "data.conditioning=true")
    assert cache_main(argv + ["--out", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err  # (tqdm's bar shares stderr)
    assert err.count("error: ") == 1
    message = err.split("error: ")[1].splitlines()[0]
    assert "shard-0.tar" in message and "0001" in message and "cond.png" in message


def test_one_coin_flips_the_posterior_and_the_control_together():
    n = 64
    mean = torch.randn(n, 4, 2, 2)
    control = torch.rand(n, 3, 4, 4)
    batch = {"mean": mean, "std": torch.ones(n, 4, 2, 2), "mean_flip": mean + 100, "std_flip": torch.full((n, 4, 2, 2), 2.0),
             CONTROL: control, "caption": ["c"] * n}
    cached = Cached.__new__(Cached)
    cached.flips, cached.dtype = True, torch.float32
    torch.manual_seed(0)
    picked = cached.pick_flips(batch)
    flipped = picked["mean"][:, 0, 0, 0] > 50
    assert 10 < flipped.sum() < n - 10
    for i in range(n):
        assert torch.equal(picked["std"][i], batch["std_flip" if flipped[i] else "std"][i])
        assert torch.equal(picked[CONTROL][i], control[i].flip(-1) if flipped[i] else control[i])
    assert not any(key.endswith("_flip") for key in picked)
    # The U-Net loop's random stream is unchanged: pick then sample draws what sampling alone draws.
    torch.manual_seed(1)
    alone = cached.posterior_sample(batch)
    torch.manual_seed(1)
    assert torch.equal(cached.posterior_sample(cached.pick_flips(batch)), alone)
    assert Encoded(None, None, None, torch.float32, "cpu").pick_flips(batch) is batch  # the transform flipped already


def test_a_missing_cond_png_met_in_a_dataloader_worker_is_still_one_line(tmp_path):
    stream = ShardStream(expand_shards(write_control_shards(tmp_path, drop=0)), 6, paired_transform(RES), shuffle_buffer=0)
    with pytest.raises(LdmError) as info:
        list(torch.utils.data.DataLoader(stream, batch_size=2, num_workers=1))
    assert str(info.value).startswith("webdataset sample ") and "\n" not in str(info.value) and "0000" in str(info.value)
