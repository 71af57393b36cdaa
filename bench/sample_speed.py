"""Sampling throughput: our LatentDiffusionPipeline (with the sampling levers) vs diffusers' StableDiffusionPipeline.

Both pipelines get the same components (VAE, text encoder, tokenizer, DDIM scheduler, and
the same U-Net weights), the same prompts and the same starting latents: 50 DDIM steps with
classifier-free guidance (scale 7.5), at batch 1 and batch 16. The variants alternate within
each repeat. U-Net steps/s counts denoising steps (one CFG U-Net call of the whole batch, as
diffusers' "it/s"); images/s is whole pipeline calls (text encoding and VAE decoding
included). `max_abs_diff` compares each variant's images (float, [0, 1]) with diffusers'.

Variants: "diffusers" (eager), "ours" (eager), "ours+fused_qkv+channels_last",
"ours+compile" (torch.compile of the U-Net), "ours+reduce-overhead" (CUDA graphs; GPU only),
"ours+xformers" (xformers' memory-efficient attention instead of SDPA, where it runs; else
the reason it cannot, as the finding).

    python bench/sample_speed.py                                   # CPU: demo and wide configs
    python bench/sample_speed.py --configs sd512 --json $OUT/sample_speed.json   # GPU, bf16 weights
    python bench/sample_speed.py --tiny --steps 3                  # the smoke test
"""

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.train_speed import CONFIGS, TINY, untrained_vae  # noqa: E402
from ldm.config import UNetStageConfig, load_config  # noqa: E402

VARIANTS = ("diffusers", "ours", "ours+fused_qkv+channels_last", "ours+compile", "ours+reduce-overhead", "ours+xformers")
PROMPTS = ["a red circle", "a green square", "a blue triangle", "a yellow circle"]


def components(args, name: str, work: Path, device: str, dtype):
    from diffusers import DDIMScheduler

    from ldm.autoencoder import load_vae
    from ldm.text_encoder import build_text_encoder, hidden_size
    from ldm.unet import build_unet

    path, vae_config, overrides = CONFIGS[name]
    cfg = load_config(UNetStageConfig, path, [*overrides, *(TINY if args.tiny else [])])
    vae = load_vae(str(untrained_vae(vae_config, work / f"vae-{name}", [f"data.resolution={cfg.data.resolution}"])))
    tokenizer, text_encoder = build_text_encoder(cfg.text_encoder, work / f"tokenizer-{name}")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    torch.manual_seed(0)
    unet = build_unet(cfg.model, cfg.data.resolution // factor, vae.config.latent_channels, hidden_size(text_encoder))
    # Stable Diffusion's DDIM settings (as its scheduler_config.json).
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    for part in ("vae", "text_encoder", "unet"):
        parts[part] = parts[part].eval().to(device)
        if dtype != torch.float32:  # diffusers warns on every cast, even a no-op one
            parts[part] = parts[part].to(dtype)
    return parts, cfg.data.resolution, vae.config.latent_channels, cfg.data.resolution // factor


def make_pipelines(parts, variants, device):
    """Each variant's pipeline; the compiled ones get their own copy of the U-Net (levers change it in place)."""
    from diffusers import StableDiffusionPipeline

    from ldm.pipeline import LatentDiffusionPipeline
    from ldm.speed import apply_sampling_levers

    pipes, skipped = {}, {}
    for v in variants:
        if v == "diffusers":
            pipes[v] = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        elif v == "ours":
            pipes[v] = LatentDiffusionPipeline(**parts)
        elif v == "ours+reduce-overhead" and device != "cuda":
            skipped[v] = "skipped: CUDA graphs need a CUDA GPU (on the CPU there is no kernel-launch cost to remove)"
            continue
        elif v == "ours+xformers":
            from ldm.speed import xformers_status
            from ldm.unet import set_attention_backend

            status = xformers_status()
            if status != "available":
                skipped[v] = f"skipped: xformers {status}"
                continue
            unet = copy.deepcopy(parts["unet"])
            set_attention_backend(unet, "xformers")
            pipes[v] = LatentDiffusionPipeline(**{**parts, "unet": unet})
        else:
            unet = copy.deepcopy(parts["unet"])
            levers = {"ours+fused_qkv+channels_last": dict(fuse_qkv=True, channels_last=True),
                      "ours+compile": dict(compile=True),
                      "ours+reduce-overhead": dict(compile=True, compile_mode="reduce-overhead")}[v]
            apply_sampling_levers(unet, **levers)
            pipes[v] = LatentDiffusionPipeline(**{**parts, "unet": unet})
        pipes[v].set_progress_bar_config(disable=True)
    return pipes, skipped


def timed_call(pipe, prompts, latents, steps: int, device: str):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, latents=latents.clone(),
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    sync()
    return time.perf_counter() - t0, images


@torch.no_grad()
def measure(args, name: str, work: Path, device: str, dtype, result: dict) -> dict:
    parts, resolution, channels, latent = components(args, name, work, device, dtype)
    variants = [v for v in args.variants.split(",")]
    pipes, skipped = make_pipelines(parts, variants, device)
    out = {"resolution": resolution, "latent": latent, "dtype": str(dtype), "steps": args.steps, "batches": {}}
    for batch in args.batch_sizes:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        latents = torch.randn(batch, channels, latent, latent, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        times = {v: [] for v in pipes}
        images = {}
        for v, pipe in pipes.items():  # warm-up (compilation, CUDA graph capture) and the outputs to compare
            _, images[v] = timed_call(pipe, prompts, latents, args.steps, device)
        for _ in range(args.repeats):
            for v, pipe in pipes.items():
                seconds, _ = timed_call(pipe, prompts, latents, args.steps, device)
                times[v].append(seconds)
        rows = {}
        ref = images.get("diffusers")
        for v, ts in times.items():
            sec = statistics.median(ts)
            rows[v] = {"seconds": sec, "runs": ts, "unet_steps_per_s": args.steps / sec, "images_per_s": batch / sec,
                       "max_abs_diff_vs_diffusers": float(abs(images[v] - ref).max()) if ref is not None else None}
        base = rows.get("diffusers", {}).get("unet_steps_per_s")
        for r in rows.values():
            r["vs_diffusers"] = r["unet_steps_per_s"] / base if base else None
        rows.update({v: {"error": why} for v, why in skipped.items()})
        out["batches"][str(batch)] = rows
        print_table(name, batch, out, rows)
        if args.json:  # after each batch size, so that a run stopped by its time limit keeps what it measured
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({**result, "configs": {**result["configs"], name: out}}, indent=2) + "\n")
    return out


def print_table(name, batch, out, rows):
    print(f"\n{name}: {out['resolution']}px ({out['latent']}x{out['latent']} latents), batch {batch}, "
          f"{out['steps']} DDIM steps, CFG 7.5, {out['dtype']}")
    print(f"{'variant':30}{'U-Net steps/s':>14}{'images/s':>10}{'x diffusers':>13}{'max |diff|':>12}")
    for v, r in rows.items():
        if "error" in r:
            print(f"{v:30}{r['error']}")
            continue
        diff = f"{r['max_abs_diff_vs_diffusers']:.2e}" if r["max_abs_diff_vs_diffusers"] is not None else "-"
        ratio = f"{r['vs_diffusers']:.2f}" if r["vs_diffusers"] else "-"
        print(f"{v:30}{r['unet_steps_per_s']:14.2f}{r['images_per_s']:10.3f}{ratio:>13}{diff:>12}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="demo,wide")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on a GPU, float32 on the CPU)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--workdir", default="/tmp/sample-speed")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    from ldm.speed import xformers_status

    result = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "xformers": xformers_status(), "configs": {}}
    print(f"xformers: {result['xformers']}")
    work = Path(args.workdir)
    for name in args.configs.split(","):
        result["configs"][name] = measure(args, name, work, device, dtype, result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
