"""What ldm-sample writes to disk, written so that a kill at any instant loses at most one image.

- A PNG is written to a temporary name and renamed: a reader sees a whole file or none.
  Its text chunks carry the prompt and settings, so an image found alone still says
  how it was made.
- Every shard appends one JSON line per finished image to its own manifest (two
  processes never write one file). An image counts as done when some manifest lists it
  and it is on disk; a torn last line from a kill is cut off before appending again.
"""

import json
import os
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

MANIFEST_GLOB = "manifest*.jsonl"


def manifest_name(shard_suffix: str) -> str:
    """manifest.jsonl for a whole file, manifest-shardI-of-N.jsonl for a shard."""
    return f"manifest{shard_suffix}.jsonl"


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def read_manifests(outdir: Path) -> set:
    """Files any manifest in `outdir` records (any shard count); torn lines are ignored."""
    recorded = set()
    for manifest in sorted(outdir.glob(MANIFEST_GLOB)):
        for line in manifest.read_text(encoding="utf-8").splitlines():
            try:
                recorded.add(json.loads(line)["file"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return recorded


def is_done(outdir: Path, file: str, recorded: set) -> bool:
    # Non-empty: a file renamed into place but never flushed before a power cut can be empty.
    path = outdir / file
    return file in recorded and path.is_file() and path.stat().st_size > 0


def cut_torn_tail(manifest: Path) -> None:
    """Drop a last line without its newline (a kill mid-append), so the next record starts on its own line."""
    if not manifest.is_file():
        return
    data = manifest.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(manifest, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def append_record(manifest: Path, record: dict) -> None:
    # One short write per record, flushed on close; lines stay whole under SIGKILL.
    with open(manifest, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def remove_stale_temps(outdir: Path, files) -> None:
    """Temporary files a killed run left for `files` (only this shard's: others may be writing theirs)."""
    for file in files:
        temp_path(outdir / file).unlink(missing_ok=True)


def png_info(settings: dict) -> PngInfo:
    """PNG text chunks: each setting on its own (as viewers list them) and all of them as JSON."""
    info = PngInfo()
    for key, value in settings.items():
        info.add_itxt(key, "" if value is None else str(value))
    info.add_itxt("parameters", json.dumps(settings, ensure_ascii=False))
    return info


def save_png(image, path: Path, settings: dict = None) -> None:
    """Write through a temporary file and rename, so a crash never leaves a truncated PNG."""
    tmp = temp_path(path)
    image.save(tmp, format="PNG", pnginfo=png_info(settings) if settings else None)
    os.replace(tmp, path)
