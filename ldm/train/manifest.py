"""A checkpoint's manifest: every file with its size and sha256, written last.

A checkpoint is restored only once it has been checked as a whole: every file the
manifest names is there with its size and hash, nothing else is there, and each file
reads back as what its name says (safetensors header, JSON, a tensor-only torch file,
loaded with `weights_only=True`). So a missing, truncated, corrupt or foreign part
is refused in one line naming the file, before anything is restored, and no file of a
checkpoint is ever unpickled with code execution allowed (a checkpoint folder is
untrusted input: it may have been copied from anywhere).
"""

import hashlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Dict

from ldm.errors import LdmError

MANIFEST = "manifest.json"
TORCH_FILES = (".bin", ".pt", ".pth", ".pkl")  # accelerate's torch.save files: tensors and plain data only
# An FSDP checkpoint's sharded folders (torch.distributed.checkpoint): *.distcp data files, read by
# torch with weights_only=True, and one .metadata file that torch reads with plain pickle.load.
DCP_METADATA = ".metadata"


class DcpMetadataUnpickler(pickle.Unpickler):
    """Reads a torch.distributed.checkpoint .metadata file allowing only the classes such a file holds
    (its dataclasses, torch.Size, dtypes, paths): a crafted one is refused before torch unpickles it."""

    DCP = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    NAMES = {"Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata",
             "TensorProperties", "StorageMeta", "_StorageInfo", "_MEM_FORMAT_ENCODING"}

    def find_class(self, module, name):
        import torch

        if module in self.DCP and name in self.NAMES:
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) in {("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                              ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_of(folder: Path) -> Dict[str, Path]:
    """Every file under `folder` (sharded states are subfolders) by its relative path, the manifest aside."""
    found = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}
    found.pop(MANIFEST, None)
    return found


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to disk (before the rename that publishes it)."""
    for path in sorted(folder.rglob("*"), reverse=True) + [folder]:
        if path.is_symlink():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_manifest(folder) -> Path:
    """List every file of the finished `folder` (size, sha256), flush everything, then write the manifest."""
    folder = Path(folder)
    entries = {name: {"size": path.stat().st_size, "sha256": sha256(path)} for name, path in files_of(folder).items()}
    fsync_tree(folder)
    manifest = folder / MANIFEST
    with open(manifest, "w") as f:
        f.write(json.dumps({"files": entries}, indent=1))
        f.flush()
        os.fsync(f.fileno())
    return manifest


def problem_of(folder: Path) -> "tuple[str, str] | None":
    """(file, what is wrong) for the first problem of checkpoint `folder`, or None when it is whole."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return MANIFEST, "missing (the checkpoint was not finished, or was written by an older version)"
    try:
        entries = json.loads(manifest.read_text())["files"]
        assert isinstance(entries, dict) and all({"size", "sha256"} <= set(e) for e in entries.values())
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
        return MANIFEST, "unreadable (not the JSON manifest this project writes)"
    present = files_of(folder)
    for name in present:
        if name not in entries:
            return name, "not part of the checkpoint (a foreign file)"
        if present[name].is_symlink():
            return name, "a symbolic link (a checkpoint holds plain files only)"
    for name, entry in entries.items():
        path = folder / name
        if name not in present:
            return name, "missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return name, f"{size} bytes instead of {entry['size']} (truncated or overwritten)"
        if sha256(path) != entry["sha256"]:
            return name, "its sha256 does not match the manifest (corrupt)"
    for name, path in present.items():
        if "/" in name and path.name != DCP_METADATA:
            continue  # a sharded or DeepSpeed state folder: read by its own loader (hash-checked above)
        problem = format_problem(path)
        if problem:
            return name, problem
    return None


def format_problem(path: Path) -> "str | None":
    """What is wrong with the contents of one file, judged by its suffix (None: it reads back)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                list(f.keys())
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.name == DCP_METADATA:
            DcpMetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        elif path.suffix == ".yaml":  # the run's config (changes.py): plain YAML, no tags that build objects
            import yaml

            yaml.safe_load(path.read_text())
        elif path.suffix in TORCH_FILES:
            from accelerate.utils import load  # torch.load with weights_only=True and accelerate's safe globals

            load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is the refusal; the reason is kept short
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        return f"unreadable as {path.suffix or path.name} ({type(e).__name__}: {reason}); nothing is unpickled beyond plain tensors"
    return None
