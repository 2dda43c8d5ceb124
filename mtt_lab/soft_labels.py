"""The soft-label baseline (Qin, Deng & Alvarez-Melis, *A Label is Worth a Thousand Images in Dataset
Distillation*, NeurIPS 2024).

No pixel is learned: ``ipc`` random *real* images per class, each labelled with a trained expert's
tempered softmax instead of its one-hot class,

    y_i = softmax(f(theta*_e, x_i) / T)            (a row of ``[C * ipc, C]``, each row sums to 1)

and a fresh network is then trained on these soft targets (``evaluate.evaluate_synset`` takes soft
labels ``[n, C]``: cross-entropy with probability targets, which has the gradient of the KL
divergence to them). The paper's finding is that most of what distilled sets gain over random
real images comes from such labels, so every distilled set should be compared with this one.

Choices made here: the labels are computed once on the un-augmented images (the evaluation
augments the images, not the labels); the expert and its epoch ``e`` are knobs (the paper finds an
earlier epoch better at small IPC); T = 1 by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import ImageDataset
from .experts import TrajectoryStore, TrajectoryStoreError
from .models import Functional
from .synthetic import check_at_least


@dataclass
class SoftLabelConfig:
    """The knobs of the soft-label baseline."""

    ipc: int = 1  # real images per class
    temperature: float = 1.0  # T in softmax(logits / T); larger T = softer labels
    expert: int = 0  # which expert of the store labels the images
    epoch: int = -1  # which of its snapshots (-1: the last, E)
    lr: float = 0.01  # the learning rate to evaluate the set with
    seed: int = 0

    def validate(self) -> None:
        check_at_least("ipc", self.ipc, 1)
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0; got {self.temperature!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0; got {self.lr!r}")


@dataclass(frozen=True)
class SoftLabelSet:
    """Images ``[C * ipc, c, h, w]`` (grouped by class), soft labels ``[C * ipc, C]``, the class of each
    image ``hard [C * ipc]`` and the ``lr`` to evaluate with."""

    images: Tensor
    labels: Tensor
    hard: Tensor
    lr: float


def tempered_softmax(logits: Tensor, temperature: float) -> Tensor:
    """``[n, C]`` logits -> ``[n, C]`` probabilities softmax(logits / T)."""
    # y = softmax(z / T)
    return F.softmax(logits / temperature, dim=1)


def soft_label_set(store: TrajectoryStore | None, train: ImageDataset,
                   config: SoftLabelConfig | None = None) -> SoftLabelSet:
    """``ipc`` random real images per class of ``train``, labelled by expert ``config.expert`` of ``store``
    at snapshot ``config.epoch`` with temperature ``config.temperature``."""
    config = config or SoftLabelConfig()
    config.validate()
    if store is None:
        raise ValueError("the soft-label baseline needs an expert TrajectoryStore to label its images; got None "
                         "(train experts first: `mtt-lab experts --out DIR`)")
    if len(store) == 0:
        raise TrajectoryStoreError(f"{store.path} holds no finished expert yet")
    if not -len(store) <= config.expert < len(store):
        raise ValueError(f"expert must be in 0..{len(store) - 1} ({store.path} holds {len(store)}); "
                         f"got {config.expert}")
    if not -(store.epochs + 1) <= config.epoch <= store.epochs:
        raise ValueError(f"epoch must be in 0..{store.epochs} (or -1 for the last); got {config.epoch}")
    store.check_compatible(dataset=train.name)
    if store.zca != (train.zca is not None):
        raise TrajectoryStoreError(f"{store.path} was trained {'with' if store.zca else 'without'} ZCA; "
                                   f"load the real data the same way")
    images, hard = train.sample_per_class(config.ipc, torch.Generator().manual_seed(config.seed))
    model = store.build_model().to(train.device)
    fn = Functional(model)
    theta = store[config.expert][config.epoch].to(train.device)
    with torch.no_grad():
        labels = tempered_softmax(fn(theta, images), config.temperature)
    return SoftLabelSet(images, labels, hard, config.lr)
