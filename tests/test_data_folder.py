"""Image folders with captions, the image transform, and `build_dataset`'s sources and splits."""

import json
import logging

import pytest
import torch
from PIL import Image

from ldm.config import DataConfig, ShapesConfig
from ldm.data import build_dataset
from ldm.data.folder import ImageFolderDataset
from ldm.data.transforms import image_transform
from ldm.errors import LdmError

RES = 16


def asymmetric_image(width=40, height=30, seed=0) -> Image.Image:
    """Random pixels: no crop or flip of it equals another by chance."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def write_image(path, seed=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    asymmetric_image(seed=seed).save(path, format=fmt)


def txt_folder(root, names=("a.png", "b.jpg", "c.PNG")):
    """Layout (a): a caption file beside each image."""
    for i, name in enumerate(names):
        write_image(root / name, seed=i)
        (root / name).with_suffix(".txt").write_text(f"  caption {i}\n")
    return root


def jsonl_folder(root):
    """Layout (b): metadata.jsonl at the root, one image in a subfolder."""
    write_image(root / "x.png", seed=0)
    write_image(root / "sub" / "y.jpg", seed=1)
    lines = [{"file_name": "x.png", "text": "an x"}, {"file_name": "sub/y.jpg", "text": "a y"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return root


def error_of(fn, *args):
    with pytest.raises(LdmError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def folder_cfg(root, **kw):
    return DataConfig(source="folder", path=str(root), resolution=RES, **kw)


# ---------------------------------------------------------------- layouts and items


def test_txt_layout(tmp_path):
    ds = ImageFolderDataset(txt_folder(tmp_path), image_transform(RES))
    assert [p.name for p, _ in ds.samples] == ["a.png", "b.jpg", "c.PNG"]  # sorted, any case
    assert [ds[i]["caption"] for i in range(3)] == ["caption 0", "caption 1", "caption 2"]  # stripped
    for i in range(3):
        x = ds[i]["pixel_values"]
        assert x.shape == (3, RES, RES) and x.dtype == torch.float32 and type(x) is torch.Tensor
        assert x.min() >= -1 and x.max() <= 1


def test_metadata_layout_with_subfolder(tmp_path):
    ds = ImageFolderDataset(jsonl_folder(tmp_path), image_transform(RES))
    assert [(p.relative_to(tmp_path).as_posix(), c) for p, c in ds.samples] == [("sub/y.jpg", "a y"), ("x.png", "an x")]


def test_hidden_files_are_not_images(tmp_path):
    txt_folder(tmp_path, names=("a.png",))
    (tmp_path / "._a.png").write_bytes(b"macOS resource fork")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    write_image(tmp_path / ".ipynb_checkpoints" / "a.png")
    assert len(ImageFolderDataset(tmp_path, image_transform(RES))) == 1


def test_default_collate_batches_items(tmp_path):
    ds = ImageFolderDataset(txt_folder(tmp_path), image_transform(RES))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["pixel_values"].shape == (3, 3, RES, RES)
    assert batch["caption"] == ["caption 0", "caption 1", "caption 2"]


# ---------------------------------------------------------------- transform


def test_value_range_ends_at_black_and_white():
    half = Image.new("RGB", (40, 30), (0, 0, 0))
    half.paste((255, 255, 255), (20, 0, 40, 30))  # left black, right white
    x = image_transform(RES)(half)
    assert x[:, :, 0].eq(-1).all() and x[:, :, -1].eq(1).all()


def test_grayscale_and_rgba_become_rgb():
    for mode in ("L", "RGBA", "P"):
        assert image_transform(RES)(asymmetric_image().convert(mode)).shape == (3, RES, RES)


def test_center_crop_is_deterministic_and_random_crop_is_not():
    image = asymmetric_image()
    center = image_transform(RES, center_crop=True)
    assert torch.equal(center(image), center(image))
    torch.manual_seed(0)
    crops = {tuple(image_transform(RES, center_crop=False)(image).flatten().tolist()) for _ in range(20)}
    assert len(crops) > 1


def test_flip_only_when_asked():
    image = asymmetric_image()
    plain = image_transform(RES)(image)
    flipped = torch.flip(plain, dims=[-1])
    assert not torch.equal(plain, flipped)
    torch.manual_seed(0)
    assert all(torch.equal(image_transform(RES, random_flip=False)(image), plain) for _ in range(10))
    outs = [image_transform(RES, random_flip=True)(image) for _ in range(20)]
    assert all(torch.equal(x, plain) or torch.equal(x, flipped) for x in outs)
    assert any(torch.equal(x, plain) for x in outs) and any(torch.equal(x, flipped) for x in outs)


# ---------------------------------------------------------------- errors at construction


def test_missing_folder(tmp_path):
    message = error_of(ImageFolderDataset, tmp_path / "nope", image_transform(RES))
    assert "data folder not found" in message and "nope" in message and "data.path" in message


def test_no_images(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    message = error_of(ImageFolderDataset, tmp_path, image_transform(RES))
    assert "no images found" in message and str(tmp_path) in message


def test_images_without_caption(tmp_path):
    txt_folder(tmp_path, names=("a.png",))
    write_image(tmp_path / "b.png")
    write_image(tmp_path / "c.png")
    message = error_of(ImageFolderDataset, tmp_path, image_transform(RES))
    assert "2 of 3 images" in message and "b.png" in message
    assert "b.txt" in message and "metadata.jsonl" in message  # both fixes named


def test_malformed_metadata_line(tmp_path):
    jsonl_folder(tmp_path)
    for bad in ("{not json", '{"file_name": "x.png"}', '["x.png", "an x"]', '{"file_name": "x.png", "text": 3}'):
        (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "an x"}\n\n' + bad + "\n")
        message = error_of(ImageFolderDataset, tmp_path, image_transform(RES))
        assert "line 3" in message and "malformed" in message and "file_name" in message


def test_metadata_names_missing_file(tmp_path):
    jsonl_folder(tmp_path)
    with open(tmp_path / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "sub/gone.png", "text": "gone"}) + "\n")
    message = error_of(ImageFolderDataset, tmp_path, image_transform(RES))
    assert "line 3" in message and "sub/gone.png" in message


# ---------------------------------------------------------------- unreadable images at load time


def test_corrupt_image_is_skipped_and_counted(tmp_path, caplog):
    txt_folder(tmp_path, names=("a.png", "b.png", "c.png"))
    (tmp_path / "b.png").write_bytes(torch.randint(0, 256, (200,), dtype=torch.uint8).numpy().tobytes())
    ds = ImageFolderDataset(tmp_path, image_transform(RES))
    with caplog.at_level(logging.WARNING, logger="ldm.data.folder"):
        items = [ds[i] for i in range(3)] + [ds[1]]
    assert [item["caption"] for item in items] == ["caption 0", "caption 2", "caption 2", "caption 2"]
    assert ds.num_skipped == 1
    warnings = [r.getMessage() for r in caplog.records if "b.png" in r.getMessage()]
    assert len(warnings) == 1  # once per file, not once per access


def test_last_image_corrupt_wraps_to_first(tmp_path):
    txt_folder(tmp_path, names=("a.png", "b.png"))
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ds = ImageFolderDataset(tmp_path, image_transform(RES))
    assert ds[1]["caption"] == "caption 0" and ds.num_skipped == 1


def test_every_image_unreadable(tmp_path):
    txt_folder(tmp_path, names=("a.png", "b.png"))
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"garbage")
    ds = ImageFolderDataset(tmp_path, image_transform(RES))
    message = error_of(ds.__getitem__, 0)
    assert "unreadable" in message and ds.num_skipped == 2


# ---------------------------------------------------------------- build_dataset


def test_splits_are_disjoint_and_deterministic(tmp_path):
    txt_folder(tmp_path, names=[f"{i}.png" for i in range(5)])
    cfg = folder_cfg(tmp_path, num_validation=2, random_flip=True, center_crop=False)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "validation")
    assert (len(train), len(val)) == (3, 2)
    assert [val[i]["caption"] for i in range(2)] == ["caption 0", "caption 1"]
    assert [train[i]["caption"] for i in range(3)] == ["caption 2", "caption 3", "caption 4"]
    # Validation is never augmented: the same tensors every time.
    assert torch.equal(val[0]["pixel_values"], build_dataset(cfg, "validation")[0]["pixel_values"])
    assert build_dataset(cfg)[0]["pixel_values"].shape == (3, RES, RES)  # "train" is the default


def test_build_dataset_errors(tmp_path):
    txt_folder(tmp_path)  # 3 images
    assert "split 'test'" in error_of(build_dataset, folder_cfg(tmp_path), "test")
    assert "none to train on" in error_of(build_dataset, folder_cfg(tmp_path, num_validation=3))
    assert "num_validation" in error_of(build_dataset, folder_cfg(tmp_path, num_validation=-1))
    assert "data.path" in error_of(build_dataset, DataConfig(source="folder"))
    message = error_of(build_dataset, DataConfig(source="imagenet"))
    assert "imagenet" in message and "folder" in message and "shapes" in message


def test_shapes_source():
    cfg = DataConfig(source="shapes", resolution=RES, num_validation=4, shapes=ShapesConfig(num_images=10, seed=3))
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "validation")
    assert (len(train), len(val)) == (6, 4)
    item = train[0]
    assert item["pixel_values"].shape == (3, RES, RES) and item["pixel_values"].dtype == torch.float32
    assert -1 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1
    assert isinstance(item["caption"], str) and item["caption"].startswith("a ")
    assert torch.equal(val[0]["pixel_values"], build_dataset(cfg, "validation")[0]["pixel_values"])


# ---------------------------------------------------------------- metadata.csv


def csv_folder(root, rows='x.png,an x\nsub/y.jpg,"a y, with a comma"\n'):
    write_image(root / "x.png", seed=0)
    write_image(root / "sub" / "y.jpg", seed=1)
    (root / "metadata.csv").write_text("file_name,text\n" + rows)
    return root


def test_metadata_csv_layout(tmp_path):
    ds = ImageFolderDataset(csv_folder(tmp_path), image_transform(RES))
    assert [(p.relative_to(tmp_path).as_posix(), c) for p, c in ds.samples] == [
        ("sub/y.jpg", "a y, with a comma"), ("x.png", "an x"),
    ]


def test_metadata_csv_errors(tmp_path):
    csv_folder(tmp_path, rows="x.png\n")
    message = error_of(ImageFolderDataset, tmp_path, image_transform(RES))
    assert "line 2" in message and "malformed" in message
    (tmp_path / "metadata.csv").write_text("path,caption\nx.png,an x\n")
    assert "header row" in error_of(ImageFolderDataset, tmp_path, image_transform(RES))
    (tmp_path / "metadata.csv").write_text("file_name,text\nx.png,an x\nsub/y.jpg,a y\n")
    jsonl_folder(tmp_path)
    assert "keep one" in error_of(ImageFolderDataset, tmp_path, image_transform(RES))
