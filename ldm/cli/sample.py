"""ldm-sample: an image for every prompt of a file, resumable, shardable.

    ldm-sample --model runs/unet/final --prompts prompts.txt --outdir out/
    accelerate launch -m ldm.cli.sample --model ... --prompts ... --outdir ...   # one shard per GPU
    ldm-sample --model ... --controlnet runs/controlnet/final --prompts edges.jsonl --outdir out/
    ldm-sample --model ... --lora runs/mylora/final/lora:0.8 --prompts prompts.txt --outdir out/

Each image depends only on its prompt line and its seed (default: --seed + line number):
its initial noise and any sampler noise come from its own generator, so batch size, the
shard and the other lines of the file never change it. Images are named from the line
number and seed, written atomically with their prompt and settings in PNG text chunks,
and recorded in the shard's manifest as each one is done; a re-run (killed or not, with
any shard count) skips what is already there. Every run ends with a labelled contact
sheet. The whole file is checked, and the model folder's parts matched, before any image.
With --controlnet (repeatable: multi-control) or --adapter, each .jsonl line names its
control image (see `ldm.cli.sample_control`). A .jsonl line with "init_image" (and
"mask_image") is sampled by img2img (inpainting), with its "strength" (see
`ldm.cli.sample_img2img`). --scheduler picks the sampler by name (`ldm.schedulers`).
"""

import argparse
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from ldm.cli import sample_control, sample_img2img
from ldm.cli.common import run_main
from ldm.cli.sample_io import (
    append_record, cut_torn_tail, is_done, manifest_name, read_manifests, remove_stale_temps, save_png,
)
from ldm.cli.shards import Shard, resolve_shard
from ldm.errors import LdmError
from ldm.model_parts import check_folder_parts_agree, check_model_folder
from ldm.prompts import PromptRecord, read_prompts
from ldm.schedulers import SCHEDULERS, check_scheduler, model_objective

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

MANIFEST = manifest_name("")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ldm-sample",
        description="Generate images for every prompt of a .txt or .jsonl file with a saved model folder.",
    )
    p.add_argument("--model", required=True, help="model folder saved by the trainer (model_index.json, unet/, vae/, ...)")
    p.add_argument("--prompts", required=True, help=".txt (one prompt a line, # comments) or .jsonl ({\"prompt\": ..., \"seed\"?, ...})")
    p.add_argument("--outdir", required=True, help="folder for the images, their manifest and contact_sheet.png")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance scale; 1 turns it off (default: 7.5)")
    p.add_argument("--seed", type=int, default=0, help="a line's seed is this plus its line number, unless the .jsonl line sets one (default: 0)")
    p.add_argument("--batch-size", type=int, default=4, help="images per U-Net batch (default: 4)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt for lines that set none (default: none)")
    p.add_argument("--num-images-per-prompt", type=int, default=1, help="images per prompt line (default: 1)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 is deterministic DDIM (default: 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto; under accelerate launch, the process's GPU)")
    p.add_argument("--num-shards", type=int, default=None,
                   help="split the file into N shards by prompt line, e.g. one per machine (default: 1, or the process count under accelerate launch)")
    p.add_argument("--shard-index", type=int, default=None,
                   help="the shard to sample, 0..N-1: prompt lines I, I+N, ... (default: 0, or the process rank under accelerate launch)")
    p.add_argument("--scheduler", default=None, metavar="NAME",
                   help="sampler: " + ", ".join(SCHEDULERS) + " (default: the model's own; each fits some objectives, "
                        "see docs/sampling.md)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights and activations (default: fp32)")
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "xformers"),
                   help="attention kernel: PyTorch SDPA, or xformers (CUDA only) (default: sdpa)")
    p.add_argument("--controlnet", action="append", default=None, metavar="DIR",
                   help="a ControlNet folder (diffusers ControlNetModel); repeat for multi-control. Each .jsonl line "
                        "then needs \"image\": \"path\" (relative to the prompt file; a list with several ControlNets)")
    p.add_argument("--adapter", action="append", default=None, metavar="DIR",
                   help="a T2I-Adapter folder (diffusers T2IAdapter); repeatable. Lines need \"image\" as with --controlnet")
    p.add_argument("--lora", action="append", default=None, metavar="DIR[:SCALE]",
                   help="a LoRA folder in diffusers' format (pytorch_lora_weights.safetensors, as the trainer's "
                        "final/lora/), at SCALE (default 1); repeatable")
    return p


@dataclass
class Job:
    """One image to make."""

    record: PromptRecord
    index: int  # image index within its line
    seed: int
    steps: int
    guidance_scale: float
    negative_prompt: Optional[str]
    file: str
    control_scale: object = None  # the line's controlnet/adapter conditioning scale (float or tuple), or None
    edit: Optional[sample_img2img.Edit] = None  # the line's img2img / inpainting settings, or None


SEED_LIMIT = 2**64


def plan(records: List[PromptRecord], args) -> List[Job]:
    """Every image the file asks for, with the settings of its line (a .jsonl line overrides flags)."""
    jobs = []
    for r in records:
        seed = r.seed if r.seed is not None else args.seed + r.line
        if not 0 <= seed < SEED_LIMIT:  # torch.Generator.manual_seed takes 64 bits: a bigger one failed mid-file
            raise LdmError(f"line {r.line}: seed {seed} is out of range; seeds must be >= 0 and < 2**64")
        for k in range(args.num_images_per_prompt):
            suffix = f"-{k:02d}" if args.num_images_per_prompt > 1 else ""
            jobs.append(Job(
                record=r, index=k, seed=seed,
                steps=r.num_inference_steps or args.steps,
                guidance_scale=r.guidance_scale if r.guidance_scale is not None else args.guidance_scale,
                negative_prompt=r.negative_prompt if r.negative_prompt is not None else args.negative_prompt,
                file=f"{r.line:05d}-s{seed:010d}{suffix}.png",
                control_scale=sample_control.line_scale(r, args),
            ))
    return jobs


def check_args(args) -> None:
    for name in ("steps", "batch_size", "num_images_per_prompt"):
        if getattr(args, name) < 1:
            raise LdmError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not math.isfinite(args.guidance_scale):  # argparse's float() reads "nan" and "inf"
        raise LdmError(f"--guidance-scale must be a finite number, got {args.guidance_scale}")
    if Path(args.outdir).exists() and not Path(args.outdir).is_dir():
        raise LdmError(f"--outdir {args.outdir} exists and is not a folder")
    sample_control.check_control_args(args)
    if args.lora:
        from ldm.lora import check_lora_args  # torch and diffusers load only when needed: --help stays fast

        check_lora_args(args.lora)
    if args.scheduler is not None and args.scheduler not in SCHEDULERS:
        check_scheduler(args.scheduler, "ddpm")  # the unknown-name error, before the model is read
    if args.attention == "xformers":
        check_xformers(args.device)


def check_xformers(device: str) -> None:
    """--attention xformers needs the package and a CUDA device (one line each, before any work)."""
    import importlib.util

    import torch

    if importlib.util.find_spec("xformers") is None:
        raise LdmError("--attention xformers but xformers is not installed: pip install xformers, or use --attention sdpa")
    if not device.startswith("cuda") and not (device == "auto" and torch.cuda.is_available()):
        raise LdmError(f"--attention xformers needs a CUDA GPU (--device {device}): use --attention sdpa on CPU")


def pick_device(name: str):
    import torch

    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise LdmError(f"--device {name} but no CUDA GPU is available; use --device cpu")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def initial_noise(job: Job, shape):
    """(latents, generator) of one image: draw `index + 1` noise tensors from the line's seed, keep the last.

    Image 0 of a line is thus `pipe(prompt, generator=torch.Generator().manual_seed(seed))`
    at batch size 1, and the generator goes on to feed that image's sampler noise. CPU
    generators give the same noise on every device.
    """
    import torch

    generator = torch.Generator("cpu").manual_seed(job.seed)
    for _ in range(job.index + 1):
        latents = torch.randn((1, *shape), generator=generator)
    return latents, generator


def batches(jobs: List[Job], batch_size: int):
    """Consecutive jobs that can share a pipeline call (same steps, guidance, control scale and img2img settings),
    at most batch_size each."""
    batch = []
    key_of = lambda job: (job.steps, job.guidance_scale, job.control_scale,  # noqa: E731
                          job.edit and (job.edit.mode, job.edit.strength, job.edit.size))
    for job in jobs:
        if batch and (len(batch) == batch_size or key_of(job) != key_of(batch[0])):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


def image_settings(job: Job, args, height: int, width: int, scheduler: str) -> dict:
    """What made an image: stored in its PNG text chunks (each key, and all as JSON in "parameters")."""
    return dict(
        prompt=job.record.prompt, negative_prompt=job.negative_prompt, seed=job.seed, steps=job.steps,
        guidance_scale=job.guidance_scale, model=str(args.model), line=job.record.line, image_index=job.index,
        eta=args.eta, height=height, width=width, scheduler=scheduler, **control_record(job, args),
        **({"lora": list(args.lora)} if args.lora else {}),
        **sample_img2img.edit_record(job.edit),
    )


def control_record(job: Job, args) -> dict:
    """The control model folders, control image path(s) and scale of an image; nothing without control."""
    kind = sample_control.control_kind(args)
    if kind is None:
        return {}
    one = len(job.record.image) == 1
    scale = list(job.control_scale) if isinstance(job.control_scale, tuple) else job.control_scale
    return {kind: [str(d) for d in sample_control.control_dirs(args)], "control_image": job.record.image[0] if one else job.record.image,
            f"{kind}_conditioning_scale": 1.0 if scale is None else scale}


def manifest_record(job: Job, args) -> dict:
    return dict(
        file=job.file, line=job.record.line, prompt=job.record.prompt, negative_prompt=job.negative_prompt,
        seed=job.seed, steps=job.steps, guidance_scale=job.guidance_scale, **control_record(job, args),
        **sample_img2img.edit_record(job.edit),
    )


@contextmanager
def failing_lines(batch: List[Job], prompts, done: int):
    """An `LdmError` while sampling `batch` (NaN latents from a line's settings, ...) names its
    prompt lines, and says that the `done` images made before it are kept (a re-run continues)."""
    try:
        yield
    except LdmError as e:
        lines = ", ".join(str(n) for n in sorted({job.record.line for job in batch}))
        raise LdmError(f"{prompts}, line {lines}: {e} ({done} images made before it are kept; "
                       "a re-run after the fix makes only the rest)") from None


def make_images(todo: List[Job], args, shard: Shard, outdir: Path, recorded: set) -> None:
    """Sample `todo` in batches; each image is saved and recorded as soon as its batch is done."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a model is a local folder; never reach for the hub
    import diffusers
    import torch
    import transformers
    from tqdm.auto import tqdm

    from ldm.pipeline import LatentDiffusionPipeline

    # One progress bar (ours, over images, with an ETA); not diffusers' and transformers' loading bars.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    device = shard.device if args.device == "auto" and shard.device is not None else pick_device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    pipe = LatentDiffusionPipeline.from_pretrained(args.model, **sample_control.load_control_models(args)).to(device, dtype)
    if args.lora:
        from ldm.lora import load_loras

        load_loras(pipe, args.lora)
    pipe.set_progress_bar_config(disable=True)
    if args.scheduler is not None:
        from ldm.schedulers import make_scheduler

        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler, model_objective(args.model))
    if args.attention == "xformers":
        pipe.enable_xformers_memory_efficient_attention()
    height, width = args.height or pipe.default_size[0], args.width or pipe.default_size[1]
    f = pipe.vae_scale_factor
    if height % f or width % f:
        raise LdmError(f"--height and --width must be multiples of {f} (the VAE's scale factor), got {height}x{width}")
    shape = (pipe.unet.config.in_channels, height // f, width // f)
    sample_control.check_control_sizes(todo, args, height, width)  # every line's, before the first image
    scheduler = args.scheduler or type(pipe.scheduler).__name__
    outdir.mkdir(parents=True, exist_ok=True)
    manifest = outdir / manifest_name(shard.suffix)
    cut_torn_tail(manifest)
    remove_stale_temps(outdir, [job.file for job in todo])

    made = 0  # images written by this run (the bar counts on the main shard only)
    with tqdm(total=len(todo), unit="img", desc="ldm-sample" + shard.suffix, disable=not shard.is_main) as bar:
        for batch in batches(todo, args.batch_size):
            edit = batch[0].edit
            if edit is not None:
                edit_shape = (shape[0], edit.size[0] // f, edit.size[1] // f)
                with failing_lines(batch, args.prompts, made):
                    images = sample_img2img.edit_call(pipe, batch, edit, edit_shape, args.eta)
                for job, image in zip(batch, images):
                    save_png(image, outdir / job.file, image_settings(job, args, *edit.size, scheduler))
                    if job.file not in recorded:
                        append_record(manifest, manifest_record(job, args))
                    bar.update()
                    made += 1
                continue
            noise = [initial_noise(job, shape) for job in batch]
            with failing_lines(batch, args.prompts, made):
                images = pipe(
                    [j.record.prompt for j in batch],
                    negative_prompt=[j.negative_prompt or "" for j in batch],
                    height=height, width=width,
                    num_inference_steps=batch[0].steps, guidance_scale=batch[0].guidance_scale, eta=args.eta,
                    latents=torch.cat([latents for latents, _ in noise]).to(dtype),
                    generator=[generator for _, generator in noise],
                    **(sample_control.control_call_args(batch, pipe) if sample_control.control_kind(args) else {}),
                ).images
            for job, image in zip(batch, images):
                save_png(image, outdir / job.file, image_settings(job, args, height, width, scheduler))
                if job.file not in recorded:
                    append_record(manifest, manifest_record(job, args))
                bar.update()
                made += 1


def write_contact_sheet(jobs: List[Job], outdir: Path, name: str) -> Optional[Path]:
    """contact_sheet.png: the images of `jobs` on disk, one labelled row per prompt line."""
    from ldm.contact_sheet import MAX_ROWS, contact_sheet, thumbnail

    rows = {}
    for job in jobs:
        if (outdir / job.file).is_file():
            rows.setdefault(job.record.line, (job.record.prompt, []))[1].append(outdir / job.file)
    if not rows:
        return None
    if len(rows) > MAX_ROWS:
        print(f"{name} shows the first {MAX_ROWS} of {len(rows)} prompt lines")
    shown = list(rows.items())[:MAX_ROWS]
    path = outdir / name
    remove_stale_temps(outdir, [name])
    sheet = contact_sheet(
        [[thumbnail(p) for p in paths] for _, (_, paths) in shown],
        [f"{line}: {prompt}" for line, (prompt, _) in shown],
    )
    save_png(sheet, path)
    return path


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    records = read_prompts(args.prompts)
    sample_control.check_control_lines(records, args)  # images named and on disk, before any work
    all_jobs = plan(records, args)  # every line checked before any work, whichever shard it falls in
    check_model_folder(args.model)  # configs only: a folder of mismatched parts fails now, not after loading
    check_folder_parts_agree(args.model)
    if args.scheduler is not None:
        check_scheduler(args.scheduler, model_objective(args.model))  # fits the model's objective, package installed
    factor = sample_img2img.vae_factor_of(args.model)
    edits = {r.line: sample_img2img.line_edit(r, args, factor) for r in records}  # files and sizes, before any image
    for job in all_jobs:
        job.edit = edits[job.record.line]
    shard = resolve_shard(args.num_shards, args.shard_index)
    lines = {r.line for r in shard.take(records)}
    jobs = [job for job in all_jobs if job.record.line in lines]
    outdir = Path(args.outdir)
    # Done: recorded by any shard's manifest and on disk. A file without a record (a kill between
    # the two) is made again; a record without its file likewise.
    recorded = read_manifests(outdir)
    todo = [job for job in jobs if not is_done(outdir, job.file, recorded)]
    where = "" if shard.count == 1 else f" (shard {shard.index} of {shard.count})"
    print(f"{len(jobs)} images for {args.prompts}{where}: {len(jobs) - len(todo)} already in {outdir}, {len(todo)} to make")
    try:
        if todo:
            make_images(todo, args, shard, outdir, recorded)
        sheet = write_contact_sheet(jobs, outdir, f"contact_sheet{shard.suffix}.png")
        if sheet is not None:
            print(f"contact sheet: {sheet}")
    finally:
        shard.close()
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
