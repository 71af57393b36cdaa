"""Non-finite values (issue 10, defect 3): a NaN/inf step is skipped on every process, counted
and logged; too many in a row stop the run in one line; no NaN model, EMA or scaling factor is
ever saved or loaded; sampling that produces NaN says so instead of writing black images."""

import json
import math
import shutil
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.config import TrainConfig
from ldm.errors import LdmError
from ldm.train.checkpoint import find_checkpoint
from ldm.train.loader import train_loader
from ldm.train.loop import Step, Update, training_loop
from ldm.train.optim import build_lr_scheduler
from ldm.train.run import Run, make_accelerator


@dataclass
class ToyValidation:
    every: int = 100


@dataclass
class ToyConfig:
    train: TrainConfig
    validation: ToyValidation = field(default_factory=ToyValidation)


def toy_stage(out, poison=(), **train):
    """A one-layer stage whose loss is NaN on the step calls in `poison` (1-based). Returns the weights after each call."""
    from diffusers.training_utils import EMAModel

    train = {"batch_size": 2, "max_steps": 6, "log_every": 1, "checkpoint_every": 100, "learning_rate": 0.1, **train}
    cfg = ToyConfig(TrainConfig(output_dir=str(out), **train))
    run = Run(cfg.train.output_dir)
    checkpoint = find_checkpoint(run.checkpoints, None)
    accelerator = make_accelerator(cfg.train, run)
    loader = train_loader([{"x": torch.linspace(-1, 1, 3) * i} for i in range(1, 7)], 2, 0, 0, accelerator.num_processes)
    torch.manual_seed(0)
    gen = torch.nn.Linear(3, 3)
    ema = EMAModel(gen.parameters(), decay=0.5)
    opt = torch.optim.AdamW(gen.parameters(), lr=cfg.train.learning_rate)
    sched = build_lr_scheduler(opt, cfg.train, accelerator.num_processes)
    gen, opt, loader, sched = accelerator.prepare(gen, opt, loader, sched)
    net = accelerator.unwrap_model(gen)
    seen = {"weights": [], "ema": []}

    def step(batch, step_):
        seen["weights"].append(net.weight.detach().clone())
        seen["ema"].append(ema.shadow_params[0].clone())
        loss = (gen(batch["x"]) - batch["x"]).pow(2).mean()
        if len(seen["weights"]) in poison:
            loss = loss * float("nan")
        return Step([Update(loss, opt, sched, clip=gen.parameters())], 2, {"loss": loss})

    training_loop(accelerator, run, cfg, loader, checkpoint, None, name="toy", unit="samples", trained=(gen,),
                  net=net, ema=ema, lr_scheduler=sched, step=step, validate=lambda s: None, save=lambda s: None)
    seen["weights"].append(net.weight.detach().clone())
    seen["ema"].append(ema.shadow_params[0].clone())
    return seen


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_nonfinite_step_is_skipped_counted_and_logged(tmp_path):
    """Fails on the main of 2026-11-30: the NaN step was applied (all weights NaN from then on)."""
    seen = toy_stage(tmp_path / "run", poison={3, 5})
    w = seen["weights"]
    assert all(bool(torch.isfinite(x).all()) for x in w)
    assert torch.equal(w[2], w[3]) and torch.equal(w[4], w[5])  # the poisoned steps changed nothing
    assert not torch.equal(w[1], w[2]) and not torch.equal(w[3], w[4])  # the others trained
    assert torch.equal(seen["ema"][2], seen["ema"][3])  # nor the EMA
    by_step = {r["step"]: r for r in records(tmp_path / "run")}
    assert [by_step[s].get("nonfinite_steps", 0) for s in range(1, 7)] == [0, 0, 1, 1, 2, 2]


def test_too_many_nonfinite_steps_in_a_row_stop_in_one_line(tmp_path):
    with pytest.raises(LdmError) as e:
        toy_stage(tmp_path / "run", poison={2, 3, 4}, max_nonfinite_steps=3, max_steps=10)
    message = str(e.value)
    assert "\n" not in message and "3 steps in a row" in message and "step 4" in message
    assert "train.learning_rate" in message


def test_max_nonfinite_steps_is_checked(tmp_path):
    from ldm.train.run import check_train_config

    with pytest.raises(LdmError, match="max_nonfinite_steps"):
        check_train_config(TrainConfig(max_nonfinite_steps=0))


def nonfinite_tensors(folder):
    """Every safetensors file (and JSON number) under `folder` holding a NaN/inf."""
    bad = [str(p) for p in folder.rglob("*.safetensors") if any(
        t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in load_file(str(p)).values())]
    for p in folder.rglob("*.json"):
        text = p.read_text()
        if "NaN" in text or "Infinity" in text:
            bad.append(str(p))
    return bad


@pytest.mark.parametrize("stage", ["vae", "unet"])
def test_a_diverging_run_stops_with_an_error_and_saves_no_nan(tmp_path, capsys, stage, vae_dir):
    """train.learning_rate=1e6: fails on the main of 2026-11-30 (exit 0, every tensor of final/ NaN)."""
    run = tmp_path / stage
    common = ["train.max_steps=30", "train.checkpoint_every=1", "train.checkpoints_total_limit=null",
              "train.learning_rate=1e6", "train.max_grad_norm=1e9", "train.log_every=1", "validation.every=1000"]
    if stage == "vae":
        from ldm.cli.train_vae import main

        argv = [f"train.output_dir={run}", "model.block_out_channels=[8,16]", "model.norm_num_groups=8",
                "data.resolution=16", "data.shapes.num_images=8", "data.num_validation=0", "train.batch_size=4",
                "scale_samples=4", *common]
    else:
        from ldm.cli.train_unet import main

        argv = [f"train.output_dir={run}", f"vae_path={vae_dir}", "data.resolution=16", "data.shapes.num_images=8",
                "model.block_out_channels=[32,64]", "model.norm_num_groups=8", "model.layers_per_block=1",
                "text_encoder.width=32", "text_encoder.heads=4", "text_encoder.layers=1", "text_encoder.context_length=8",
                "train.batch_size=4", "data.num_validation=0", "validation.prompts=[]", *common]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1].startswith("error: training diverged") and "non-finite" in err[-1] and "Traceback" not in "".join(err)
    assert nonfinite_tensors(run) == []
    assert not (run / "final").exists()
    assert any(r.get("nonfinite_steps", 0) >= 1 for r in records(run))


def test_a_model_folder_with_nan_weights_is_refused(tmp_path, tiny_model_dir):
    """Fails on the main of 2026-11-30: the folder loaded and sampled black images."""
    from ldm.pipeline import LatentDiffusionPipeline

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "unet/diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(weights))
    with pytest.raises(LdmError, match="non-finite") as e:
        LatentDiffusionPipeline.from_pretrained(str(folder))
    assert "\n" not in str(e.value) and "unet" in str(e.value)


def test_a_vae_with_a_nan_scaling_factor_is_refused(tmp_path, tiny_model_dir):
    """Fails on the main of 2026-11-30: stage 2 accepted "scaling_factor": NaN."""
    from ldm.autoencoder import load_vae
    from ldm.pipeline import LatentDiffusionPipeline

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "vae/config.json").read_text())
    config["scaling_factor"] = math.nan
    (folder / "vae/config.json").write_text(json.dumps(config))
    for load in (lambda: load_vae(folder / "vae"), lambda: LatentDiffusionPipeline.from_pretrained(str(folder))):
        with pytest.raises(LdmError, match="scaling_factor") as e:
            load()
        assert "\n" not in str(e.value)


def test_sampling_that_produces_nan_raises_instead_of_black_images(tiny_pipe):
    """Fails on the main of 2026-11-30: NaN latents decoded to black images."""
    unet = tiny_pipe.unet
    saved = unet.conv_out.bias.detach().clone()
    try:
        with torch.no_grad():
            unet.conv_out.bias.fill_(float("inf"))
        with pytest.raises(LdmError, match="non-finite") as e:
            tiny_pipe(["a red circle"], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
        assert "\n" not in str(e.value)
    finally:
        with torch.no_grad():
            unet.conv_out.bias.copy_(saved)


def test_ldm_sample_exits_nonzero_on_a_nan_model(tmp_path, tiny_model_dir, capsys):
    from ldm.cli.sample import main

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "unet/diffusion_pytorch_model.safetensors"
    tensors = {k: torch.full_like(v, float("nan")) for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    assert main(["--model", str(folder), "--prompts", str(prompts), "--outdir", str(tmp_path / "out"), "--steps", "2"]) == 2
    assert not list((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else True
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "non-finite" in err[-1]
