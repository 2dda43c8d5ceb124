"""Dataset condensation with distribution matching (DM; Zhao & Bilen, WACV 2023).

The synthetic set S is learned so that, in the feature space of *randomly initialised* networks,
each class of S has the same mean embedding as the class of real images. No network is trained,
no second derivative is taken: one outer iteration (:meth:`DistributionMatching.step`) is

1. draw a fresh network psi with the model's own random init (its weights are never updated);
2. for every class c: ``batch_real`` real images of c and the ``ipc`` synthetic images of c, both
   augmented by one DSA transform shared by all their images (Siamese, as in ``gradient_matching``),
   embedded by psi's feature extractor
   (``model.embed``: a ConvNet's flattened last block, ``[n, d]``);
3. loss = sum_c || mean_i psi(aug(x_real_c,i)) - mean_j psi(aug(s_c,j)) ||^2
4. one SGD step (momentum 0.5) on the pixels.

Defaults follow the paper: lr_img 1.0, batch_real 256, real init, DSA on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .augment import dsa, seeded_generator
from .data import ImageDataset
from .synthetic import SetConfig, SyntheticSet, check_at_least, check_rates

Embed = Callable[[Tensor], Tensor]  # images [n, c, h, w] -> features [n, d]


def mean_embedding_loss(embed: Embed, syn: list[Tensor], real: list[Tensor], seeds: list[int],
                        strategy: str) -> Tensor:
    """sum_c ||mean psi(aug(real[c])) - mean psi(aug(syn[c]))||^2 (a scalar).

    ``syn[c]`` ``[ipc, ch, h, w]``, ``real[c]`` ``[b, ch, h, w]``: class c's images; ``seeds[c]`` seeds
    the DSA of both (Siamese). The real embeddings carry no graph; the loss is differentiable with
    respect to ``syn``.
    """
    loss = syn[0].new_zeros(())
    for s, r, seed in zip(syn, real, seeds, strict=True):
        with torch.no_grad():
            mean_real = embed(dsa(r, strategy, seeded_generator(seed), siamese=True)).mean(0)  # [d]
        mean_syn = embed(dsa(s, strategy, seeded_generator(seed), siamese=True)).mean(0)  # [d]
        # loss += ||mu_real_c - mu_syn_c||^2
        loss = loss + (mean_real - mean_syn).pow(2).sum()
    return loss


@dataclass
class DMConfig(SetConfig):
    """DM's knobs (defaults: the paper's)."""

    lr_img: float = 1.0  # SGD (momentum 0.5) on the pixels
    batch_real: int = 256  # real images per class in each iteration

    def validate(self) -> None:
        super().validate()
        check_rates(self, ["lr_img"])
        check_at_least("batch_real", self.batch_real, 1)


class DistributionMatching(SyntheticSet):
    """Learns a synthetic set by DM. Drive it with :meth:`step` or iterate :meth:`steps`.

    ``images`` ``[C * ipc, c, h, w]``, ``labels`` ``[C * ipc]`` and ``lr`` (0.01, to evaluate with).
    """

    def __init__(self, train: ImageDataset, config: DMConfig | None = None):
        super().__init__(train, config or DMConfig())
        self.optimizer = torch.optim.SGD([self._images], lr=self.config.lr_img, momentum=0.5)

    def objective(self) -> Tensor:
        net = self._network().train()
        for p in net.parameters():
            p.requires_grad_(False)
        real = self._real_per_class(self.config.batch_real)
        syn = list(self._images.split(self.config.ipc))
        loss = mean_embedding_loss(net.embed, syn, real, [self._seed() for _ in syn], self.strategy)
        (self._images.grad,) = torch.autograd.grad(loss, self._images)
        return loss.detach()
