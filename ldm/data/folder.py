"""A folder of images with captions, in either of two layouts.

(a) a caption file beside each image, with the same stem:   cat.png + cat.txt
(b) a `metadata.jsonl` at the folder root, one JSON object per line, as Hugging Face's
    `imagefolder`:  {"file_name": "sub/cat.png", "text": "a cat"}  (paths relative to
    the folder; subfolders allowed), or a `metadata.csv` with the columns file_name and
    text (a header row first), as `imagefolder` also reads

Both may be mixed: a metadata line wins over a .txt file. Every problem a user can
fix (no folder, no images, an image with no caption, a bad metadata line) is raised at
construction, before training starts. A file that turns out to be unreadable only when
it is decoded is skipped (with a warning) instead, so that one bad JPEG never ends a
run hours in.
"""

import csv
import json
import logging
import posixpath
from pathlib import Path
from typing import Callable, Dict, List, Tuple

from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ldm.errors import LdmError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"
METADATA_CSV = "metadata.csv"


def relative_name(root: Path, image: Path) -> str:
    """How metadata.jsonl names an image: its path relative to the folder, with '/'."""
    return image.relative_to(root).as_posix()


def find_images(root: Path) -> List[Path]:
    """Image files under `root`, recursively, sorted by relative path (stable across machines).

    Hidden files and folders are left out: macOS `._cat.png` files and
    `.ipynb_checkpoints/` look like images but are not the data set.
    """
    found = [
        path for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    ]
    return sorted(found, key=lambda path: relative_name(root, path))


def read_text(path: Path) -> str:
    # utf-8-sig: Windows editors start files with a byte-order mark, which json rejects.
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise LdmError(f"{path} is not UTF-8 text (save it with UTF-8 encoding)") from None


def jsonl_entries(path: Path):
    """(line number, file_name, text) of each non-blank line of a metadata.jsonl."""
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            yield number, entry["file_name"], entry["text"]
        except (ValueError, KeyError, TypeError):  # not JSON, not an object, a key missing
            yield number, None, None


def csv_entries(path: Path):
    """(line number, file_name, text) of each row of a metadata.csv with a header row."""
    rows = csv.reader(read_text(path).splitlines())
    header = next(rows, [])
    if "file_name" not in header or "text" not in header:
        raise LdmError(f"{path} must start with a header row naming the columns file_name and text, got {header}")
    name_col, text_col = header.index("file_name"), header.index("text")
    for number, row in enumerate(rows, start=2):
        if any(cell.strip() for cell in row):
            ok = len(row) > max(name_col, text_col)
            yield number, row[name_col] if ok else None, row[text_col] if ok else None


def read_metadata(root: Path, images: List[Path]) -> Dict[str, str]:
    """Captions from `root/metadata.jsonl` or `metadata.csv` (empty when neither exists), keyed by relative name."""
    jsonl, table = root / METADATA, root / METADATA_CSV
    if jsonl.is_file() and table.is_file():
        raise LdmError(f"{root} holds both {METADATA} and {METADATA_CSV}: keep one of them")
    path = jsonl if jsonl.is_file() else table
    if not path.is_file():
        return {}
    entries = jsonl_entries(path) if path == jsonl else csv_entries(path)
    example = '{"file_name": "cat.png", "text": "a cat"}' if path == jsonl else "cat.png,a cat"
    known = {relative_name(root, image) for image in images}
    captions = {}
    for number, file_name, text in entries:
        if not isinstance(file_name, str) or not isinstance(text, str):
            raise LdmError(
                f"{path} line {number} is malformed: each line must give a string file_name and text, like {example}"
            )
        name = posixpath.normpath(file_name)  # "./a/b.png" and "a//b.png" name "a/b.png"
        if name not in known:
            raise LdmError(
                f"{path} line {number} names '{file_name}', which is not an image in {root} "
                f"(fix the file_name or add the image; extensions: {', '.join(IMAGE_EXTENSIONS)})"
            )
        captions[name] = text.strip()
    return captions


def load_captions(root: Path, images: List[Path]) -> List[str]:
    """One caption per image: its metadata.jsonl line, else the `.txt` file beside it."""
    metadata = read_metadata(root, images)
    captions, missing = [], []
    for image in images:
        name, txt = relative_name(root, image), image.with_suffix(".txt")
        if name in metadata:
            captions.append(metadata[name])
        elif txt.is_file():
            captions.append(read_text(txt).strip())
        else:
            missing.append(image)
    if missing:
        first = missing[0]
        raise LdmError(
            f"{len(missing)} of {len(images)} images in {root} have no caption, the first is {first} "
            f"(add {first.with_suffix('.txt')} or a line "
            f'{{"file_name": "{relative_name(root, first)}", "text": ...}} to {root / METADATA})'
        )
    return captions


def load_image(path: Path) -> Image.Image:
    """Decode an image, upright (phone photos store their rotation in EXIF)."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image)  # a loaded copy, so the file can close


class ImageFolderDataset(Dataset):
    """Items are {"pixel_values": transform(image), "caption": str}.

    `samples` lists (path, caption) pairs in item order. `num_skipped` counts the
    unreadable images met so far in this process (each DataLoader worker holds its own
    copy of the data set, so its own count).
    """

    def __init__(self, root, transform: Callable):
        self.root = Path(root)
        if not self.root.is_dir():
            raise LdmError(f"data folder not found: {self.root} (set data.path to a folder of images with captions)")
        images = find_images(self.root)
        if not images:
            raise LdmError(
                f"no images found in {self.root} (expected {', '.join(IMAGE_EXTENSIONS)} files, "
                f"in subfolders too; set data.path to a folder of images with captions)"
            )
        self.samples: List[Tuple[Path, str]] = list(zip(images, load_captions(self.root, images)))
        self.transform = transform
        self._unreadable = set()  # indices already found bad: warned once, never decoded again

    @property
    def num_skipped(self) -> int:
        return len(self._unreadable)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        # A bad file is replaced by the next readable one, so a batch keeps its size.
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            if i in self._unreadable:
                continue
            path, caption = self.samples[i]
            try:
                image = load_image(path)
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
                self._unreadable.add(i)
                logger.warning("skipping unreadable image %s (%s: %s)", path, type(e).__name__, e)
                continue
            return {"pixel_values": self.transform(image), "caption": caption}
        raise LdmError(f"every image in {self.root} is unreadable (check the files open in an image viewer)")
