"""Training throughput: our trainer (train_unet, with the speed levers) vs diffusers' text-to-image loop.

Every measurement runs in its own process (clean peak memory and RSS, no compile cache
shared between variants), and the variants alternate within each repeat, so that a load
that comes and goes on a shared machine hits all of them alike; read the ratios.

- "baseline": bench/diffusers_baseline.py, the loop of diffusers' train_text_to_image.py
  (VAE encoder and text encoder every step, AdamW, EMAModel.step), same U-Net, data, batch;
- "ours": ldm.train.unet_loop.train_unet with no lever; then the levers, added one by one
  ("+cache" reads latents and text states from an ldm-cache folder, "+foreach" foreach
  AdamW and foreach EMA, "+fused" fused AdamW and foreach EMA, "+channels_last", "+bf16"
  autocast, "+compile" torch.compile of the U-Net) and "all".

Images/s counts the steps after the warm-up (compilation happens there). MFU is the U-Net's
forward+backward FLOPs per image (torch.utils.flop_counter, counted on the meta device) x
images/s over the measured dense bf16 matmul peak of the same device.

    python bench/train_speed.py                                  # CPU: demo and wide configs
    python bench/train_speed.py --configs sd256,sd512 --json $OUT/train_speed.json   # GPU
    python bench/train_speed.py --tiny --steps 2 --warmup 1      # the smoke test of the GPU path
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ldm.config import UNetStageConfig, VAEStageConfig, load_config  # noqa: E402

WIDE = [  # the demo at 4x the U-Net width, a 77-token text tower 4x as wide and deep
    "model.block_out_channels=[128,256]", "model.layers_per_block=2", "model.norm_num_groups=32",
    "model.down_block_types=[CrossAttnDownBlock2D,CrossAttnDownBlock2D]",
    "model.up_block_types=[CrossAttnUpBlock2D,CrossAttnUpBlock2D]",
    "text_encoder.width=256", "text_encoder.heads=4", "text_encoder.layers=4", "text_encoder.context_length=77",
]
SD = ["data.source=shapes", "data.shapes.num_images=320", "data.num_validation=64", "text_encoder.weights=null"]
# name -> (config file, VAE config, overrides)
CONFIGS = {
    "demo": ("configs/unet/shapes.yaml", "configs/vae/shapes.yaml", ["data.shapes.num_images=1088"]),
    "wide": ("configs/unet/shapes.yaml", "configs/vae/shapes.yaml", ["data.shapes.num_images=1088", *WIDE]),
    "sd256": ("configs/unet/sd-base.yaml", "configs/vae/kl-f8.yaml", [*SD, "data.resolution=256"]),
    "sd512": ("configs/unet/sd-base.yaml", "configs/vae/kl-f8.yaml", [*SD, "data.resolution=512"]),
}
TINY = [  # --tiny: any config shrunk to seconds on a CPU (tests the code path, not the speed)
    "model.block_out_channels=[32,64]", "model.layers_per_block=1", "model.norm_num_groups=8",
    "model.down_block_types=[CrossAttnDownBlock2D,DownBlock2D]", "model.up_block_types=[UpBlock2D,CrossAttnUpBlock2D]",
    "model.cross_attention_dim=null", "text_encoder.model_name=null", "text_encoder.width=32", "text_encoder.heads=4",
    "text_encoder.layers=1", "text_encoder.context_length=8", "data.resolution=32", "data.shapes.num_images=96",
    "data.num_validation=16", "data.num_workers=0", "train.batch_size=4", "train.gradient_checkpointing=false",
]
FAST_ADAM = {"foreach": ["train.speed.adamw=foreach", "ema.foreach=true"], "fused": ["train.speed.adamw=fused", "ema.foreach=true"]}
LEVERS = {  # variant -> the levers on top of "ours"
    "ours": [],
    "+cache": ["CACHE"],
    "+foreach": ["CACHE", *FAST_ADAM["foreach"]],
    "+fused": ["CACHE", *FAST_ADAM["fused"]],
    "+channels_last": ["CACHE", *FAST_ADAM["fused"], "train.speed.channels_last=true"],
    "+bf16": ["CACHE", *FAST_ADAM["fused"], "train.mixed_precision=bf16"],
    "+bf16+channels_last": ["CACHE", *FAST_ADAM["fused"], "train.mixed_precision=bf16", "train.speed.channels_last=true"],
    "+compile": ["CACHE", *FAST_ADAM["fused"], "train.mixed_precision=bf16", "train.speed.compile=true"],
    "all": ["CACHE", *FAST_ADAM["fused"], "train.mixed_precision=bf16", "train.speed.channels_last=true", "train.speed.compile=true"],
}
BASELINES = {"baseline": "no", "baseline-bf16": "bf16"}


# ---------------------------------------------------------------- setup (parent process)


def untrained_vae(vae_config: str, folder: Path, overrides) -> Path:
    """A VAE of `vae_config`'s shape with a scaling factor: the step cost does not depend on its weights."""
    from ldm.autoencoder import build_vae

    if (folder / "config.json").is_file():
        return folder
    cfg = load_config(VAEStageConfig, vae_config, overrides)
    torch.manual_seed(0)
    vae = build_vae(cfg.model, sample_size=cfg.data.resolution)
    vae.register_to_config(scaling_factor=0.18215)
    vae.save_pretrained(str(folder))
    return folder


def stage_config(args, name: str, vae: Path, output_dir: Path, extra=()) -> UNetStageConfig:
    path, _, overrides = CONFIGS[name]
    tiny = TINY if args.tiny else []
    return load_config(UNetStageConfig, path, [
        *overrides, *tiny, f"vae_path={vae}", f"train.output_dir={output_dir}",
        f"train.max_steps={args.warmup + args.steps}", f"train.log_every={args.warmup}", "train.checkpoint_every=100000000",
        "train.max_minutes=null", "validation.prompts=[]", *args.overrides, *extra,
    ])


def make_cache(args, name: str, vae: Path, work: Path) -> Path:
    from accelerate import Accelerator

    from ldm.cache import write_cache

    cache = work / f"cache-{name}"
    if not (cache / "index.json").is_file():
        t0 = time.perf_counter()
        write_cache(stage_config(args, name, vae, work / "unused"), cache, Accelerator())
        print(f"{name}: ldm-cache written in {time.perf_counter() - t0:.1f} s", flush=True)
    return cache


# ---------------------------------------------------------------- one measurement (child process)


def peak_memory() -> dict:
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_ours(cfg, warmup: int) -> dict:
    import shutil

    from ldm.train.unet_loop import train_unet

    shutil.rmtree(cfg.train.output_dir, ignore_errors=True)  # a repeat starts afresh (the last one left a checkpoint)
    train_unet(cfg)
    records = [json.loads(line) for line in (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "samples_per_s" in r and r["step"] > warmup]
    seconds = sum(cfg.train.batch_size * cfg.train.log_every / r["samples_per_s"] for r in timed)
    steps = len(timed) * cfg.train.log_every
    return {"images_per_s": cfg.train.batch_size * steps / seconds, "timed_steps": steps,
            "losses": [r["loss"] for r in records if "loss" in r]}


def run_baseline(cfg, warmup: int, steps: int) -> dict:
    from accelerate import Accelerator

    from bench.diffusers_baseline import DiffusersTextToImageLoop
    from ldm.autoencoder import load_vae
    from ldm.data import build_dataset
    from ldm.text_encoder import build_text_encoder, hidden_size, tokenize
    from ldm.train.loader import train_loader
    from ldm.unet import build_unet

    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    torch.manual_seed(cfg.train.seed)
    vae = load_vae(cfg.vae_path)
    tokenizer, text_encoder = build_text_encoder(cfg.text_encoder, Path(cfg.train.output_dir) / "tokenizer")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet = build_unet(cfg.model, cfg.data.resolution // factor, vae.config.latent_channels, hidden_size(text_encoder))
    loop = DiffusersTextToImageLoop(accelerator, vae, text_encoder, unet, cfg)
    loader = accelerator.prepare(train_loader(build_dataset(cfg.data, "train"), cfg.train.batch_size, cfg.data.num_workers, cfg.train.seed))

    def batches():
        while True:
            for batch in loader:
                # The script tokenizes in its dataset transform, so the ids come with the batch.
                yield {"pixel_values": batch["pixel_values"], "input_ids": tokenize(tokenizer, batch["caption"], accelerator.device)}

    data = batches()
    losses = []
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        losses.append(loop.step(next(data)))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"images_per_s": cfg.train.batch_size * steps / seconds, "timed_steps": steps, "losses": losses}


def worker(job: dict) -> dict:
    torch.set_num_threads(job["threads"]) if job.get("threads") else None
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(UNetStageConfig), OmegaConf.create(job["config"])))
    if job["variant"] in BASELINES:
        result = run_baseline(cfg, job["warmup"], job["steps"])
    else:
        result = run_ours(cfg, job["warmup"])
    return {**result, **peak_memory()}


def run_job(job: dict, timeout: float) -> dict:
    """One measurement in a fresh process; its last stdout line is the result."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- FLOPs, peak, memory


def unet_flops_per_image(cfg, latent_size: int, latent_channels: int, text_len: int, text_width: int) -> float:
    """Forward + backward FLOPs of the U-Net for one image, counted on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.unet import build_unet

    with torch.device("meta"):
        unet = build_unet(cfg.model, latent_size, latent_channels, text_width)
        x = torch.randn(2, latent_channels, latent_size, latent_size)
        t = torch.randint(0, 1000, (2,))
        c = torch.randn(2, text_len, text_width)
    with FlopCounterMode(display=False) as counter:
        unet(x, t, c).sample.float().square().mean().backward()
    return counter.get_total_flops() / 2


def matmul_peak(device: str, dtype=torch.bfloat16, n: int = 8192, seconds: float = 2.0) -> float:
    """Measured dense matmul FLOP/s: the best of repeated n x n x n products."""
    if device == "cpu":
        n = 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        sync()
        best = max(best, 10 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def largest_batch(cfg, latent_size: int, latent_channels: int, text_len: int, text_width: int, checkpointing: bool,
                  limit: int = 1024) -> int:
    """The largest batch whose U-Net training step (bf16 autocast, fused AdamW) fits in GPU memory."""
    from ldm.unet import build_unet

    unet = build_unet(cfg.model, latent_size, latent_channels, text_width).cuda().train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(unet.parameters(), fused=True)

    def fits(batch: int) -> bool:
        try:
            x = torch.randn(batch, latent_channels, latent_size, latent_size, device="cuda")
            c = torch.randn(batch, text_len, text_width, device="cuda")
            t = torch.randint(0, 1000, (batch,), device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = unet(x, t, c).sample.float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    low, high = 0, 8
    while high <= limit and fits(high):
        low, high = high, high * 2
    while high - low > max(1, low // 16):  # to within ~6 %
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


# ---------------------------------------------------------------- main


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="demo,wide", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--variants", default="baseline,ours,+cache,+fused,+channels_last,+bf16,all",
                        help=f"comma-separated, of {', '.join([*BASELINES, *LEVERS])}")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement (a multiple of --warmup)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per variant, alternating variants")
    parser.add_argument("--threads", type=int, help="torch threads in each measurement (default: torch's choice)")
    parser.add_argument("--tiny", action="store_true", help="shrink every config (a smoke test of the code path)")
    parser.add_argument("--max-batch", action="store_true", help="GPU: the largest batch that fits, with and without checkpointing")
    parser.add_argument("--budget", type=float, default=1e9, help="seconds: skip measurements that would start after this")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per measurement")
    parser.add_argument("--workdir", default=None, help="VAEs, caches and runs (default: a temporary folder)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every measurement")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (our trainer's steps are timed per log interval)")
    started = time.monotonic()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="train-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    names = args.configs.split(",")
    variants = args.variants.split(",")
    for v in variants:
        if v not in LEVERS and v not in BASELINES:
            parser.error(f"unknown variant {v}")
    peak = matmul_peak(device)
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": args.threads or torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "bf16_matmul_peak_tflops": peak / 1e12,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "tiny": args.tiny, "configs": {},
    }
    print(f"{device}: measured bf16 matmul peak {peak / 1e12:.2f} TFLOP/s", flush=True)
    for name in names:
        _, vae_config, _ = CONFIGS[name]
        probe = stage_config(args, name, work / "vae-unused", work / "unused")
        vae = untrained_vae(vae_config, work / f"vae-{name}", [f"data.resolution={probe.data.resolution}"])
        cache = make_cache(args, name, vae, work) if any("CACHE" in LEVERS.get(v, []) for v in variants) else None
        cfg = stage_config(args, name, vae, work / "unused")
        from ldm.autoencoder import load_vae
        from ldm.text_encoder import build_text_encoder, hidden_size

        vae_model = load_vae(str(vae))
        latent = cfg.data.resolution // 2 ** (len(vae_model.config.block_out_channels) - 1)
        _, text_encoder = build_text_encoder(cfg.text_encoder, work / "tokenizer-unused")
        text_len = getattr(text_encoder.config, "context_length", None) or text_encoder.config.max_position_embeddings
        text_width = hidden_size(text_encoder)
        flops = unet_flops_per_image(cfg, latent, vae_model.config.latent_channels, text_len, text_width)
        runs = {v: [] for v in variants}
        loads = [load_average()]
        for repeat in range(args.repeats):
            for v in variants:
                if time.monotonic() - started > args.budget:
                    runs[v].append({"error": "skipped: over the time budget"})
                    continue
                extra = [f"train.mixed_precision={BASELINES[v]}"] if v in BASELINES else [
                    f"data.cache={cache}" if lever == "CACHE" else lever for lever in LEVERS[v]]
                run_cfg = stage_config(args, name, vae, work / f"run-{name}-{v}", extra)
                from omegaconf import OmegaConf

                job = {"variant": v, "config": OmegaConf.to_container(OmegaConf.structured(run_cfg)), "warmup": args.warmup,
                       "steps": args.steps, "threads": args.threads}
                out = run_job(job, args.timeout)
                runs[v].append(out)
                result["configs"][name] = {"partial_runs": runs}  # replaced by the summary below
                write_json(args.json, result)
                shown = f"{out['images_per_s']:.1f} images/s" if "images_per_s" in out else out["error"]
                print(f"{name} repeat {repeat + 1} {v}: {shown}", flush=True)
            loads.append(load_average())
        summary = {}
        for v, outs in runs.items():
            ok = [o for o in outs if "images_per_s" in o]
            if not ok:
                summary[v] = {"error": outs[-1].get("error") if outs else "not run"}
                continue
            ips = statistics.median(o["images_per_s"] for o in ok)
            summary[v] = {"images_per_s": ips, "runs": [o["images_per_s"] for o in ok],
                          "tflops": flops * ips / 1e12, "mfu": flops * ips / peak,
                          "peak_rss_mib": max(o["peak_rss_mib"] for o in ok),
                          "peak_gpu_mib": max((o.get("peak_gpu_mib", 0) for o in ok), default=0),
                          "first_losses": ok[0]["losses"][:3]}
        base = summary.get("baseline", {}).get("images_per_s")
        base16 = summary.get("baseline-bf16", {}).get("images_per_s")
        for v, s in summary.items():
            if "images_per_s" in s:
                s["vs_baseline"] = s["images_per_s"] / base if base else None
                s["vs_baseline_bf16"] = s["images_per_s"] / base16 if base16 else None
        entry = {"config": CONFIGS[name][0], "overrides": CONFIGS[name][2] + (TINY if args.tiny else []) + args.overrides,
                 "batch_size": cfg.train.batch_size, "resolution": cfg.data.resolution, "latent": latent,
                 "unet_gflops_per_image_fwd_bwd": flops / 1e9, "load_average_1_5_15": loads,
                 "variants": summary}
        result["configs"][name] = entry
        write_json(args.json, result)  # now, and again after the largest-batch search
        if args.max_batch:
            if device != "cuda":
                entry["largest_batch"] = "skipped: needs a CUDA GPU (the CPU has no fixed memory limit to find)"
            else:
                entry["largest_batch"] = {
                    f"checkpointing={gc}": largest_batch(cfg, latent, vae_model.config.latent_channels, text_len, text_width, gc)
                    for gc in (False, True)}
        result["configs"][name] = entry
        print_table(name, entry, device)
        write_json(args.json, result)  # after each config, so that a run stopped by its time limit keeps what it measured
    return 0


def write_json(path, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def print_table(name: str, entry: dict, device: str) -> None:
    mem = "peak GPU MiB" if device == "cuda" else "peak RSS MiB"
    print(f"\n{name}: {entry['config']} batch {entry['batch_size']} at {entry['resolution']}px, "
          f"U-Net {entry['unet_gflops_per_image_fwd_bwd']:.2f} GFLOP/image fwd+bwd")
    print(f"{'variant':16}{'images/s':>10}{'x baseline':>12}{'x bl-bf16':>11}{'MFU':>8}{mem:>14}   runs")
    for v, s in entry["variants"].items():
        if "images_per_s" not in s:
            print(f"{v:16}{s['error']}")
            continue
        ratio = f"{s['vs_baseline']:.2f}" if s.get("vs_baseline") else "-"
        ratio16 = f"{s['vs_baseline_bf16']:.2f}" if s.get("vs_baseline_bf16") else "-"
        m = s["peak_gpu_mib"] if device == "cuda" else s["peak_rss_mib"]
        runs = ", ".join(f"{r:.1f}" for r in s["runs"])
        print(f"{v:16}{s['images_per_s']:10.1f}{ratio:>12}{ratio16:>11}{100 * s['mfu']:7.1f}%{m:14.0f}   {runs}")
    if "largest_batch" in entry:
        print(f"largest batch: {entry['largest_batch']}")


if __name__ == "__main__":
    raise SystemExit(main())
