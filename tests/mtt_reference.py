"""A plain autograd reference for one MTT outer-iteration gradient.

This file deliberately shares no engine code with ``mtt_lab.distill``: it does not call
``student_step``, ``unroll``, ``trajectory_loss``, ``Functional`` or anything of ``Distiller``.
It keeps the student's weights as a dict ``{name: tensor}`` (the module's own parameter
shapes), runs the N student SGD steps with ``create_graph=True`` through
``torch.func.functional_call``, writes the MTT loss out by hand and asks
``torch.autograd.grad`` for the derivatives. Only the augmentation ``mtt_lab.augment.dsa`` is
reused, since it is not what the reference checks.

Used by ``tests/test_distill.py`` and usable from a benchmark script::

    import sys; sys.path.insert(0, "tests")
    from mtt_reference import mtt_reference_grad
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from mtt_lab.augment import dsa

__all__ = ["mtt_reference_grad", "split_flat"]


def split_flat(model: nn.Module, flat: Tensor) -> dict[str, Tensor]:
    """Cut a flat vector ``[P]`` into ``{name: tensor}`` with the shapes of ``model``'s parameters.

    The order is ``model.named_parameters()``, each parameter flattened row-major (the layout of
    the expert trajectories).
    """
    params, offset = {}, 0
    for name, p in model.named_parameters():
        n = p.numel()
        params[name] = flat[offset:offset + n].reshape(p.shape)
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} entries, the model has {offset} parameters")
    return params


def mtt_reference_grad(
    model: nn.Module,
    theta_start: Tensor,
    theta_target: Tensor,
    images: Tensor,
    labels: Tensor,
    alpha: Tensor,
    steps: Sequence[tuple[Tensor, int]],
    strategy: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """MTT loss of one outer iteration and its gradients with respect to the pixels and alpha.

    Args:
        model: the student architecture (only its structure and buffers are used; its own
            parameter values are ignored). Must have the dtype/device of the tensors below.
        theta_start: theta*_t, flat ``[P]`` (``model.named_parameters()`` order, row-major).
        theta_target: theta*_{t+M}, flat ``[P]``.
        images: the synthetic images ``[n, c, h, w]``; should require grad (a leaf).
        labels: ``[n]`` int64 class indices, or ``[n, classes]`` soft labels.
        alpha: the student step size, a 0-dim tensor; should require grad (a leaf).
        steps: one ``(batch_indices, dsa_seed)`` pair per student step, N in all. An object with
            ``.index`` and ``.seed`` attributes is accepted too.
        strategy: DSA strategy string (``""`` = no augmentation). Step i sees
            ``dsa(images[idx_i], strategy, torch.Generator().manual_seed(seed_i))``.

    Returns:
        ``(loss, d loss / d images, d loss / d alpha)``, all detached, where
        ``loss = ||theta_N - theta_target||^2 / ||theta_start - theta_target||^2`` and
        ``theta_{i+1} = theta_i - alpha * grad_theta CE(model(theta_i, aug_i(images[idx_i])), labels[idx_i])``.
    """
    if not images.requires_grad:
        images = images.detach().requires_grad_(True)
    if not alpha.requires_grad:
        alpha = alpha.detach().requires_grad_(True)
    buffers = dict(model.named_buffers())

    # theta_0 = theta*_t, as independent leaves (the start point carries no gradient to X / alpha)
    weights = {name: w.detach().clone().requires_grad_(True)
               for name, w in split_flat(model, theta_start).items()}
    for step in steps:
        index, seed = step if isinstance(step, (tuple, list)) else (step.index, step.seed)
        x = dsa(images[index], strategy, torch.Generator().manual_seed(int(seed)))
        logits = functional_call(model, {**weights, **buffers}, (x,))
        ce = F.cross_entropy(logits, labels[index])
        grads = torch.autograd.grad(ce, list(weights.values()), create_graph=True)
        # plain SGD with the learnable step size: theta_{i+1} = theta_i - alpha * g_i
        weights = {name: w - alpha * g for (name, w), g in zip(weights.items(), grads)}

    start = split_flat(model, theta_start.detach())
    target = split_flat(model, theta_target.detach())
    numerator = sum(((weights[k] - target[k]) ** 2).sum() for k in weights)
    denominator = sum(((start[k] - target[k]) ** 2).sum() for k in weights)
    loss = numerator / denominator
    grad_images, grad_alpha = torch.autograd.grad(loss, [images, alpha])
    return loss.detach(), grad_images, grad_alpha
