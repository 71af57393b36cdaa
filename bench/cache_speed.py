"""Stage-2 step time with the VAE encoder and text encoder in the loop vs. from an ldm-cache folder.

Runs the real trainer (`ldm.train.unet_loop.train_unet`) on the demo config both ways, with
the same batch size, U-Net, EMA and optimizer, and times the steps after a warm-up from
the trainer's own metrics (training time only: checkpoints and validation are excluded
and switched off). The VAE's weights do not change the step cost, so an untrained VAE of
the demo's shape is used unless runs/shapes/vae/final exists (or --vae is given).

    python bench/cache_speed.py                       # demo config, 60 timed steps, 3 repeats
    python bench/cache_speed.py --json bench/cache_speed.json --threads 2

It also times the data alone (batches from each loader, no model) and the two encoders
alone on one batch: together they bound what the cache can save.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the trainer's progress bars would drown the table

import torch  # noqa: E402

from ldm.config import UNetStageConfig, VAEStageConfig, load_config  # noqa: E402

DEMO_VAE = Path("runs/shapes/vae/final")


def untrained_vae(folder: Path) -> Path:
    """A VAE of configs/vae/shapes.yaml's shape with a scaling factor, as train_vae.py would save it."""
    from ldm.autoencoder import build_vae

    if (folder / "config.json").is_file():
        return folder
    cfg = load_config(VAEStageConfig, "configs/vae/shapes.yaml")
    torch.manual_seed(0)
    vae = build_vae(cfg.model, sample_size=cfg.data.resolution)
    vae.register_to_config(scaling_factor=1.0)
    vae.save_pretrained(str(folder))
    return folder


def stage_config(args, vae: Path, output_dir: Path, cache=None) -> UNetStageConfig:
    overrides = [
        f"vae_path={vae}", f"train.output_dir={output_dir}", f"train.max_steps={args.warmup + args.steps}",
        f"train.log_every={args.warmup}", "train.checkpoint_every=1000000", "train.max_minutes=null",
        "validation.prompts=[]", *args.overrides,
    ]
    if cache is not None:
        overrides.append(f"data.cache={cache}")
    return load_config(UNetStageConfig, args.config, overrides)


def ms_per_step(cfg, output_dir: Path, warmup: int, clock: str) -> float:
    """Training time per step after the warm-up, from the trainer's samples_per_s records.

    clock "wall": elapsed time, as the trainer reports it. "cpu": this process's CPU time
    (the trainer's clock swapped for time.process_time); with one torch thread and no
    DataLoader workers it is the work done, and barely moves when other jobs share the CPU.
    """
    import types

    import ldm.train.run as run_module
    from ldm.train.unet_loop import train_unet

    shutil.rmtree(output_dir, ignore_errors=True)
    real = run_module.time
    if clock == "cpu":
        run_module.time = types.SimpleNamespace(perf_counter=time.process_time, monotonic=time.monotonic)
    try:
        train_unet(cfg)
    finally:
        run_module.time = real
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "samples_per_s" in r and r["step"] > warmup]
    seconds = sum(cfg.train.batch_size * cfg.train.log_every / r["samples_per_s"] for r in timed)
    return 1000.0 * seconds / (len(timed) * cfg.train.log_every)


def data_ms_per_batch(cfg, batches: int) -> float:
    """Batches from the training loader alone (images drawn, or cache entries read)."""
    from ldm.autoencoder import load_vae
    from ldm.cache import check_cache
    from ldm.data import build_dataset
    from ldm.data.cached import cached_dataset
    from ldm.train.loader import train_loader

    dataset = build_dataset(cfg.data, "train") if not cfg.data.cache else cached_dataset(cfg, check_cache(cfg, load_vae(cfg.vae_path)))
    it = iter(train_loader(dataset, cfg.train.batch_size, cfg.data.num_workers, cfg.train.seed))
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return 1000.0 * (time.perf_counter() - t0) / batches


@torch.no_grad()
def encoders_ms_per_batch(cfg, repeats: int = 10) -> float:
    """The work the cache removes from a step: VAE posterior and text hidden states of one batch."""
    from ldm.autoencoder import load_vae
    from ldm.data import build_dataset
    from ldm.text_encoder import build_text_encoder, encode_text, tokenize

    vae = load_vae(cfg.vae_path).eval()
    tokenizer, text_encoder = build_text_encoder(cfg.text_encoder, Path(cfg.train.output_dir) / "tokenizer")
    text_encoder.eval()
    items = build_dataset(cfg.data, "train")
    pixels = torch.stack([items[i]["pixel_values"] for i in range(cfg.train.batch_size)])
    captions = [items[i]["caption"] for i in range(cfg.train.batch_size)]

    def encode():
        vae.encode(pixels).latent_dist.sample()
        encode_text(text_encoder, tokenize(tokenizer, captions))

    encode()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        encode()
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/unet/shapes.yaml")
    parser.add_argument("--vae", help="a VAE folder (default: runs/shapes/vae/final if it exists, else an untrained one)")
    parser.add_argument("--workdir", default="runs/bench-cache", help="runs and the cache go here")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run (a multiple of --warmup)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="runs each way, alternating; the median is reported")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for both runs")
    args = parser.parse_args(argv)
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (steps are timed per log interval)")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    vae = Path(args.vae) if args.vae else DEMO_VAE if (DEMO_VAE / "config.json").is_file() else untrained_vae(work / "vae")

    cache = work / "cache"
    if not (cache / "index.json").is_file():
        from accelerate import Accelerator

        from ldm.cache import write_cache

        t0 = time.perf_counter()
        write_cache(stage_config(args, vae, work / "unused"), cache, Accelerator())
        print(f"ldm-cache: {time.perf_counter() - t0:.1f} s")

    loads = [load_average()]
    clocks = ("wall", "cpu")
    times = {clock: {"encoders": [], "cache": []} for clock in clocks}
    for repeat in range(args.repeats):
        for clock in clocks:
            for mode in times[clock]:
                cfg = stage_config(args, vae, work / f"run-{mode}", cache if mode == "cache" else None)
                times[clock][mode].append(ms_per_step(cfg, work / f"run-{mode}", args.warmup, clock))
                print(f"repeat {repeat + 1}, {mode}: {times[clock][mode][-1]:.1f} ms/step ({clock})")
        loads.append(load_average())
    data = {mode: data_ms_per_batch(stage_config(args, vae, work / "unused", cache if mode == "cache" else None), 20)
            for mode in ("encoders", "cache")}

    cfg = stage_config(args, vae, work / "unused")
    encoders = encoders_ms_per_batch(cfg)
    batch = cfg.train.batch_size
    median = {clock: {mode: statistics.median(v) for mode, v in per_mode.items()} for clock, per_mode in times.items()}
    speedup = {clock: m["encoders"] / m["cache"] for clock, m in median.items()}
    result = {
        "config": args.config, "overrides": args.overrides, "vae": str(vae), "batch_size": batch,
        "timed_steps": args.steps, "warmup_steps": args.warmup, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "load_average_1_5_15": loads,
        "ms_per_step": times, "median_ms_per_step": median,
        "samples_per_s": {clock: {m: 1000.0 * batch / v for m, v in med.items()} for clock, med in median.items()},
        "data_only_ms_per_batch": data,
        "encoders_only_ms_per_batch": encoders,
        "speedup": speedup,
    }
    print()
    print(f"{'':20}{'clock':>6}{'ms/step (median)':>18}{'samples/s':>11}   runs (ms/step)")
    for clock in clocks:
        for mode, label in (("encoders", "VAE + text encoder"), ("cache", "ldm-cache")):
            runs = ", ".join(f"{v:.1f}" for v in times[clock][mode])
            print(f"{label:20}{clock:>6}{median[clock][mode]:18.1f}{1000.0 * batch / median[clock][mode]:11.1f}   {runs}")
    print(f"data alone, ms/batch: {data['encoders']:.1f} drawing images, {data['cache']:.1f} reading the cache; "
          f"the encoders alone (VAE posterior + text hidden states of one batch): {encoders:.1f} ms")
    print(f"speed-up: {speedup['wall']:.2f}x wall, {speedup['cpu']:.2f}x CPU time  (batch {batch}, {torch.get_num_threads()} torch "
          f"threads, {os.cpu_count()} CPUs, load average before/after each repeat: {' | '.join(loads)})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
