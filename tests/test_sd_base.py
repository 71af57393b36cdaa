"""configs/unet/sd-base*.yaml: Stable Diffusion-sized U-Nets and text towers.

The full sd-base U-Net (860M parameters) is built, run forward and trained one step at a
reduced resolution (8x8 latents) in float32: the objective, backward, clipping and AdamW
over all its parameters (~14 GB, about a minute on 2 cores). Its other training settings
(bf16, warm-up, EMA, folder data, the ViT-L/14-sized text tower) go through the real loop
on a U-Net of the same layout made narrow: the loop's closing checkpoint of the full-size
model would write ~14 GB to disk.
"""

from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights

from ldm.config import UNetStageConfig, load_config
from ldm.objectives import build_objective
from ldm.text_encoder import build_open_clip_text_model, build_text_encoder, encode_text, hidden_size, tokenize
from ldm.train.optim import build_optimizer
from ldm.unet import build_unet

CONFIGS = Path(__file__).resolve().parent.parent / "configs/unet"
SD_BASE, OPENCLIP_H = CONFIGS / "sd-base.yaml", CONFIGS / "sd-base-openclip-h.yaml"
# What an untrained tower needs instead of the local weights file the configs name.
RANDOM_TOWER = ["text_encoder.weights=null"]


def parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sd_base_is_stable_diffusion_1s_unet_and_runs_on_real_text_states(tmp_path):
    cfg = load_config(UNetStageConfig, str(SD_BASE), RANDOM_TOWER)
    tokenizer, text_encoder = build_text_encoder(cfg.text_encoder, tmp_path / "tokenizer")
    assert hidden_size(text_encoder) == 768 and text_encoder.config.layers == 12 and text_encoder.config.quick_gelu
    assert tokenizer.model_max_length == 77
    torch.manual_seed(0)
    unet = build_unet(cfg.model, cfg.data.resolution // 8, 4, hidden_size(text_encoder))
    assert parameters(unet) == 859_520_964  # runwayml/stable-diffusion-v1-5's unet/
    assert unet.config.sample_size == 64 and unet.config.cross_attention_dim == 768

    # 8x8 latents (64x64 pixels) keep the CPU time to seconds; every block still runs.
    with torch.no_grad():
        context = encode_text(text_encoder, tokenize(tokenizer, ["a red circle", ""]))
        assert context.shape == (2, 77, 768)
        out = unet(torch.randn(2, 4, 8, 8), torch.tensor([999, 0]), context).sample
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()

    # One training step of the full-size U-Net at that reduced resolution: sd-base's
    # objective, gradient checkpointing, clipping and AdamW over all 860M parameters.
    objective = build_objective(cfg.objective)
    unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = build_optimizer(unet.parameters(), cfg.train)
    probe = unet.conv_in.weight.detach().clone()
    z0 = torch.randn(1, 4, 8, 8)
    loss = objective(lambda x, t, c: unet(x, t, c).sample, z0, context[:1], t=torch.tensor([500])).mean()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.train.max_grad_norm)
    optimizer.step()
    assert torch.isfinite(loss) and torch.isfinite(grad_norm) and grad_norm > 0
    assert not torch.equal(unet.conv_in.weight, probe)  # the step moved the weights


def test_sd_base_openclip_h_has_sd2s_conditioning():
    cfg = load_config(UNetStageConfig, str(OPENCLIP_H), RANDOM_TOWER)
    with init_empty_weights():  # shapes only: 1.2B parameters are not drawn
        text_encoder = build_open_clip_text_model(cfg.text_encoder)
        unet = build_unet(cfg.model, cfg.data.resolution // 8, 4, hidden_size(text_encoder))
    tower = text_encoder.config
    assert (tower.width, tower.heads, tower.layers, tower.context_length, tower.layer) == (1024, 16, 24, 77, "penultimate")
    assert unet.config.cross_attention_dim == 1024
    # sd-base plus the wider to_k/to_v of its 16 cross-attention layers, 2 x 12480 x (1024 - 768);
    # stabilityai/stable-diffusion-2-base's unet/ has the same count.
    assert parameters(unet) == 859_520_964 + 2 * 12480 * 256 == 865_910_724


@pytest.fixture(scope="module")
def f8_vae_dir(tmp_path_factory):
    """A stage-1 folder with SD's downsampling factor 8 (4 levels), tiny and untrained."""
    from ldm.autoencoder import build_vae
    from ldm.config import VAEModelConfig

    torch.manual_seed(0)
    vae = build_vae(VAEModelConfig(block_out_channels=[8, 8, 16, 16], norm_num_groups=8, layers_per_block=1), sample_size=64)
    vae.register_to_config(scaling_factor=0.18215)
    folder = tmp_path_factory.mktemp("kl-f8") / "final"
    vae.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Four captioned 64x64 images, a caption .txt beside each (sd-base reads a folder)."""
    from ldm.data.shapes import ShapesDataset

    folder = tmp_path_factory.mktemp("images")
    shapes = ShapesDataset(4, 64, seed=0)
    for i in range(len(shapes)):
        shapes.image(i).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(shapes.spec(i).caption)
    return folder


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one state per process, fixed by the first Accelerator (mixed
    precision included): a bf16 run after the suite's fp32 ones needs a fresh state, as a
    new process has; and the tests after it need theirs back."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_sd_base_training_settings_run_through_the_loop(tmp_path, f8_vae_dir, image_folder, fresh_accelerate_state):
    """One step with everything from sd-base.yaml but the U-Net's width, the data size and the weights files."""
    import json

    from ldm.cli.train_unet import main

    run = tmp_path / "unet"
    assert main([
        "--config", str(SD_BASE), *RANDOM_TOWER,
        f"vae_path={f8_vae_dir}", f"data.path={image_folder}", "data.resolution=64", "data.num_validation=1",
        "data.num_workers=0", "model.block_out_channels=[32,32,64,64]",  # same blocks and layers, 1/10 the width
        f"train.output_dir={run}", "train.batch_size=1", "train.max_steps=1", "train.log_every=1",
        "validation.prompts=[a red circle]", "validation.num_inference_steps=2",  # bf16 on a CPU is slow
    ]) == 0

    saved = load_config(UNetStageConfig, str(run / "final/ldm_config.yaml"))
    assert saved.train.mixed_precision == "bf16" and saved.train.gradient_checkpointing and saved.ema.enabled
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 1 and record["loss"] > 0
    assert record["lr"] == pytest.approx(1e-4 / 10000)  # step 1 of the 10000 warm-up steps
    unet = json.loads((run / "final/unet/config.json").read_text())
    assert unet["cross_attention_dim"] == 768 and unet["layers_per_block"] == 2 and unet["sample_size"] == 8
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    tower = json.loads((run / "final/text_encoder/config.json").read_text())
    assert (tower["width"], tower["layers"], tower["context_length"], tower["quick_gelu"]) == (768, 12, 77, True)
    assert [p.name for p in (run / "samples").iterdir()] == ["step-000001.png"]
