"""ldm-cache and training from its folder: stored values, resume, checks, caption dropout."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import ldm.cache
from ldm.autoencoder import load_vae
from ldm.cli.cache import main as cache_main
from ldm.cli.train_unet import main as train_main
from ldm.config import UNetStageConfig, load_config
from ldm.data import build_dataset
from ldm.data.cached import Cached
from ldm.text_encoder import build_text_encoder, encode_text, tokenize
from test_train_unet import one_line_error, records, tiny

FLIPS = "data.random_flip=true"


@pytest.fixture
def small_units(monkeypatch):
    monkeypatch.setattr(ldm.cache, "UNIT_SIZE", 8)  # 20 training items -> shards of 8, 8 and 4


def make_cache(tmp_path, vae_dir, *extra):
    out = tmp_path / "cache"
    assert cache_main(tiny(tmp_path / "unused", vae_dir, *extra) + ["--out", str(out)]) == 0
    return out


def test_cache_holds_the_posteriors_and_hidden_states(tmp_path, vae_dir, small_units):
    out = make_cache(tmp_path, vae_dir, FLIPS)
    index = json.loads((out / "index.json").read_text())
    assert index["num_samples"] == 20 and [s["num_samples"] for s in index["shards"]] == [8, 8, 4]
    shards = [load_file(str(out / s["file"])) for s in index["shards"]]
    cached = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    assert sorted(cached) == ["context", "mean", "mean_flip", "std", "std_flip"]

    cfg = load_config(UNetStageConfig, None, tiny(tmp_path / "unused", vae_dir, FLIPS))
    items = build_dataset(cfg.data, "train", augment=False)
    pixels = torch.stack([items[i]["pixel_values"] for i in range(len(items))])
    captions = [items[i]["caption"] for i in range(len(items))]
    vae = load_vae(vae_dir).eval()
    with torch.no_grad():
        posterior, mirrored = vae.encode(pixels).latent_dist, vae.encode(pixels.flip(-1)).latent_dist
    assert cached["mean"].shape == (20, 4, 8, 8) and cached["mean"].dtype == torch.float32
    torch.testing.assert_close(cached["mean"], posterior.mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cached["std"], posterior.std, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cached["mean_flip"], mirrored.mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cached["std_flip"], mirrored.std, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(cached["mean_flip"], cached["mean"])  # shapes are not symmetric

    tokenizer, text_encoder = build_text_encoder(cfg.text_encoder, tmp_path / "tok")
    with torch.no_grad():
        context = encode_text(text_encoder.eval(), tokenize(tokenizer, captions))
        empty = encode_text(text_encoder, tokenize(tokenizer, [""]))
    assert cached["context"].shape == (20, 8, 32)
    torch.testing.assert_close(cached["context"], context, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(load_file(str(out / "empty_context.safetensors"))["context"], empty)
    assert [c for s in index["shards"] for c in json.loads(__import__("safetensors").safe_open(
        str(out / s["file"]), "pt").metadata()["captions"])] == captions


def test_a_killed_cache_job_resumes(tmp_path, vae_dir, small_units, capsys):
    out = make_cache(tmp_path, vae_dir)
    kept = (out / "shard-00000.safetensors").stat().st_mtime_ns
    first = load_file(str(out / "shard-00001.safetensors"))
    (out / "index.json").unlink()
    (out / "shard-00001.safetensors").unlink()
    (out / ".tmp-123-shard-00002.safetensors").write_bytes(b"half a shard")  # what a kill leaves
    assert cache_main(tiny(tmp_path / "unused", vae_dir) + ["--out", str(out)]) == 0
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == kept  # not encoded again
    again = load_file(str(out / "shard-00001.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert json.loads((out / "index.json").read_text())["num_samples"] == 20

    capsys.readouterr()
    err = one_line_error_of(cache_main, capsys, tiny(tmp_path / "unused", vae_dir, "data.resolution=8") + ["--out", str(out)])
    assert "another config" in err and "data.resolution" in err


def one_line_error_of(main, capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def weights(run):
    return load_file(str(run / "final/unet/diffusion_pytorch_model.safetensors"))


def test_cached_run_follows_the_uncached_one(tmp_path, vae_dir):
    """Without flips, the cached loop draws the same noise in the same order: the same training, to float precision."""
    out = make_cache(tmp_path, vae_dir)
    common = ["train.max_steps=2", "ema.enabled=false", "objective.caption_dropout=0.5"]
    assert train_main(tiny(tmp_path / "plain", vae_dir, *common)) == 0
    assert train_main(tiny(tmp_path / "cached", vae_dir, *common, f"data.cache={out}")) == 0
    losses = [[r["loss"] for r in records(tmp_path / name)] for name in ("plain", "cached")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # the same noise, timesteps and dropped captions
    plain, cached = weights(tmp_path / "plain"), weights(tmp_path / "cached")
    for key in plain:  # Adam's normalised steps turn the encoders' last-bit differences into a few 1e-5
        torch.testing.assert_close(cached[key], plain[key], atol=1e-4, rtol=1e-4)


def test_cached_resume_is_bit_identical(tmp_path, vae_dir):
    out = make_cache(tmp_path, vae_dir, FLIPS)
    run = tmp_path / "unet"
    common = ["train.max_steps=4", "train.checkpoints_total_limit=null", FLIPS, f"data.cache={out}", "validation.every=100"]
    assert train_main(tiny(run, vae_dir, *common, "train.checkpoint_every=2")) == 0
    straight = weights(run)
    shutil.rmtree(run / "checkpoints/step-000004")
    shutil.rmtree(run / "final")
    assert train_main(tiny(run, vae_dir, *common, "train.checkpoint_every=1", "--resume", "auto")) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000003", "step-000004"]
    resumed = weights(run)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_cache_that_does_not_fit_the_config(tmp_path, vae_dir, capsys):
    out = make_cache(tmp_path, vae_dir)
    capsys.readouterr()
    run = tmp_path / "unet"
    err = one_line_error(capsys, tiny(run, vae_dir, f"data.cache={out}", FLIPS))
    assert "no flipped latents" in err and "ldm-cache" in err
    err = one_line_error(capsys, tiny(run, vae_dir, f"data.cache={out}", "text_encoder.layers=2"))
    assert "text_encoder.layers is 1 in the cache, 2 now" in err and "re-run ldm-cache" in err
    err = one_line_error(capsys, tiny(run, vae_dir, f"data.cache={out}", "data.shapes.num_images=30"))
    assert "data.shapes.num_images" in err
    other_vae = tmp_path / "vae2"
    shutil.copytree(vae_dir, other_vae)
    config = json.loads((other_vae / "config.json").read_text())
    (other_vae / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.5}))
    assert "vae." in one_line_error(capsys, tiny(run, other_vae, f"data.cache={out}"))
    assert "no finished cache" in one_line_error(capsys, tiny(run, vae_dir, f"data.cache={tmp_path}"))
    # A trained text encoder ignores the cached hidden states: no mismatch.
    assert train_main(tiny(run, vae_dir, f"data.cache={out}", "train.max_steps=1", "text_encoder.trainable=true",
                           "text_encoder.layers=2")) == 0


def test_dropped_captions_take_the_empty_caption_context(tmp_path):
    empty = torch.full((1, 3, 2), 7.0)
    folder = tmp_path / "c"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file({"context": empty}, str(folder / "empty_context.safetensors"))
    cached = Cached(folder, {"empty_context": "empty_context.safetensors"}, False,
                    type("E", (), {"dtype": torch.float32})(), "cpu")
    batch = {"context": torch.arange(12.0).view(2, 3, 2), "caption": ["a red circle", "a blue square"]}
    context = cached.context(batch, ["a red circle", ""])
    assert torch.equal(context[0], batch["context"][0]) and torch.equal(context[1], empty[0])
