"""A few real digits per class, for the tests of the methods beyond MTT (tiny, so each test is fast)."""

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
