"""ldm-sample's conditional control: --controlnet / --adapter folders and each line's control image.

A .jsonl line names its control image (`"image": "path"`, relative to the prompt file's
folder; a list of paths with several ControlNets) and may set its scale. Every line is
checked (an image for each control model, on disk, of the images' size) before any image
is made, and each error names the line.
"""

from pathlib import Path
from typing import List, Optional

from ldm.errors import LdmError

KINDS = {"controlnet": "ControlNet", "adapter": "T2I-Adapter"}


def control_kind(args) -> Optional[str]:
    """"controlnet", "adapter", or None."""
    return "controlnet" if args.controlnet else "adapter" if args.adapter else None


def control_dirs(args) -> List[str]:
    return list(args.controlnet or args.adapter or [])


def check_control_args(args) -> None:
    """The control model folders: one kind, each a saved diffusers model (config.json)."""
    if args.controlnet and args.adapter:
        raise LdmError("give --controlnet or --adapter, not both")
    for folder in control_dirs(args):
        flag = "--" + control_kind(args)
        if not Path(folder).is_dir():
            raise LdmError(f"{flag} {folder}: no such folder (a {KINDS[control_kind(args)]} saved by save_pretrained)")
        if not (Path(folder) / "config.json").is_file():
            raise LdmError(f"{flag} {folder} has no config.json: is it a folder saved by save_pretrained?")


def scale_field(kind: Optional[str]) -> Optional[str]:
    return None if kind is None else f"{kind}_conditioning_scale"


def check_control_lines(records, args) -> None:
    """Each line has one existing control image per control model (with control), or none (without)."""
    kind, count, prompts = control_kind(args), len(control_dirs(args)), args.prompts
    for r in records:
        for field in ("controlnet_conditioning_scale", "adapter_conditioning_scale"):
            if getattr(r, field) is not None and field != scale_field(kind):
                raise LdmError(f"{prompts}, line {r.line} sets {field} but no --{field.split('_')[0]} was given")
        if kind is None:
            if r.image is not None:
                raise LdmError(f"{prompts}, line {r.line} sets \"image\" but no --controlnet or --adapter was given")
            continue
        if r.image is None:
            how = "a .txt prompt file gives none: use a .jsonl file" if Path(prompts).suffix.lower() == ".txt" else "add"
            raise LdmError(f"{prompts}, line {r.line}: no control image for the {KINDS[kind]}; {how} "
                           f"with {{\"prompt\": ..., \"image\": \"path\"}} lines")
        if len(r.image) != count:
            raise LdmError(f"{prompts}, line {r.line}: {len(r.image)} control images for {count} {KINDS[kind]}s: "
                           f"give one path per --{kind}, in their order")
        scale = getattr(r, scale_field(kind))
        if isinstance(scale, list) and len(scale) != count:
            raise LdmError(f"{prompts}, line {r.line}: {scale_field(kind)} has {len(scale)} values for {count} "
                           f"{KINDS[kind]}s: give one number, or one per --{kind}")
        for path in r.image:
            if not Path(path).is_file():
                raise LdmError(f"{prompts}, line {r.line}: control image not found: {path} "
                               f"(paths are relative to the prompt file's folder)")


def line_scale(record, args):
    """The line's control scale (hashable, for batching), or None for the pipeline's default of 1."""
    scale = getattr(record, scale_field(control_kind(args)), None) if control_kind(args) else None
    return tuple(scale) if isinstance(scale, list) else scale


def load_control_models(args) -> dict:
    """{"controlnet": model or list} or {"adapter": ...} for `from_pretrained`, or {}."""
    kind = control_kind(args)
    if kind is None:
        return {}
    from diffusers import ControlNetModel, T2IAdapter

    cls = ControlNetModel if kind == "controlnet" else T2IAdapter
    models = [cls.from_pretrained(folder) for folder in control_dirs(args)]
    return {kind: models[0] if len(models) == 1 else models}


def check_control_sizes(jobs, args, height: int, width: int) -> None:
    """Every control image of `jobs` is height x width (read from the file headers, before any image is made)."""
    import PIL.Image

    for job in jobs:
        for path in job.record.image or []:
            try:
                with PIL.Image.open(path) as image:
                    w, h = image.size
            except OSError as e:
                raise LdmError(f"{args.prompts}, line {job.record.line}: cannot read control image {path} ({e})") from None
            if (h, w) != (height, width):
                raise LdmError(
                    f"{args.prompts}, line {job.record.line}: control image {path} is {h}x{w} (height x width) but "
                    f"the images are {height}x{width} (--height/--width, default the model's): give {height}x{width} "
                    f"control images or set --height {h} --width {w}"
                )


def control_call_args(batch, pipe) -> dict:
    """`image=` (and the scale) of one pipeline call: per prompt, one image per control model."""
    import PIL.Image

    adapter = pipe.adapter
    mode = "L" if adapter is not None and getattr(adapter.config, "in_channels", 3) == 1 else "RGB"
    kind = "controlnet" if pipe.controlnet is not None else "adapter"

    def load(path):
        with PIL.Image.open(path) as image:
            return image.convert(mode)

    images = [[load(path) for path in job.record.image] for job in batch]
    # One control model: a list of one image per prompt; several: per prompt a list of one per model.
    kwargs = {"image": [one[0] for one in images] if len(images[0]) == 1 else images}
    if batch[0].control_scale is not None:
        scale = batch[0].control_scale
        kwargs[f"{kind}_conditioning_scale"] = list(scale) if isinstance(scale, tuple) else float(scale)
    return kwargs
