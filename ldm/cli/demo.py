"""ldm-demo: the whole two-stage job on the embedded shapes data, end to end.

1. draw the shapes data, holding out (green, triangle) and (purple, circle);
2. train the KL autoencoder (configs/vae/shapes.yaml);
3. train the text-conditioned latent U-Net on its latents (configs/unet/shapes.yaml);
4. save the model folder at runs/demo/pipeline;
5. sample 8 images for each of the 18 (colour, kind) prompts into a labelled grid, and
   print the prompt-adherence table scored by the rule-based checker;
6. with --control: train a ControlNet and a T2I-Adapter on the shapes outlines on top of
   that model and measure how well each follows fresh outlines (ldm/cli/demo_control.py);
7. write runs/demo/report.html over the run folders of the stages that ran (ldm-report).

A re-run reuses each finished stage (its final/ folder), so an interrupted demo resumes.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from ldm.cli.common import run_main
from ldm.config import UNetStageConfig, VAEStageConfig, load_config
from ldm.data.checker import classify
from ldm.data.shapes import all_pairs, caption, parse_pair
from ldm.grid import labelled_grid

HELD_OUT = ("green triangle", "purple circle")
REPO = Path(__file__).resolve().parents[2]


def _config_path(name: str) -> str:
    # The configs live at the top of the repository (installed editable by `make`).
    for base in (Path.cwd(), REPO):
        if (base / name).is_file():
            return str(base / name)
    return name  # load_config reports it as missing


def parse_args(argv):
    p = argparse.ArgumentParser(prog="ldm-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--vae-config", default="configs/vae/shapes.yaml")
    p.add_argument("--unet-config", default="configs/unet/shapes.yaml")
    p.add_argument("--vae", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for stage 1")
    p.add_argument("--unet", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for stage 2")
    p.add_argument("--images-per-prompt", type=int, default=8)
    p.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the stage-2 config's validation.guidance_scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="retrain both stages even if finished ones exist")
    p.add_argument("--control", action="store_true",
                   help="also train a ControlNet and a T2I-Adapter on the base model and score them (IoU, colour)")
    p.add_argument("--control-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides for both control stages (configs/control/*.yaml)")
    return p.parse_args(argv)


def _finished(final: Path) -> bool:
    return (final / "model_index.json").is_file() or (final / "config.json").is_file()


def train_stages(args, out: Path):
    """Stage 1 then stage 2; each is skipped when its final/ folder is already there."""
    from ldm.train.unet_loop import train_unet
    from ldm.train.vae_loop import train_vae

    held = [f"data.shapes.exclude=[{','.join(HELD_OUT)}]"]
    vae_cfg = load_config(VAEStageConfig, _config_path(args.vae_config), held + [f"train.output_dir={out / 'vae'}"] + args.vae)
    unet_cfg = load_config(
        UNetStageConfig, _config_path(args.unet_config),
        held + [f"train.output_dir={out / 'unet'}", f"vae_path={out / 'vae' / 'final'}"] + args.unet,
    )
    timings = {}
    for name, cfg, train in (("vae", vae_cfg, train_vae), ("unet", unet_cfg, train_unet)):
        final = Path(cfg.train.output_dir) / "final"
        if args.fresh and Path(cfg.train.output_dir).exists():
            shutil.rmtree(cfg.train.output_dir)
        if not _finished(final):
            start = time.time()
            train(cfg, resume="auto")  # an interrupted demo carries on from its last checkpoint
            timings[name] = time.time() - start
        else:
            print(f"stage {name}: reusing {final}")
    pipeline = out / "pipeline"
    shutil.copytree(out / "unet" / "final", pipeline, dirs_exist_ok=True)
    return pipeline, unet_cfg, timings


def sample_all(pipeline_dir: Path, n: int, steps: int, guidance: float, seed: int):
    """n images for each of the 18 prompts, from one seeded generator."""
    from ldm.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(str(pipeline_dir))
    pipe.set_progress_bar_config(desc="sampling")
    prompts = [caption(c, k) for c, k in all_pairs()]
    out = pipe(
        prompts, num_images_per_prompt=n, num_inference_steps=steps, guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
    )
    return prompts, [out.images[i * n : (i + 1) * n] for i in range(len(prompts))]


def adherence_table(prompts, images):
    """Per prompt: fraction of its images whose colour and kind both match; plus the means."""
    rows = []
    for prompt, ims in zip(prompts, images):
        held = " ".join(parse_pair(prompt)) in HELD_OUT
        score = sum(classify(im) == parse_pair(prompt) for im in ims) / len(ims)
        rows.append({"prompt": prompt, "held_out": held, "adherence": score})
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    seen = mean([r["adherence"] for r in rows if not r["held_out"]])
    held = mean([r["adherence"] for r in rows if r["held_out"]])
    return rows, seen, held


def print_table(rows, seen, held):
    print(f"\n{'prompt':<22}{'pair':<10}{'adherence':>10}")
    for r in rows:
        print(f"{r['prompt']:<22}{'held out' if r['held_out'] else 'seen':<10}{r['adherence']:>10.3f}")
    print(f"\nmean over seen pairs:     {seen:.3f}")
    print(f"mean over held-out pairs: {held:.3f}")


def _main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    start = time.time()
    pipeline, unet_cfg, timings = train_stages(args, out)
    guidance = args.guidance_scale if args.guidance_scale is not None else unet_cfg.validation.guidance_scale
    prompts, images = sample_all(pipeline, args.images_per_prompt, args.steps, guidance, args.seed)
    rows, seen, held = adherence_table(prompts, images)
    labels = [f"{p}{' (held out)' if r['held_out'] else ''}  {r['adherence']:.2f}" for p, r in zip(prompts, rows)]
    labelled_grid(images, labels).save(out / "samples.png")
    print_table(rows, seen, held)
    report = {"seen": seen, "held_out": held, "per_prompt": rows, "guidance_scale": guidance,
              "num_inference_steps": args.steps, "train_seconds": timings, "total_seconds": time.time() - start}
    (out / "adherence.json").write_text(json.dumps(report, indent=2))
    if args.control:
        from ldm.cli.demo_control import run_control_demo

        run_control_demo(args, out, HELD_OUT, _config_path, guidance)
    from ldm.eval.report import write_demo_report

    page = write_demo_report(out)  # both stages (and the control runs when they ran) on one page
    print(f"\nmodel folder: {pipeline}\nsample grid:  {out / 'samples.png'}\nreport:       {page}\ntotal time:   {time.time() - start:.0f} s")


def main(argv=None):
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
