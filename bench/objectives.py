"""Stage-2 objectives compared on the demo: epsilon, v, EDM and flow matching at equal compute.

Trains the demo's stage-2 config (configs/unet/shapes.yaml, the demo's held-out pairs
green triangle and purple circle) once per objective on the same stage-1 VAE, with the
same number of optimizer steps and no time limit, each into OUT/NAME; then samples
--images-per-prompt images for each of the 18 prompts with the model folder's own
scheduler (DDIM for epsilon and v, EDM Euler, flow-matching Euler) and scores them with
the demo's rule-based checker (`ldm.cli.demo.sample_all` / `adherence_table`).

    python bench/objectives.py --vae runs/demo/vae/final --max-steps 2300
    python bench/objectives.py --objectives edm flow --max-steps 500 --set train.batch_size=16

    epsilon  ddpm, prediction_type=epsilon, Min-SNR-5 (the demo's own objective)
    v        ddpm, prediction_type=v_prediction, Min-SNR-5
    edm      Karras et al. 2022 (P_mean -1.2, P_std 1.2, sigma_data 1)
    flow     rectified flow, logit-normal t (Esser et al. 2024)

Prints a table (objective, steps, train seconds, seen adherence, held-out adherence, each
held-out pair) and writes OUT/objectives.json and OUT/objectives.md. A finished objective
(its final/ folder) is reused unless --fresh.
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from ldm.cli.demo import HELD_OUT, adherence_table, sample_all  # noqa: E402
from ldm.config import UNetStageConfig, load_config  # noqa: E402

OBJECTIVES = {
    "epsilon": ["objective.kind=ddpm", "objective.prediction_type=epsilon"],
    "v": ["objective.kind=ddpm", "objective.prediction_type=v_prediction"],
    # EDM and flow matching weight the noise levels themselves: Min-SNR is DDPM's.
    "edm": ["objective.kind=edm", "objective.prediction_type=epsilon", "objective.min_snr_gamma=null"],
    "flow": ["objective.kind=flow", "objective.prediction_type=epsilon", "objective.min_snr_gamma=null"],
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", default="runs/demo/vae/final", help="stage-1 VAE folder (default: runs/demo/vae/final)")
    p.add_argument("--config", default="configs/unet/shapes.yaml", help="stage-2 config (default: the demo's)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps for every objective (default: the config's)")
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    p.add_argument("--out", default="runs/objectives", help="one run folder per objective under it")
    p.add_argument("--images-per-prompt", type=int, default=8)
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more stage-2 overrides, for every objective")
    p.add_argument("--fresh", action="store_true", help="retrain objectives whose final/ folder exists")
    return p.parse_args(argv)


def config_for(args, name: str, out: Path):
    config = args.config if Path(args.config).is_file() else str(REPO / args.config)
    overrides = [
        f"data.shapes.exclude=[{','.join(HELD_OUT)}]", f"vae_path={args.vae}", f"train.output_dir={out / name}",
        "train.max_minutes=null",  # the same compute for each: steps, not minutes
        *([f"train.max_steps={args.max_steps}"] if args.max_steps is not None else []),
        *OBJECTIVES[name], *args.set,
    ]
    return load_config(UNetStageConfig, config, overrides)


def steps_done(run: Path):
    """The last step the run reached: its newest checkpoint (one is written at the end) or logged step; None if neither."""
    steps = [int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*") if p.name.split("-")[1].isdigit()]
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        steps += [json.loads(line).get("step") or 0 for line in metrics.read_text().splitlines() if line.strip()]
    return max(steps) if steps else None


def train(cfg, fresh: bool):
    """Train one objective (or reuse its final/ folder); returns (final folder, train seconds or None)."""
    from ldm.train.unet_loop import train_unet

    run = Path(cfg.train.output_dir)
    if fresh and run.exists():
        shutil.rmtree(run)
    final = run / "final"
    if (final / "model_index.json").is_file():
        print(f"{run.name}: reusing {final}")
        return final, None
    start = time.time()
    train_unet(cfg, resume="auto")
    return final, time.time() - start


def measure(args, name: str, out: Path) -> dict:
    cfg = config_for(args, name, out)
    final, seconds = train(cfg, args.fresh)
    prompts, images = sample_all(final, args.images_per_prompt, args.steps, args.guidance_scale, args.seed)
    rows, seen, held = adherence_table(prompts, images)
    scheduler = json.loads((final / "scheduler/scheduler_config.json").read_text())["_class_name"]
    return {
        "objective": name, "overrides": OBJECTIVES[name], "scheduler": scheduler,
        "steps": steps_done(Path(cfg.train.output_dir)), "max_steps": cfg.train.max_steps, "train_seconds": seconds,
        "seen": seen, "held_out": held,
        "held_out_pairs": {r["prompt"]: r["adherence"] for r in rows if r["held_out"]}, "per_prompt": rows,
    }


def table(results) -> str:
    """A markdown table, one row per objective."""
    pairs = [f"a {pair}" for pair in HELD_OUT]
    head = ["objective", "sampler", "steps", "train s", "seen", "held out", *pairs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        seconds = "reused" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        cells = [r["objective"], r["scheduler"], str(r["steps"]), seconds, f"{r['seen']:.3f}", f"{r['held_out']:.3f}",
                 *[f"{r['held_out_pairs'].get(p, float('nan')):.3f}" for p in pairs]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.objectives:
        results.append(measure(args, name, out))
        print(f"\n{table(results)}\n", flush=True)  # the table so far: a long run shows progress
    report = {
        "vae": args.vae, "config": args.config, "max_steps": args.max_steps, "images_per_prompt": args.images_per_prompt,
        "num_inference_steps": args.steps, "guidance_scale": args.guidance_scale, "seed": args.seed,
        "overrides": args.set, "results": results,
    }
    (out / "objectives.json").write_text(json.dumps(report, indent=2))
    settings = (f"{args.images_per_prompt} images per prompt, {args.steps} steps, guidance {args.guidance_scale}, "
                f"seed {args.seed}; adherence = fraction of images whose colour and kind the checker reads as the prompt's.")
    (out / "objectives.md").write_text(f"# Stage-2 objectives on the shapes demo\n\n{settings}\n\n{table(results)}\n")
    print(f"written: {out / 'objectives.json'}, {out / 'objectives.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
