"""Fine-tuning stage 2 from an existing model folder: a full fine-tune, and LoRA through peft.

A tiny diffusers Stable Diffusion folder (random weights: transformers CLIP text encoder
and tokenizer, PNDM scheduler with v-prediction) is fine-tuned a few CPU steps on shapes
with LoRA; its LoRA folder must load in diffusers' StableDiffusionPipeline and in ours
with equal images, and change them.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from ldm.cli.train_unet import main
from ldm.config import UNetStageConfig, load_config
from ldm.errors import LdmError
from ldm.lora import WEIGHT_NAME
from ldm.pipeline import LatentDiffusionPipeline

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory, tiny_vae, hf_text_encoder, clip_tokenizer, tiny_unet):
    """A diffusers Stable Diffusion folder as StableDiffusionPipeline.save_pretrained writes it (v-prediction)."""
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
        set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae, text_encoder=hf_text_encoder, tokenizer=clip_tokenizer, unet=tiny_unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    folder = tmp_path_factory.mktemp("sd")
    pipe.save_pretrained(str(folder))
    return folder


def args(out, init, *extra):
    """A tiny fine-tune: 16x16 shapes (8x8x4 latents of the folder's VAE), 20 training images (5 batches of 4)."""
    return [
        f"train.output_dir={out}", f"init_from={init}", "data.resolution=16", "data.shapes.num_images=24",
        "data.num_validation=4", "train.batch_size=4", "train.log_every=1", "validation.num_inference_steps=2", *extra,
    ]


# With the text encoder's adapters: transformers' add_adapter may refuse this peft (then ldm.lora
# injects them with peft directly); loading goes through diffusers' loader either way.
LORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=8", "lora.text_encoder=true", "train.learning_rate=1e-2"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, sd_dir):
    run = tmp_path_factory.mktemp("lora") / "run"
    assert main(args(run, sd_dir, *LORA, "train.max_steps=3", "train.checkpoint_every=3")) == 0
    return run


def images(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                output_type="np", **kwargs).images


def sd_pipe(folder):
    return StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)


def test_lora_folder_loads_in_diffusers_and_ours_with_equal_images(lora_run, sd_dir):
    lora = lora_run / "final/lora"
    assert (lora / WEIGHT_NAME).is_file() and not (lora_run / "final/unet").exists()
    saved = load_file(str(lora / WEIGHT_NAME))
    assert any(k.startswith("unet.") for k in saved) and any(k.startswith("text_encoder.") for k in saved)

    base = images(LatentDiffusionPipeline.from_pretrained(str(sd_dir)))
    theirs, ours = sd_pipe(sd_dir), LatentDiffusionPipeline.from_pretrained(str(sd_dir))
    assert np.abs(images(theirs) - base).max() <= 1e-5  # the same pipeline before the LoRA
    for pipe in (theirs, ours):
        pipe.load_lora_weights(str(lora))
        for part in (pipe.unet, pipe.text_encoder):
            config = part.peft_config[next(iter(part.peft_config))]
            assert (config.r, config.lora_alpha) == (4, 8)  # alpha came back from the file's metadata
    with_lora = images(ours)
    assert np.abs(images(theirs) - with_lora).max() <= 1e-5
    assert np.abs(with_lora - base).max() > 1e-3  # the LoRA changes the images


def merged_by_hand(sd_dir, lora, scale):
    """The base pipeline with W + scale (alpha / r) B A written into each adapted layer (float64 sums).

    diffusers' key names: "unet.<layer>.lora.down.weight" (A) / ".lora.up.weight" (B), and
    "text_encoder.<layer>.lora_linear_layer.down.weight" / ".up.weight".
    """
    pipe = LatentDiffusionPipeline.from_pretrained(str(sd_dir))
    saved = load_file(str(lora / WEIGHT_NAME))
    for key in [k for k in saved if k.endswith(".down.weight")]:
        part, _, rest = key.partition(".")
        layer = getattr(pipe, part).get_submodule(rest.split(".lora")[0])
        down, up = saved[key].double(), saved[key.replace(".down.weight", ".up.weight")].double()
        layer.weight.data = (layer.weight.double() + scale * (8 / 4) * up @ down).float()
    return pipe


def test_our_pipeline_loads_the_text_encoder_lora(lora_run, sd_dir):
    """The folder's U-Net and text-encoder adapters in our pipeline: the images of the base with the adapters
    merged into its weights by hand, at scale 1 and at set_adapters' 0.5; the base at cross_attention_kwargs 0."""
    lora = lora_run / "final/lora"
    pipe = LatentDiffusionPipeline.from_pretrained(str(sd_dir))
    base = images(pipe)
    pipe.load_lora_weights(str(lora), adapter_name="mine")
    config = pipe.text_encoder.peft_config["mine"]
    assert (config.r, config.lora_alpha) == (4, 8)
    ids = pipe.tokenizer(PROMPTS, padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():  # the text encoder's adapters change its states (so the images below see them)
        states = pipe.text_encoder(ids)[0]
        assert (states - sd_pipe(sd_dir).text_encoder(ids)[0]).abs().max() > 1e-3
    assert pipe.get_list_adapters() == {"unet": ["mine"], "text_encoder": ["mine"]}
    with_lora = images(pipe)
    assert np.abs(with_lora - images(merged_by_hand(sd_dir, lora, 1.0))).max() <= 1e-5
    assert np.abs(with_lora - base).max() > 1e-3
    pipe.disable_lora()  # the U-Net's and the text encoder's
    assert np.abs(images(pipe) - base).max() <= 1e-5
    pipe.enable_lora()
    assert np.abs(images(pipe, cross_attention_kwargs={"scale": 0.0}) - base).max() <= 1e-5
    pipe.set_adapters(["mine"], adapter_weights=[0.5])
    half = images(pipe)
    assert np.abs(half - images(merged_by_hand(sd_dir, lora, 0.5))).max() <= 1e-5
    pipe.set_adapters(["mine"], adapter_weights=[1.0])
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert not getattr(pipe.text_encoder, "peft_config", None) and not getattr(pipe.unet, "peft_config", None)
    assert np.abs(images(pipe) - with_lora).max() <= 1e-5  # fused into the weights


def test_only_the_adapters_train_and_the_lora_holds_their_ema(lora_run, sd_dir):
    raw = load_file(str(lora_run / "checkpoints/step-000003/model.safetensors"))
    base = load_file(str(sd_dir / "unet/diffusion_pytorch_model.safetensors"))
    frozen = {k.replace(".base_layer", ""): v for k, v in raw.items() if "lora_" not in k}
    assert frozen.keys() == base.keys() and all(torch.equal(frozen[k], base[k]) for k in base)

    shadow = load_file(str(lora_run / "checkpoints/step-000003/ema.safetensors"))
    ema = {"shadow_params": [shadow[f"shadow.{i}"] for i in range(len(shadow))]}
    adapters = [v for k, v in raw.items() if "lora_" in k]
    assert len(ema["shadow_params"]) == len(adapters)  # the EMA averages the adapters only
    saved = [v for k, v in load_file(str(lora_run / "final/lora" / WEIGHT_NAME)).items() if k.startswith("unet.")]
    assert len(saved) == len(adapters)
    assert all(any(torch.equal(s, v) for v in saved) for s in ema["shadow_params"])  # the saved LoRA is the EMA
    assert not all(any(torch.equal(a, v) for v in saved) for a in adapters)  # not the raw adapters


def test_the_text_encoder_adapters_train_and_save_in_diffusers_format(lora_run, sd_dir):
    """The text encoder's checkpoint (accelerate's model_1): its base unchanged, its adapters trained; the
    saved text_encoder.* part is diffusers' convert_state_dict_to_diffusers of those adapters, as diffusers'
    LoRA training examples write it (the text encoder has no EMA: the raw adapters of the last step)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    raw = load_file(str(lora_run / "checkpoints/step-000003/model_1.safetensors"))
    base = load_file(str(sd_dir / "text_encoder/model.safetensors"))
    frozen = {k.replace(".base_layer", ""): v for k, v in raw.items() if "lora_" not in k}
    assert frozen.keys() == base.keys() and all(torch.equal(frozen[k], base[k]) for k in base)
    adapters = {k.replace(".default", ""): v for k, v in raw.items() if "lora_" in k}
    assert len(adapters) == 2 * 4 * 2  # A and B of q, k, v, out_proj in each of the 2 layers
    assert all(v.abs().max() > 0 for k, v in adapters.items() if "lora_B" in k)  # trained away from B = 0
    saved = {k.removeprefix("text_encoder."): v for k, v in load_file(str(lora_run / "final/lora" / WEIGHT_NAME)).items()
             if k.startswith("text_encoder.")}
    expected = convert_state_dict_to_diffusers(adapters)
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    assert all(k.endswith(("lora_linear_layer.down.weight", "lora_linear_layer.up.weight")) for k in saved)


def test_objective_follows_the_folder(lora_run):
    cfg = load_config(UNetStageConfig, str(lora_run / "final/ldm_config.yaml"))
    assert cfg.objective.prediction_type == "v_prediction" and cfg.objective.beta_schedule == "scaled_linear"


def test_resume_with_lora_is_bit_identical(tmp_path, sd_dir):
    """4 steps straight vs. stopped at step 2 and resumed, with accumulation, EMA and text-encoder adapters."""
    run = tmp_path / "run"
    common = [*LORA, "train.max_steps=4", "train.gradient_accumulation_steps=2", "train.checkpoints_total_limit=null"]
    assert main(args(run, sd_dir, *common, "train.checkpoint_every=2")) == 0
    straight = load_file(str(run / "final/lora" / WEIGHT_NAME))
    straight_raw = load_file(str(run / "checkpoints/step-000004/model.safetensors"))
    straight_text = load_file(str(run / "checkpoints/step-000004/model_1.safetensors"))  # the text encoder's
    shutil.rmtree(run / "checkpoints/step-000004")
    shutil.rmtree(run / "final")
    assert main(args(run, sd_dir, *common, "train.checkpoint_every=1", "--resume", "auto")) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000003", "step-000004"]
    raw = load_file(str(run / "checkpoints/step-000004/model.safetensors"))
    assert all(torch.equal(straight_raw[k], raw[k]) for k in straight_raw)
    assert all(torch.equal(straight_text[k], v) for k, v in load_file(str(run / "checkpoints/step-000004/model_1.safetensors")).items())
    assert any(k.startswith("text_encoder.") for k in straight)
    resumed = load_file(str(run / "final/lora" / WEIGHT_NAME))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_full_fine_tune_starts_from_the_folder(tmp_path, tiny_model_dir):
    """A learning rate of 1e-30: the final folder holds the init folder's weights; a real rate moves the U-Net."""
    still = tmp_path / "still"
    assert main(args(still, tiny_model_dir, "train.max_steps=1", "train.learning_rate=1e-30")) == 0
    moved = tmp_path / "moved"
    assert main(args(moved, tiny_model_dir, "train.max_steps=2", "train.learning_rate=1e-3", "ema.enabled=false")) == 0
    for part in ("unet", "vae", "text_encoder"):
        init = load_file(str(tiny_model_dir / part / "diffusion_pytorch_model.safetensors"))
        final = load_file(str(still / "final" / part / "diffusion_pytorch_model.safetensors"))
        assert init.keys() == final.keys(), part
        assert all(torch.allclose(init[k], final[k], rtol=0, atol=1e-20) for k in init), part
    init = load_file(str(tiny_model_dir / "unet/diffusion_pytorch_model.safetensors"))
    trained = load_file(str(moved / "final/unet/diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(init[k], trained[k]) for k in init)
    assert json.loads((moved / "final/vae/config.json").read_text())["scaling_factor"] == 0.5  # the folder's latent scale
    LatentDiffusionPipeline.from_pretrained(str(moved / "final"))


def test_full_fine_tune_of_a_stable_diffusion_folder_with_our_vae(tmp_path, sd_dir, vae_dir):
    """init_vae=false: the U-Net and text encoder from the folder, the VAE (and its scale) from vae_path."""
    run = tmp_path / "run"
    assert main(args(run, sd_dir, "train.max_steps=1", "init_vae=false", f"vae_path={vae_dir}")) == 0
    assert json.loads((run / "final/vae/config.json").read_text())["scaling_factor"] == pytest.approx(0.7)
    assert json.loads((run / "final/text_encoder/config.json").read_text())["architectures"] == ["CLIPTextModel"]
    scheduler = json.loads((run / "final/scheduler/scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "PNDMScheduler" and scheduler["prediction_type"] == "v_prediction"


def one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    return err[0]


def test_one_line_errors(tmp_path, capsys, sd_dir, tiny_model_dir):
    out = tmp_path / "run"
    err = one_line_error(capsys, args(out, sd_dir, "objective.prediction_type=epsilon", "objective.beta_schedule=linear"))
    assert "beta_schedule=linear" in err and "scaled_linear" in err
    err = one_line_error(capsys, args(out, sd_dir, "objective.prediction_type=sample"))
    assert "prediction_type=sample contradicts" in err and "v_prediction" in err
    assert "init_from" in one_line_error(capsys, args(out, sd_dir, "lora.enabled=true", "init_from=null"))
    err = one_line_error(capsys, args(out, tiny_model_dir, "lora.enabled=true", "lora.text_encoder=true"))
    assert "OpenCLIPTextModel" in err and "text_encoder.trainable=true" in err
    err = one_line_error(capsys, args(out, sd_dir, "lora.enabled=true", "lora.target_modules=[attn9]"))
    assert "attn9" in err and "to_q" in err
    assert "lora.rank" in one_line_error(capsys, args(out, sd_dir, "lora.enabled=true", "lora.rank=0"))
    assert "no model folder" in one_line_error(capsys, args(out, tmp_path / "nowhere"))
    assert "data.cache" in one_line_error(capsys, args(out, sd_dir, f"data.cache={tmp_path}"))


def test_a_lora_for_another_base_is_refused_in_one_line(lora_run, tiny_vae, hf_text_encoder, clip_tokenizer):
    torch.manual_seed(0)
    other = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    pipe = LatentDiffusionPipeline(tiny_vae, hf_text_encoder, clip_tokenizer, other, PNDMScheduler())
    with pytest.raises(LdmError, match="made for another base") as e:
        pipe.load_lora_weights(str(lora_run / "final/lora"))
    assert "\n" not in str(e.value)
    assert not getattr(pipe.unet, "peft_config", None)  # nothing was loaded
    with pytest.raises(LdmError, match="no LoRA at"):
        pipe.load_lora_weights(str(lora_run / "nowhere"))


def test_ldm_sample_lora_at_a_scale_gives_the_python_apis_image(lora_run, sd_dir, tmp_path, capsys):
    from PIL import Image

    from ldm.cli.sample import main as sample

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    lora = lora_run / "final/lora"
    common = ["--model", str(sd_dir), "--prompts", str(prompts), "--steps", "2", "--device", "cpu"]
    assert sample([*common, "--outdir", str(tmp_path / "half"), "--lora", f"{lora}:0.5"]) == 0
    assert sample([*common, "--outdir", str(tmp_path / "none")]) == 0
    name = "00001-s0000000001.png"
    half = np.asarray(Image.open(tmp_path / "half" / name))
    assert np.abs(half.astype(int) - np.asarray(Image.open(tmp_path / "none" / name))).max() > 0

    pipe = LatentDiffusionPipeline.from_pretrained(str(sd_dir))
    pipe.load_lora_weights(str(lora), adapter_name="mine")
    pipe.set_adapters(["mine"], adapter_weights=[0.5])
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(1)).images[0]
    np.testing.assert_array_equal(half, np.asarray(expected))

    capsys.readouterr()
    for spec, words in ((f"{lora}:x", "must be a scale"), (str(tmp_path / "nowhere"), "no LoRA at")):
        assert sample([*common, "--outdir", str(tmp_path / "e"), "--lora", spec]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0]


def test_lora_on_our_open_clip_model_loads_and_fuses(tmp_path, tiny_model_dir):
    """Our folders (open_clip text tower): U-Net adapters load in our pipeline; fusing them gives the same images."""
    run = tmp_path / "run"
    assert main(args(run, tiny_model_dir, "lora.enabled=true", "train.learning_rate=1e-2", "train.max_steps=2")) == 0
    pipe = LatentDiffusionPipeline.from_pretrained(str(tiny_model_dir))
    base = images(pipe)
    pipe.load_lora_weights(str(run / "final/lora"))
    with_lora = images(pipe)
    assert np.abs(with_lora - base).max() > 1e-3
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert not getattr(pipe.unet, "peft_config", None)
    assert np.abs(images(pipe) - with_lora).max() <= 1e-5
