"""ldm-sample's img2img and inpainting lines: `"init_image"`, `"mask_image"`, `"strength"`.

A .jsonl line with `init_image` is made by `LatentDiffusionImg2ImgPipeline` (with
`mask_image` too, by `LatentDiffusionInpaintPipeline`), at its image's size, with its
`strength` (default: diffusers' 0.8 for img2img, 1.0 for inpainting). Every line is checked
(files on disk and readable, a mask of its image's size, a size the VAE can take) before
any image is made, and each error names the line.
"""

from dataclasses import dataclass
from typing import Optional

from ldm.errors import LdmError

DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}


@dataclass(frozen=True)
class Edit:
    """What an img2img / inpainting line asks for (hashable: lines with equal settings share a batch)."""

    mode: str  # "img2img" | "inpaint"
    init_image: str
    mask_image: Optional[str]
    strength: float
    size: tuple  # (height, width) of the init image


def read_size(path: str, prompts, line: int, what: str) -> tuple:
    import PIL.Image

    try:
        with PIL.Image.open(path) as image:
            return image.height, image.width
    except FileNotFoundError:
        raise LdmError(f"{prompts}, line {line}: {what} not found: {path} (paths are relative to the prompt file's folder)") from None
    except OSError as e:
        raise LdmError(f"{prompts}, line {line}: cannot read {what} {path} ({e})") from None


def line_edit(record, args, vae_factor: int) -> Optional[Edit]:
    """The line's `Edit` (files checked), or None for a text-to-image line."""
    if record.init_image is None:
        return None
    if args.controlnet or args.adapter:
        raise LdmError(f"{args.prompts}, line {record.line}: init_image with --controlnet/--adapter is not supported: "
                       f"sample those lines without control")
    size = read_size(record.init_image, args.prompts, record.line, "init_image")
    if size[0] % vae_factor or size[1] % vae_factor:
        raise LdmError(f"{args.prompts}, line {record.line}: init_image {record.init_image} is {size[0]}x{size[1]}, not "
                       f"multiples of {vae_factor} (the VAE's scale factor): crop or resize it")
    mode = "img2img" if record.mask_image is None else "inpaint"
    if record.mask_image is not None:
        mask = read_size(record.mask_image, args.prompts, record.line, "mask_image")
        if mask != size:
            raise LdmError(f"{args.prompts}, line {record.line}: mask_image {record.mask_image} is {mask[0]}x{mask[1]} but "
                           f"init_image is {size[0]}x{size[1]}: give a mask of the image's size (white: repaint)")
    strength = DEFAULT_STRENGTH[mode] if record.strength is None else float(record.strength)
    return Edit(mode, record.init_image, record.mask_image, strength, size)


def vae_factor_of(model) -> int:
    """The VAE's scale factor from the model folder's config (before loading weights)."""
    import json
    from pathlib import Path

    from ldm.autoencoder import downsampling_factor

    return downsampling_factor(json.loads((Path(model) / "vae" / "config.json").read_text())["block_out_channels"])


def edit_generator(seed: int, index: int, shape):
    """The generator of image `index` of a line: seeded, then past `index` noise draws (as `initial_noise`)."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    for _ in range(index):
        torch.randn((1, *shape), generator=generator)
    return generator


def edit_call(pipe, batch, edit: Edit, shape, eta: float) -> list:
    """The images of a batch of img2img / inpainting jobs (all with `edit`'s settings but their own files)."""
    import PIL.Image

    from ldm.pipeline_img2img import LatentDiffusionImg2ImgPipeline
    from ldm.pipeline_inpaint import LatentDiffusionInpaintPipeline

    def load(path, mode):
        with PIL.Image.open(path) as image:
            return image.convert(mode)

    cls = LatentDiffusionInpaintPipeline if edit.mode == "inpaint" else LatentDiffusionImg2ImgPipeline
    edit_pipe = cls.from_pipe(pipe)
    edit_pipe.set_progress_bar_config(disable=True)
    kwargs = dict(
        prompt=[j.record.prompt for j in batch], image=[load(j.edit.init_image, "RGB") for j in batch],
        strength=edit.strength, negative_prompt=[j.negative_prompt or "" for j in batch],
        num_inference_steps=batch[0].steps, guidance_scale=batch[0].guidance_scale, eta=eta,
        generator=[edit_generator(j.seed, j.index, shape) for j in batch],
    )
    if edit.mode == "inpaint":
        kwargs.update(mask_image=[load(j.edit.mask_image, "L") for j in batch], height=edit.size[0], width=edit.size[1])
    return edit_pipe(**kwargs).images


def edit_record(edit: Optional[Edit]) -> dict:
    """The image's init/mask paths and strength, for its PNG text and the manifest; nothing for text-to-image."""
    if edit is None:
        return {}
    record = {"init_image": edit.init_image, "strength": edit.strength}
    if edit.mask_image is not None:
        record["mask_image"] = edit.mask_image
    return record
