"""Stage-1 training: a few CPU steps of a tiny VAE through the command line, in-process."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

from ldm.autoencoder import build_vae
from ldm.cli.train_vae import main
from ldm.config import VAEStageConfig, load_config
from ldm.vae_loss import vae_loss
from lpips_files import write_lpips_weights

SD_SCALING_FACTOR = 0.18215
KL_F8 = Path(__file__).resolve().parent.parent / "configs/vae/kl-f8.yaml"
# A discriminator switched on at the second step (step index 1), small enough for 16x16 images.
GAN = ["loss.discriminator_start=1", "loss.discriminator_channels=8", "loss.discriminator_layers=2"]
GAN_PARTS = {"g_loss", "d_weight", "disc_loss", "logits_real", "logits_fake"}


def tiny(out, *extra):
    """Overrides for a tiny run: factor 2, 16x16 shapes, 12 training images (3 batches)."""
    return [
        f"train.output_dir={out}",
        "model.block_out_channels=[8,16]", "model.norm_num_groups=8",
        "data.resolution=16", "data.shapes.num_images=16", "data.num_validation=4",
        "train.batch_size=4", "train.log_every=1", "scale_samples=8",
        *extra,
    ]


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_steps_write_the_run_folder(tmp_path):
    run = tmp_path / "vae"
    argv = tiny(run, "train.max_steps=2", "train.checkpoint_every=1", "train.checkpoints_total_limit=1", "per_channel_stats=true")
    assert main(argv) == 0

    assert (run / "config.yaml").is_file()
    # checkpoints_total_limit=1 keeps the newest only; temporary folders never stay behind.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    assert (run / "checkpoints/step-000002/checkpoint.json").is_file()
    assert (run / "samples/step-000002.png").is_file()
    assert any((run / "logs").rglob("events.out.tfevents.*"))

    config = json.loads((run / "final/config.json").read_text())
    measured = [r for r in records(run) if "scaling_factor" in r]
    assert len(measured) == 1 and config["scaling_factor"] == pytest.approx(measured[0]["scaling_factor"])
    assert abs(config["scaling_factor"] - SD_SCALING_FACTOR) > 1e-3  # measured, not the SD constant
    assert len(config["latents_mean"]) == len(config["latents_std"]) == 4  # per latent channel
    AutoencoderKL.from_pretrained(str(run / "final"))

    logged = [r for r in records(run) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2]
    assert all(r["images_per_s"] > 0 and math.isfinite(r["loss"]) for r in logged)
    assert not GAN_PARTS & set(logged[-1]) and "perceptual" not in logged[-1]  # both off by default
    # Validation at the end: PSNR (dB), SSIM and MAE on [0, 1], and the grid of 4 held-out
    # images (16x16, 1-pixel gaps) over their reconstructions.
    [val] = [r for r in records(run) if "val_psnr" in r]
    assert val["step"] == 2 and 0 < val["val_psnr"] < 60 and -1 < val["val_ssim"] < 1 and 0 < val["val_mae"] < 1
    assert Image.open(run / "samples/step-000002.png").size == (4 * 17 + 1, 2 * 17 + 1)


def test_gradient_checkpointing_changes_memory_not_results(tmp_path, monkeypatch):
    import ldm.train.vae_loop as vae_loop

    built, build_vae = [], vae_loop.build_vae
    monkeypatch.setattr(vae_loop, "build_vae", lambda *a: built.append(build_vae(*a)) or built[-1])
    for name, flag in (("plain", "false"), ("recomputed", "true")):
        assert main(tiny(tmp_path / name, *GAN, "train.max_steps=2", f"train.gradient_checkpointing={flag}")) == 0
    assert [vae.is_gradient_checkpointing for vae in built] == [False, True]
    plain, recomputed = final_weights(tmp_path / "plain"), final_weights(tmp_path / "recomputed")
    assert all(torch.allclose(plain[k], recomputed[k], atol=1e-6) for k in plain)


def test_time_budget_stops_early_and_still_saves(tmp_path, capsys):
    run = tmp_path / "vae"
    assert main(tiny(run, "train.max_steps=50", "train.max_minutes=0.0001", "train.checkpoint_every=100")) == 0
    assert (run / "final/config.json").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]
    assert "spent" in capsys.readouterr().out

    # A fresh start into the same folder would mix two runs' checkpoints: refused.
    err = one_line_error(capsys, tiny(run, "train.max_steps=50"))
    assert "--resume auto" in err and "step-000001" in err


def final_weights(run):
    return load_file(str(run / "final/diffusion_pytorch_model.safetensors"))


def checkpoint_tensors(folder):
    """The model weights (autoencoder, discriminator) and EMA weights a checkpoint folder holds."""
    tensors = {f"{p.name}:{k}": v for p in sorted(folder.glob("model*.safetensors")) for k, v in load_file(str(p)).items()}
    if (folder / "ema.safetensors").is_file():
        shadow = load_file(str(folder / "ema.safetensors"))
        tensors.update({f"ema:{i}": shadow[f"shadow.{i}"] for i in range(len(shadow))})
        tensors["ema:step"] = torch.tensor(json.loads((folder / "ema.json").read_text())["optimization_step"])
    return tensors


def all_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra", [[], GAN + ["ema.enabled=true", "ema.decay=0.9"]], ids=["plain", "gan-and-ema"])
def test_resume_from_a_checkpoint_is_bit_identical(tmp_path, extra):
    """4 steps straight vs. stopped at step 2 and resumed; the data crosses an epoch at step 3.
    gan-and-ema: the discriminator trains from step 2 on, across the interruption, and both
    optimizers, schedulers and the EMA come back from the checkpoint."""
    run = tmp_path / "vae"
    common = ["train.max_steps=4", "train.lr_scheduler=cosine", "train.lr_warmup_steps=1", "train.checkpoints_total_limit=null", *extra]
    assert main(tiny(run, *common, "train.checkpoint_every=2")) == 0
    straight = final_weights(run)
    straight_factor = json.loads((run / "final/config.json").read_text())["scaling_factor"]
    straight_state = checkpoint_tensors(run / "checkpoints/step-000004")

    # Stop at step 2: the later checkpoint and the final model are gone.
    shutil.rmtree(run / "checkpoints/step-000004")
    shutil.rmtree(run / "final")
    # Checkpointing and validating at every step on the way must not change the result.
    assert main(tiny(run, *common, "train.checkpoint_every=1", "validation.every=1", "--resume", "auto")) == 0
    resumed = final_weights(run)

    # It did resume: steps 3 and 4 were checkpointed again, step 1 never.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000003", "step-000004"]
    assert all_equal(straight, resumed)
    resumed_state = checkpoint_tensors(run / "checkpoints/step-000004")
    assert all_equal(straight_state, resumed_state)
    assert json.loads((run / "final/config.json").read_text())["scaling_factor"] == straight_factor
    logged = [r for r in records(run) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]  # steps 3-4 not logged twice
    if extra:
        assert len([k for k in straight_state if k.startswith("model_1")]) > 0  # the discriminator is saved
        assert not GAN_PARTS & set(logged[0]) and all(GAN_PARTS <= set(r) for r in logged[1:])
        assert all(r["d_weight"] > 0 for r in logged[1:])
        # The final VAE holds the EMA weights, not the raw ones.
        raw = load_file(str(run / "checkpoints/step-000004/model.safetensors"))
        assert not torch.equal(raw["vae.decoder.conv_out.weight"], resumed["decoder.conv_out.weight"])


def test_interrupt_saves_a_checkpoint_to_resume_from(tmp_path, monkeypatch):
    import ldm.train.vae_loop as vae_loop

    calls = {"n": 0}

    def interrupted_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return vae_loss(*args, **kwargs)

    monkeypatch.setattr(vae_loop, "vae_loss", interrupted_loss)
    run = tmp_path / "vae"
    assert main(tiny(run, "train.max_steps=3", "train.checkpoint_every=100")) == 130
    assert (run / "checkpoints/step-000002/checkpoint.json").is_file()
    assert not (run / "final").exists()

    monkeypatch.setattr(vae_loop, "vae_loss", vae_loss)
    assert main(tiny(run, "train.max_steps=3", "train.checkpoint_every=100", "--resume", "auto")) == 0
    assert (run / "final/config.json").is_file()
    assert (run / "checkpoints/step-000003").is_dir()


def one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    return err[0]


def test_unknown_config_key_lists_the_keys(tmp_path, capsys):
    err = one_line_error(capsys, tiny(tmp_path / "vae", "train.max_stepz=3"))
    assert "train.max_stepz" in err and "max_steps" in err and "batch_size" in err


def test_missing_data_folder(tmp_path, capsys):
    err = one_line_error(capsys, tiny(tmp_path / "vae", "data.source=folder", f"data.path={tmp_path / 'nowhere'}"))
    assert "nowhere" in err
    assert not (tmp_path / "vae").exists()  # nothing written before the checks pass


def test_resolution_not_divisible_by_the_vae_factor(tmp_path, capsys):
    err = one_line_error(capsys, tiny(tmp_path / "vae", "model.block_out_channels=[8,16,16]", "data.resolution=18"))
    assert "data.resolution=18" in err and "4" in err


def test_resume_from_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    err = one_line_error(capsys, tiny(tmp_path / "vae", "--resume", str(tmp_path)))
    assert "not a complete checkpoint" in err


def test_bad_names_are_caught_before_training(tmp_path, capsys):
    assert "loss.reconstruction" in one_line_error(capsys, tiny(tmp_path / "v", "loss.reconstruction=l3"))
    assert "train.lr_scheduler" in one_line_error(capsys, tiny(tmp_path / "v", "train.lr_scheduler=nope"))
    assert "train.mixed_precision" in one_line_error(capsys, tiny(tmp_path / "v", "train.mixed_precision=fp8"))
    assert "loss.discriminator_loss" in one_line_error(capsys, tiny(tmp_path / "v", "loss.discriminator_loss=wgan"))


def test_bad_values_are_caught_before_training(tmp_path, capsys):
    assert "validation.every" in one_line_error(capsys, tiny(tmp_path / "v", "validation.every=0"))
    assert "loss.kl_weight" in one_line_error(capsys, tiny(tmp_path / "v", "loss.kl_weight=-1"))
    err = one_line_error(capsys, tiny(tmp_path / "v", *GAN, "loss.discriminator_layers=3"))  # 16 px: no logits left
    assert "loss.discriminator_layers=3" in err and "24" in err
    assert not (tmp_path / "v").exists()


def test_missing_lpips_weights_stop_before_training(tmp_path, capsys):
    err = one_line_error(capsys, tiny(tmp_path / "v", "loss.perceptual_weight=1.0"))
    assert "loss.lpips_vgg_weights" in err and "vgg16-397923af.pth" in err and "nothing is downloaded" in err
    err = one_line_error(capsys, tiny(
        tmp_path / "v", "loss.perceptual_weight=1.0",
        f"loss.lpips_vgg_weights={tmp_path / 'vgg.pth'}", f"loss.lpips_linear_weights={tmp_path / 'lin.pth'}",
    ))
    assert "no file at" in err and "vgg.pth" in err
    assert not (tmp_path / "v").exists()  # nothing written before the checks pass


def test_a_checkpoint_without_a_discriminator_is_not_resumed_with_one(tmp_path, capsys):
    run = tmp_path / "vae"
    assert main(tiny(run, "train.max_steps=1")) == 0
    capsys.readouterr()  # the progress bar of that run
    err = one_line_error(capsys, tiny(run, "train.max_steps=2", *GAN, "--resume", "auto"))
    assert "without a discriminator" in err and "loss.discriminator_start" in err


def write_images(folder, n, size):
    """`n` random-noise PNGs with captions, an image folder as users have them."""
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"image {i}")
    return folder


def test_kl_f8_config_is_stable_diffusions_layout():
    cfg = load_config(VAEStageConfig, str(KL_F8))
    assert cfg.model.block_out_channels == [128, 256, 512, 512] and cfg.model.latent_channels == 4
    assert cfg.model.layers_per_block == 2 and cfg.data.resolution == 256
    loss = cfg.loss
    assert (loss.perceptual_weight, loss.discriminator_start, loss.discriminator_weight, loss.discriminator_loss) == (
        1.0, 50001, 0.5, "hinge")
    # LDM's kl_weight 1e-6 is against a per-image sum over 3 x 256 x 256 values; ours a per-pixel mean.
    assert loss.kl_weight * 3 * 256 * 256 == pytest.approx(1e-6, rel=1e-3)
    with torch.device("meta"):  # the full-size model, without allocating it
        vae = build_vae(cfg.model, cfg.data.resolution)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # Stable Diffusion's VAE


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state, fixed at the first Accelerator's mixed precision:
    a test in another precision starts from a cleared state and leaves one cleared behind."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_kl_f8_trains_with_lpips_and_the_discriminator(tmp_path):
    """kl-f8 at a reduced size (channels 8-32, 32x32 images, factor 8): LPIPS from local files
    and the discriminator from the second step (in float32: bf16 convolutions are ~5x slower
    on CPU; the bf16 test below runs the same loop on a smaller model)."""
    vgg, lin = write_lpips_weights(tmp_path)
    images = write_images(tmp_path / "images", 12, 40)
    run = tmp_path / "kl-f8"
    argv = [
        "--config", str(KL_F8), f"train.output_dir={run}", f"data.path={images}",
        "model.block_out_channels=[8,16,32,32]", "model.norm_num_groups=8", "data.resolution=32",
        "data.num_workers=0", "data.num_validation=4", "train.batch_size=4", "train.max_steps=3",
        "train.log_every=1", "train.checkpoint_every=1", "train.learning_rate=1e-3", "scale_samples=8",
        f"loss.lpips_vgg_weights={vgg}", f"loss.lpips_linear_weights={lin}",
        "loss.discriminator_start=1", "loss.discriminator_channels=8", "train.mixed_precision='no'",
    ]
    assert main(argv) == 0

    vae = AutoencoderKL.from_pretrained(str(run / "final"))
    assert vae.config.latent_channels == 4 and len(vae.config.block_out_channels) == 4
    assert vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean.shape == (1, 4, 4, 4)  # factor 8
    logged = [r for r in records(run) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert all(r["perceptual"] > 0 and math.isfinite(r["loss"]) for r in logged)
    assert not GAN_PARTS & set(logged[0]) and all(GAN_PARTS <= set(r) for r in logged[1:])
    # The discriminator trained from step 2 on: untouched by step 1, changed by step 3.
    disc = [load_file(str(run / f"checkpoints/step-00000{i}/model_1.safetensors")) for i in (1, 3)]
    assert disc[0].keys() == disc[1].keys()
    assert not all(torch.equal(disc[0][k], disc[1][k]) for k in disc[0] if k.endswith("weight"))


def test_help_shows_overrides(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "key=value" in out and "train.max_steps=" in out and "--resume" in out


def test_bf16_mixed_precision_with_the_discriminator(tmp_path, fresh_accelerate_state):
    """Both optimizers under bf16 autocast: the losses come out close to float32's but not equal
    (autocast is really on), and the weights stay float32."""
    common = [*GAN, "train.max_steps=2", "train.checkpoint_every=100"]
    assert main(tiny(tmp_path / "bf16", *common, "train.mixed_precision=bf16")) == 0
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    assert main(tiny(tmp_path / "fp32", *common)) == 0
    bf16, fp32 = ([r for r in records(tmp_path / name) if "loss" in r] for name in ("bf16", "fp32"))
    for key in ("rec_loss", "disc_loss"):
        assert bf16[-1][key] == pytest.approx(fp32[-1][key], rel=0.05) and bf16[-1][key] != fp32[-1][key]
    assert all(t.dtype == torch.float32 for t in final_weights(tmp_path / "bf16").values())
