"""Reference solutions for notebook 06 (from DD to MTT)."""

import torch
import torch.nn.functional as F


def dd_replay(fn, theta0, images, labels, lrs):
    """``theta0 [P]`` -> ``theta_N [P]``: one full-batch SGD step per step size in ``lrs``.

    theta_{i+1} = theta_i - lrs[i] * grad_theta CE(fn(theta_i, images), labels). Nothing needs to flow
    back through the steps here, so each gradient is taken on a detached leaf and the graph is dropped.
    """
    theta = theta0.detach()
    for eta in lrs:
        theta = theta.clone().requires_grad_(True)
        loss = F.cross_entropy(fn(theta, images), labels)
        (grad,) = torch.autograd.grad(loss, theta)
        theta = (theta - eta * grad).detach()
    return theta
