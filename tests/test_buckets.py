"""Aspect-ratio bucketing: the bucket list, assignment, the crop record, one-bucket batches with every
image once an epoch (1 and 2 processes, folders and shards), exact resume, ldm-cache, both stages."""

import io
import json
import math
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from ldm.config import DataConfig
from ldm.data import build_dataset
from ldm.data.bucket_batches import (BucketBatchSampler, epoch_batches, split_to_multiple, stream_batches,
                                     stream_batches_per_epoch)
from ldm.data.buckets import BucketTransform, bucket_list, nearest_bucket, with_bucket_step
from ldm.data.webdataset import ShardStream, expand_shards
from ldm.errors import LdmError
from ldm.train.loader import EpochShuffle, item_buckets

# Width x height of the mixed folder's images: 1:1, 4:3, 3:4, 16:9.
SIZES = {"square": (40, 40), "landscape": (48, 36), "portrait": (36, 48), "wide": (64, 36)}
# Their buckets at resolution 32, step 4 (the tiny VAE's factor 2 times the tiny U-Net's 2), as (width, height).
BUCKETS = {"square": (32, 32), "landscape": (36, 28), "portrait": (28, 36), "wide": (44, 24)}
PER_RATIO = 5


def picture(size, seed: int) -> Image.Image:
    """A smooth random picture (a coarse noise field upsampled), so a crop of it is not flat."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    return coarse.resize(size, Image.BICUBIC)


def mixed_folder(folder, per_ratio=PER_RATIO):
    """per_ratio PNGs of each aspect ratio, named so that the sorted order mixes the ratios; captions = names."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(per_ratio):
        for k, (name, size) in enumerate(SIZES.items()):
            stem = f"{i:02d}-{name}"
            picture(size, 10 * i + k).save(folder / f"{stem}.png")
            (folder / f"{stem}.txt").write_text(stem)
    return folder


def bucketed(path, **kw) -> DataConfig:
    cfg = DataConfig(source="folder", path=str(path), resolution=32, num_validation=kw.pop("num_validation", 0), **kw)
    cfg.buckets.enabled = True
    return with_bucket_step(cfg, 4, "the factor")


# ---------------------------------------------------------------- the buckets


@pytest.mark.parametrize("resolution, step, tolerance", [(1024, 64, 0.04), (512, 64, 0.07), (256, 32, 0.07)])
def test_bucket_list(resolution, step, tolerance):
    buckets = bucket_list(resolution, step, max_aspect=2.0)
    assert (resolution, resolution) in buckets
    for width, height in buckets:
        assert width % step == 0 and height % step == 0
        assert abs(width * height / resolution**2 - 1) <= tolerance  # about the same pixel count
        assert 1 / 2 <= width / height <= 2
        assert (height, width) in buckets  # portrait and landscape alike
    aspects = [w / h for w, h in buckets]
    assert aspects == sorted(aspects) and len(set(buckets)) == len(buckets)
    # The widest and tallest reach towards the limit: the next width's bucket would pass 2:1.
    width, height = buckets[-1]
    assert aspects[-1] > 1.75 and aspects[0] == pytest.approx(1 / aspects[-1])
    assert (width + step) / (round(resolution**2 / (width + step) / step) * step) > 2
    assert bucket_list(resolution, step, max_aspect=1.0) == [(resolution, resolution)]


def test_sdxl_like_assignment():
    """At 1024 with a step of 64 the common photo ratios go where SDXL's own buckets put them."""
    buckets = bucket_list(1024, 64, 2.0)
    for size, expected in [((4000, 3000), (1152, 896)), ((3000, 4000), (896, 1152)), ((1920, 1080), (1344, 768)),
                           ((1080, 1920), (768, 1344)), ((500, 500), (1024, 1024)), ((5000, 1000), (1408, 768))]:
        assert buckets[nearest_bucket(size, buckets)] == expected, size


def test_mixed_ratios_go_to_their_buckets():
    buckets = bucket_list(32, 4, 2.0)
    assert buckets == [(24, 44), (24, 40), (28, 36), (32, 32), (36, 28), (40, 24), (44, 24)]
    for name, size in SIZES.items():
        assert buckets[nearest_bucket(size, buckets)] == BUCKETS[name], name


def test_bad_bucket_settings_are_one_line_errors():
    cfg = DataConfig(resolution=32)
    cfg.buckets.enabled = True
    cfg.buckets.step = 6
    with pytest.raises(LdmError, match=r"data.buckets.step=6 is not a multiple of the U-Net factor 4"):
        with_bucket_step(cfg, 4, "the U-Net factor")
    cfg.buckets.step = 12
    with pytest.raises(LdmError, match=r"data.resolution=32 is not a multiple of data.buckets.step=12"):
        with_bucket_step(cfg, 4, "the U-Net factor")
    cfg.buckets.step, cfg.buckets.max_aspect = None, 0.5
    with pytest.raises(LdmError, match="max_aspect must be at least 1"):
        with_bucket_step(cfg, 4, "the U-Net factor")
    cfg.buckets.max_aspect = 2.0
    assert with_bucket_step(cfg, 4, "x").buckets.step == 4 and cfg.buckets.step is None  # resolved in a copy
    shapes = with_bucket_step(cfg, 4, "x")
    with pytest.raises(LdmError, match="shapes images are square"):
        build_dataset(shapes, "train")


def test_transform_covers_the_bucket_and_records_the_crop():
    """Resized to cover the bucket, cropped to it: the pixels are the recorded box of PIL's resize."""
    image = picture((64, 36), 3)
    buckets = bucket_list(32, 4, 2.0)
    for center in (True, False):
        torch.manual_seed(1)
        item = BucketTransform(buckets, center_crop=center)(image)
        assert item["pixel_values"].shape == (3, 24, 44) and item["pixel_values"].dtype == torch.float32
        assert item["original_size"].tolist() == [36, 64] and item["target_size"].tolist() == [24, 44]
        # scale max(44 / 64, 24 / 36) = 0.6875 -> 44 x 24.75, rounded to 44 x 25: one row to crop.
        top, left = item["crop_top_left"].tolist()
        assert left == 0 and top in (0, 1)
        if center:
            assert top == 0  # round(0.5) = 0, as torchvision's CenterCrop
        resized = np.asarray(image.resize((44, 25), Image.BILINEAR), dtype=np.float32)
        expected = torch.from_numpy(resized[top:top + 24, left:left + 44]).permute(2, 0, 1) / 127.5 - 1
        torch.testing.assert_close(item["pixel_values"], expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- one-bucket batches, every image once


def check_epoch(batches, buckets, n):
    """Every batch of one bucket; together every item exactly once."""
    for batch in batches:
        assert len({buckets[i] for i in batch}) == 1
    seen = Counter(i for batch in batches for i in batch)
    assert sorted(seen) == list(range(n)) and set(seen.values()) == {1}


@pytest.mark.parametrize("batch_size", [1, 3, 4])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_image_once_an_epoch_in_one_bucket_batches(batch_size, world):
    rng = np.random.default_rng(0)
    buckets = rng.choice(5, size=41, p=[0.5, 0.2, 0.2, 0.05, 0.05]).tolist()
    samplers = [BucketBatchSampler(buckets, batch_size, seed=7, rank=r, world=world) for r in range(world)]
    assert len({len(s) for s in samplers}) == 1  # every process takes the same number of steps
    orders = []
    for epoch in range(3):
        parts = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            parts.append(list(sampler))
            assert len(parts[-1]) == len(sampler)
        batches = [batch for part in parts for batch in part]
        if batch_size == 1 and 41 % world:  # single images cannot be split: the few left over wait an epoch
            assert len(batches) == 41 - 41 % world
            continue
        check_epoch(batches, buckets, 41)
        assert all(len(b) <= batch_size for b in batches)
        orders.append(batches)
    if orders:
        assert orders[0] != orders[1]  # each epoch its own order


def test_remainders_are_kept_and_split_for_processes():
    # Buckets of 5, 3 and 1 items, batches of 2: 3 + 2 + 1 = 6 batches, the last of each bucket partial.
    buckets = [0] * 5 + [1] * 3 + [2]
    assert sorted(len(b) for b in epoch_batches(buckets, 2, seed=0, epoch=0)) == [1, 1, 1, 2, 2, 2]
    assert epoch_batches(buckets, 2, seed=0, epoch=0, world=2) == epoch_batches(buckets, 2, seed=0, epoch=0)
    # 6 batches over 4 processes: the two largest (first) ones are split, making 8.
    assert sorted(len(b) for b in epoch_batches(buckets, 2, seed=0, epoch=0, world=4)) == [1] * 7 + [2]
    assert split_to_multiple([[1, 2, 3], [4], [5, 6, 7]], 2) == [[1, 2], [3], [4], [5, 6, 7]]


def test_one_bucket_is_epoch_shuffle():
    """Square images only: the batches are EpochShuffle's, plus the last partial one it drops."""
    for epoch in range(2):
        order = list(iter(_epoch_shuffle(22, seed=5, epoch=epoch)))
        expected = [order[i:i + 4] for i in range(0, 22, 4)]
        assert epoch_batches([0] * 22, 4, seed=5, epoch=epoch) == expected


def _epoch_shuffle(n, seed, epoch):
    sampler = EpochShuffle(n, seed)
    sampler.set_epoch(epoch)
    return sampler


def test_sampler_resumes_where_it_stopped():
    buckets = [i % 3 for i in range(30)]
    full = BucketBatchSampler(buckets, 4, seed=1, rank=1, world=2)
    full.set_position(2)
    resumed = BucketBatchSampler(buckets, 4, seed=1, rank=1, world=2)
    resumed.set_position(2, skip=3)
    assert list(resumed) == list(full)[3:]


def test_stream_grouping_makes_a_fixed_number_of_batches():
    """Any spread over the buckets: exactly stream_batches_per_epoch batches, every item once, one bucket each."""
    rng = np.random.default_rng(1)
    spreads = [[0] * 23, [0, 1, 2, 3] * 6, rng.integers(0, 6, 29).tolist(), [b for b in range(6) for _ in range(5)]]
    for batch_size in (1, 2, 4, 5):
        for buckets in spreads:
            n = len(buckets) - 2  # the stream goes on past the epoch's end
            batches = list(stream_batches(zip(buckets, range(len(buckets))), batch_size, 6, n))
            assert len(batches) == stream_batches_per_epoch(n, batch_size, 6)
            assert all(0 < len(b) <= batch_size for b in batches)
            check_epoch(batches, buckets, n)


# ---------------------------------------------------------------- a mixed folder


def test_mixed_folder_items_and_loader(tmp_path):
    folder = mixed_folder(tmp_path / "data")
    train = build_dataset(bucketed(folder, num_validation=4), "train")
    buckets = item_buckets(train)
    assert len(train) == len(buckets) == 16
    names = [train.dataset.samples[i][0].stem.split("-")[1] for i in train.indices]
    all_buckets = bucket_list(32, 4, 2.0)
    assert [all_buckets[b] for b in buckets] == [BUCKETS[name] for name in names]
    item = train[0]
    width, height = BUCKETS[names[0]]
    assert item["pixel_values"].shape == (3, height, width)
    assert item["original_size"].tolist() == list(reversed(SIZES[names[0]])) and item["caption"] == train.dataset.samples[4][0].stem
    # The validation split stays square, unbucketed.
    val = build_dataset(bucketed(folder, num_validation=4), "validation")
    assert item_buckets(val) is None and {tuple(val[i]["pixel_values"].shape) for i in range(4)} == {(3, 32, 32)}

    # Through the loader: each batch one shape, every image once an epoch.
    from ldm.train.loader import BucketLoader, train_loader

    loader = train_loader(train, batch_size=3, num_workers=0, seed=0)
    assert isinstance(loader, BucketLoader)
    for epoch in range(2):
        loader.set_position(epoch)
        captions = []
        for batch in loader:
            assert len({tuple(s) for s in batch["target_size"].tolist()}) == 1
            assert batch["pixel_values"].shape[2:] == tuple(batch["target_size"][0].tolist())
            captions += batch["caption"]
        assert sorted(captions) == sorted(train.dataset.samples[i][0].stem for i in train.indices)
        assert len(captions) == 16
    # DataLoader workers load the same batches (the batch sampler stays in this process).
    with_workers = train_loader(train, batch_size=3, num_workers=2, seed=0)
    with_workers.set_position(1, 2)
    loader.set_position(1, 2)
    for a, b in zip(loader, with_workers, strict=True):
        assert a["caption"] == b["caption"] and torch.equal(a["pixel_values"], b["pixel_values"])


def test_unreadable_image_is_replaced_within_its_bucket(tmp_path):
    folder = mixed_folder(tmp_path / "data", per_ratio=2)
    (folder / "01-wide.png").write_bytes(b"not a png")
    dataset = build_dataset(bucketed(folder), "train").dataset
    bad = [p.name for p, _ in dataset.samples].index("01-wide.png")
    assert dataset.num_skipped == 1  # its header did not read
    item = dataset[bad]
    assert item["caption"] != "01-wide" and item["pixel_values"].shape[1:] == (
        BUCKETS["square"][1], BUCKETS["square"][0])  # a header-less file counts as square; a square stands in


# ---------------------------------------------------------------- shards


def write_mixed_shards(folder, num_shards=2, per_shard=8):
    """Sample i: a picture of ratio i % 4, caption "img i"."""
    ratios = list(SIZES.values())
    for s in range(num_shards):
        with wds.TarWriter(str(folder / f"shard-{s}.tar")) as sink:
            for j in range(per_shard):
                i = s * per_shard + j
                out = io.BytesIO()
                picture(ratios[i % 4], i).save(out, format="PNG")
                sink.write({"__key__": f"{i:04d}", "png": out.getvalue(), "txt": f"img {i}".encode()})
    return str(folder / ("shard-{0..%d}.tar" % (num_shards - 1)))


def shard_stream(pattern, num_samples, rank=0, world=1, batch_size=3):
    transform = BucketTransform(bucket_list(32, 4, 2.0))
    return ShardStream(expand_shards(pattern), num_samples, transform, seed=3, rank=rank, world=world,
                       batch_size=batch_size, shuffle_buffer=4)


def test_shards_in_one_bucket_batches_every_sample_once(tmp_path):
    pattern = write_mixed_shards(tmp_path, num_shards=2, per_shard=8)
    streams = [shard_stream(pattern, 16, rank=r, world=2) for r in range(2)]
    assert streams[0].batches_per_epoch == streams[1].batches_per_epoch == stream_batches_per_epoch(8, 3, 7) == 8
    for epoch in range(2):
        captions = []
        for stream in streams:
            stream.set_position(epoch)
            batches = list(stream)
            assert len(batches) == stream.batches_per_epoch
            for batch in batches:
                assert len({tuple(s) for s in batch["target_size"].tolist()}) == 1
                assert batch["pixel_values"].shape[2:] == tuple(batch["target_size"][0].tolist())
                captions += batch["caption"]
        assert sorted(captions) == sorted(f"img {i}" for i in range(16))
    # A resume skips whole batches (their samples' headers are read again, not decoded) and goes on the same.
    stream = shard_stream(pattern, 16, rank=1, world=2)
    stream.set_position(1)
    straight = list(stream)
    stream.set_position(1, skip=2)
    for a, b in zip(straight[2:], list(stream), strict=True):
        assert a["caption"] == b["caption"] and torch.equal(a["pixel_values"], b["pixel_values"])
    # DataLoader workers split the stream by whole batches: the same batches with 2 workers.
    stream.set_position(1)
    with_workers = list(DataLoader(stream, batch_size=None, num_workers=2))
    assert [b["caption"] for b in with_workers] == [b["caption"] for b in straight]


# ---------------------------------------------------------------- training on a mixed folder, both stages


def folder_data(folder, *extra):
    """A mixed folder at resolution 32: 20 images, the first 4 held out, 16 trained in buckets of 4 (3 + 1 a batch)."""
    return ["data.source=folder", f"data.path={folder}", "data.resolution=32", "data.num_validation=4",
            "data.buckets.enabled=true", "train.batch_size=3", *extra]


@pytest.fixture
def seen_batches(monkeypatch):
    """The batches the training loop takes, in order (captions and pixel shape of each)."""
    import ldm.train.loop as loop

    seen, batches_from = [], loop.batches_from

    def recording(*args):
        for batch in batches_from(*args):
            pixels = batch["pixel_values"] if "pixel_values" in batch else batch["mean"]  # images, or cached latents
            seen.append((list(batch["caption"]), tuple(pixels.shape[2:])))
            yield batch

    monkeypatch.setattr(loop, "batches_from", recording)
    return seen


def check_trained_batches(seen, num_batches=8):
    """Every batch one bucket's shape; the first epoch (8 batches) holds each of the 16 training images once."""
    trained = sorted(f"{i:02d}-{name}" for i in range(1, PER_RATIO) for name in SIZES)
    epoch = [caption for captions, _ in seen[:num_batches] for caption in captions]
    assert sorted(epoch) == trained
    buckets = {name: (h, w) for name, (w, h) in BUCKETS.items()}
    for captions, shape in seen:
        assert {buckets[c.split("-")[1]] for c in captions} == {shape}
    assert {shape for _, shape in seen} == set(buckets.values())  # all four shapes trained


def test_stage_1_trains_on_mixed_ratios_and_resumes_bit_identically(tmp_path, seen_batches):
    from ldm.cli.train_vae import main
    from test_train_vae import tiny

    folder = mixed_folder(tmp_path / "data")
    run = tmp_path / "vae"
    # 8 batches an epoch, 2 per step: step 3 stops mid-epoch, step 6 is in the next epoch. The VAE's factor is 2:
    # a step of 4 gives the buckets stage 2 has.
    common = ["train.max_steps=6", "train.gradient_accumulation_steps=2", "train.checkpoints_total_limit=null",
              "data.random_flip=true", "data.center_crop=false", "data.buckets.step=4", *folder_data(folder)]
    assert main(tiny(run, *common, "train.checkpoint_every=3")) == 0
    check_trained_batches(seen_batches)
    straight = load_file(str(run / "final/diffusion_pytorch_model.safetensors"))
    first = list(seen_batches)

    shutil.rmtree(run / "checkpoints/step-000006")
    shutil.rmtree(run / "final")
    seen_batches.clear()
    assert main(tiny(run, *common, "train.checkpoint_every=1", "--resume", "auto")) == 0
    assert seen_batches == first[6:]  # the resumed run takes exactly the remaining batches
    resumed = load_file(str(run / "final/diffusion_pytorch_model.safetensors"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    config = json.loads((run / "final/config.json").read_text())
    assert math.isfinite(config["scaling_factor"])  # measured on bucketed batches


def test_stage_2_trains_on_mixed_ratios_and_resumes_bit_identically(tmp_path, vae_dir, seen_batches):
    from ldm.cli.train_unet import main
    from test_train_unet import tiny

    folder = mixed_folder(tmp_path / "data")
    run = tmp_path / "unet"
    common = ["train.max_steps=6", "train.gradient_accumulation_steps=2", "train.checkpoints_total_limit=null",
              "validation.every=100", *folder_data(folder)]
    assert main(tiny(run, vae_dir, *common, "train.checkpoint_every=3")) == 0
    check_trained_batches(seen_batches)
    straight = load_file(str(run / "final/unet/diffusion_pytorch_model.safetensors"))
    first = list(seen_batches)

    shutil.rmtree(run / "checkpoints/step-000006")
    shutil.rmtree(run / "final")
    seen_batches.clear()
    assert main(tiny(run, vae_dir, *common, "train.checkpoint_every=1", "--resume", "auto")) == 0
    assert seen_batches == first[6:]
    resumed = load_file(str(run / "final/unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # The resolved step is part of the run's config (a resume with another step would change the buckets).
    assert "step: 4" in (run / "config.yaml").read_text()


def test_ldm_cache_keeps_the_buckets(tmp_path, vae_dir, seen_batches):
    from ldm.cli.cache import main as cache_main
    from ldm.cli.train_unet import main
    from ldm.data.cached import CachedLatents
    from test_train_unet import tiny

    folder = mixed_folder(tmp_path / "data")
    out = tmp_path / "cache"
    assert cache_main(tiny(tmp_path / "unused", vae_dir, *folder_data(folder), "data.random_flip=true") + ["--out", str(out)]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["config"]["data"]["buckets"] == {"max_aspect": 2.0, "step": 4} and index["num_samples"] == 16
    with safe_open(str(out / index["shards"][0]["file"]), "pt") as shard:
        keys, metadata = set(shard.keys()), shard.metadata()
        means = {name: shard.get_tensor(f"mean.{name}") for name in ("32x32", "28x36", "36x28", "24x44")}
    # Latents of each bucket (factor 2: half its pixels a side), stored per bucket, 4 entries each.
    assert {k for k in keys if k.startswith("mean.")} == {f"mean.{n}" for n in means}
    assert {tuple(m.shape) for m in means.values()} == {(4, 4, 16, 16), (4, 4, 14, 18), (4, 4, 18, 14), (4, 4, 12, 22)}
    assert "std_flip.24x44" in keys and "context.24x44" in keys
    rows, records, captions = (json.loads(metadata[k]) for k in ("rows", "records", "captions"))
    dataset = build_dataset(bucketed(folder, num_validation=4), "train")
    for i, (name, row) in enumerate(rows):
        item = dataset[i]
        assert captions[i] == item["caption"] and name == "x".join(map(str, item["target_size"].tolist()))
        assert records[i] == {"original_size": item["original_size"].tolist(), "crop_top_left": item["crop_top_left"].tolist()}
    # The cached data set gives each entry of its bucket, with its record, and batches by bucket.
    cached = CachedLatents(out, index, flips=True, context=True)
    assert item_buckets(cached) is not None and len(set(item_buckets(cached))) == 4
    entry = cached[5]
    name, row = rows[5]
    assert torch.equal(entry["mean"], means[name][row]) and entry["caption"] == captions[5]
    assert entry["original_size"].tolist() == records[5]["original_size"]

    run = tmp_path / "cached"
    assert main(tiny(run, vae_dir, *folder_data(folder), f"data.cache={out}", "train.max_steps=4", "validation.every=100")) == 0
    assert len(seen_batches) == 4
    for captions, shape in seen_batches:  # latents of one bucket a batch
        assert {BUCKETS[c.split("-")[1]] for c in captions} == {(shape[1] * 2, shape[0] * 2)}


def test_a_cache_without_buckets_does_not_serve_a_bucketed_run(tmp_path, vae_dir, capsys):
    from ldm.cli.cache import main as cache_main
    from ldm.cli.train_unet import main
    from test_train_unet import tiny

    folder = mixed_folder(tmp_path / "data", per_ratio=2)
    plain = ["data.source=folder", f"data.path={folder}", "data.resolution=32", "data.num_validation=2"]
    out = tmp_path / "cache"
    assert cache_main(tiny(tmp_path / "unused", vae_dir, *plain) + ["--out", str(out)]) == 0
    capsys.readouterr()
    assert main(tiny(tmp_path / "run", vae_dir, *plain, "data.buckets.enabled=true", f"data.cache={out}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.buckets is None in the cache, {'max_aspect': 2.0, 'step': 4} now" in err[0]


def test_stage_1_trains_on_mixed_shards(tmp_path, seen_batches):
    from ldm.cli.train_vae import main
    from test_train_vae import tiny

    pattern = write_mixed_shards(tmp_path, num_shards=2, per_shard=8)
    run = tmp_path / "vae"
    data = ["data.source=webdataset", f"data.path={pattern}", "data.num_samples=16", "data.num_validation=0",
            "data.resolution=32", "data.buckets.enabled=true", "data.buckets.step=4", "train.batch_size=3"]
    per_epoch = stream_batches_per_epoch(16, 3, 7)
    assert main(tiny(run, *data, f"train.max_steps={per_epoch + 2}", "train.checkpoint_every=3",
                     "train.checkpoints_total_limit=null")) == 0
    epoch = [c for captions, _ in seen_batches[:per_epoch] for c in captions]
    assert sorted(epoch) == sorted(f"img {i}" for i in range(16))
    ratios = [(h, w) for w, h in BUCKETS.values()]
    for captions, shape in seen_batches:
        assert {ratios[int(c.split()[1]) % 4] for c in captions} == {shape}
    straight = load_file(str(run / "final/diffusion_pytorch_model.safetensors"))
    first = list(seen_batches)
    shutil.rmtree(run / "final")
    for later in sorted((run / "checkpoints").iterdir())[1:]:
        shutil.rmtree(later)
    seen_batches.clear()
    assert main(tiny(run, *data, f"train.max_steps={per_epoch + 2}", "train.checkpoint_every=100", "--resume", "auto")) == 0
    assert seen_batches == first[3:]
    resumed = load_file(str(run / "final/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_controlnet_trains_on_mixed_ratios(tmp_path, base_dir, seen_batches):
    """The control stage shares the buckets: image and control through one box, one shape a batch."""
    from ldm.cli.train_control import main
    from test_train_control import tiny

    folder = tmp_path / "data"
    (folder / "cond").mkdir(parents=True)
    lines = []
    for i in range(3):
        for name, size in SIZES.items():
            stem = f"{i:02d}-{name}"
            picture(size, i).save(folder / f"{stem}.png")
            picture(size, 100 + i).convert("L").convert("RGB").save(folder / "cond" / f"{stem}.png")
            lines.append(json.dumps({"file_name": f"{stem}.png", "text": stem, "conditioning_image": f"cond/{stem}.png"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    data = ["data.source=folder", f"data.path={folder}", "data.num_validation=0", "data.buckets.enabled=true"]
    assert main(tiny(tmp_path / "control", base_dir, "controlnet", *data, "train.batch_size=2", "train.max_steps=6",
                     "validation.every=100")) == 0
    buckets = bucket_list(16, 4, 2.0)  # the base makes 16x16 images; VAE factor 2 times U-Net factor 2
    shapes = {name: buckets[nearest_bucket(size, buckets)] for name, size in SIZES.items()}
    assert len(seen_batches) == 6 and len(set(shapes.values())) == 3  # at 16 pixels 4:3 and 16:9 share 20x12
    for captions, shape in seen_batches:
        assert {(shapes[c.split("-")[1]][1], shapes[c.split("-")[1]][0]) for c in captions} == {shape}
    assert (tmp_path / "control/final/config.json").is_file()


def test_checkpoint_from_before_the_buckets_key_resumes(tmp_path):
    """A checkpoint whose config.yaml predates data.buckets resumes: the missing keys count as their defaults."""
    from omegaconf import OmegaConf

    from ldm.cli.train_vae import main
    from ldm.train.manifest import write_manifest
    from test_train_vae import tiny

    run = tmp_path / "vae"
    assert main(tiny(run, "train.max_steps=1", "train.checkpoint_every=1")) == 0
    saved = run / "checkpoints/step-000001/config.yaml"
    config = OmegaConf.load(saved)
    del config.data["buckets"]
    OmegaConf.save(config, saved)
    write_manifest(saved.parent)  # the checkpoint's list of sizes and hashes, for the edited file
    assert main(tiny(run, "train.max_steps=2", "--resume", "auto")) == 0
    assert (run / "final").is_dir()


def test_two_processes_take_whole_batches_every_image_once_and_resume(tmp_path, vae_dir):
    """DDP over gloo: each process its own one-bucket batches, the same number of steps, the
    epoch's images once between them; resumed from the step-3 checkpoint, the same batches and weights."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from test_train_unet import tiny

    folder = mixed_folder(tmp_path / "data")
    report = tmp_path / "report"
    report.mkdir()
    # 16 images in 4 buckets of 4, batches of 3: 8 batches (4 of 3, 4 of 1), 4 per process an epoch.
    argv = tiny(tmp_path / "run", vae_dir, *folder_data(folder), "train.max_steps=6", "train.checkpoint_every=3",
                "train.checkpoints_total_limit=null", "validation.every=100")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    script = Path(__file__).with_name("two_rank_buckets.py")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(report), *argv], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    reports = {(phase, rank): json.loads((report / f"{phase}-rank{rank}.json").read_text())
               for phase in ("straight", "resumed") for rank in range(2)}
    straight = [reports["straight", rank]["seen"] for rank in range(2)]
    assert reports["straight", 0]["world_size"] == 2 and len(straight[0]) == len(straight[1]) == 6
    buckets = {name: [h, w] for name, (w, h) in BUCKETS.items()}
    epoch = []
    for rank in range(2):
        for captions, shape in straight[rank]:
            assert [buckets[c.split("-")[1]] for c in captions] == [shape] * len(captions)
        epoch += [c for captions, _ in straight[rank][:4] for c in captions]
    assert sorted(epoch) == sorted(f"{i:02d}-{name}" for i in range(1, PER_RATIO) for name in SIZES)
    weights = {key: load_file(str(report / f"{key[0]}-rank{key[1]}.safetensors")) for key in reports}
    for rank in range(2):
        assert reports["resumed", rank]["seen"] == straight[rank][3:]
        assert all(torch.equal(weights["straight", 0][k], weights["resumed", rank][k]) for k in weights["straight", 0])


def test_ldm_cache_of_mixed_shards(tmp_path, vae_dir):
    from ldm.cli.cache import main as cache_main
    from ldm.data.cached import CachedLatents
    from test_train_unet import tiny

    pattern = write_mixed_shards(tmp_path, num_shards=2, per_shard=8)
    out = tmp_path / "cache"
    data = ["data.source=webdataset", f"data.path={pattern}", "data.num_samples=16", "data.num_validation=0",
            "data.resolution=32", "data.buckets.enabled=true"]
    assert cache_main(tiny(tmp_path / "unused", vae_dir, *data) + ["--out", str(out)]) == 0
    index = json.loads((out / "index.json").read_text())
    cached = CachedLatents(out, index, flips=False, context=True)
    assert len(cached) == 16 and len(set(item_buckets(cached))) == 4
    ratios = [(h // 2, w // 2) for w, h in BUCKETS.values()]  # latents of the bucket of sample i's ratio i % 4
    for i in range(16):
        entry = cached[i]
        assert tuple(entry["mean"].shape[1:]) == ratios[int(entry["caption"].split()[1]) % 4]
