"""Evaluation during training (validation.eval_every): eval_* scores with the EMA weights in metrics.jsonl."""

import pytest
import torch
from safetensors.torch import load_file

from ldm.cli.train_unet import main
from ldm.config import ValidationConfig, DataConfig
from ldm.errors import LdmError
from ldm.eval.during_training import build_training_eval
from test_train_unet import one_line_error, records, tiny

EVAL = ["validation.eval_every=1", "validation.eval_images_per_prompt=1", "validation.eval_steps=2"]


def run_unet(tmp_path, vae_dir, name, *extra):
    run = tmp_path / name
    assert main(tiny(run, vae_dir, "train.max_steps=2", "validation.every=1", *extra)) == 0
    return run


def test_eval_every_step_logs_adherence_and_leaves_training_unchanged(tmp_path, vae_dir):
    plain = run_unet(tmp_path, vae_dir, "plain")
    evaluated = run_unet(tmp_path, vae_dir, "eval", *EVAL)

    assert not any(k.startswith("eval_") for r in records(plain) for k in r)  # off by default
    scored = [r for r in records(evaluated) if "eval_adherence" in r]
    assert [r["step"] for r in scored] == [1, 2]
    for r in scored:  # the 18 shapes prompts: the demo's held-out pairs are among them
        assert 0 <= r["eval_adherence"] <= 1 and 0 <= r["eval_adherence_held_out"] <= 1
    # Sampling for the evaluation moves no training RNG: the final weights are those of the run without it.
    a = load_file(str(plain / "final/unet/diffusion_pytorch_model.safetensors"))
    b = load_file(str(evaluated / "final/unet/diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_inception_file_is_one_line_before_training(tmp_path, vae_dir, capsys):
    run = tmp_path / "unet"
    err = one_line_error(capsys, tiny(run, vae_dir, "validation.every=1", *EVAL, f"validation.eval_inception_weights={tmp_path / 'none.pth'}"))
    assert "validation.eval_inception_weights" in err and "none.pth" in err
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


def test_settings_are_checked():
    shapes = DataConfig()
    assert build_training_eval(ValidationConfig(), shapes) is None
    assert len(build_training_eval(ValidationConfig(eval_every=1, every=1), shapes).prompts) == 18
    with pytest.raises(LdmError, match="multiple of validation.every"):
        build_training_eval(ValidationConfig(eval_every=3, every=2), shapes)
    with pytest.raises(LdmError, match="eval_prompts"):
        build_training_eval(ValidationConfig(eval_every=1, every=1), DataConfig(source="folder"))


def test_fid_and_clip_score_from_local_files(tmp_path, vae_dir):
    """With a (random) Inception file and a transformers CLIP folder, eval_fid, eval_kid and eval_clip_score are logged."""
    from eval_files import write_hf_clip_folder, write_inception_weights

    from ldm.eval.weights import INCEPTION_FILE

    inception = write_inception_weights(tmp_path / INCEPTION_FILE)
    clip = write_hf_clip_folder(tmp_path / "clip")[0]
    run = run_unet(tmp_path, vae_dir, "eval", "validation.eval_every=2", "validation.every=2", "validation.eval_images_per_prompt=1",
                   "validation.eval_steps=2", f"validation.eval_inception_weights={inception}", f"validation.eval_clip_folder={clip}")
    scored = [r for r in records(run) if "eval_fid" in r]
    assert [r["step"] for r in scored] == [2]
    r = scored[0]
    assert r["eval_fid"] >= 0 and r["eval_kid_std"] >= 0 and -1 <= r["eval_clip_score"] / 100 <= 1 and 0 <= r["eval_adherence"] <= 1
