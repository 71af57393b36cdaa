"""A contact sheet of a sampling run: one row per prompt line, labelled "line: prompt".

Built on `ldm.grid.labelled_grid`; long prompts are cut to the label column (with "…")
so they never run over the thumbnails, and very long files show their first rows only,
so the sheet stays an image a viewer opens.
"""

from typing import List, Sequence

from PIL import Image, ImageFont

from ldm.grid import LABEL_WIDTH, TILE, labelled_grid

MAX_ROWS = 100
FONT_SIZE = 16  # labelled_grid's font


def fit_label(text: str, width: int = LABEL_WIDTH - 16, font=None) -> str:
    """`text` on one line, cut with '…' to at most `width` pixels in the grid's font."""
    font = font or ImageFont.load_default(size=FONT_SIZE)
    text = " ".join(text.split())
    if font.getlength(text) <= width:
        return text
    text = text[: width // 3]  # no glyph is under 3 px wide: a bound before measuring char by char
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text.rstrip() + "…"


def thumbnail(path, tile: int = TILE) -> Image.Image:
    """The image at `path`, shrunk to about the tile size (small ones are left for the grid to enlarge)."""
    with Image.open(path) as image:
        image = image.convert("RGB")
    image.thumbnail((2 * tile, 2 * tile))
    return image


def contact_sheet(rows: Sequence[Sequence[Image.Image]], labels: List[str], max_rows: int = MAX_ROWS) -> Image.Image:
    """Thumbnails in labelled rows; at most `max_rows` rows."""
    font = ImageFont.load_default(size=FONT_SIZE)
    return labelled_grid(list(rows)[:max_rows], [fit_label(label, font=font) for label in labels[:max_rows]])
