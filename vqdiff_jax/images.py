"""Image grids saved as PNG files."""

import os

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Convert float images in [-1, 1] to uint8 [0, 255]; uint8 input is returned as is."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, *, num_columns: int, padding: int = 2) -> np.ndarray:
    """Tile images [N, H, W, C] row by row into one uint8 image [rows*(H+p)+p, ...]."""
    images = to_uint8(images)
    n, h, w, c = images.shape
    num_columns = max(1, min(num_columns, n))
    num_rows = -(-n // num_columns)
    grid = np.full(
        (num_rows * (h + padding) + padding, num_columns * (w + padding) + padding, c),
        255, np.uint8,
    )
    for i in range(n):
        row, col = divmod(i, num_columns)
        top, left = padding + row * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = images[i]
    return grid


def save_grid(path: str, images: np.ndarray, *, num_columns: int, scale: int = 1) -> str:
    """Save images [N, H, W, C] (float in [-1, 1] or uint8) as a PNG grid at `path`."""
    grid = make_grid(images, num_columns=num_columns)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    image = Image.fromarray(grid)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)
    return path
