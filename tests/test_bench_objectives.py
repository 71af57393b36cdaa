"""bench/objectives.py at toy size: trains two objectives a few steps, samples, writes its table."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench/objectives.py"


def test_objectives_bench_writes_its_table(tmp_path, vae_dir):
    spec = importlib.util.spec_from_file_location("bench_objectives", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "runs"
    assert bench.main([
        "--vae", str(vae_dir), "--out", str(out), "--objectives", "epsilon", "flow", "--max-steps", "2",
        "--images-per-prompt", "1", "--steps", "2",
        "--set", "data.resolution=16", "data.shapes.num_images=40", "data.num_validation=8", "train.batch_size=8",
        "validation.prompts=[]",
    ]) == 0
    report = json.loads((out / "objectives.json").read_text())
    results = {r["objective"]: r for r in report["results"]}
    assert list(results) == ["epsilon", "flow"]
    assert results["epsilon"]["scheduler"] == "DDIMScheduler"
    assert results["flow"]["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    for r in results.values():
        assert r["steps"] == 2 and r["train_seconds"] > 0 and len(r["per_prompt"]) == 18
        assert sorted(r["held_out_pairs"]) == ["a green triangle", "a purple circle"]
        assert 0.0 <= r["seen"] <= 1.0 and 0.0 <= r["held_out"] <= 1.0
    # Each trained with the held-out pairs excluded and no time limit.
    cfg = (out / "flow/config.yaml").read_text()
    assert "green triangle" in cfg and "max_minutes: null" in cfg and "kind: flow" in cfg
    table = (out / "objectives.md").read_text()
    assert "| flow | FlowMatchEulerDiscreteScheduler | 2 |" in table
