"""R7: untrusted files. A pickle whose unpickling creates a sentinel folder is put in place of every
file of a run folder (the manifest rewritten to match, as a careful attacker would), of an
ldm-cache folder, of a model folder and of a stage-1 VAE folder, and at every weights path a
config or a command names; then the consumer runs (resume, training from the cache, ldm-sample,
stage 2 on the VAE, the weight loaders of ldm-eval, LPIPS and the text encoder).
Held: the sentinel is never created, and the consumer either refuses in one line (exit 2, or an
LdmError of one line) or, for a file it never reads (a log, a sample image), goes on unharmed.
"""

import shutil
from pathlib import Path

import pytest

from harness import hostile_pickle, one_line, rewrite_manifest, stage_argv

from ldm.errors import LdmError


def files_of(folder: Path):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def plant(folder: Path, name: str, sentinel: Path) -> None:
    """The file `name` of `folder` replaced by the hostile pickle; checkpoint manifests rewritten to match."""
    hostile_pickle(folder / name, sentinel)
    for manifest in folder.rglob("manifest.json"):
        rewrite_manifest(manifest.parent)


def judge(record, case, sentinel, code, err, must_refuse=False) -> str:
    """Held: no sentinel; a one-line refusal, or (a file the consumer does not read, unless `must_refuse`)
    a clean exit 0. Returns '' when held, else what happened (a loop over files asserts at its end)."""
    refused, line = one_line(code, err)
    held = not sentinel.exists() and (refused or (code == 0 and not must_refuse))
    outcome = "sentinel CREATED" if sentinel.exists() else (
        line if refused else "not read: the consumer ran to the end (exit 0)" if code == 0 else f"exit {code}, {line[-200:]}")
    record("R7", case, held, detail=outcome)
    return "" if held else f"{case}: {outcome}"


# ---------------------------------------------------------------- a run folder: --resume auto

RUN = ["train.max_steps=2", "train.checkpoint_every=1", "train.checkpoints_total_limit=null", "ema.enabled=true",
       "ema.decay=0.9", "validation.every=100"]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    from ldm.cli.train_vae import main

    run = tmp_path_factory.mktemp("r7-run") / "vae"
    assert main(stage_argv("vae", run, *RUN)) == 0
    return run


def run_files():
    return ["config.yaml", "metrics.jsonl", "report.html", "samples/step-000002.png", "final/config.json",
            "final/diffusion_pytorch_model.safetensors"] + [f"checkpoints/step-000002/{name}" for name in (
                "model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "ema.safetensors",
                "ema.json", "config.yaml", "checkpoint.json", "manifest.json")]


def test_every_file_of_the_run_folder_is_in_the_list(run_folder):
    listed = set(run_files()) | {f"checkpoints/step-000001/{n}" for n in files_of(run_folder / "checkpoints/step-000001")}
    held_elsewhere = {n for n in files_of(run_folder) if n.startswith("logs/")}  # TensorBoard events: written, never read
    assert set(files_of(run_folder)) - held_elsewhere == listed


@pytest.mark.parametrize("name", run_files())
def test_a_pickle_in_a_run_folder(run_folder, tmp_path, capsys, record, name):
    from ldm.cli.train_vae import main

    run = tmp_path / "vae"
    shutil.copytree(run_folder, run)
    sentinel = tmp_path / "pwned"
    plant(run, name, sentinel)
    capsys.readouterr()
    code = main(stage_argv("vae", run, *RUN, "train.max_steps=3", "--resume", "auto"))
    failed = judge(record, f"run folder {name} (--resume auto)", sentinel, code, capsys.readouterr().err,
                   must_refuse=name.startswith("checkpoints/step-000002/"))  # the checkpoint resumed from
    assert not failed, failed


# ---------------------------------------------------------------- an ldm-cache folder: stage 2 trains from it


@pytest.fixture(scope="module")
def cache_folder(tmp_path_factory, vae_dir):
    from ldm.cli.cache import main as cache_main

    root = tmp_path_factory.mktemp("r7-cache")
    assert cache_main(stage_argv("unet", root / "unused", vae_dir=vae_dir) + ["--out", str(root / "cache")]) == 0
    return root / "cache"


def test_a_pickle_in_every_file_of_an_ldm_cache(cache_folder, vae_dir, tmp_path, capsys, record):
    from ldm.cli.train_unet import main

    names, failed = files_of(cache_folder), []
    assert len(names) >= 2
    for name in names:
        cache = tmp_path / name.replace("/", "_") / "cache"
        shutil.copytree(cache_folder, cache)
        sentinel = cache.parent / "pwned"
        plant(cache, name, sentinel)
        capsys.readouterr()
        code = main(stage_argv("unet", cache.parent / "unet", f"data.cache={cache}", "train.max_steps=1",
                               vae_dir=vae_dir))
        failed.append(judge(record, f"ldm-cache {name} (training from the cache)", sentinel, code, capsys.readouterr().err))
    failed = [f for f in failed if f]
    assert not failed, failed


# ---------------------------------------------------------------- a model folder: ldm-sample; a VAE folder: stage 2


def test_a_pickle_in_every_file_of_a_model_folder(tiny_model_dir, tmp_path, capsys, record):
    from ldm.cli.sample import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    failed = []
    for name in files_of(tiny_model_dir):
        model = tmp_path / name.replace("/", "_") / "model"
        shutil.copytree(tiny_model_dir, model)
        sentinel = model.parent / "pwned"
        plant(model, name, sentinel)
        capsys.readouterr()
        code = main(["--model", str(model), "--prompts", str(prompts), "--outdir", str(model.parent / "out"),
                     "--steps", "2", "--device", "cpu"])
        failed.append(judge(record, f"model folder {name} (ldm-sample)", sentinel, code, capsys.readouterr().err))
    failed = [f for f in failed if f]
    assert not failed, failed


def test_a_pickle_in_every_file_of_a_vae_folder(vae_dir, tmp_path, capsys, record):
    from ldm.cli.train_unet import main

    failed = []
    for name in files_of(vae_dir):
        vae = tmp_path / name.replace("/", "_") / "vae"
        shutil.copytree(vae_dir, vae)
        sentinel = vae.parent / "pwned"
        plant(vae, name, sentinel)
        capsys.readouterr()
        code = main(stage_argv("unet", vae.parent / "unet", "train.max_steps=1", vae_dir=vae))
        failed.append(judge(record, f"vae_path folder {name} (stage 2)", sentinel, code, capsys.readouterr().err))
    failed = [f for f in failed if f]
    assert not failed, failed


# ---------------------------------------------------------------- weights paths a config or a command names


def refusal_of(function, *args, **kwargs):
    """(code, err) as a command line would show the call: 2 and the message of an LdmError."""
    try:
        function(*args, **kwargs)
    except LdmError as e:
        return 2, f"error: {e}"
    except Exception as e:  # noqa: BLE001 - anything else would be a traceback on the command line
        return 1, f"Traceback: {type(e).__name__}: {e}"
    return 0, ""


@pytest.mark.parametrize("what", ["validation.eval_inception_weights / ldm-eval --inception-weights",
                                  "validation.eval_clip_weights / ldm-eval --clip-weights",
                                  "loss.lpips_vgg_weights", "loss.lpips_linear_weights",
                                  "text_encoder.weights (.bin)", "text_encoder.weights (.safetensors)"])
def test_a_pickle_at_a_weights_path(tmp_path, record, what):
    sentinel = tmp_path / "pwned"
    hostile = tmp_path / ("weights.safetensors" if "safetensors" in what else "weights.pth")
    hostile_pickle(hostile, sentinel)
    if "inception" in what:
        from ldm.eval.fid_kid import InceptionMetrics

        code, err = refusal_of(InceptionMetrics.from_file, hostile, features=64)
    elif "clip" in what:
        from eval_files import register_tiny_open_clip
        from ldm.eval.clip_score import load_open_clip

        code, err = refusal_of(load_open_clip, register_tiny_open_clip(tmp_path), str(hostile))
    elif "lpips" in what:
        from lpips_files import write_lpips_weights
        from ldm.lpips import LPIPS

        vgg, linear = write_lpips_weights(tmp_path)
        args = (hostile, linear) if "vgg" in what else (vgg, hostile)
        code, err = refusal_of(LPIPS.from_files, *args)
    else:
        from ldm.text_encoder import OpenCLIPTextModel, load_open_clip_weights

        model = OpenCLIPTextModel(width=32, heads=4, layers=1, context_length=8)
        code, err = refusal_of(load_open_clip_weights, model, str(hostile))
    failed = judge(record, what, sentinel, code, err, must_refuse=True)
    assert not failed, failed


@pytest.mark.parametrize("what", ["init_from (stage 2)", "base_model (control stage)",
                                  "validation.eval_clip_folder / ldm-eval --clip-folder"])
def test_a_pickle_in_a_folder_a_config_names(tiny_model_dir, base_dir, tmp_path, capsys, record, what):
    """The weights file of the folder replaced (its configs are covered by the model folder case above)."""
    sentinel = tmp_path / "pwned"
    if "clip" in what:
        from eval_files import write_hf_clip_folder
        from ldm.eval.clip_score import load_hf_clip

        folder = tmp_path / "clip"
        write_hf_clip_folder(folder)
        weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
        hostile_pickle(weights[0], sentinel)
        code, err = refusal_of(load_hf_clip, folder)
    elif "init_from" in what:
        from ldm.cli.train_unet import main

        folder = tmp_path / "model"
        shutil.copytree(tiny_model_dir, folder)
        hostile_pickle(folder / "unet/diffusion_pytorch_model.safetensors", sentinel)
        capsys.readouterr()
        code = main(stage_argv("unet", tmp_path / "unet", f"init_from={folder}", "train.max_steps=1",
                               vae_dir=folder / "vae"))
        err = capsys.readouterr().err
    else:
        from ldm.cli.train_control import main

        folder = tmp_path / "base"
        shutil.copytree(base_dir, folder)
        hostile_pickle(folder / "unet/diffusion_pytorch_model.safetensors", sentinel)
        capsys.readouterr()
        code = main(stage_argv("control", tmp_path / "control", "train.max_steps=1", base_dir=folder))
        err = capsys.readouterr().err
    failed = judge(record, what, sentinel, code, err, must_refuse=True)
    assert not failed, failed
