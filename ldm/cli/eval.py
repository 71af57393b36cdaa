"""ldm-eval: judge a model folder over guidance scales and step counts.

    ldm-eval --model runs/demo/pipeline --data-config runs/demo/pipeline/ldm_config.yaml \\
             --guidance-scales 1,3,5,7.5,10 --outdir runs/demo/eval
    ldm-eval --model DIR --prompts prompts.txt --data-config cfg.yaml --inception-weights \\
             weights-inception-2015-12-05-6726825d.pth --clip-model ViT-B-32 --clip-weights open_clip_pytorch_model.bin ...
    accelerate launch -m ldm.cli.eval ...                       # the images split across processes

Prompts: a prompt file (--prompts, as ldm-sample reads it), or else the captions of the
held-out (validation) split of --data-config. Real images for FID/KID: that same held-out
split. For every (step count, guidance scale) point it makes one image per prompt (or
--num-images-per-prompt), reusing those already in OUTDIR/images, then scores them:
FID and KID (--inception-weights), CLIP score (--clip-model + --clip-weights, or
--clip-folder), and on shapes prompts the adherence checker. It writes OUTDIR/eval.json,
prints a table, and plots OUTDIR/tradeoff.png. Nothing is downloaded: docs/evaluation.md says
where to get each weights file.
"""

import argparse
import time
from pathlib import Path
from typing import List

from ldm.cli.common import run_main
from ldm.errors import LdmError

METRICS = ("fid", "kid", "clip", "adherence")


def numbers(kind, name):
    def parse(text: str) -> List:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} takes comma-separated numbers, e.g. 1,3,7.5; got '{text}'") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{name} needs at least one value")
        return values
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (model_index.json, unet/, vae/, ...)")
    p.add_argument("--outdir", required=True, help="images/, eval.json and tradeoff.png go here; a re-run reuses the images")
    p.add_argument("--prompts", default=None, help=".txt or .jsonl prompt file (default: the held-out captions of --data-config)")
    p.add_argument("--data-config", default=None, help="a stage-2 config YAML (e.g. the model folder's ldm_config.yaml): its held-out split "
                   "gives the real images for FID/KID and, without --prompts, the prompts")
    p.add_argument("--data", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for --data-config, e.g. data.num_validation=256")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--guidance-scales", type=numbers(float, "--guidance-scales"), default=[1.0, 3.0, 5.0, 7.5, 10.0],
                   help="comma-separated (default: 1,3,5,7.5,10)")
    p.add_argument("--steps", type=numbers(int, "--steps"), default=[25], help="comma-separated step counts (default: 25)")
    p.add_argument("--seed", type=int, default=0, help="a prompt's seed is this plus its line number (default: 0)")
    p.add_argument("--num-images-per-prompt", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8, help="images per U-Net batch (default: 8)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (under accelerate launch: each process's GPU)")
    p.add_argument("--metrics", default="auto",
                   help="comma-separated from fid,kid,clip,adherence; 'auto': those whose files are given (and adherence on shapes prompts)")
    p.add_argument("--inception-weights", default=None, help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (FID, KID)")
    p.add_argument("--inception-features", type=int, default=2048, help="Inception features for FID/KID (2048: the standard; 64: quick checks)")
    p.add_argument("--clip-model", default=None, help="open_clip model name, e.g. ViT-B-32 (with --clip-weights)")
    p.add_argument("--clip-weights", default=None, help="the open_clip model's weights file (open_clip_pytorch_model.bin)")
    p.add_argument("--clip-folder", default=None, help="a transformers CLIP folder (instead of --clip-model)")
    return p


def wanted_metrics(args, shapes: bool) -> List[str]:
    """The metrics to compute (a metric named without its weights file fails in `load_metrics`, before any image)."""
    if args.metrics == "auto":
        chosen = []
        if args.inception_weights is not None:
            chosen += ["fid", "kid"]
        if args.clip_folder is not None or args.clip_model is not None or args.clip_weights is not None:
            chosen.append("clip")
        return chosen + (["adherence"] if shapes else [])
    chosen = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METRICS]
    if unknown:
        raise LdmError(f"--metrics: unknown metric '{unknown[0]}' (choose from {', '.join(METRICS)}, or auto)")
    if "adherence" in chosen and not shapes:
        raise LdmError("--metrics adherence needs shapes prompts ('a COLOUR KIND'), as the shapes checker judges only those")
    return chosen


def check_args(args) -> None:
    for name in ("batch_size", "num_images_per_prompt"):
        if getattr(args, name) < 1:
            raise LdmError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if min(args.steps) < 1:
        raise LdmError(f"--steps must be at least 1, got {min(args.steps)}")
    if args.limit is not None and args.limit < 1:
        raise LdmError(f"--limit must be at least 1, got {args.limit}")
    if args.prompts is None and args.data_config is None:
        raise LdmError("give the prompts: --prompts FILE, or --data-config YAML to use its held-out captions")


def held_out(args):
    """The held-out split of --data-config (None without one)."""
    if args.data_config is None:
        return None
    from ldm.config import UNetStageConfig, load_config
    from ldm.data import build_dataset

    cfg = load_config(UNetStageConfig, args.data_config, args.data)
    if cfg.data.num_validation < 1:
        raise LdmError(f"{args.data_config} holds out no images (data.num_validation=0): pass --data data.num_validation=N")
    return build_dataset(cfg.data, "validation")


def prompt_records(args, real):
    from ldm.prompts import PromptRecord, read_prompts

    if args.prompts is not None:
        records = read_prompts(args.prompts)
        for r in records:
            if r.guidance_scale is not None or r.num_inference_steps is not None:
                raise LdmError(f"{args.prompts}, line {r.line}: ldm-eval sweeps guidance_scale and num_inference_steps "
                               f"itself (--guidance-scales, --steps); remove them from the line")
    else:
        records = [PromptRecord(line=i + 1, prompt=real[i]["caption"]) for i in range(len(real))]
    return records[: args.limit] if args.limit else records


def is_shapes(records) -> bool:
    from ldm.data.shapes import parse_pair

    try:
        for r in records:
            parse_pair(r.prompt)
    except LdmError:
        return False
    return True


def load_metrics(args, chosen, real, device="cpu"):
    """(InceptionMetrics with the real images in, or None; CLIP scorer or None), weight files checked."""
    inception = clip = None
    if "fid" in chosen or "kid" in chosen:
        from ldm.eval.fid_kid import InceptionMetrics, from_model_range

        if real is None:
            raise LdmError("FID and KID compare with real images: pass --data-config YAML (its held-out split)")
        inception = InceptionMetrics.from_file(args.inception_weights, device=device, features=args.inception_features)
        for i in range(0, len(real), 64):
            batch = [real[j]["pixel_values"] for j in range(i, min(i + 64, len(real)))]
            import torch

            inception.update(from_model_range(torch.stack(batch)), real=True)
    if "clip" in chosen:
        from ldm.eval.clip_score import load_clip

        clip = load_clip(args.clip_model, args.clip_weights, args.clip_folder, device=device)
    return inception, clip


def model_validation_loss(args):
    """The model folder's held-out validation loss as training measures it (ldm/eval/validation_loss.py):
    fixed noise levels and noise, the split of --data-config. It does not depend on guidance, so one
    figure serves every point. None without --data-config."""
    if args.data_config is None:
        return None
    import torch

    from ldm.codec import LatentCodec
    from ldm.config import UNetStageConfig, load_config
    from ldm.eval.validation_loss import ValidationLoss, held_out_split, text_to_image_inputs
    from ldm.objectives import build_objective
    from ldm.pipeline import LatentDiffusionPipeline

    cfg = load_config(UNetStageConfig, args.data_config, args.data)
    dataset = held_out_split(cfg.data)
    if dataset is None:
        return None
    pipe = LatentDiffusionPipeline.from_pretrained(str(args.model))
    loss = ValidationLoss(build_objective(cfg.objective), dataset, cfg.validation, rank=0, world=1)
    with torch.no_grad():
        return loss(text_to_image_inputs(LatentCodec(pipe.vae), pipe.text_encoder, pipe.tokenizer, pipe.unet, pipe.device))


def end_process_group() -> None:
    """Leave the process group accelerate opened: only the main process goes on to score."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    start = time.time()
    from ldm.eval.sweep import Point, load_images, make_missing, pick, plan, process_state
    from ldm.model_parts import check_folder_parts_agree, check_model_folder

    check_model_folder(args.model)
    check_folder_parts_agree(args.model)
    real = held_out(args)
    records = prompt_records(args, real)
    shapes = is_shapes(records)
    chosen = wanted_metrics(args, shapes)
    state = process_state()
    # Weight files first: a missing one fails now, not after an hour of sampling.
    inception, clip = load_metrics(args, chosen, real, pick(args.device, state))
    points = [Point(s, g) for s in args.steps for g in args.guidance_scales]
    jobs = plan(records, points, args.seed, args.num_images_per_prompt)
    root = Path(args.outdir) / "images"
    total = sum(len(j) for j in jobs.values())
    if state.is_main_process:
        print(f"{len(records)} prompts x {len(points)} points = {total} images in {root}")
    try:
        missing = make_missing(jobs, args, root, state)
    finally:
        if state.num_processes > 1:
            end_process_group()
    if not state.is_main_process:
        return 0
    print(f"{total - missing} images reused, {missing} made")
    from ldm.eval.machine import machine_info
    from ldm.eval.scores import format_table, plot_points, score_point, write_json

    rows = []
    for point in points:
        images, prompts = load_images(root, jobs[point])
        row = {"steps": point.steps, "guidance_scale": point.guidance_scale, "images": len(images), "folder": point.folder}
        scores = score_point(images, prompts, inception, clip, "adherence" in chosen)
        # Asked for one of FID and KID: the other came along (same features) but is not reported.
        unasked = {"fid"} - set(chosen) | ({"kid", "kid_std"} if "kid" not in chosen else set())
        rows.append({**row, **{k: v for k, v in scores.items() if k not in unasked}})
    val_loss = model_validation_loss(args)
    if val_loss is not None:
        print(f"validation loss on the held-out split (any guidance scale): {val_loss['val_loss']:.5g}")
    print(format_table(rows))
    outdir = Path(args.outdir)
    plot = plot_points(rows, outdir / "tradeoff.png")
    result = {
        "model": str(args.model), "prompts": args.prompts or f"held-out captions of {args.data_config}",
        "num_prompts": len(records), "num_images_per_prompt": args.num_images_per_prompt, "seed": args.seed,
        "metrics": chosen, "real_images": None if real is None else len(real),
        "inception_weights": args.inception_weights, "inception_features": args.inception_features if inception else None,
        "clip": args.clip_folder or (f"{args.clip_model} {args.clip_weights}" if args.clip_model else None),
        "points": rows, "validation_loss": val_loss, "machine": machine_info(), "seconds": round(time.time() - start, 1),
    }
    path = write_json(result, outdir / "eval.json")
    print(f"results: {path}" + (f"\nplot:    {plot}" if plot else ""))
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
