"""Does a full fine-tune teach the demo model a pair it never saw? Held-out adherence before and after.

The demo model (runs/demo/pipeline) never saw (green, triangle) and (purple, circle). This
fine-tunes it for --steps steps (a full fine-tune: `init_from` the folder, the whole U-Net
trains) on shapes data that holds only the target pairs (default: those held-out ones)
plus a few seen ones (so the rest is not forgotten outright), then scores all 18 prompts
before and after with the
demo's rule-based checker (ldm.cli.demo's `sample_all` and `adherence_table`: the same
seed, images per prompt, steps and guidance both times) and prints one table.

    python bench/finetune_heldout.py --model runs/demo/pipeline --steps 500 --out runs/finetune-heldout
    python bench/finetune_heldout.py ... train.batch_size=16 ema.decay=0.99   # any stage-2 override
    python bench/finetune_heldout.py ... --targets "red square,purple square"  # aim at weak seen pairs instead

The fine-tune starts from the folder's recorded config (its ldm_config.yaml: resolution,
objective, EMA) with a constant learning rate and no warm-up; the fine-tuned model is
OUT/final. Results go to OUT/heldout.json too.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ldm.cli.demo import HELD_OUT, adherence_table, sample_all  # noqa: E402
from ldm.config import UNetStageConfig, load_config  # noqa: E402
from ldm.data.shapes import all_pairs  # noqa: E402

SEEN = ("red circle", "blue square", "yellow triangle", "cyan circle", "green square", "purple triangle")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/demo/pipeline", help="the model folder to fine-tune (default: runs/demo/pipeline)")
    p.add_argument("--out", default="runs/finetune-heldout", help="run folder of the fine-tune (default: runs/finetune-heldout)")
    p.add_argument("--steps", type=int, required=True, help="fine-tuning steps")
    p.add_argument("--targets", default=",".join(HELD_OUT),
                   help=f"the pairs the fine-tune aims at, scored as their own group (default: the demo's held-out {','.join(HELD_OUT)})")
    p.add_argument("--seen", default=",".join(SEEN), help=f"other pairs trained beside the targets (default: {','.join(SEEN)})")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (default: 1e-4)")
    p.add_argument("--num-images", type=int, default=2048, help="shapes images drawn for fine-tuning (default: 2048)")
    p.add_argument("--images-per-prompt", type=int, default=8, help="images scored per prompt (default: 8)")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps when scoring (default: 25)")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the model's validation.guidance_scale")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="stage-2 config overrides for the fine-tune")
    return p.parse_args(argv)


def finetune_config(args, keep):
    """The folder's recorded stage-2 config, turned into a full fine-tune from it on the `keep` pairs only."""
    exclude = [f"{c} {k}" for c, k in all_pairs() if f"{c} {k}" not in keep]
    recorded = Path(args.model) / "ldm_config.yaml"
    overrides = [
        f"init_from={args.model}", f"train.output_dir={args.out}", f"train.max_steps={args.steps}",
        f"train.learning_rate={args.lr}", "train.lr_scheduler=constant", "train.lr_warmup_steps=0",
        f"train.checkpoint_every={args.steps}", f"validation.every={args.steps}",
        f"data.shapes.exclude=[{','.join(exclude)}]", f"data.shapes.num_images={args.num_images}",
        *args.overrides,
    ]
    return load_config(UNetStageConfig, str(recorded) if recorded.is_file() else None, overrides)


def score(folder, args, guidance):
    prompts, images = sample_all(Path(folder), args.images_per_prompt, args.sample_steps, guidance, args.seed)
    return adherence_table(prompts, images)


def main(argv=None):
    args = parse_args(argv)
    targets = {s.strip() for s in args.targets.split(",") if s.strip()}
    keep = targets | {s.strip() for s in args.seen.split(",") if s.strip()}
    cfg = finetune_config(args, keep)
    guidance = args.guidance_scale if args.guidance_scale is not None else cfg.validation.guidance_scale

    from ldm.train.unet_loop import train_unet

    final = train_unet(cfg, resume="auto")  # first: a bad setting fails before any scoring
    before, _, held_before = score(args.model, args, guidance)
    after, _, held_after = score(final, args, guidance)

    def group(row):
        pair = row["prompt"].removeprefix("a ")
        return "target" if pair in targets else "fine-tuned" if pair in keep else "untouched"

    print(f"\n{args.steps} fine-tuning steps from {args.model} on {', '.join(sorted(keep))}; "
          f"{args.images_per_prompt} images per prompt, {args.sample_steps} steps, guidance {guidance}")
    print(f"\n{'prompt':<22}{'pair':<12}{'held out':<10}{'before':>8}{'after':>8}")
    for b, a in zip(before, after):
        held = "yes" if b["held_out"] else ""
        print(f"{b['prompt']:<22}{group(b):<12}{held:<10}{b['adherence']:>8.3f}{a['adherence']:>8.3f}")
    means = {}
    for name in ("target", "fine-tuned", "untouched"):
        rows = [(b["adherence"], a["adherence"]) for b, a in zip(before, after) if group(b) == name]
        if rows:
            means[name] = (sum(r[0] for r in rows) / len(rows), sum(r[1] for r in rows) / len(rows))
            print(f"mean over {name + ' pairs:':<32}{means[name][0]:>8.3f}{means[name][1]:>8.3f}")
    label = "mean over the demo's held-out pairs:"
    print(f"{label:<42}{held_before:>8.3f}{held_after:>8.3f}")
    report = {"steps": args.steps, "model": args.model, "targets": sorted(targets), "trained_pairs": sorted(keep),
              "guidance_scale": guidance,
              "images_per_prompt": args.images_per_prompt, "sample_steps": args.sample_steps,
              "held_out": {"before": held_before, "after": held_after}, "means": means,
              "per_prompt": [{"prompt": b["prompt"], "pair": group(b), "before": b["adherence"], "after": a["adherence"]}
                             for b, a in zip(before, after)]}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "heldout.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    from ldm.cli.common import run_main

    raise SystemExit(run_main(main))
