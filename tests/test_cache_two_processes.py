"""ldm-cache in two processes (torchrun, gloo on the CPU), as under `accelerate launch`.

Each process encodes its own shards; the main process writes the index once both are
done. The result must be the cache one process writes: same shards, same values.
"""

import json
import os
import subprocess
import sys

from safetensors.torch import load_file

from ldm.cli.cache import main as cache_main
from test_train_unet import tiny

# Shards of 8 items, so that 20 training items make 3 shards and both processes get work.
LAUNCHED = """
import sys
import ldm.cache
ldm.cache.UNIT_SIZE = 8
from ldm.cli.cache import main
raise SystemExit(main(sys.argv[1:]))
"""


def shards(out):
    index = json.loads((out / "index.json").read_text())
    return index, {s["file"]: load_file(str(out / s["file"])) for s in index["shards"]}


def test_two_processes_write_the_cache_one_process_writes(tmp_path, vae_dir, monkeypatch):
    args = tiny(tmp_path / "unused", vae_dir, "data.random_flip=true")
    script = tmp_path / "cache_in_two.py"
    script.write_text(LAUNCHED)
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), *args, "--out", str(two)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    import ldm.cache

    monkeypatch.setattr(ldm.cache, "UNIT_SIZE", 8)
    one = tmp_path / "one"
    assert cache_main(args + ["--out", str(one)]) == 0

    index_two, tensors_two = shards(two)
    index_one, tensors_one = shards(one)
    assert index_two["num_samples"] == index_one["num_samples"] == 20
    assert [s["num_samples"] for s in index_two["shards"]] == [8, 8, 4]
    assert tensors_two.keys() == tensors_one.keys()
    for name, tensors in tensors_one.items():
        for key, value in tensors.items():
            assert tensors_two[name][key].equal(value), (name, key)
    assert not list(two.glob(".tmp-*"))  # no temporary file left behind
