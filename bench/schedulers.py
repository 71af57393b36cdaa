"""Prompt adherence of a model folder per sampler, at a few step counts (docs/sampling.md).

For each scheduler name that fits the model's objective (`ldm.schedulers`; default: all of
them), and each step count, samples --images-per-prompt images for each of the demo's 18
prompts with one seeded generator, exactly as `ldm-demo` does (`ldm.cli.demo.sample_all`),
and scores them with the demo's rule-based checker (`adherence_table`). Prints a markdown
table (scheduler, class, steps, seconds, seen adherence, held-out adherence) and, with
--out, writes the table and the per-prompt numbers as JSON.

    python bench/schedulers.py                                  # runs/demo/pipeline, 8 images, 10 and 25 steps
    python bench/schedulers.py --model runs/x/final --schedulers ddim dpm++2m-karras --steps 10 25 50
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import torch  # noqa: E402

from ldm.cli.demo import adherence_table  # noqa: E402
from ldm.data.shapes import all_pairs, caption  # noqa: E402
from ldm.errors import LdmError  # noqa: E402
from ldm.schedulers import check_scheduler, make_scheduler, model_objective, names_for  # noqa: E402

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/demo/pipeline", help="model folder (default: runs/demo/pipeline)")
    p.add_argument("--schedulers", nargs="+", default=None, help="names (default: every one that fits the model)")
    p.add_argument("--steps", nargs="+", type=int, default=[10, 25], help="step counts (default: 10 25)")
    p.add_argument("--images-per-prompt", type=int, default=8, help="images per prompt (default: 8, as the demo)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="default: the model's validation.guidance_scale in ldm_config.yaml, else 7.5")
    p.add_argument("--seed", type=int, default=0, help="the generator's seed (default: 0, as the demo)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-batch-size", type=int, default=None, help="cap the U-Net batch (memory)")
    p.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    return p.parse_args(argv)

def guidance_of(model: Path, given):
    if given is not None:
        return given
    recorded = model / "ldm_config.yaml"
    if recorded.is_file():
        from omegaconf import OmegaConf

        value = OmegaConf.load(recorded).get("validation", {}).get("guidance_scale")
        if value is not None:
            return float(value)
    return 7.5

def run(pipe, base, name, objective, prompts, steps, args, guidance):
    """Adherence of one (scheduler, steps): the demo's sampling with that scheduler."""
    pipe.scheduler = make_scheduler(name, base, objective)
    start = time.time()
    out = pipe(prompts, num_images_per_prompt=args.images_per_prompt, num_inference_steps=steps,
               guidance_scale=guidance, generator=torch.Generator().manual_seed(args.seed),
               max_batch_size=args.max_batch_size)
    seconds = time.time() - start
    n = args.images_per_prompt
    rows, seen, held = adherence_table(prompts, [out.images[i * n : (i + 1) * n] for i in range(len(prompts))])
    return {"scheduler": name, "class": type(pipe.scheduler).__name__, "steps": steps, "seconds": round(seconds, 2),
            "seen": seen, "held_out": held, "per_prompt": rows}

def table(results, model, guidance, n) -> str:
    lines = [f"Adherence on {model} ({n} images per prompt, guidance {guidance}):", "",
             "| scheduler | class | steps | seconds | seen pairs | held-out pairs |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['scheduler']} | {r['class']} | {r['steps']} | {r['seconds']:.1f} | {r['seen']:.3f} | {r['held_out']:.3f} |")
    return "\n".join(lines) + "\n"

def main(argv=None) -> int:
    from ldm.pipeline import LatentDiffusionPipeline

    args = parse_args(argv)
    model = Path(args.model)
    try:
        objective = model_objective(model)
        names = args.schedulers or names_for(objective)
        usable = []
        for name in names:
            try:
                check_scheduler(name, objective)
                usable.append(name)
            except LdmError as e:
                if args.schedulers:  # asked for by name: say why not, and stop
                    raise
                print(f"skipped: {e}")
    except LdmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pipe = LatentDiffusionPipeline.from_pretrained(str(model)).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    base = pipe.scheduler
    guidance = guidance_of(model, args.guidance_scale)
    prompts = [caption(c, k) for c, k in all_pairs()]
    results = []
    for name in usable:
        for steps in args.steps:
            results.append(run(pipe, base, name, objective, prompts, steps, args, guidance))
            r = results[-1]
            print(f"{name:>16} {steps:>3} steps: seen {r['seen']:.3f}  held-out {r['held_out']:.3f}  ({r['seconds']:.1f} s)",
                  flush=True)
    text = table(results, model, guidance, args.images_per_prompt)
    print("\n" + text)
    if args.out:
        Path(args.out + ".md").write_text(text)
        Path(args.out + ".json").write_text(json.dumps(
            {"model": str(model), "objective": objective, "guidance_scale": guidance,
             "images_per_prompt": args.images_per_prompt, "results": results}, indent=2))
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
