"""`ldm-demo --control`: a ControlNet and a T2I-Adapter on the demo's base model, and how well they follow.

1. train each control model on the shapes outlines (configs/control/shapes-controlnet.yaml,
   shapes-t2i-adapter.yaml) on top of runs/demo/pipeline; a finished one is reused;
2. draw fresh controls (a seed the training data never used) for all 18 prompts, the two
   held-out pairs included: an outline of the prompt's kind at a random size and place;
3. sample each prompt with each method at conditioning scale 1, and with the control off
   (scale 0: exactly the base model) as the baseline;
4. score: the IoU between the generated shape (pixels far from the background colour)
   and the filled control shape, and colour adherence (the checker's colour = the prompt's);
5. write a grid (control | ControlNet | T2I-Adapter | control off) and control.json.
"""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ldm.data.checker import colour_of, foreground_mask, iou
from ldm.data.shapes import all_pairs, caption, fresh_controls
from ldm.grid import labelled_grid

METHODS = {  # name: (config, run folder, pipeline argument, scale argument, diffusers class)
    "ControlNet": ("configs/control/shapes-controlnet.yaml", "controlnet", "controlnet", "controlnet_conditioning_scale"),
    "T2I-Adapter": ("configs/control/shapes-t2i-adapter.yaml", "t2i-adapter", "adapter", "adapter_conditioning_scale"),
}
CONTROL_SEED = 1_000_003  # not the training data's seed: these outlines are new to both models


def train_control_models(args, out: Path, held_out, config_path) -> dict:
    """Train (or reuse) both control models on runs/demo/pipeline; their final folders and seconds."""
    from ldm.config import ControlStageConfig, load_config
    from ldm.train.control_loop import train_control

    folders, timings = {}, {}
    for name, (config, folder, _, _) in METHODS.items():
        overrides = [f"base_model={out / 'pipeline'}", f"train.output_dir={out / folder}",
                     f"data.shapes.exclude=[{','.join(held_out)}]"] + list(args.control_overrides)
        cfg = load_config(ControlStageConfig, config_path(config), overrides)
        final = Path(cfg.train.output_dir) / "final"
        if args.fresh and Path(cfg.train.output_dir).exists():
            shutil.rmtree(cfg.train.output_dir)
        if not (final / "config.json").is_file():
            start = time.time()
            train_control(cfg, resume="auto")
            timings[name] = time.time() - start
        else:
            print(f"control stage {name}: reusing {final}")
        folders[name] = final
    return folders, timings


def draw_controls(n: int, resolution: int, seed: int = CONTROL_SEED):
    """n fresh (outline, filled mask) controls per prompt for all 18 prompts, each its own size and place."""
    prompts = [caption(c, k) for c, k in all_pairs()]
    drawn = fresh_controls([p for p in prompts for _ in range(n)], resolution, seed)
    return prompts, [[(c.outline, c.mask) for c in drawn[i * n:(i + 1) * n]] for i in range(len(prompts))]


def sample_with(pipe, scale_argument: str, prompts, controls, scale: float, steps: int, guidance: float, seed: int):
    """One image per (prompt, control), all from one seeded generator (the same noise for every method)."""
    flat_prompts = [p for p, row in zip(prompts, controls) for _ in row]
    images = [outline for row in controls for outline, _ in row]
    out = pipe(flat_prompts, image=images, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(seed), **{scale_argument: scale})
    n = len(controls[0])
    return [out.images[i * n:(i + 1) * n] for i in range(len(prompts))]


def score(prompts, controls, images, held_out) -> dict:
    """Mean IoU with the filled control shape and colour adherence, overall and over the held-out pairs."""
    ious, colours, held_ious, held_colours = [], [], [], []
    for prompt, row, ims in zip(prompts, controls, images):
        colour = prompt.split()[1]
        for (_, mask), im in zip(row, ims):
            value, right = iou(foreground_mask(im), mask), colour_of(im) == colour
            ious.append(value)
            colours.append(right)
            if " ".join(prompt.split()[1:]) in held_out:
                held_ious.append(value)
                held_colours.append(right)
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    return {"iou": mean(ious), "colour_adherence": mean(colours),
            "held_out_iou": mean(held_ious), "held_out_colour_adherence": mean(held_colours)}


def run_control_demo(args, out: Path, held_out, config_path, guidance: float) -> dict:
    """Train both control models if needed, then measure them against the control-off baseline."""
    from diffusers import ControlNetModel, T2IAdapter

    from ldm.pipeline import LatentDiffusionPipeline

    folders, timings = train_control_models(args, out, held_out, config_path)
    base = LatentDiffusionPipeline.from_pretrained(str(out / "pipeline"))
    resolution = base.default_size[0]
    prompts, controls = draw_controls(args.images_per_prompt, resolution)
    loaders = {"ControlNet": ControlNetModel, "T2I-Adapter": T2IAdapter}
    results, samples = {}, {}
    for name, (_, _, argument, scale_argument) in METHODS.items():
        pipe = LatentDiffusionPipeline.from_pretrained(
            str(out / "pipeline"), **{argument: loaders[name].from_pretrained(str(folders[name]))})
        pipe.set_progress_bar_config(desc=f"sampling {name}")
        samples[name] = sample_with(pipe, scale_argument, prompts, controls, 1.0, args.steps, guidance, args.seed)
        results[name] = score(prompts, controls, samples[name], held_out)
        if name == "ControlNet":  # scale 0: the residuals vanish, the base model alone
            samples["control off"] = sample_with(pipe, scale_argument, prompts, controls, 0.0, args.steps, guidance, args.seed)
            results["control off"] = score(prompts, controls, samples["control off"], held_out)
    rows = [[row[0][0]] + [samples[m][i][0] for m in ("ControlNet", "T2I-Adapter", "control off")]
            for i, row in enumerate(controls)]
    labels = [f"{p}{' (held out)' if ' '.join(p.split()[1:]) in held_out else ''}" for p in prompts]
    labelled_grid(rows, labels).save(out / "control.png")
    report = {"methods": results, "train_seconds": timings, "images_per_prompt": args.images_per_prompt,
              "num_inference_steps": args.steps, "guidance_scale": guidance, "control_seed": CONTROL_SEED}
    (out / "control.json").write_text(json.dumps(report, indent=2))
    print_control_table(results)
    print(f"control grid: {out / 'control.png'} (columns: control | ControlNet | T2I-Adapter | control off)")
    return report


def print_control_table(results) -> None:
    print(f"\n{'method':<14}{'IoU':>8}{'colour':>9}{'IoU held out':>15}{'colour held out':>18}")
    for name, r in results.items():
        print(f"{name:<14}{r['iou']:>8.3f}{r['colour_adherence']:>9.3f}{r['held_out_iou']:>15.3f}"
              f"{r['held_out_colour_adherence']:>18.3f}")
