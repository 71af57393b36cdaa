"""Image grids people would rather look at than read: one labelled row per prompt."""

from typing import List, Sequence

from PIL import Image, ImageDraw, ImageFont

TILE = 96  # small samples are enlarged (nearest) so each pixel stays visible
LABEL_WIDTH = 260


def labelled_grid(rows: Sequence[Sequence[Image.Image]], labels: List[str], tile: int = TILE) -> Image.Image:
    """A grid with `labels[i]` written left of row `rows[i]`."""
    cols = max(len(r) for r in rows)
    pad = 4
    grid = Image.new("RGB", (LABEL_WIDTH + cols * (tile + pad), len(rows) * (tile + pad) + pad), (255, 255, 255))
    pen = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=16)
    for i, (row, label) in enumerate(zip(rows, labels)):
        y = pad + i * (tile + pad)
        pen.text((8, y + tile // 2), label, fill=(0, 0, 0), font=font, anchor="lm")
        for j, image in enumerate(row):
            resample = Image.Resampling.NEAREST if image.width < tile else Image.Resampling.LANCZOS
            grid.paste(image.convert("RGB").resize((tile, tile), resample), (LABEL_WIDTH + j * (tile + pad), y))
    return grid
