"""Shared tiny components, built locally (nothing is downloaded), as diffusers' own tests do.

Models are built once per session with a fixed seed; a test that changes a model
should build its own. Schedulers are cheap and stateful, so each test gets a fresh one.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.text_encoder import OpenCLIPTextModel
from ldm.tokenizer import open_clip_tokenizer, write_clip_tokenizer_files

TEXT_LEN = 16  # tokens per prompt; short keeps the text encoders fast

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the
# thread hand-offs made the suite ~9x slower (70 s vs 8 s). OMP_NUM_THREADS overrides.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_run_reports(request, monkeypatch):
    """Every training run writes report.html at its end (matplotlib: ~2 s of CPU each); only
    the tests marked `run_report` pay for it, the rest train without it."""
    if "run_report" not in request.keywords:
        monkeypatch.setattr("ldm.train.loop.write_run_report", lambda *args, **kwargs: None)


@pytest.fixture(scope="session")
def clip_tokenizer(tmp_path_factory):
    """A transformers CLIPTokenizer with the full CLIP BPE (as in Stable Diffusion 1)."""
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    write_clip_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=TEXT_LEN)


@pytest.fixture(scope="session")
def open_clip_tok(tmp_path_factory):
    """The CLIPTokenizer that matches open_clip's tokenizer."""
    return open_clip_tokenizer(tmp_path_factory.mktemp("open_clip_tokenizer"), context_length=TEXT_LEN)


@pytest.fixture(scope="session")
def hf_text_encoder():
    torch.manual_seed(0)
    config = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=49408, max_position_embeddings=TEXT_LEN, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, layer_norm_eps=1e-5,
    )
    return CLIPTextModel(config).eval()


@pytest.fixture(scope="session")
def open_clip_text_encoder():
    torch.manual_seed(0)
    return OpenCLIPTextModel(width=32, heads=4, layers=2, context_length=TEXT_LEN).eval()


@pytest.fixture(scope="session")
def tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    ).eval()


@pytest.fixture(scope="session")
def tiny_vae():
    """Factor 2; a scaling factor that is not SD's 0.18215, so a hard-coded constant shows up."""
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=16, scaling_factor=0.5,
    ).eval()


def sd_ddim() -> DDIMScheduler:
    """DDIM as Stable Diffusion configures it (StableDiffusionPipeline rewrites other settings)."""
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


@pytest.fixture
def ddim():
    return sd_ddim()


@pytest.fixture
def hf_parts(tiny_vae, hf_text_encoder, clip_tokenizer, tiny_unet, ddim):
    """Components with a transformers CLIPTextModel (the Stable Diffusion layout)."""
    return dict(vae=tiny_vae, text_encoder=hf_text_encoder, tokenizer=clip_tokenizer, unet=tiny_unet, scheduler=ddim)


@pytest.fixture
def open_clip_parts(tiny_vae, open_clip_text_encoder, open_clip_tok, tiny_unet, ddim):
    """Components with an open_clip text tower (the default of this project)."""
    return dict(vae=tiny_vae, text_encoder=open_clip_text_encoder, tokenizer=open_clip_tok, unet=tiny_unet, scheduler=ddim)


@pytest.fixture
def tiny_pipe(open_clip_parts):
    from ldm.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline(**open_clip_parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_vae, open_clip_text_encoder, open_clip_tok, tiny_unet):
    """A saved model folder (open_clip text tower), as the U-Net trainer writes one."""
    from ldm.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline(tiny_vae, open_clip_text_encoder, open_clip_tok, tiny_unet, sd_ddim())
    folder = tmp_path_factory.mktemp("model")
    pipe.save_pretrained(str(folder))
    (folder / "ldm_config.yaml").write_text("# written by the U-Net trainer\n")
    return folder


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory):
    """A stage-1 folder as train_vae.py writes it (factor 2, scaling factor 0.7), untrained."""
    from ldm.autoencoder import build_vae
    from ldm.config import VAEModelConfig

    torch.manual_seed(0)
    vae = build_vae(VAEModelConfig(block_out_channels=[8, 16], norm_num_groups=8), sample_size=16)
    vae.register_to_config(scaling_factor=0.7)
    folder = tmp_path_factory.mktemp("vae") / "final"
    vae.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, vae_dir):
    """A tiny base model folder written by the stage-2 trainer (16x16 images, 8x8x4 latents)."""
    from ldm.cli.train_unet import main as train_unet

    run = tmp_path_factory.mktemp("base") / "unet"
    assert train_unet([
        f"train.output_dir={run}", f"vae_path={vae_dir}", "model.block_out_channels=[32,64]",
        "model.norm_num_groups=8", "model.layers_per_block=1", "text_encoder.width=32", "text_encoder.heads=4",
        "text_encoder.layers=1", "text_encoder.context_length=8", "data.resolution=16", "data.shapes.num_images=24",
        "data.num_validation=4", "train.batch_size=4", "train.max_steps=1", "validation.every=100",
    ]) == 0
    return run / "final"


def pytest_collection_modifyitems(config, items):
    """The long cases of the reliability battery run only under `make reliability` (LDM_RELIABILITY=1)."""
    if os.environ.get("LDM_RELIABILITY") == "1":
        return
    skip = pytest.mark.skip(reason="a long reliability case: make reliability (LDM_RELIABILITY=1)")
    for item in items:
        if item.get_closest_marker("reliability") is not None:  # not `in item.keywords`: that holds the folder name
            item.add_marker(skip)
