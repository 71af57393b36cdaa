"""R9: SIGTERM to one rank, to every rank, to the launcher; and a stalled rank (issue 10, defect 5).

Stage 2 (train_unet.py, tiny models) in 2 CPU processes over gloo under torchrun, as
tests/test_multiprocess.py launches it; each rank runs under rank_exit.py, which writes
down its exit status. Once the run has logged STOP_AFTER steps, SIGTERM goes to rank 0,
rank 1, both, or the torchrun parent (or SIGINT to the whole job, as Ctrl-C). Held: both
ranks gone within BOUND_S, each with exit 130 (interrupted, resumable; not killed by a
signal), exactly one checkpoint, at the step the run stopped at (the last one logged), and
`--resume auto` to MAX_STEPS ends with the weights and EMA of an uninterrupted run to
MAX_STEPS, bit for bit. The resumes and the uninterrupted run share one launch
(train_runs.py): each launch costs ~15 s of imports on 2 cores.

The watchdog case: rank 1 stalls before its backward pass of step 3, and rank 0 waits
for it in DDP's all-reduce. With train.collective_timeout_minutes=0.1 the job ends within
seconds, rank 1 saying it was stuck in 'step 3: forward/backward', instead of waiting
for the process-group timeout (an hour by default).
"""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
STOP_AFTER, MAX_STEPS, BOUND_S = 2, 12, 60.0


def arguments(run: Path, vae_dir: Path, *extra) -> list:
    return [
        f"train.output_dir={run}", f"vae_path={vae_dir}",
        "model.block_out_channels=[32,64]", "model.norm_num_groups=8", "model.layers_per_block=1",
        "text_encoder.width=32", "text_encoder.heads=4", "text_encoder.layers=1", "text_encoder.context_length=8",
        "data.resolution=16", "data.shapes.num_images=20", "data.num_validation=4", "train.batch_size=2",
        f"train.max_steps={MAX_STEPS}", "train.checkpoint_every=100000", "train.checkpoints_total_limit=null",
        "train.log_every=1", "validation.prompts=[a red circle]", "validation.every=100000",
        "validation.num_inference_steps=2", *extra,
    ]


class Job:
    """A 2-process torchrun launch of `script`, each rank under rank_exit.py."""

    def __init__(self, folder: Path, script: Path, argv, env=None):
        self.exits = Path(tempfile.mkdtemp(prefix="exits-", dir=folder))  # one per launch: a resume launches again
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": str(ROOT), **(env or {})}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   str(HERE / "rank_exit.py"), str(self.exits), str(script), *map(str, argv)]
        self.launcher = subprocess.Popen(command, env=env, cwd=folder, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.script = str(script)

    def ranks(self) -> dict:
        """{rank: psutil.Process} of the training processes (the children of rank_exit.py)."""
        found = {}
        for process in self.processes()[1:]:
            try:
                if self.script in process.cmdline() and "rank_exit.py" not in " ".join(process.cmdline()):
                    found[int(process.environ()["RANK"])] = process
            except (psutil.Error, KeyError):
                continue
        return found

    def wait(self, bound_s: float):
        """(seconds until every process of the job was gone or None past `bound_s`, {rank: exit status}, output)."""
        processes = self.processes()
        t0 = time.monotonic()
        _, alive = psutil.wait_procs(processes, timeout=bound_s)
        seconds = None if alive else time.monotonic() - t0
        for process in alive:  # past the bound: end the job so the test does not hang
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        output, _ = self.launcher.communicate(timeout=30)
        exits = {int(p.stem[4:]): int(p.read_text()) for p in self.exits.glob("rank*.exit")}
        return seconds, exits, output

    def processes(self) -> list:
        """The launcher and every process under it, while it runs."""
        try:
            launcher = psutil.Process(self.launcher.pid)
            return [launcher, *launcher.children(recursive=True)] if self.launcher.poll() is None else []
        except psutil.NoSuchProcess:
            return []

    def kill(self):
        for process in self.processes()[::-1]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass


def logged_steps(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return max((json.loads(line)["step"] for line in lines if '"loss"' in line), default=0)


def checkpoints(run: Path) -> list:
    return sorted(p.name for p in (run / "checkpoints").glob("step-*")) if (run / "checkpoints").is_dir() else []


TARGETS = ("rank 0", "rank 1", "every rank", "the launcher", "Ctrl-C")


def train_in_one_launch(folder: Path, runs) -> None:
    """Each argument list of `runs` through train_unet.py's main, in turn, in one 2-process launch (train_runs.py)."""
    listing = folder / "runs.json"
    listing.write_text(json.dumps(runs))
    job = Job(folder, HERE / "train_runs.py", [listing])
    seconds, exits, output = job.wait(600)
    assert exits == {0: 0, 1: 0}, output[-5000:]


@pytest.fixture(scope="module")
def stopped_and_resumed(tmp_path_factory, vae_dir) -> dict:
    """{target: what `sigterm` saw, with "identical"}: each target's run stopped, then, in one launch, an
    uninterrupted run to MAX_STEPS and every cleanly stopped run resumed to MAX_STEPS."""
    root = tmp_path_factory.mktemp("r9")
    cases = {target: sigterm(root / f"case{i}", vae_dir, target) for i, target in enumerate(TARGETS)}
    straight = root / "straight"
    resumed = {target: out["run"] for target, out in cases.items() if stopped_cleanly(out)}
    train_in_one_launch(root, [arguments(straight, vae_dir)]
                        + [[*arguments(run, vae_dir), "--resume", "auto"] for run in resumed.values()])
    last = f"checkpoints/step-{MAX_STEPS:06d}"
    for target, out in cases.items():
        out["identical"] = target in resumed and same_files(resumed[target] / last, straight / last)
    return cases


def sigterm(folder: Path, vae_dir: Path, target: str) -> dict:
    """Launch; once STOP_AFTER steps are logged, SIGTERM `target` ("rank 0", "rank 1", "every rank", "the
    launcher"), or SIGINT to the whole job ("Ctrl-C")."""
    folder.mkdir(parents=True, exist_ok=True)
    run = folder / "run"
    job = Job(folder, ROOT / "train_unet.py", arguments(run, vae_dir))
    try:
        deadline = time.monotonic() + 300
        while logged_steps(run) < STOP_AFTER and job.launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        ranks = job.ranks()
        assert sorted(ranks) == [0, 1] and job.launcher.poll() is None, job.launcher.communicate()[0][-5000:]
        if target == "Ctrl-C":  # SIGINT to the whole job, as a terminal sends it: each rank gets it twice or more
            os.killpg(job.launcher.pid, signal.SIGINT)  # the launcher leads its own process group
        targets = {"rank 0": [ranks[0]], "rank 1": [ranks[1]], "every rank": list(ranks.values()),
                   "the launcher": [psutil.Process(job.launcher.pid)], "Ctrl-C": []}[target]
        for process in targets:
            process.send_signal(signal.SIGTERM)
        seconds, exits, output = job.wait(BOUND_S)
    finally:
        if job.launcher.poll() is None:
            job.kill()
    return dict(run=run, seconds=seconds, exits=exits, output=output, checkpoints=checkpoints(run),
                logged=logged_steps(run))


def stopped_cleanly(out: dict) -> bool:
    """Both ranks gone in time with 130, one checkpoint, at the last logged step."""
    return (out["seconds"] is not None and out["exits"] == {0: 130, 1: 130}
            and out["checkpoints"] == [f"step-{out['logged']:06d}"] and STOP_AFTER <= out["logged"] < MAX_STEPS)


def same_files(a: Path, b: Path, names=("model.safetensors", "ema.safetensors")) -> bool:
    for name in names:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def detail(out: dict, resumed: str = "") -> str:
    took = "not gone" if out["seconds"] is None else f"{out['seconds']:.1f} s"
    return (f"exit codes {out['exits']}, checkpoints {out['checkpoints']} (last logged step {out['logged']}), "
            f"{took}{resumed}")


def test_sigterm_to_one_rank_stops_both_at_one_step_with_one_checkpoint(tmp_path, vae_dir, record):
    """The fast case of the default run (no resume; resuming from such a checkpoint: test_multiprocess.py)."""
    out = sigterm(tmp_path, vae_dir, "rank 1")
    held = stopped_cleanly(out)
    assert record("R9", "SIGTERM to rank 1 (stop only)", held, detail=detail(out)), out["output"][-5000:]
    assert "interrupted: saved" in out["output"] and "--resume auto" in out["output"]


@pytest.mark.reliability
@pytest.mark.parametrize("target", TARGETS)
def test_sigterm_stops_saves_and_resumes_identically(stopped_and_resumed, record, target):
    """SIGTERM to `target`; "Ctrl-C": SIGINT to the job's process group (the launcher forwards it to the ranks
    too, so each rank sees a second signal while it stops). The runs are made once for all targets (the fixture)."""
    out = stopped_and_resumed[target]
    clean, identical = stopped_cleanly(out), out["identical"]
    note = ", resume identical" if identical else (", resume NOT identical" if clean else "")
    case = "Ctrl-C (SIGINT to the job's process group)" if target == "Ctrl-C" else f"SIGTERM to {target}"
    assert record("R9", case, clean and identical, detail=detail(out, note)), out["output"][-5000:]


def test_a_stalled_rank_ends_the_job_naming_the_rank_and_phase(tmp_path, vae_dir, record):
    """Rank 1 stalls in step 3: the watchdog ends the job in seconds, not at the process-group timeout."""
    run = tmp_path / "run"
    job = Job(tmp_path, HERE / "stalling_rank.py", arguments(run, vae_dir, "train.collective_timeout_minutes=0.1"),
              env={"LDM_TEST_STALL_RANK": "1", "LDM_TEST_STALL_STEP": "3"})
    try:
        deadline = time.monotonic() + 300
        while logged_steps(run) < 2 and job.launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        seconds, exits, output = job.wait(BOUND_S)
    finally:
        if job.launcher.poll() is None:
            job.kill()
    line = re.search(r"watchdog: rank 1 has spent ([\d.]+) s in 'step 3: forward/backward' \(allowed 6.0 s, "
                     r"train.collective_timeout_minutes=0.1\)", output)
    held = seconds is not None and exits.get(1) == 124 and line is not None and logged_steps(run) == 2
    took = "not gone" if seconds is None else f"{seconds:.1f} s after step 2"
    assert record("R9", "rank 1 stalled in step 3 (watchdog, 6 s)", held,
                  detail=f"exit codes {exits}, {took}, '{line.group(0) if line else 'no watchdog line'}'"), output[-5000:]
    assert "Thread" in output and "stalling_rank.py" in output  # faulthandler's stacks name where it stalled


def test_a_second_signal_repeats_the_stop_with_several_processes():
    """One process: a second signal interrupts at once (test_loop.py). Several: it only repeats the request,
    since a rank leaving the step at hand would leave the others in a collective."""
    from ldm.train.interrupt import StopRequest

    several = StopRequest(num_processes=2)
    several(signal.SIGTERM, None)
    several(signal.SIGINT, None)  # the launcher forwarding a terminal's Ctrl-C, or tearing down the job
    several(signal.SIGTERM, None)
    assert several.signum == signal.SIGTERM  # the first request, still pending for the step's end
    one = StopRequest(num_processes=1)
    one(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        one(signal.SIGINT, None)


def test_the_watchdog_names_the_rank_the_phase_and_its_allowance():
    from ldm.train.watchdog import Watchdog

    dog = Watchdog(rank=1, step_minutes=0.5, long_minutes=60)
    assert dog.overdue(time.monotonic()) is None  # nothing marked yet
    dog.mark("step 7: stop-request all-reduce")
    start = dog.phase[1]
    assert dog.overdue(start + 29.9) is None
    line = dog.overdue(start + 31.0)
    assert line.startswith("watchdog: rank 1 has spent 31.0 s in 'step 7: stop-request all-reduce' (allowed 30.0 s, "
                           "train.collective_timeout_minutes=0.5)")
    dog.mark("checkpoint save at step 7 (stopping)", long=True)  # cadence work: the process group's allowance
    start = dog.phase[1]
    assert dog.overdue(start + 31.0) is None and dog.overdue(start + 3599.0) is None
    assert "train.process_group_timeout_minutes=60" in dog.overdue(start + 3601.0)
    dog.stop()
    assert dog.overdue(start + 1e6) is None


def test_a_bad_collective_timeout_is_refused():
    from ldm.config import TrainConfig
    from ldm.errors import LdmError
    from ldm.train.run import check_train_config

    with pytest.raises(LdmError, match="train.collective_timeout_minutes must be positive, got 0"):
        check_train_config(TrainConfig(collective_timeout_minutes=0))
