"""A folder of images with captions, in either of two layouts.

(a) a caption file beside each image, with the same stem:   cat.png + cat.txt
(b) a `metadata.jsonl` at the folder root, one JSON object per line, as Hugging Face's
    `imagefolder`:  {"file_name": "sub/cat.png", "text": "a cat"}  (paths relative to
    the folder; subfolders allowed), or a `metadata.csv` with the columns file_name and
    text (a header row first), as `imagefolder` also reads

Both may be mixed: a metadata line wins over a .txt file.

Control images (ControlNet / T2I-Adapter training, data.conditioning): a metadata line
names its image's control with `conditioning_image` (a path relative to the folder,
in a `conditioning_image` column of a metadata.csv), of the image's size:
  {"file_name": "cat.png", "text": "a cat", "conditioning_image": "edges/cat.png"}
Files named as controls are not training images themselves.

Every problem a user can
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
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ldm.data.buckets import BucketTransform
from ldm.data.skips import note_skip
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


class Entry(NamedTuple):
    """One metadata line; file_name or text is None when the line is malformed; `problem`
    says why its caption cannot be trained on (not UTF-8), the line being otherwise fine."""

    number: int
    file_name: Optional[str]
    text: Optional[str]
    conditioning_image: Optional[str] = None
    problem: Optional[str] = None


def utf8_problem(data: bytes) -> Optional[str]:
    """Why `data` is not UTF-8 text (the first bad byte and where), or None."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})"
    return None


CONTROL = "conditioning_image"


def jsonl_entries(path: Path):
    """The `Entry` of each non-blank line of a metadata.jsonl.

    Lines are decoded one by one: a scraped caption in Latin-1 spoils its own line (its
    caption is skipped and reported), not the whole file.
    """
    raw = path.read_bytes()
    raw = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw  # a Windows editor's byte-order mark
    for number, data in enumerate(raw.split(b"\n"), start=1):
        problem = utf8_problem(data)
        line = data.decode("utf-8", errors="replace")
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            fields = entry["file_name"], entry["text"], entry.get(CONTROL)
        except (ValueError, KeyError, TypeError):  # not JSON, not an object, a key missing
            yield Entry(number, None, None)
            continue
        malformed = fields[2] is not None and not isinstance(fields[2], str)  # a control path must be a string
        yield Entry(number, None, None) if malformed else Entry(number, *fields, problem=problem and f"caption {problem}")


def csv_entries(path: Path):
    """The `Entry` of each row of a metadata.csv with a header row."""
    rows = csv.reader(read_text(path).splitlines())
    header = next(rows, [])
    if "file_name" not in header or "text" not in header:
        raise LdmError(f"{path} must start with a header row naming the columns file_name and text, got {header}")
    name_col, text_col = header.index("file_name"), header.index("text")
    control_col = header.index(CONTROL) if CONTROL in header else None
    for number, row in enumerate(rows, start=2):
        if any(cell.strip() for cell in row):
            ok = len(row) > max(name_col, text_col, control_col or 0)
            control = row[control_col] if ok and control_col is not None and row[control_col].strip() else None
            yield Entry(number, row[name_col] if ok else None, row[text_col] if ok else None, control)


def metadata_file(root: Path) -> Optional[Path]:
    """`root/metadata.jsonl` or `root/metadata.csv`, or None when there is neither."""
    jsonl, table = root / METADATA, root / METADATA_CSV
    if jsonl.is_file() and table.is_file():
        raise LdmError(f"{root} holds both {METADATA} and {METADATA_CSV}: keep one of them")
    return jsonl if jsonl.is_file() else table if table.is_file() else None


def read_entries(path: Optional[Path]) -> List[Entry]:
    if path is None:
        return []
    return list(jsonl_entries(path) if path.name == METADATA else csv_entries(path))


def control_names(entries: List[Entry]) -> set:
    """The relative names of the files the metadata names as control images."""
    return {posixpath.normpath(e.conditioning_image) for e in entries if e.conditioning_image}


def read_metadata(root: Path, images: List[Path], path: Optional[Path], entries: List[Entry]) -> Dict[str, Entry]:
    """The metadata lines (of `path`, already read into `entries`) keyed by the relative name of their image."""
    if path is None:
        return {}
    example = '{"file_name": "cat.png", "text": "a cat"}' if path.name == METADATA else "cat.png,a cat"
    known = {relative_name(root, image) for image in images}
    lines = {}
    for entry in entries:
        number, file_name, text = entry.number, entry.file_name, entry.text
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
        lines[name] = entry._replace(text=text.strip())
    return lines


def load_captions(root: Path, images: List[Path], metadata: Dict[str, Entry]) -> List[Tuple[str, Optional[str]]]:
    """One (caption, problem) per image: its metadata.jsonl line, else the `.txt` file beside it.

    `problem` (None when the caption is fine) says why the caption cannot be trained on:
    not UTF-8, or empty (an image trained with no words at all is a data error, not the
    unconditional case, which caption dropout makes on purpose).
    """
    captions, missing = [], []
    for image in images:
        name, txt = relative_name(root, image), image.with_suffix(".txt")
        if name in metadata:
            text, problem = metadata[name].text, metadata[name].problem
        elif txt.is_file():
            data = txt.read_bytes()
            data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
            problem = utf8_problem(data)
            text = data.decode("utf-8", errors="replace").strip()
            problem = problem and f"caption file {txt.name} {problem}"
        else:
            missing.append(image)
            continue
        captions.append((text, problem or (None if text.strip() else "empty caption")))
    if missing:
        first = missing[0]
        raise LdmError(
            f"{len(missing)} of {len(images)} images in {root} have no caption, the first is {first} "
            f"(add {first.with_suffix('.txt')} or a line "
            f'{{"file_name": "{relative_name(root, first)}", "text": ...}} to {root / METADATA})'
        )
    return captions


def upright_size(path: Path) -> Tuple[int, int]:
    """(width, height) of an image as `load_image` gives it, from its header (no pixel decoding)."""
    with Image.open(path) as image:
        width, height = image.size
        exif = Image.Exif()
        # The EXIF block the header holds (image.getexif() would decode a PNG to look past its pixels).
        if image.info.get("exif"):
            exif.load(image.info["exif"])
        # EXIF orientations 5-8 turn the image a quarter: load_image swaps its sides.
        return (height, width) if exif.get(0x0112, 1) in (5, 6, 7, 8) else (width, height)


def load_controls(root: Path, images: List[Path], metadata: Dict[str, Entry], path: Optional[Path]) -> List[Path]:
    """One control image per image, named by its metadata line, existing and of the image's size."""
    controls, missing = [], []
    for image in images:
        entry = metadata.get(relative_name(root, image))
        if entry is None or not entry.conditioning_image:
            missing.append((image, entry))
            continue
        control = root / posixpath.normpath(entry.conditioning_image)
        if not control.is_file():
            raise LdmError(
                f"{path} line {entry.number} names the conditioning_image '{entry.conditioning_image}', "
                f"which is not a file in {root} (fix the path, relative to the folder, or add the control image)"
            )
        controls.append(control)
    if missing:
        # A line that names its image but no control first: the file with no line may be an unnamed control.
        image, entry = min(missing, key=lambda pair: pair[1] is None)
        name = relative_name(root, image)
        where = f"line {entry.number} of {path} gives it no" if entry else f"{path or root / METADATA} has no line for it with a"
        raise LdmError(
            f"data.conditioning is on but {len(missing)} of {len(images)} images in {root} have no control image, "
            f"the first is {image}: {where} conditioning_image (write its line as "
            f'{{"file_name": "{name}", "text": ..., "conditioning_image": "conditioning/{name}"}}, or set data.conditioning=false)'
        )
    for image, control in zip(images, controls):
        sizes = upright_size(image), upright_size(control)
        if sizes[0] != sizes[1]:
            (w, h), (cw, ch) = sizes
            raise LdmError(
                f"the control image {control} is {cw}x{ch} but its image {image} is {w}x{h} "
                f"(a control must have its image's size: resize or re-make it)"
            )
    return controls


def load_image(path: Path) -> Image.Image:
    """Decode an image, upright (phone photos store their rotation in EXIF)."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image)  # a loaded copy, so the file can close


class ImageFolderDataset(Dataset):
    """Items are {"pixel_values": transform(image), "caption": str}.

    With `conditioning`, `transform` is a `ldm.data.transforms.PairedTransform` and items
    also carry "conditioning_pixel_values" (the control image, cropped and flipped as its
    image, in [0, 1]); `controls` lists the control files in item order.

    With a `ldm.data.buckets.BucketTransform`, items are of their aspect-ratio bucket and
    carry its record (original_size, crop_top_left, target_size); `item_buckets` lists each
    item's bucket, from the image headers read once here (no pixels decoded), and an
    unreadable image is replaced by the next readable one of its bucket. Otherwise
    `item_buckets` is None.

    `samples` lists (path, caption) pairs in item order. `num_skipped` counts the
    unreadable images met so far in this process (each DataLoader worker holds its own
    copy of the data set, so its own count).
    """

    def __init__(self, root, transform: Callable, conditioning: bool = False, bad_captions: str = "skip"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise LdmError(f"data folder not found: {self.root} (set data.path to a folder of images with captions)")
        path = metadata_file(self.root)
        entries = read_entries(path)
        named_controls = control_names(entries)
        images = [image for image in find_images(self.root) if relative_name(self.root, image) not in named_controls]
        if not images:
            raise LdmError(
                f"no images found in {self.root} (expected {', '.join(IMAGE_EXTENSIONS)} files, "
                f"in subfolders too; set data.path to a folder of images with captions)"
            )
        metadata = read_metadata(self.root, images, path, entries)
        # Controls before captions: a control that no line names looks like an image without a caption.
        self.controls: Optional[List[Path]] = load_controls(self.root, images, metadata, path) if conditioning else None
        captions = load_captions(self.root, images, metadata)
        # Bad captions (not UTF-8, empty): skipped and reported, as unreadable images are, or an error.
        self.skipped: List[Tuple[str, str]] = [(str(image), problem) for image, (_, problem) in zip(images, captions) if problem]
        if self.skipped and bad_captions == "error":
            path_, problem = self.skipped[0]
            raise LdmError(f"{len(self.skipped)} images in {self.root} have a bad caption, the first {path_}: {problem} "
                           "(fix it, or set data.bad_captions=skip to skip and report them)")
        keep = [i for i, (_, problem) in enumerate(captions) if not problem]
        if not keep:
            raise LdmError(f"every caption in {self.root} is empty or not UTF-8 (the first: {self.skipped[0][1]})")
        self.samples: List[Tuple[Path, str]] = [(images[i], captions[i][0]) for i in keep]
        if self.controls is not None:
            self.controls = [self.controls[i] for i in keep]
        for path_, problem in self.skipped:
            logger.warning("skipping %s: %s", path_, problem)
        self.transform = transform
        self._unreadable = set()  # indices already found bad: warned once, never decoded again
        self.skip_log: Optional[Path] = None  # the run's skipped.jsonl (set by the training loop; workers inherit it)
        self._header_failures: Dict[int, str] = {}  # bad headers met while bucketing, named in skipped.jsonl when met
        self.item_buckets: Optional[List[int]] = None
        if isinstance(transform, BucketTransform):
            self.item_buckets = [self.header_bucket(i) for i in range(len(self.samples))]

    def header_bucket(self, i: int) -> int:
        """Item i's bucket from its image header; an unreadable header marks the item unreadable."""
        path = self.samples[i][0]
        try:
            return self.transform.bucket_of(upright_size(path))
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds on bad files; decoding would fail too
            self._unreadable.add(i)
            self._header_failures[i] = f"unreadable image ({type(e).__name__}: {e})"
            return self.transform.bucket_of((1, 1))

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
                if i in self._header_failures:  # found while bucketing, before the run's skip report existed
                    note_skip(self.skip_log, str(self.samples[i][0]), self._header_failures.pop(i), logger)
                continue
            if self.item_buckets is not None and self.item_buckets[i] != self.item_buckets[index]:
                continue  # a batch holds one bucket: the stand-in must be of it
            path, caption = self.samples[i]
            files, loaded = [path] if self.controls is None else [path, self.controls[i]], []
            try:
                for file in files:
                    loaded.append(load_image(file))
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
                self._unreadable.add(i)
                note_skip(self.skip_log, str(file), f"unreadable image ({type(e).__name__}: {e})", logger)
                continue
            if self.item_buckets is not None:
                return {**self.transform(*loaded, bucket=self.item_buckets[i]), "caption": caption}
            if self.controls is None:
                return {"pixel_values": self.transform(loaded[0]), "caption": caption}
            pixels, control = self.transform(*loaded)
            return {"pixel_values": pixels, "caption": caption, "conditioning_pixel_values": control}
        raise LdmError(f"every image in {self.root} is unreadable (check the files open in an image viewer)")
