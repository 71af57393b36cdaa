"""ldm.schedulers: samplers by name, fitted to the model's objective; ldm-sample --scheduler / --dtype / --attention."""

import importlib.util

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler, DPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler, EDMEulerScheduler,
    EulerAncestralDiscreteScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline,
)

from ldm.cli.sample import main
from ldm.config import UNetStageConfig, save_config
from ldm.errors import LdmError
from ldm.objectives import build_objective
from ldm.pipeline import LatentDiffusionPipeline
from ldm.schedulers import SCHEDULERS, make_scheduler, model_objective

HAS_TORCHSDE = importlib.util.find_spec("torchsde") is not None


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_vae, open_clip_text_encoder, open_clip_tok, tiny_unet):
    """A model folder per objective (ldm_config.yaml records it), and one without ldm_config.yaml."""
    out = {}
    for kind in ("ddpm", "edm", "flow"):
        cfg = UNetStageConfig()
        cfg.objective.kind = kind
        cfg.objective.min_snr_gamma = None
        folder = tmp_path_factory.mktemp(kind)
        scheduler = build_objective(cfg.objective).sampling_scheduler()
        LatentDiffusionPipeline(tiny_vae, open_clip_text_encoder, open_clip_tok, tiny_unet, scheduler).save_pretrained(str(folder))
        if kind != "flow":  # the flow folder's objective is read from its scheduler alone
            save_config(cfg, folder / "ldm_config.yaml")
        out[kind] = folder
    return out


def test_each_folders_objective_is_read(folders):
    assert {kind: model_objective(folder) for kind, folder in folders.items()} == {"ddpm": "ddpm", "edm": "edm", "flow": "flow"}


@pytest.mark.parametrize("name", [n for n in SCHEDULERS if SCHEDULERS[n][2] == ("ddpm",)])
def test_every_ddpm_scheduler_samples_and_keeps_the_models_schedule(hf_parts, name):
    if name == "dpm++sde-karras" and not HAS_TORCHSDE:
        with pytest.raises(LdmError, match="pip install torchsde") as e:
            make_scheduler(name, hf_parts["scheduler"])
        assert "\n" not in str(e.value)
        return
    scheduler = make_scheduler(name, hf_parts["scheduler"])
    assert type(scheduler).__name__ == SCHEDULERS[name][0]
    for key in ("beta_start", "beta_end", "beta_schedule", "prediction_type"):
        assert scheduler.config[key] == hf_parts["scheduler"].config[key]
    # The same images as diffusers' StableDiffusionPipeline with that scheduler.
    ours = LatentDiffusionPipeline(**{**hf_parts, "scheduler": scheduler})
    theirs = StableDiffusionPipeline(**{**hf_parts, "scheduler": make_scheduler(name, hf_parts["scheduler"])},
                                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)  # DPMSolverSDEScheduler seeds its Brownian tree from the global RNG
    a = ours("a red circle", num_inference_steps=3, generator=gen(), output_type="np").images
    torch.manual_seed(0)
    b = theirs("a red circle", num_inference_steps=3, generator=gen(), output_type="np").images
    assert np.isfinite(a).all() and np.abs(a - b).max() <= 1e-5


def test_named_settings():
    base = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    karras = make_scheduler("dpm++2m-karras", base)
    assert isinstance(karras, DPMSolverMultistepScheduler)
    assert (karras.config.algorithm_type, karras.config.solver_order, karras.config.use_karras_sigmas) == ("dpmsolver++", 2, True)
    assert make_scheduler("dpm++2m", base).config.use_karras_sigmas is False
    assert isinstance(make_scheduler("euler-ancestral", base), EulerAncestralDiscreteScheduler)
    assert make_scheduler("pndm", base).config.skip_prk_steps is True


def test_edm_and_flow_schedulers(folders):
    edm = LatentDiffusionPipeline.from_pretrained(str(folders["edm"]))
    assert isinstance(edm.scheduler, EDMEulerScheduler)
    dpm = make_scheduler("edm-dpm++2m", edm.scheduler)
    assert isinstance(dpm, EDMDPMSolverMultistepScheduler)
    assert (dpm.config.sigma_min, dpm.config.sigma_max, dpm.config.sigma_data) == (
        edm.scheduler.config.sigma_min, edm.scheduler.config.sigma_max, edm.scheduler.config.sigma_data)
    flow = LatentDiffusionPipeline.from_pretrained(str(folders["flow"]))
    assert isinstance(make_scheduler("flow-euler", flow.scheduler), FlowMatchEulerDiscreteScheduler)


@pytest.mark.parametrize("kind, name, words", [
    ("ddpm", "edm-euler", "'edm-euler' samples edm models but this model was trained with the ddpm objective: use one of ddim"),
    ("edm", "dpm++2m-karras", "trained with the edm objective: use one of edm-euler, edm-dpm..2m"),
    ("flow", "euler", "trained with the flow objective: use one of flow-euler"),
    ("ddpm", "dpm-fast", "unknown scheduler 'dpm-fast': known ones are ddim, pndm, euler, euler-ancestral, heun, dpm"),
])
def test_a_scheduler_that_does_not_fit_is_a_one_line_cli_error(folders, tmp_path, capsys, kind, name, words):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    code = main(["--model", str(folders[kind]), "--prompts", str(prompts), "--outdir", str(tmp_path / "o"),
                 "--device", "cpu", "--steps", "2", "--scheduler", name])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    import re
    assert re.search(words, err[0]), err[0]
    assert not (tmp_path / "o").exists()  # nothing made


def read(path):
    image = PIL.Image.open(path)
    return np.asarray(image), image.text


@pytest.mark.parametrize("kind, name", [("ddpm", "dpm++2m-karras"), ("ddpm", "euler-ancestral"), ("edm", "edm-dpm++2m")])
def test_cli_scheduler_gives_the_python_apis_images(folders, tmp_path, kind, name):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "out"
    assert main(["--model", str(folders[kind]), "--prompts", str(prompts), "--outdir", str(out), "--device", "cpu",
                 "--steps", "3", "--scheduler", name, "--seed", "4"]) == 0
    pixels, text = read(out / "00001-s0000000005.png")
    assert text["scheduler"] == name
    pipe = LatentDiffusionPipeline.from_pretrained(str(folders[kind]))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(name, pipe.scheduler)
    expected = pipe(["a red circle"], num_inference_steps=3, generator=gen(5), negative_prompt=[""]).images[0]
    assert np.array_equal(pixels, np.asarray(expected))


def test_cli_dtype_and_negative_prompt(folders, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    runs = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / dtype
        assert main(["--model", str(folders["ddpm"]), "--prompts", str(prompts), "--outdir", str(out), "--device", "cpu",
                     "--steps", "2", "--dtype", dtype, "--negative-prompt", "a blue square"]) == 0
        runs[dtype], text = read(out / "00001-s0000000001.png")
        assert text["negative_prompt"] == "a blue square"
    # bf16 is bf16 (not the fp32 images), yet close to them.
    diff = np.abs(runs["fp32"].astype(int) - runs["bf16"].astype(int))
    assert 0 < diff.max() and diff.mean() < 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU error")
def test_cli_xformers_on_cpu_is_a_one_line_error(folders, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    code = main(["--model", str(folders["ddpm"]), "--prompts", str(prompts), "--outdir", str(tmp_path / "o"),
                 "--device", "cpu", "--attention", "xformers"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "xformers" in err[0] and ("sdpa" in err[0])
