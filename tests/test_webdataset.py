"""WebDataset tar shards: brace patterns, per-process shards, a deterministic, resumable stream."""

import io
import json
import logging
import shutil

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from ldm.config import DataConfig
from ldm.data import build_dataset
from ldm.data.transforms import image_transform
from ldm.data.webdataset import ShardStream, expand_shards
from ldm.errors import LdmError
from ldm.train.loader import StreamLoader
from test_train_unet import tiny

RES = 8


def png(value: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (RES, RES), (value, value, value)).save(out, format="PNG")
    return out.getvalue()


def write_shards(folder, num_shards=4, per_shard=5, corrupt=()):
    """Shards shard-0..N.tar; sample i has grey level i and caption "img i" (txt or json, alternately)."""
    for s in range(num_shards):
        with wds.TarWriter(str(folder / f"shard-{s}.tar")) as sink:
            for j in range(per_shard):
                i = s * per_shard + j
                sample = {"__key__": f"{i:04d}", "png": b"not a png" if i in corrupt else png(i)}
                if i % 2:
                    sample["json"] = json.dumps({"caption": f"img {i}"}).encode()
                else:
                    sample["txt"] = f"img {i}".encode()
                sink.write(sample)
    return str(folder / ("shard-{0..%d}.tar" % (num_shards - 1)))


def stream(pattern, num_samples=20, **kw):
    return ShardStream(expand_shards(pattern), num_samples, image_transform(RES), **kw)


def ids(items):
    """The sample numbers of decoded items, from their grey level (pixel -1 + 2 * i / 255)."""
    return [round((item["pixel_values"][0, 0, 0].item() + 1) * 127.5) for item in items]


def test_brace_patterns_and_missing_shards(tmp_path):
    write_shards(tmp_path, num_shards=3)
    assert expand_shards(str(tmp_path / "shard-{0..2}.tar")) == [str(tmp_path / f"shard-{i}.tar") for i in range(3)]
    both = expand_shards(f"{tmp_path}/shard-{{0..1}}.tar::{tmp_path}/shard-2.tar")
    assert [p.rsplit("/", 1)[1] for p in both] == ["shard-0.tar", "shard-1.tar", "shard-2.tar"]

    with pytest.raises(LdmError, match=r"nothing-\{0\.\.3\}\.tar.*4 of which do not exist.*nothing-0\.tar"):
        expand_shards(str(tmp_path / "nothing-{0..3}.tar"))
    with pytest.raises(LdmError, match="1 of which.*shard-3.tar"):
        expand_shards(str(tmp_path / "shard-{0..3}.tar"))
    with pytest.raises(LdmError, match="local"):
        expand_shards("pipe:curl -s http://x/shard-{0..3}.tar")


def test_config_errors_before_training(tmp_path):
    pattern = write_shards(tmp_path)
    cfg = DataConfig(source="webdataset", path=pattern, resolution=RES)
    with pytest.raises(LdmError, match="data.num_samples must be set"):
        build_dataset(cfg)
    cfg.num_samples = 20
    assert isinstance(build_dataset(cfg), ShardStream)
    with pytest.raises(LdmError, match="no validation split.*num_validation=0"):
        build_dataset(cfg, "validation")
    with pytest.raises(LdmError, match="4 webdataset shards for 5 processes"):
        build_dataset(cfg).for_process(0, 5, batch_size=2, seed=0)


def test_processes_read_disjoint_shards_and_yield_equal_counts(tmp_path):
    pattern = write_shards(tmp_path, num_shards=5, per_shard=4)  # 20 samples; 3 shards vs 2 for the ranks
    ranks = [stream(pattern).for_process(rank, 2, batch_size=2, seed=0) for rank in range(2)]
    assert set(ranks[0].my_shards).isdisjoint(ranks[1].my_shards)
    seen = [ids(list(r)) for r in ranks]
    assert [len(s) for s in seen] == [10, 10]  # num_samples // world each: rank 1 goes round its 8 twice
    shard_of = lambda i: i // 4  # noqa: E731
    assert {shard_of(i) for i in seen[0]} == {0, 2, 4} and {shard_of(i) for i in seen[1]} == {1, 3}
    assert len(set(seen[0])) == 10  # 12 samples in its shards: no repeat within the epoch
    assert set(seen[1]) == set(range(4, 8)) | set(range(12, 16))  # all 8 of its samples, 2 of them twice


def test_order_depends_on_seed_and_epoch_and_resume_skips_exactly(tmp_path):
    pattern = write_shards(tmp_path)
    s = stream(pattern, shuffle_buffer=4)
    first = ids(list(s))
    assert sorted(first) == list(range(20))  # one epoch: every sample once
    assert ids(list(s)) == first  # a function of (seed, epoch, rank) only
    s.set_position(1)
    second = ids(list(s))
    assert sorted(second) == list(range(20)) and second != first
    s.set_position(1, skip=7)
    assert ids(list(s)) == second[7:]
    other_seed = stream(pattern, shuffle_buffer=4).for_process(0, 1, batch_size=1, seed=1)
    assert ids(list(other_seed)) != first


def test_resume_skip_does_not_decode(tmp_path, monkeypatch):
    import ldm.data.webdataset as module

    pattern = write_shards(tmp_path)
    decoded = []
    real = module.decode
    monkeypatch.setattr(module, "decode", lambda sample, t: decoded.append(sample["__key__"]) or real(sample, t))
    s = stream(pattern)
    s.set_position(0, skip=15)
    assert len(list(s)) == 5 and len(decoded) == 5


def test_corrupt_sample_is_replaced_counted_and_logged(tmp_path, caplog):
    pattern = write_shards(tmp_path, num_shards=1, per_shard=20, corrupt={3})
    s = stream(pattern, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING):
        got = ids(list(s))
    assert got == [0, 1, 2, 4, 4] + list(range(5, 20))  # position 3 takes the next good sample: no shift
    assert s.num_skipped == 1 and "0003" in s.skipped_keys[0] and "0003" in caplog.text
    s.set_position(0, skip=4)
    assert ids(list(s)) == got[4:]  # the skip counts positions, good or bad


def test_captions_from_txt_and_json(tmp_path):
    pattern = write_shards(tmp_path, num_shards=1, per_shard=4)
    items = list(stream(pattern, num_samples=4, shuffle_buffer=0))
    assert [item["caption"] for item in items] == ["img 0", "img 1", "img 2", "img 3"]
    assert items[0]["pixel_values"].shape == (3, RES, RES)


def test_workers_give_the_same_batches(tmp_path):
    pattern = write_shards(tmp_path)
    part = stream(pattern, shuffle_buffer=4).for_process(0, 1, batch_size=3, seed=0)

    def batches(workers, skip):
        loader = StreamLoader(DataLoader(part, batch_size=3, num_workers=workers, drop_last=True))
        loader.set_position(2, skip)
        return [ids([{"pixel_values": p} for p in b["pixel_values"]]) for b in loader]

    alone = batches(0, 0)
    assert len(alone) == 6 and batches(2, 0) == alone
    assert batches(2, 1) == alone[1:]  # resumed one batch in, with two workers


# ---------------------------------------------------------------- through the stage-2 trainer


def test_training_on_shards_resumes_bit_identically(tmp_path, vae_dir):
    """5 batches of 4 an epoch; stopped at step 3 (mid-epoch), resumed to step 6 (into epoch 2)."""
    from safetensors.torch import load_file

    from ldm.cli.train_unet import main
    
    data = ["data.source=webdataset", f"data.path={write_shards(tmp_path)}", "data.num_samples=20",
            "data.random_flip=true", "train.max_steps=6", "train.checkpoints_total_limit=null"]
    run = tmp_path / "unet"
    assert main(tiny(run, vae_dir, *data, "train.checkpoint_every=3")) == 0
    straight = load_file(str(run / "checkpoints/step-000006/model.safetensors"))
    for stale in ("checkpoints/step-000006", "final"):
        shutil.rmtree(run / stale)
    assert main(tiny(run, vae_dir, *data, "train.checkpoint_every=1", "--resume", "auto")) == 0
    resumed = load_file(str(run / "checkpoints/step-000006/model.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_ldm_cache_counts_and_encodes_shards(tmp_path, vae_dir, capsys):
    from ldm.cli.cache import main as cache_main
    from ldm.cli.train_unet import main
    
    data = ["data.source=webdataset", f"data.path={write_shards(tmp_path, corrupt={7})}"]
    assert cache_main(tiny(tmp_path / "unused", vae_dir, *data) + ["--out", str(tmp_path / "cache")]) == 0
    index = json.loads((tmp_path / "cache/index.json").read_text())
    assert index["num_samples"] == 19 and [s["num_samples"] for s in index["shards"]] == [5, 4, 5, 5]
    assert "19 samples in 4 shards" in capsys.readouterr().out
    # Training from the cache needs no data.num_samples: the index counts them.
    assert main(tiny(tmp_path / "unet", vae_dir, *data, f"data.cache={tmp_path / 'cache'}", "train.max_steps=1")) == 0
