"""Stage-2 training: a few CPU steps of a tiny U-Net on a tiny VAE, through the command line."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ldm.cli.train_unet import main
from ldm.config import UNetStageConfig, load_config

PROMPTS = "validation.prompts=[a red circle,a blue square]"


def tiny(out, vae_dir, *extra):
    """Overrides for a tiny run: 16x16 shapes -> 8x8x4 latents, 20 training images (5 batches)."""
    return [
        f"train.output_dir={out}", f"vae_path={vae_dir}",
        "model.block_out_channels=[32,64]", "model.norm_num_groups=8", "model.layers_per_block=1",
        "text_encoder.width=32", "text_encoder.heads=4", "text_encoder.layers=1", "text_encoder.context_length=8",
        "data.resolution=16", "data.shapes.num_images=24", "data.num_validation=4",
        "train.batch_size=4", "train.log_every=1", "validation.num_inference_steps=2",
        *extra,
    ]


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_steps_write_a_model_folder_that_samples(tmp_path, vae_dir):
    from ldm.pipeline import LatentDiffusionPipeline

    run = tmp_path / "unet"
    assert main(tiny(run, vae_dir, "train.max_steps=2", "train.checkpoint_every=1", "validation.every=1", PROMPTS)) == 0

    assert (run / "config.yaml").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert (run / "checkpoints/step-000002/ema.safetensors").is_file()  # the EMA
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-000001.png", "step-000002.png"]
    assert [r["step"] for r in records(run)] == [1, 2] and all(r["samples_per_s"] > 0 for r in records(run))

    final = run / "final"
    for part in ("model_index.json", "vae", "unet", "scheduler", "text_encoder", "tokenizer", "ldm_config.yaml"):
        assert (final / part).exists(), part
    saved = load_config(UNetStageConfig, str(final / "ldm_config.yaml"))
    assert saved.train.max_steps == 2 and saved.model.block_out_channels == [32, 64]
    assert json.loads((final / "vae/config.json").read_text())["scaling_factor"] == pytest.approx(0.7)
    scheduler = json.loads((final / "scheduler/scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["clip_sample"] is False

    # The final U-Net holds the EMA weights, not the raw ones.
    ema = load_file(str(run / "checkpoints/step-000002/ema.safetensors"))
    pipe = LatentDiffusionPipeline.from_pretrained(str(final))
    for shadow, param in zip([ema[f"shadow.{i}"] for i in range(len(ema))], pipe.unet.parameters()):
        assert torch.equal(shadow, param.data)
    raw = load_file(str(run / "checkpoints/step-000002/model.safetensors"))
    assert any(not torch.equal(raw[k], v) for k, v in pipe.unet.state_dict().items() if k in raw)

    pipe.set_progress_bar_config(disable=True)
    image = pipe(["a red circle"], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 16, 16, 3) and image.min() >= 0 and image.max() <= 1


def test_resume_from_a_checkpoint_is_bit_identical(tmp_path, vae_dir):
    """4 steps straight vs. stopped at step 2 and resumed, with gradient accumulation and EMA.

    5 batches an epoch, 2 per step: step 2 stops mid-epoch (4 batches in), step 3 is the
    epoch's 1-batch remainder, step 4 starts the next epoch. The resumed run also
    checkpoints and samples at every step: neither may move the training RNG.
    """
    run = tmp_path / "unet"
    common = ["train.max_steps=4", "train.gradient_accumulation_steps=2", "train.lr_scheduler=linear",
              "objective.prediction_type=v_prediction", "train.checkpoints_total_limit=null", PROMPTS]
    assert main(tiny(run, vae_dir, *common, "train.checkpoint_every=2", "validation.every=100")) == 0
    straight = {part: load_file(str(run / f"final/{part}/diffusion_pytorch_model.safetensors")) for part in ("unet", "text_encoder")}
    straight_raw = load_file(str(run / "checkpoints/step-000004/model.safetensors"))

    shutil.rmtree(run / "checkpoints/step-000004")
    shutil.rmtree(run / "final")
    assert main(tiny(run, vae_dir, *common, "train.checkpoint_every=1", "validation.every=1", "--resume", "auto")) == 0

    # It did resume: steps 3 and 4 were checkpointed again, step 1 never.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000003", "step-000004"]
    raw = load_file(str(run / "checkpoints/step-000004/model.safetensors"))
    assert all(torch.equal(straight_raw[k], raw[k]) for k in straight_raw)
    for part, weights in straight.items():
        resumed = load_file(str(run / f"final/{part}/diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(weights[k], resumed[k]) for k in weights), part


def test_trainable_text_encoder_is_trained_and_saved(tmp_path, vae_dir):
    from ldm.text_encoder import build_text_encoder
    from ldm.config import TextEncoderConfig

    run = tmp_path / "unet"
    assert main(tiny(run, vae_dir, "train.max_steps=1", "text_encoder.trainable=true", "objective.caption_dropout=0")) == 0
    _, initial = build_text_encoder(TextEncoderConfig(width=32, heads=4, layers=1, context_length=8), tmp_path / "tok")
    trained = load_file(str(run / "final/text_encoder/diffusion_pytorch_model.safetensors"))
    initial = initial.state_dict()
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)


def one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    return err[0]


def test_vae_folder_without_scaling_factor(tmp_path, vae_dir, capsys):
    folder = tmp_path / "vae"
    shutil.copytree(vae_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["scaling_factor"]
    (folder / "config.json").write_text(json.dumps(config))
    err = one_line_error(capsys, tiny(tmp_path / "unet", folder))
    assert "scaling_factor" in err


def test_missing_vae_folder(tmp_path, capsys):
    assert "no VAE" in one_line_error(capsys, tiny(tmp_path / "unet", tmp_path / "nowhere"))


def test_resolution_not_divisible_by_the_vae_factor(tmp_path, vae_dir, capsys):
    err = one_line_error(capsys, tiny(tmp_path / "unet", vae_dir, "data.resolution=17"))
    assert "data.resolution=17" in err and "2" in err


def test_latents_too_small_for_the_unet(tmp_path, vae_dir, capsys):
    err = one_line_error(capsys, tiny(tmp_path / "unet", vae_dir, "data.resolution=10"))  # 5x5 latents, 2 levels
    assert "U-Net" in err


def test_text_width_must_match_cross_attention(tmp_path, vae_dir, capsys):
    err = one_line_error(capsys, tiny(tmp_path / "unet", vae_dir, "model.cross_attention_dim=48"))
    assert "cross_attention_dim" in err and "32" in err


def test_unknown_objective(tmp_path, vae_dir, capsys):
    assert "prediction_type" in one_line_error(capsys, tiny(tmp_path / "u", vae_dir, "objective.prediction_type=x0"))
    assert "beta_schedule" in one_line_error(capsys, tiny(tmp_path / "u", vae_dir, "objective.beta_schedule=cosine"))


def test_v_prediction_zero_snr_offset_noise_and_checkpointing_train(tmp_path, vae_dir):
    """The objective's options run through the loop: finite losses, a saved zero-SNR sampler."""
    run = tmp_path / "unet"
    assert main(tiny(
        run, vae_dir, "train.max_steps=2", "objective.prediction_type=v_prediction",
        "objective.rescale_zero_terminal_snr=true", "objective.offset_noise=0.1", "objective.min_snr_gamma=5",
        "train.gradient_checkpointing=true", "text_encoder.trainable=true",
    )) == 0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records(run) if "loss" in r)
    scheduler = json.loads((run / "final/scheduler/scheduler_config.json").read_text())
    assert scheduler["rescale_betas_zero_snr"] is True and scheduler["timestep_spacing"] == "trailing"
    assert scheduler["prediction_type"] == "v_prediction"


@pytest.mark.run_report
def test_a_finished_run_writes_its_report(tmp_path, vae_dir):
    run = tmp_path / "unet"
    assert main(tiny(run, vae_dir, "train.max_steps=2", "validation.every=1", PROMPTS)) == 0
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2  # the loss curve and a validation grid, embedded
    assert "http://" not in page and "https://" not in page  # nothing for the browser to fetch
