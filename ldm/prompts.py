"""Prompt files for `ldm-sample`: `.txt` (one prompt a line) or `.jsonl` (one object a line).

Every record keeps its 1-based line number: outputs are named from it, and every error
names it. The whole file is read and checked before any image is made, so a typo on
line 900 does not surface after an hour of sampling.

For conditional control a .jsonl line names its control image, `"image": "edges/1.png"`
(relative to the prompt file's folder; a list of paths for several ControlNets), and may
set `controlnet_conditioning_scale` / `adapter_conditioning_scale` (a number, or a list).
For img2img a line names its start image, `"init_image": "photos/1.png"`, and may set
`"strength"` (in (0, 1]); with `"mask_image"` too it is inpainted (white: repaint).
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

from ldm.errors import LdmError

# Per-line fields a .jsonl record may set: the types they may have, and those in words.
FIELDS = {
    "prompt": ((str,), "a string"),
    "negative_prompt": ((str,), "a string"),
    "seed": ((int,), "an integer"),
    "guidance_scale": ((int, float), "a number"),
    "num_inference_steps": ((int,), "an integer"),
    "image": ((str, list), "a path or a list of paths"),
    "controlnet_conditioning_scale": ((int, float, list), "a number or a list of numbers"),
    "adapter_conditioning_scale": ((int, float, list), "a number or a list of numbers"),
    "init_image": ((str,), "a path"),
    "mask_image": ((str,), "a path"),
    "strength": ((int, float), "a number in (0, 1]"),
}
# What the items of a list-valued field must be.
LIST_ITEMS = {
    "image": ((str,), "paths"),
    "controlnet_conditioning_scale": ((int, float), "numbers"),
    "adapter_conditioning_scale": ((int, float), "numbers"),
}


@dataclass
class PromptRecord:
    line: int  # 1-based line number in the prompt file
    prompt: str
    negative_prompt: Optional[str] = None
    seed: Optional[int] = None
    guidance_scale: Optional[float] = None
    num_inference_steps: Optional[int] = None
    image: Optional[List[str]] = None  # control image paths, resolved against the prompt file's folder
    controlnet_conditioning_scale: Optional[Union[float, List[float]]] = None
    adapter_conditioning_scale: Optional[Union[float, List[float]]] = None
    init_image: Optional[str] = None  # img2img start image, resolved against the prompt file's folder
    mask_image: Optional[str] = None  # inpainting mask (white: repaint), likewise
    strength: Optional[float] = None


def _lines(path: Path):
    """(line number, text) of every line.

    A BOM is dropped; CRLF (and CR) become LF, as text mode reads them. Splitting on LF only
    (not str.splitlines, which also splits on form feeds and U+2028) keeps line numbers as
    editors count them. Text that is not UTF-8 and NUL bytes are refused with their line.
    """
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):  # a BOM: utf-8-sig's error offsets count from after it
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1  # editors show lines, not byte offsets
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise LdmError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}, byte offset {e.start}; "
            "Latin-1 or Windows-1252?): save it as UTF-8"
        ) from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # as text mode reads CRLF and CR
    for number, line in enumerate(lines, start=1):
        if "\x00" in line:  # kept, it would end up in file names' manifest and PNG metadata unseen
            raise LdmError(f"{path}, line {number}: a NUL byte (\\x00) in the text (a binary or UTF-16 file?): remove it")
    return enumerate(lines, start=1)


def _txt_records(path: Path) -> List[PromptRecord]:
    records = []
    for number, line in _lines(path):
        line = line.strip()
        if line and not line.startswith("#"):
            records.append(PromptRecord(line=number, prompt=line))
    return records


def _check_field(path, number, key, value) -> None:
    if key not in FIELDS:
        raise LdmError(f"{path}, line {number}: unknown key '{key}' (allowed: {', '.join(FIELDS)})")
    # bool is an int in Python; a JSON true is never a seed or a step count.
    types, words = FIELDS[key]
    if isinstance(value, bool) or not isinstance(value, types):
        raise LdmError(f"{path}, line {number}: '{key}' must be {words}, got {json.dumps(value, ensure_ascii=False)}")
    # json reads NaN, Infinity and -Infinity: a NaN guidance scale silently turned guidance off.
    if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
        raise LdmError(f"{path}, line {number}: '{key}' must be a finite number, got {json.dumps(value)}")
    if isinstance(value, list):
        types, words = LIST_ITEMS[key]
        if not value or any(isinstance(v, bool) or not isinstance(v, types) for v in value):
            raise LdmError(f"{path}, line {number}: '{key}' must be a non-empty list of {words}, got {json.dumps(value, ensure_ascii=False)}")
    if key == "image" and not all(p.strip() for p in ([value] if isinstance(value, str) else value)):
        raise LdmError(f"{path}, line {number}: 'image' is empty: give the control image's path")


def _check_edit_fields(path, number, obj) -> None:
    """img2img / inpainting fields: a mask or a strength needs an init_image; strength in (0, 1]."""
    for key in ("mask_image", "strength"):
        if key in obj and "init_image" not in obj:
            raise LdmError(f"{path}, line {number}: '{key}' needs \"init_image\" (the image to start from)")
    if "strength" in obj and not 0.0 < obj["strength"] <= 1.0:
        raise LdmError(f"{path}, line {number}: strength must be in (0, 1] (1: start from noise), got {obj['strength']}")
    for key in ("init_image", "mask_image"):
        if key in obj and not obj[key].strip():
            raise LdmError(f"{path}, line {number}: '{key}' is empty: give the image's path")


def _jsonl_records(path: Path) -> List[PromptRecord]:
    records = []
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LdmError(f"{path}, line {number}: malformed JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise LdmError(f"{path}, line {number}: expected a JSON object like {{\"prompt\": \"a red circle\"}}")
        for key, value in obj.items():
            _check_field(path, number, key, value)
            if isinstance(value, str) and "\x00" in value:  # a \u0000 escape
                raise LdmError(f"{path}, line {number}: a NUL character (\\u0000) in '{key}': remove it")
        if not obj.get("prompt", "").strip():
            raise LdmError(f"{path}, line {number}: missing or empty \"prompt\"")
        if obj.get("num_inference_steps", 1) < 1:
            raise LdmError(f"{path}, line {number}: num_inference_steps must be at least 1")
        _check_edit_fields(path, number, obj)
        for key in ("init_image", "mask_image"):
            if key in obj:
                obj[key] = str(path.parent / obj[key])
        if "image" in obj:
            images = [obj["image"]] if isinstance(obj["image"], str) else obj["image"]
            obj["image"] = [str(path.parent / p) for p in images]  # an absolute path stays as it is
        records.append(PromptRecord(line=number, **obj))
    return records


def read_prompts(path) -> List[PromptRecord]:
    """All prompt records of a .txt or .jsonl file, checked; an `LdmError` names any bad line."""
    path = Path(path)
    if not path.is_file():
        raise LdmError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise LdmError(f"{path}: unknown prompt file type '{suffix}' (use .txt, one prompt a line, or .jsonl)")
    records = _txt_records(path) if suffix == ".txt" else _jsonl_records(path)
    if not records:
        raise LdmError(f"no prompts in {path} (blank lines and # comments are skipped)")
    return records
