"""The synthetic set as one picture: a mosaic of its images by class, and that mosaic as PNG bytes.

Plain torch, einops and Pillow (no plotly), so the command line can write ``grid.png`` with the core
install; :func:`mtt_lab.viz.image_grid` draws the same mosaic as a figure, and the dashboards show
:func:`grid_png` live.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import Tensor

from .data import ImageDataset


def class_of(labels: Tensor | int | None, n: int, num_classes: int) -> Tensor:
    """The class of each of ``n`` images, ``[n]`` int64.

    labels: hard labels ``[n]``, soft labels ``[n, C]`` (argmax), an ``ipc`` (images grouped by
    class, ``ipc`` each, as a :class:`~mtt_lab.distill.Distiller` holds them) or ``None`` (the
    ipc is ``n // num_classes``).
    """
    if labels is None or isinstance(labels, int):
        ipc = labels or n // num_classes
        if ipc < 1 or ipc * num_classes != n:
            raise ValueError(f"{n} images are not {num_classes} classes x ipc={ipc}; pass the labels instead")
        return torch.arange(num_classes).repeat_interleave(ipc)
    labels = labels.detach().cpu()
    return labels.argmax(dim=1) if labels.ndim == 2 else labels.long()


def mosaic_shape(num_classes: int, per_class: int) -> tuple[int, int]:
    """(rows, columns) of image cells: classes x ``per_class``, except one image per class.

    With one image per class a single column would be tall and thin, so the classes wrap into a
    block about 2.5 times as wide as tall: 2 x 5 for ten classes.
    """
    if per_class > 1:
        return num_classes, per_class
    columns = min(num_classes, math.ceil(math.sqrt(2.5 * num_classes)))
    return math.ceil(num_classes / columns), columns


def mosaic(images: Tensor, dataset: ImageDataset, labels: Tensor | int | None = None, pad: int = 1,
           background: float = 1.0) -> np.ndarray:
    """The synthetic set as one picture, ``pad`` pixels of ``background`` between images.

    images: model-space ``[n, c, h, w]`` (denormalised with ``dataset``, ZCA undone); labels: see
    :func:`class_of`. With K images in the largest class, K > 1 gives one row per class, its images
    left to right; K = 1 wraps the classes row by row into :func:`mosaic_shape` (2 x 5 for ten).
    Returns float32 ``[R * (h + pad) - pad, Q * (w + pad) - pad, c]`` in [0, 1] for R x Q cells; cell
    (i, j) starts at row ``i * (h + pad)``, column ``j * (w + pad)``.
    """
    pixels = dataset.denormalize(images.detach().to("cpu", torch.float32))
    classes = class_of(labels, len(pixels), dataset.num_classes)
    _, c, h, w = pixels.shape
    per_class = max(int(torch.bincount(classes, minlength=dataset.num_classes).max()), 1)
    rows, columns = mosaic_shape(dataset.num_classes, per_class)
    cells = torch.full((rows * columns, c, h + pad, w + pad), background)
    for r in range(dataset.num_classes):
        members = pixels[classes == r]
        first = r * per_class if per_class > 1 else r  # class r's first cell, counted row by row
        cells[first:first + len(members), :, :h, :w] = members
    grid = rearrange(cells, "(r k) c h w -> (r h) (k w) c", r=rows)
    return grid[: grid.shape[0] - pad, : grid.shape[1] - pad].numpy()


def grid_png(images: Tensor, dataset: ImageDataset, scale: int = 4, labels: Tensor | int | None = None) -> bytes:
    """The :func:`mosaic` of ``images [n, c, h, w]`` as PNG bytes, each pixel ``scale`` x ``scale``."""
    grid = (mosaic(images, dataset, labels) * 255).round().astype(np.uint8)
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="png")
    return buffer.getvalue()
