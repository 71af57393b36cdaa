"""Stage configs: the shipped YAML files load, and a bad key or value is a one-line error."""

from pathlib import Path

import pytest

from ldm.config import UNetStageConfig, VAEStageConfig, load_config, save_config
from ldm.errors import LdmError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_shipped_vae_config():
    cfg = load_config(VAEStageConfig, str(CONFIGS / "vae/shapes.yaml"))
    factor = 2 ** (len(cfg.model.block_out_channels) - 1)
    assert cfg.data.source == "shapes" and cfg.data.resolution % factor == 0
    assert all(c % cfg.model.norm_num_groups == 0 for c in cfg.model.block_out_channels)


def test_shipped_unet_config_fits_the_vae_config():
    vae = load_config(VAEStageConfig, str(CONFIGS / "vae/shapes.yaml"))
    cfg = load_config(UNetStageConfig, str(CONFIGS / "unet/shapes.yaml"))
    assert cfg.vae_path == f"{vae.train.output_dir}/final"
    assert cfg.data.resolution == vae.data.resolution
    latent = cfg.data.resolution // 2 ** (len(vae.model.block_out_channels) - 1)
    assert latent % 2 ** (len(cfg.model.block_out_channels) - 1) == 0
    assert cfg.validation.prompts and 0 < cfg.objective.caption_dropout < 1
    assert cfg.model.cross_attention_dim in (None, cfg.text_encoder.width)


def test_overrides_apply_with_types():
    overrides = ["train.max_steps=7", "model.block_out_channels=[8,16]", "train.max_minutes=1.5"]
    cfg = load_config(VAEStageConfig, str(CONFIGS / "vae/shapes.yaml"), overrides)
    assert cfg.train.max_steps == 7 and cfg.model.block_out_channels == [8, 16] and cfg.train.max_minutes == 1.5


def test_unknown_key_lists_the_keys():
    with pytest.raises(LdmError) as e:
        load_config(UNetStageConfig, None, ["ema.decays=0.9"])
    message = str(e.value)
    assert "ema.decays" in message and "decay" in message and "inv_gamma" in message and "\n" not in message


def test_bad_value_type():
    with pytest.raises(LdmError, match="train.max_steps"):
        load_config(VAEStageConfig, None, ["train.max_steps=many"])


def test_saved_config_loads_back(tmp_path):
    cfg = load_config(UNetStageConfig, str(CONFIGS / "unet/shapes.yaml"), ["train.max_steps=3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(UNetStageConfig, str(tmp_path / "config.yaml")) == cfg


def test_mixed_precision_no_survives_yaml(tmp_path):
    """A bare `no` is YAML 1.1's false; it must still mean accelerate's "no"."""
    assert load_config(VAEStageConfig, overrides=["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(VAEStageConfig, str(path)).train.mixed_precision == "no"
    assert load_config(VAEStageConfig, overrides=["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
