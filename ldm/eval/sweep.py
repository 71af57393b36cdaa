"""ldm-eval's images: every prompt at every (step count, guidance scale) point, resumable, split across processes.

    OUT/images/steps25-cfg7.5/00003-s0000000003.png

An image depends only on its prompt line, its seed (--seed + line, as ldm-sample) and its
point: its initial noise comes from its own generator (`ldm.cli.sample.initial_noise`), so
the same line starts from the same noise at every guidance scale (a paired comparison),
and batch size or process count never change it. Images are written atomically (temporary
name, then rename), so an image on disk is a whole image: a re-run makes only the missing
ones. Under `accelerate launch` the missing images are dealt out with
`PartialState.split_between_processes`.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

from ldm.cli.sample import Job, batches, initial_noise
from ldm.cli.sample_io import remove_stale_temps, save_png
from ldm.prompts import PromptRecord


@dataclass(frozen=True)
class Point:
    steps: int
    guidance_scale: float

    @property
    def folder(self) -> str:
        return f"steps{self.steps}-cfg{self.guidance_scale:g}"


def plan(records: Sequence[PromptRecord], points: Sequence[Point], seed: int, per_prompt: int) -> Dict[Point, List[Job]]:
    """The jobs of every point, in prompt order; file names are relative to OUT/images."""
    jobs = {}
    for point in points:
        jobs[point] = []
        for r in records:
            line_seed = r.seed if r.seed is not None else seed + r.line
            for k in range(per_prompt):
                suffix = f"-{k:02d}" if per_prompt > 1 else ""
                jobs[point].append(Job(
                    record=r, index=k, seed=line_seed, steps=point.steps, guidance_scale=point.guidance_scale,
                    negative_prompt=r.negative_prompt, file=f"{point.folder}/{r.line:05d}-s{line_seed:010d}{suffix}.png",
                ))
    return jobs


def image_settings(job: Job, args, height: int, width: int, scheduler: str) -> dict:
    """What made an image, in its PNG text chunks (the keys ldm-sample writes)."""
    return dict(
        prompt=job.record.prompt, negative_prompt=job.negative_prompt, seed=job.seed, steps=job.steps,
        guidance_scale=job.guidance_scale, model=str(args.model), line=job.record.line, image_index=job.index,
        eta=args.eta, height=height, width=width, scheduler=scheduler,
    )


def is_made(root: Path, job: Job) -> bool:
    path = root / job.file
    return path.is_file() and path.stat().st_size > 0


def generate(todo: List[Job], args, root: Path, device, show_progress: bool) -> None:
    """Sample `todo` in batches of one point each, saving each image as its batch finishes (tqdm with ETA)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers
    import torch
    import transformers
    from tqdm.auto import tqdm

    from ldm.errors import LdmError
    from ldm.pipeline import LatentDiffusionPipeline

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    pipe = LatentDiffusionPipeline.from_pretrained(args.model).to(device)
    pipe.set_progress_bar_config(disable=True)
    height, width = args.height or pipe.default_size[0], args.width or pipe.default_size[1]
    f = pipe.vae_scale_factor
    if height % f or width % f:
        raise LdmError(f"--height and --width must be multiples of {f} (the VAE's scale factor), got {height}x{width}")
    shape = (pipe.unet.config.in_channels, height // f, width // f)
    scheduler = type(pipe.scheduler).__name__
    for folder in {Path(job.file).parent for job in todo}:
        (root / folder).mkdir(parents=True, exist_ok=True)
    remove_stale_temps(root, [job.file for job in todo])
    with tqdm(total=len(todo), unit="img", desc="ldm-eval", disable=not show_progress, dynamic_ncols=True) as bar:
        for batch in batches(todo, args.batch_size):
            noise = [initial_noise(job, shape) for job in batch]
            images = pipe(
                [j.record.prompt for j in batch], negative_prompt=[j.negative_prompt or "" for j in batch],
                height=height, width=width, num_inference_steps=batch[0].steps, guidance_scale=batch[0].guidance_scale,
                eta=args.eta, latents=torch.cat([latents for latents, _ in noise]),
                generator=[generator for _, generator in noise],
            ).images
            for job, image in zip(batch, images):
                save_png(image, root / job.file, image_settings(job, args, height, width, scheduler))
                bar.update()


def make_missing(jobs: Dict[Point, List[Job]], args, root: Path, state) -> int:
    """Make the images not on disk yet, this process's share of them; returns how many were missing in all."""
    todo = [job for point_jobs in jobs.values() for job in point_jobs if not is_made(root, job)]
    # Every process lists the missing images before any process writes one: the shares then agree.
    state.wait_for_everyone()
    if todo:
        with state.split_between_processes(todo) as mine:
            if mine:
                device = pick(args.device, state)
                generate(list(mine), args, root, device, show_progress=state.is_main_process)
    state.wait_for_everyone()
    return len(todo)


def process_state():
    """accelerate's PartialState: this process's rank, the process count and device.

    On machines without a GPU (or with ACCELERATE_USE_CPU set, as `accelerate launch --cpu` sets it)
    PartialState must be told `cpu=True` to join the processes over gloo; otherwise each process of
    a CPU `torchrun` would think it is alone and make every image."""
    import torch
    from accelerate import PartialState

    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    return PartialState(cpu=use_cpu)


def pick(name: str, state):
    """The process's own device under accelerate (`--device auto`), otherwise as ldm-sample picks it."""
    from ldm.cli.sample import pick_device

    if name == "auto" and state.num_processes > 1:
        return state.device
    return pick_device(name)


def load_images(root: Path, jobs: List[Job]):
    """The images of `jobs` as a uint8 (N, 3, H, W) tensor and their prompts."""
    from PIL import Image

    from ldm.eval.fid_kid import to_uint8

    images = []
    for job in jobs:
        with Image.open(root / job.file) as im:
            images.append(im.convert("RGB"))
    return to_uint8(images), [job.record.prompt for job in jobs]
