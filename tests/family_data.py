"""Tiny datasets for the tests of the coresets and the methods beyond MTT (so each test is fast)."""

import io

import torch

from mtt_lab.data import ImageDataset


def few_digits(train: ImageDataset, per_class: int, classes: int = 10, size: int | None = None,
               dtype: torch.dtype = torch.float32) -> ImageDataset:
    """The first ``per_class`` images of each of the first ``classes`` classes of ``train``, optionally
    resized to ``size`` px (bilinear) and cast to ``dtype``."""
    picks = torch.cat([torch.nonzero(train.labels == c).flatten()[:per_class] for c in range(classes)])
    images = train.images[picks]
    if size is not None:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return ImageDataset(train.name, images.to(dtype).contiguous(), train.labels[picks].clone(),
                        train.class_names[:classes], train.mean, train.std)


def through_disk(state: dict) -> dict:
    """``state`` saved with ``torch.save`` and read back with ``weights_only=True`` (as a run folder would)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def toy_dataset(per_class=(12, 10, 8), size=8, seed=0) -> ImageDataset:
    """Classes = a bright quadrant of an 8x8 image (top-left, top-right, bottom-left) plus noise."""
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for c, n in enumerate(per_class):
        x = 0.5 * torch.randn(n, 1, size, size, generator=g)
        rows, cols = divmod(c, 2)
        h = size // 2
        x[:, :, rows * h:(rows + 1) * h, cols * h:(cols + 1) * h] += 1.5
        images.append(x)
        labels.append(torch.full((n,), c))
    return ImageDataset("toy", torch.cat(images), torch.cat(labels), [str(c) for c in range(len(per_class))],
                        (0.0,), (1.0,))
