"""Coresets: ``ipc`` real training images per class, the baselines every distilled set is measured against.

Every selector returns images ``[C * ipc, c, h, w]`` and labels ``[C * ipc]`` grouped by class
(``0 0 .. 0 1 1 .. 1 ...``), the layout of :meth:`ImageDataset.sample_per_class`:

* :func:`random_coreset`  uniformly random images (the usual "Random" row of the tables);
* :func:`herding`         Welling (ICML 2009) herding in a feature space: greedily add the image
                          that brings the mean of the chosen features closest to the class mean;
* :func:`k_center`        greedy K-center (farthest-first traversal, Sener & Savarese 2018) in
                          the same feature space.

Features come from any ``embed(x [n, c, h, w]) -> [n, d]``; :func:`expert_embedder` builds one
from a trained expert of a :class:`TrajectoryStore` (its penultimate layer, ``model.embed``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .data import ImageDataset
from .experts import TrajectoryStore
from .models import Functional
from .train import EVAL_BATCH, resolve_device

Embed = Callable[[Tensor], Tensor]  # images [n, c, h, w] -> features [n, d]


def random_coreset(train: ImageDataset, ipc: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``ipc`` distinct random real images per class: exactly :meth:`ImageDataset.sample_per_class`."""
    return train.sample_per_class(ipc, generator)


def expert_embedder(store: TrajectoryStore, expert: int = 0, epoch: int = -1, device: str = "auto",
                    batch_size: int = EVAL_BATCH) -> Embed:
    """Penultimate features of expert ``expert`` at epoch ``epoch`` (default: its last snapshot).

    Returns ``embed(x [n, c, h, w]) -> [n, d]`` (on ``device``), run in eval mode without a
    graph, ``batch_size`` images at a time.
    """
    device = resolve_device(device)
    model = store.build_model()
    Functional(model).load_into(store[expert][epoch])
    model = model.to(device).eval()

    @torch.no_grad()
    def embed(x: Tensor) -> Tensor:
        return torch.cat([model.embed(chunk.to(device)) for chunk in x.split(batch_size)])

    return embed


def _check_ipc(train: ImageDataset, ipc: int) -> None:
    smallest = min(train.class_counts())
    if not 1 <= ipc <= smallest:
        raise ValueError(f"ipc must be between 1 and {smallest} (the smallest class of {train.name}), got {ipc}")


def _select_per_class(train: ImageDataset, ipc: int, embed: Embed,
                      order: Callable[[Tensor, int], Tensor]) -> tuple[Tensor, Tensor]:
    """Apply ``order(features [n_c, d], ipc) -> positions [ipc]`` to every class's features."""
    _check_ipc(train, ipc)
    images, labels = [], []
    for c in range(train.num_classes):
        real = train.images_of_class(c)
        picks = order(embed(real).float(), ipc).to(real.device)
        images.append(real[picks])
        labels.append(torch.full((ipc,), c, dtype=torch.long, device=real.device))
    return torch.cat(images), torch.cat(labels)


def herding_order(features: Tensor, k: int) -> Tensor:
    """Indices ``[k]`` (distinct) into ``features [n, d]`` in the order herding picks them.

    Step j (1-based) adds the unchosen i minimising || mu - (s + phi_i) / j || with mu the mean
    of all features and s the sum of the features chosen so far.
    """
    mu = features.mean(dim=0)
    chosen_sum = torch.zeros_like(mu)
    taken = torch.zeros(len(features), dtype=torch.bool, device=features.device)
    picks = []
    for j in range(1, k + 1):
        # || mu - (s + phi_i) / j ||^2 for every candidate i
        error = (mu - (chosen_sum + features) / j).pow(2).sum(dim=1)
        i = int(error.masked_fill(taken, float("inf")).argmin())
        picks.append(i)
        taken[i] = True
        chosen_sum += features[i]
    return torch.tensor(picks)


def k_center_order(features: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """Indices ``[k]`` (distinct) into ``features [n, d]`` by greedy K-center (farthest first).

    The first centre is the point nearest the mean, or, with ``generator``, a uniformly random
    point. Every next centre is the point farthest from its nearest chosen centre.
    """
    if generator is None:
        first = int((features - features.mean(dim=0)).pow(2).sum(dim=1).argmin())
    else:
        first = int(torch.randint(len(features), (1,), generator=generator))
    picks = [first]
    # d_i = squared distance from phi_i to its nearest centre
    nearest = (features - features[first]).pow(2).sum(dim=1)
    nearest[first] = -float("inf")  # a chosen centre stays at -inf: never picked twice
    for _ in range(k - 1):
        # next centre = argmax_i min_j ||phi_i - phi_cj||^2
        i = int(nearest.argmax())
        picks.append(i)
        nearest = torch.minimum(nearest, (features - features[i]).pow(2).sum(dim=1))
        nearest[i] = -float("inf")
    return torch.tensor(picks)


def herding(train: ImageDataset, ipc: int, embed: Embed) -> tuple[Tensor, Tensor]:
    """Herding coreset: ``ipc`` real images per class whose mean feature tracks the class mean.

    Deterministic. Returns images ``[C * ipc, c, h, w]`` and labels ``[C * ipc]``, grouped by
    class, each class's images in the order herding picked them.
    """
    return _select_per_class(train, ipc, embed, herding_order)


def k_center(train: ImageDataset, ipc: int, embed: Embed,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """K-center coreset: ``ipc`` real images per class that cover the class in feature space.

    Without ``generator`` the first centre of each class is its image nearest the class mean
    (deterministic); with one it is a random image. Returns images ``[C * ipc, c, h, w]`` and
    labels ``[C * ipc]``, grouped by class, in the order they were picked.
    """
    return _select_per_class(train, ipc, embed, lambda f, k: k_center_order(f, k, generator))
