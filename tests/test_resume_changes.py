"""Resuming with changed settings (issue 10, defect 4): compared with the checkpoint's config.yaml;
breaking changes refused in one line (keys and both values), harmless ones allowed, deliberate
ones only with --allow-changed KEY, then applied for real and recorded in changes.jsonl."""

import json

import pytest
from omegaconf import OmegaConf

from ldm.cli.train_vae import main


def tiny(out, *extra):
    return [
        f"train.output_dir={out}", "model.block_out_channels=[8,16]", "model.norm_num_groups=8",
        "data.resolution=16", "data.shapes.num_images=8", "data.num_validation=0", "train.batch_size=4",
        "train.log_every=1", "scale_samples=4", "train.learning_rate=1e-3", "train.checkpoint_every=2",
        "train.checkpoints_total_limit=null", "validation.every=100", *extra,
    ]


def one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("changes") / "vae"
    assert main(tiny(out, "train.max_steps=2")) == 0
    return out


def test_each_checkpoint_holds_its_config(run):
    saved = OmegaConf.load(run / "checkpoints/step-000002/config.yaml")
    assert saved.train.learning_rate == 1e-3 and saved.data.resolution == 16


@pytest.mark.parametrize("change, shown", [
    ("data.resolution=32", "data.resolution: 16 -> 32"),
    ("model.block_out_channels=[8,32]", "model.block_out_channels: [8, 16] -> [8, 32]"),
    ("train.seed=1", "train.seed: 0 -> 1"),
    ("loss.reconstruction=l2", "loss.reconstruction: 'l1' -> 'l2'"),
])
def test_a_breaking_change_is_refused_with_both_values(run, capsys, change, shown):
    """Fails on the main of 2026-11-30: data.resolution and the seed were silently accepted, a model
    shape change was a size-mismatch traceback."""
    err = one_line_error(capsys, tiny(run, "train.max_steps=3", change, "--resume", "auto"))
    assert shown in err and "config.yaml" in err


def test_a_breaking_change_cannot_be_allowed(run, capsys):
    err = one_line_error(capsys, tiny(run, "train.max_steps=3", "data.resolution=32", "--resume", "auto",
                                      "--allow-changed", "data.resolution"))
    assert "data.resolution: 16 -> 32" in err


def test_a_deliberate_change_needs_the_flag(run, capsys):
    """Fails on the main of 2026-11-30: the new learning rate was silently ignored."""
    err = one_line_error(capsys, tiny(run, "train.max_steps=3", "train.learning_rate=5e-4", "--resume", "auto"))
    assert "train.learning_rate: 0.001 -> 0.0005" in err and "--allow-changed train.learning_rate" in err


def test_a_deliberate_change_with_the_flag_is_applied_and_recorded(run, tmp_path):
    import shutil

    out = tmp_path / "vae"
    shutil.copytree(run, out)
    argv = tiny(out, "train.max_steps=4", "train.learning_rate=5e-4", "--resume", "auto",
                "--allow-changed", "train.learning_rate")
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert lrs[1] == lrs[2] == pytest.approx(1e-3) and lrs[3] == lrs[4] == pytest.approx(5e-4)
    changes = [json.loads(line) for line in (out / "changes.jsonl").read_text().splitlines()]
    assert changes == [{"step": 2, "key": "train.learning_rate", "from": 1e-3, "to": 5e-4}]


def test_harmless_changes_are_allowed(run, tmp_path):
    import shutil

    out = tmp_path / "vae"
    shutil.copytree(run, out)
    assert main(tiny(out, "train.max_steps=3", "train.log_every=2", "train.checkpoint_every=1",
                     "validation.every=1", "data.num_workers=0", "--resume", "auto")) == 0
    assert not (out / "changes.jsonl").exists()
