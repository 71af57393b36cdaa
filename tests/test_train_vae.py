"""Stage-1 training: a few CPU steps of a tiny VAE through the command line, in-process."""

import json
import math
import shutil

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file

from ldm.cli.train_vae import main
from ldm.config import VAELossConfig
from ldm.vae_loss import psnr, vae_loss

SD_SCALING_FACTOR = 0.18215


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
    assert main(tiny(run, "train.max_steps=2", "train.checkpoint_every=1", "train.checkpoints_total_limit=1")) == 0

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
    AutoencoderKL.from_pretrained(str(run / "final"))

    logged = [r for r in records(run) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2]
    assert all(r["images_per_s"] > 0 and math.isfinite(r["loss"]) for r in logged)
    assert any("val_psnr" in r for r in records(run))


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


def test_resume_from_a_checkpoint_is_bit_identical(tmp_path):
    """4 steps straight vs. stopped at step 2 and resumed; the data crosses an epoch at step 3."""
    run = tmp_path / "vae"
    common = ["train.max_steps=4", "train.lr_scheduler=cosine", "train.lr_warmup_steps=1", "train.checkpoints_total_limit=null"]
    assert main(tiny(run, *common, "train.checkpoint_every=2")) == 0
    straight = final_weights(run)
    straight_factor = json.loads((run / "final/config.json").read_text())["scaling_factor"]

    # Stop at step 2: the later checkpoint and the final model are gone.
    shutil.rmtree(run / "checkpoints/step-000004")
    shutil.rmtree(run / "final")
    # Checkpointing (and validating) at every step on the way must not change the result.
    assert main(tiny(run, *common, "train.checkpoint_every=1", "--resume", "auto")) == 0
    resumed = final_weights(run)

    # It did resume: steps 3 and 4 were checkpointed again, step 1 never.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000003", "step-000004"]
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert json.loads((run / "final/config.json").read_text())["scaling_factor"] == straight_factor
    assert [r["step"] for r in records(run) if "loss" in r] == [1, 2, 3, 4]  # steps 3-4 not logged twice


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


def test_help_shows_overrides(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "key=value" in out and "train.max_steps=" in out and "--resume" in out


# ---------------------------------------------------------------- the loss


def test_kl_and_reconstruction_match_their_formulas():
    torch.manual_seed(0)
    mean, logvar = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    x, x_hat = torch.rand(2, 3, 6, 6, dtype=torch.float64), torch.rand(2, 3, 6, 6, dtype=torch.float64)
    # KL(N(mu, sigma^2) || N(0, 1)) = 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2), averaged over the batch.
    kl = (0.5 * (mean**2 + logvar.exp() - 1 - logvar)).sum(dim=(1, 2, 3)).mean()
    loss, parts = vae_loss(x, x_hat, posterior, VAELossConfig(reconstruction="l1", kl_weight=0.01))
    assert parts["kl"].item() == pytest.approx(kl.item(), rel=1e-6)
    assert loss.item() == pytest.approx(((x - x_hat).abs().mean() + 0.01 * kl).item(), rel=1e-6)
    loss2, _ = vae_loss(x, x_hat, posterior, VAELossConfig(reconstruction="l2", kl_weight=0.0))
    assert loss2.item() == pytest.approx(((x - x_hat) ** 2).mean().item(), rel=1e-6)


def test_psnr():
    x = torch.zeros(1, 3, 4, 4)
    # An error of 0.2 on [-1, 1] is 0.1 on [0, 1]: PSNR = 10 log10(1 / 0.01) = 20 dB.
    assert psnr(x, x + 0.2).item() == pytest.approx(20.0, rel=1e-5)
