"""Bad captions in scraped data (issue 10, defect 7): a caption that is not UTF-8 or is empty
is skipped and reported like an unreadable image (or an error with data.bad_captions=error),
and a training run writes skipped.jsonl with trained + held out + skipped = total."""

import json

import pytest

from ldm.data.folder import ImageFolderDataset
from ldm.data.transforms import image_transform
from ldm.errors import LdmError
from test_data_folder import write_image


def scraped_folder(root):
    """8 images with .txt captions: one Latin-1, one empty; plus 2 in metadata.jsonl, one of them Latin-1."""
    for i in range(8):
        write_image(root / f"{i}.png", seed=i)
        (root / f"{i}.txt").write_text(f"a picture number {i}\n")
    (root / "3.txt").write_bytes("un caf\u00e9\n".encode("latin-1"))
    (root / "5.txt").write_text("  \n")
    write_image(root / "m" / "a.png", seed=10)
    write_image(root / "m" / "b.png", seed=11)
    (root / "metadata.jsonl").write_bytes(
        b'{"file_name": "m/a.png", "text": "a fine caption"}\n'
        + '{"file_name": "m/b.png", "text": "na\u00efve"}\n'.encode("latin-1")
    )
    return root


def test_bad_captions_are_skipped_and_named(tmp_path):
    """Fails on the main of 2026-11-30: one Latin-1 caption stopped the whole data set."""
    ds = ImageFolderDataset(scraped_folder(tmp_path), image_transform(8))
    reasons = {p.rsplit("/", 1)[-1] if "/m/" not in p else "m/" + p.rsplit("/", 1)[-1]: r for p, r in ds.skipped}
    assert set(reasons) == {"3.png", "5.png", "m/b.png"}
    assert "not UTF-8 (byte 0xe9" in reasons["3.png"] and "3.txt" in reasons["3.png"]
    assert reasons["5.png"] == "empty caption"
    assert "not UTF-8 (byte 0xef" in reasons["m/b.png"]
    assert len(ds) == 7 and len(ds) + len(ds.skipped) == 10
    assert all(caption.strip() for _, caption in ds.samples)


def test_bad_captions_can_be_an_error(tmp_path):
    with pytest.raises(LdmError, match="bad caption") as e:
        ImageFolderDataset(scraped_folder(tmp_path), image_transform(8), bad_captions="error")
    assert "\n" not in str(e.value) and "data.bad_captions=skip" in str(e.value)


def test_a_run_writes_the_skip_report(tmp_path, capsys):
    from ldm.cli.train_vae import main

    run = tmp_path / "vae"
    folder = scraped_folder(tmp_path / "data")
    argv = [f"train.output_dir={run}", "data.source=folder", f"data.path={folder}", "data.resolution=16",
            "data.num_validation=2", "model.block_out_channels=[8,16]", "model.norm_num_groups=8",
            "train.batch_size=2", "train.max_steps=1", "scale_samples=2", "validation.every=100"]
    assert main(argv) == 0
    report = [json.loads(line) for line in (run / "skipped.jsonl").read_text().splitlines()]
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in report) == ["3.png", "5.png", "b.png"]
    out = capsys.readouterr().out
    assert "data: 5 trained + 2 held out for validation + 3 skipped = 10 images" in out
