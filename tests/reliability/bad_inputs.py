"""Shared pieces of reliability families R5, R6, R8 and R10 (issue 10): hostile inputs and the
tiny runs they are fed to. Reuses the helpers of the unit tests of each fix (tests/test_*.py)
rather than copying them; what is new here is the hostile data itself."""

import json
import struct
import zlib
from pathlib import Path

from test_data_folder import write_image  # noqa: F401  (re-exported for the families)
from test_disk_faults import tiny as tiny_vae_args  # noqa: F401
from test_nonfinite import nonfinite_tensors, records, toy_stage  # noqa: F401


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def decompression_bomb(path: Path, side: int = 20_000) -> Path:
    """A ~50 kB PNG that claims side x side pixels (400 M at 20,000: over twice PIL's
    MAX_IMAGE_PIXELS, so PIL refuses it as a decompression bomb) and whose zlib stream
    really inflates to that many 1-bit pixels (50 MB here; 8-bit RGB would be 1.2 GB)."""
    row = b"\x00" + b"\x00" * (side // 8)  # filter byte 0, then side 1-bit pixels
    compress = zlib.compressobj(9)
    data = b"".join(compress.compress(row) for _ in range(side)) + compress.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b""))
    return path


def bad_data_folder(root: Path, total: int = 100):
    """`total` captioned 16x16 images (R5): 5% bad images (3 corrupt, 2 truncated), 2% bad
    captions (1 empty, 1 Latin-1), one decompression bomb. Returns {path: kind} of the bad ones."""
    root.mkdir(parents=True, exist_ok=True)
    bad = {}
    for i in range(total):
        path = root / f"{i:03d}.png"
        write_image(path, seed=i)
        (root / f"{i:03d}.txt").write_text(f"picture {i}\n")
    for i in (7, 31, 64):
        (root / f"{i:03d}.png").write_bytes(bytes(range(256)) * 3)
        bad[str(root / f"{i:03d}.png")] = "corrupt"
    for i in (12, 88):
        data = (root / f"{i:03d}.png").read_bytes()
        (root / f"{i:03d}.png").write_bytes(data[: len(data) // 2])
        bad[str(root / f"{i:03d}.png")] = "truncated"
    decompression_bomb(root / "050.png")
    bad[str(root / "050.png")] = "bomb"
    (root / "020.txt").write_text("   \n")
    bad[str(root / "020.png")] = "empty caption"
    (root / "077.txt").write_bytes("une cam\u00e9ra\n".encode("latin-1"))
    bad[str(root / "077.png")] = "Latin-1 caption"
    return bad


def skip_report(run: Path) -> dict:
    """{path: reason} of run/skipped.jsonl, each path once (duplicates fail the test that reads it)."""
    rows = [json.loads(line) for line in (run / "skipped.jsonl").read_text().splitlines()]
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), paths
    return {r["path"]: r["reason"] for r in rows}


def poisoned(function, calls, value=float("nan"), pick=lambda out: out, put=lambda out, x: x):
    """`function`, whose result is multiplied by `value` (NaN) on the 1-based call numbers in
    `calls` (a set, or a callable taking the call number). `pick`/`put` get and set the tensor
    in a result that is not one (a (loss, parts) pair)."""
    count = [0]
    hit = calls if callable(calls) else calls.__contains__

    def wrapper(*args, **kwargs):
        count[0] += 1
        out = function(*args, **kwargs)
        return put(out, pick(out) * value) if hit(count[0]) else out

    wrapper.calls = count
    return wrapper


def error_lines(err: str):
    """The non-blank stderr lines, and the `error: ` ones among them."""
    lines = [line for line in err.splitlines() if line.strip()]
    return lines, [line for line in lines if line.startswith("error: ")]


def one_line_error(err: str):
    """The run's one `error: ` line, when it is the last line and there is no traceback; else None."""
    lines, errors = error_lines(err)
    ok = len(errors) == 1 and lines[-1] == errors[0] and not any("Traceback" in line for line in lines)
    return errors[0] if ok else None


def remount(folder: Path, options: str) -> None:
    """Change a mounted tmpfs's options in place (its files stay): `ro`, `rw`, `size=8m`."""
    import subprocess

    done = subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def tensors_of(folder: Path) -> dict:
    """Every tensor of every safetensors file under `folder`, keyed by relative path and name."""
    from safetensors.torch import load_file

    return {f"{p.relative_to(folder)}:{k}": v for p in sorted(folder.rglob("*.safetensors")) for k, v in load_file(str(p)).items()}
