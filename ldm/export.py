"""Export a model folder as a plain `diffusers.StableDiffusionPipeline` folder.

Our folders are already in the diffusers layout; what the ecosystem cannot read is an
open_clip text tower (`ldm.text_encoder.OpenCLIPTextModel`) and a model_index.json that
names our pipeline. The export converts the tower to a `transformers.CLIPTextModel`
(`ldm.open_clip_to_hf`), copies the VAE, U-Net, scheduler and tokenizer files as they are
(bit-exact, whatever their dtype), and writes a Stable Diffusion model_index.json, so

    StableDiffusionPipeline.from_pretrained(OUT, safety_checker=None, requires_safety_checker=False)

gives the images `LatentDiffusionPipeline.from_pretrained(DIR)` gives.
"""

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
from diffusers import __version__ as diffusers_version
from transformers import CLIPTextModel

from ldm.errors import LdmError
from ldm.open_clip_to_hf import open_clip_to_hf
from ldm.pipeline import LatentDiffusionPipeline
from ldm.text_encoder import OpenCLIPTextModel, encode_text, tokenize

FORMATS = ("diffusers",)
CONVERSION_TOLERANCE = {torch.float32: 1e-4}  # max |hidden-state difference|; half precision: 5e-2
CHECK_PROMPTS = ["", "a photo of a cat in a space suit, 35mm, golden hour"]


def check_destination(model_dir: Path, out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LdmError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LdmError(f"{out} is not empty: pass --force to replace its model parts, or choose another folder")
    src, dst = model_dir.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise LdmError(f"the export folder {out} overlaps the model folder {model_dir}: choose a folder outside it")


def index_entry(index: dict, name: str, library: str) -> list:
    """The model_index.json entry of a copied part, which StableDiffusionPipeline must be able to import."""
    entry = index.get(name)
    if not entry or entry[0] != library:
        raise LdmError(f"the '{name}' part is {entry}, not a {library} class: StableDiffusionPipeline cannot load it")
    return list(entry)


def warn_about_scheduler(scheduler) -> None:
    """StableDiffusionPipeline rewrites two old scheduler settings when it loads; say so rather than differ silently."""
    cfg = scheduler.config
    changes = []
    if getattr(cfg, "steps_offset", 1) != 1:
        changes.append(f"steps_offset {cfg.steps_offset} -> 1")
    if getattr(cfg, "clip_sample", False) is True:
        changes.append("clip_sample True -> False")
    if changes:
        warnings.warn(
            f"StableDiffusionPipeline changes this scheduler's {', '.join(changes)} when it loads, "
            "so its images will differ from this pipeline's; set them in scheduler/scheduler_config.json to match",
            stacklevel=3,
        )


@torch.no_grad()
def conversion_error(ours, theirs, tokenizer) -> float:
    """Largest |hidden-state difference| between the two text encoders on a few prompts (a self-check)."""
    ids = tokenize(tokenizer, CHECK_PROMPTS)
    return (encode_text(ours, ids).float() - theirs(ids)[0].float()).abs().max().item()


def convert_text_encoder(pipe, dest: Path) -> Optional[float]:
    """Write text_encoder/ as a CLIPTextModel; return the hidden-state difference (None for a copy)."""
    encoder = pipe.text_encoder
    if isinstance(encoder, CLIPTextModel):
        return None  # copied with the other parts
    if not isinstance(encoder, OpenCLIPTextModel):
        raise LdmError(f"cannot export a {type(encoder).__name__} text encoder: only open_clip towers and CLIPTextModel")
    hf = open_clip_to_hf(encoder, pipe.tokenizer)
    error = conversion_error(encoder, hf, pipe.tokenizer)
    tolerance = CONVERSION_TOLERANCE.get(encoder.dtype, 5e-2)
    if not error <= tolerance:
        raise LdmError(f"the converted text encoder differs from the open_clip one by {error:.3g} (> {tolerance}): not exported")
    hf.save_pretrained(str(dest / "text_encoder"))
    return error


def write_parts(pipe, model_dir: Path, dest: Path) -> Optional[float]:
    """Every part of a StableDiffusionPipeline folder into `dest`; returns the text encoder's conversion error."""
    index = json.loads((model_dir / "model_index.json").read_text(encoding="utf-8"))
    copied = ["vae", "unet", "scheduler", "tokenizer"]
    if isinstance(pipe.text_encoder, CLIPTextModel):
        copied.append("text_encoder")
    for name in copied:
        shutil.copytree(model_dir / name, dest / name)
    error = convert_text_encoder(pipe, dest)
    sd_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers_version,
        "vae": index_entry(index, "vae", "diffusers"),
        "unet": index_entry(index, "unet", "diffusers"),
        "scheduler": index_entry(index, "scheduler", "diffusers"),
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": index_entry(index, "tokenizer", "transformers"),
        # No safety checker: null entries are how diffusers itself saves a pipeline without one.
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
    (dest / "model_index.json").write_text(json.dumps(sd_index, indent=2) + "\n", encoding="utf-8")
    return error


def move_into(tmp: Path, out: Path) -> None:
    """Put the finished export at `out`: replace only the names we write, never other files there."""
    if not out.exists():
        os.replace(tmp, out)
        return
    for item in sorted(tmp.iterdir()):
        target = out / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(item, target)
    tmp.rmdir()


def export_diffusers(model_dir, out, force: bool = False) -> Optional[float]:
    """Export `model_dir` to `out` as a StableDiffusionPipeline folder.

    Returns the largest hidden-state difference between the original and the exported text
    encoder, or None when it was a CLIPTextModel already and was copied. The parts are written to a temporary
    folder beside `out` first, so a failed export leaves `out` as it was.
    """
    model_dir, out = Path(model_dir), Path(out)
    check_destination(model_dir, out, force)
    pipe = LatentDiffusionPipeline.from_pretrained(str(model_dir))  # every part checked and loadable
    warn_about_scheduler(pipe.scheduler)
    tmp = out.parent / f".{out.name}.export-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an export that was killed
    tmp.mkdir(parents=True)
    try:
        error = write_parts(pipe, model_dir, tmp)
        move_into(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return error
