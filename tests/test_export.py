"""ldm-export --to diffusers: the folder loads in StableDiffusionPipeline and gives our images."""

import filecmp
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from open_clip.transformer import LayerScale
from transformers import CLIPTextModel

from ldm.cli.export import main
from ldm.errors import LdmError
from ldm.export import warn_about_scheduler
from ldm.open_clip_to_hf import open_clip_to_hf
from ldm.pipeline import LatentDiffusionPipeline
from ldm.text_encoder import OpenCLIPTextModel, tokenize

from conftest import TEXT_LEN, sd_ddim

PROMPTS = ["a red circle", "a cat in a space suit, 35mm", ""]  # "" pads with "!" from the second token on


def open_clip_model(layer="last", quick_gelu=False) -> OpenCLIPTextModel:
    torch.manual_seed(1)
    return OpenCLIPTextModel(width=32, heads=4, layers=3, context_length=TEXT_LEN, layer=layer, quick_gelu=quick_gelu).eval()


def export(model, out, *extra):
    return main(["--model", str(model), "--to", "diffusers", str(out), *extra])


@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quick_gelu"])
@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_converted_text_encoder_gives_the_same_hidden_states(open_clip_tok, layer, quick_gelu):
    ours = open_clip_model(layer, quick_gelu)
    hf = open_clip_to_hf(ours, open_clip_tok)
    cfg = hf.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.max_position_embeddings) == (32, 128, 4, TEXT_LEN)
    assert cfg.num_hidden_layers == (3 if layer == "last" else 2)  # penultimate: the last block dropped
    assert cfg.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    assert (cfg.pad_token_id, cfg.eos_token_id) == (0, 49407)
    ids = tokenize(open_clip_tok, PROMPTS)
    assert (ids[2, 2:] == 0).all()  # open_clip's padding, attended to (no padding mask) in both
    with torch.no_grad():
        expected, got = ours(ids)[0], hf(ids).last_hidden_state  # no attention_mask, as SD pipelines call it
    assert expected.std() > 0.1
    assert (got - expected).abs().max() <= 1e-5


def test_exported_folder_gives_our_images_in_stable_diffusion(tmp_path, tiny_vae, tiny_unet, open_clip_tok):
    model = tmp_path / "model"
    LatentDiffusionPipeline(tiny_vae, open_clip_model("penultimate", True), open_clip_tok, tiny_unet, sd_ddim()).save_pretrained(model)
    out = tmp_path / "exported"
    assert export(model, out) == 0

    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"] and index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    sd = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert isinstance(sd.text_encoder, CLIPTextModel) and isinstance(sd.scheduler, DDIMScheduler)
    assert (sd.tokenizer.pad_token, sd.tokenizer.pad_token_id, sd.tokenizer.model_max_length) == ("!", 0, TEXT_LEN)
    ours = LatentDiffusionPipeline.from_pretrained(model)
    kwargs = dict(prompt=PROMPTS[:2], negative_prompt=["blurry", ""], num_images_per_prompt=2, num_inference_steps=3,
                  guidance_scale=7.5, output_type="np")
    for pipe in (sd, ours):
        pipe.set_progress_bar_config(disable=True)
    expected = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
    got = sd(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert got.shape == (4, 16, 16, 3)
    assert np.abs(got - expected).max() <= 1e-5


def test_a_clip_text_model_is_copied(tmp_path, hf_parts):
    model = tmp_path / "model"
    LatentDiffusionPipeline(**hf_parts).save_pretrained(model)
    out = tmp_path / "exported"
    assert export(model, out) == 0
    for part in ("text_encoder", "unet", "vae", "tokenizer", "scheduler"):
        compared = filecmp.dircmp(model / part, out / part)
        assert not (compared.left_only or compared.right_only or compared.diff_files), part
    StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)


def test_destination_checks_and_force(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert export(tiny_model_dir, out) == 2
    err = capsys.readouterr().err.strip()
    assert "is not empty: pass --force" in err and "\n" not in err
    assert export(tiny_model_dir, out, "--force") == 0
    assert (out / "notes.txt").read_text() == "keep me"  # --force replaces the model parts, nothing else
    assert export(tiny_model_dir, out, "--force") == 0  # again, over a previous export
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "notes.txt", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    assert not list(tmp_path.glob(".*export-tmp"))
    assert export(tiny_model_dir, tiny_model_dir / "inside", "--force") == 2
    assert "overlaps the model folder" in capsys.readouterr().err
    assert export(tmp_path / "nowhere", tmp_path / "out2") == 2
    assert "no model folder" in capsys.readouterr().err


def test_features_clip_text_model_lacks_are_refused():
    model = open_clip_model()
    model.text.transformer.resblocks[0].ls_1 = LayerScale(32, 0.1)
    with pytest.raises(LdmError, match="LayerScale"):
        open_clip_to_hf(model)


def test_scheduler_settings_stable_diffusion_rewrites_are_warned_about():
    with pytest.warns(UserWarning, match="clip_sample True -> False"):
        warn_about_scheduler(DDIMScheduler(clip_sample=True, steps_offset=1))


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--to" in capsys.readouterr().out
