"""Image files: sample archives (.npz) and grids (.png), written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from mosaic_core.atomic import write_bytes


def save_samples(path: str | Path, images: np.ndarray, labels: np.ndarray, **extra: np.ndarray) -> None:
    """Write `images` (uint8 N×H×W×C) and `labels` (int N) — plus any `extra` arrays — to an .npz."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
        raise ValueError(f"expected uint8 N×H×W×C images and N labels, got {images.dtype} {images.shape}, {labels.shape}")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=images, labels=labels.astype(np.int64), **extra)
    write_bytes(path, buffer.getvalue())


def load_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read (images, labels) from a sample archive."""
    with np.load(path) as data:
        return data["images"], data["labels"]


def image_grid(images: np.ndarray, columns: int = 10, scale: int = 4, pad: int = 2) -> np.ndarray:
    """Tile uint8 N×H×W×C images into one H'×W'×3 uint8 grid, each upscaled `scale`× (nearest)."""
    images = np.asarray(images)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"expected a non-empty N×H×W×C array, got shape {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, _ = images.shape
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = image
    return grid


def save_grid(path: str | Path, images: np.ndarray, columns: int = 10, scale: int = 4) -> None:
    """Write an image grid as PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image_grid(images, columns, scale)).save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())
