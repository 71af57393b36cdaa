"""Shared pieces of the reliability battery: tiny runs of the three stages, forked training
processes that die by SIGKILL at chosen moments, hostile pickles, and file damage.

The tiny command lines and the pickle/manifest helpers come from the existing tests
(tests/test_checkpoint_integrity.py, test_train_unet.py, test_train_control.py) so that the
battery runs exactly what those tests run.
"""

import hashlib
import importlib
import json
import multiprocessing
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from test_checkpoint_integrity import Sentinel, hostile_pickle, rewrite_manifest  # noqa: F401  (re-exported)
from test_checkpoint_integrity import tiny as tiny_vae_argv
from test_train_control import tiny as tiny_control_argv
from test_train_unet import tiny as tiny_unet_argv

__all__ = ["Sentinel", "hostile_pickle", "rewrite_manifest", "stage_argv", "stage_main", "Forked", "fork_train",
           "one_line", "damage", "DAMAGES", "weights_of", "same_weights", "logged_steps"]


# ---------------------------------------------------------------- the three stages, tiny


def stage_main(stage: str):
    """The `main(argv)` of a stage's console script (setup.cfg: ldm-train-vae / -unet / -control)."""
    if stage == "vae":
        from ldm.cli.train_vae import main
    elif stage == "unet":
        from ldm.cli.train_unet import main
    else:
        from ldm.cli.train_control import main
    return main


def stage_argv(stage: str, out: Path, *extra, vae_dir=None, base_dir=None) -> list:
    """The tiny command line of a stage (the existing tests' overrides) plus `extra`."""
    if stage == "vae":
        return tiny_vae_argv(out, *extra)
    if stage == "unet":
        return tiny_unet_argv(out, vae_dir, *extra)
    return tiny_control_argv(out, base_dir, "controlnet", *extra)


# ---------------------------------------------------------------- forked training processes


class Forked:
    """A training process forked by a fork server: a clean process that imported the trainers once
    (a fresh interpreter costs ~10 s of imports on a 2-core machine, a fork a few ms; forking the
    test process itself could inherit a lock held by one of its threads). Output goes to `log`."""

    def __init__(self, process, log: Path):
        self.process, self.log = process, log

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self):
        return self.process.exitcode

    def wait(self, timeout: float = 300.0):
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.kill()
            raise TimeoutError(f"training process {self.pid} still running after {timeout} s: {self.output()[-2000:]}")
        return self.process.exitcode

    def kill(self):
        """kill -9."""
        if self.process.exitcode is None:
            os.kill(self.pid, signal.SIGKILL)
        self.process.join()

    @property
    def killed(self) -> bool:
        return self.process.exitcode == -signal.SIGKILL

    @property
    def exit_code(self):
        code = self.process.exitcode
        return code if code is not None and code >= 0 else None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


PRELOAD = ["torch", "ldm.cli.train_vae", "ldm.cli.train_unet", "ldm.cli.train_control", "ldm.train.vae_loop",
           "ldm.train.unet_loop", "ldm.train.control_loop", "ldm.train.checkpoint"]


def die_on_call(module: str, name: str, call: int) -> None:
    """Make the `call`-th call of module.name (1-based) SIGKILL this process before it runs."""
    owner = importlib.import_module(module)
    function, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)

    setattr(owner, name, wrapper)


def _child(stage: str, argv, log: str, die_at) -> None:
    """The forked process: output to `log`, no report.html (as tests/conftest.py), then the stage's main."""
    import ldm.train.loop

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    ldm.train.loop.write_run_report = lambda *args, **kwargs: None  # ~2 s of matplotlib a run
    if die_at is not None:
        die_on_call(*die_at)
    sys.exit(stage_main(stage)(list(argv)))


_CONTEXT = []


def context():
    if not _CONTEXT:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _CONTEXT.append(ctx)
    return _CONTEXT[0]


def fork_train(stage: str, argv, log: Path, die_at=None) -> Forked:
    """Run the stage's main(argv) in a forked process; `die_at=(module name, function name, call)`
    makes it kill itself with SIGKILL at that call (a moment an outside poll could not hit reliably)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    process = context().Process(target=_child, args=(stage, [str(a) for a in argv], str(log), die_at), daemon=True)
    process.start()
    return Forked(process, log)


def logged_steps(run: Path) -> int:
    """Training records in run/metrics.jsonl (one per step with train.log_every=1)."""
    metrics = run / "metrics.jsonl"
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    count = 0
    for line in lines:
        try:
            count += "loss" in json.loads(line)
        except ValueError:
            pass  # a line being written
    return count


# ---------------------------------------------------------------- weights


def weights_of(path: Path) -> dict:
    return load_file(str(path))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def digest_tree(folder: Path, suffix=".safetensors") -> dict:
    """{relative path: sha256} of every `suffix` file under `folder` (every file for ""): bit-for-bit comparison."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob(f"*{suffix}")) if p.is_file()}


# ---------------------------------------------------------------- refusals and damage


def one_line(code: int, err: str):
    """(held, the line): exit 2 and exactly one `error: ` line without a traceback (progress bars aside)."""
    lines = [line for line in err.strip().replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    held = code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    return held, (lines[0] if len(lines) == 1 else " / ".join(lines[-3:]))


DAMAGES = ("truncated", "corrupt", "missing", "foreign")


def damage(path: Path, how: str) -> Path:
    """Damage the file `path` of a folder: truncated to half, bytes flipped, removed, or a foreign file
    added beside it (returns the file the refusal should name)."""
    if how == "foreign":
        foreign = path.with_name(path.name + ".extra")
        foreign.write_bytes(b"not part of this checkpoint")
        return foreign
    data = path.read_bytes()
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "corrupt":
        middle = len(data) // 2  # the bytes in the middle: a header-only check would miss them
        span = max(1, min(64, len(data) // 4))
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle: middle + span]) + data[middle + span:])
    else:
        raise ValueError(how)
    return path
