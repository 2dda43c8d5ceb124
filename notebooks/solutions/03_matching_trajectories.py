"""Reference solutions for notebook 03_matching_trajectories (used when MTT_LAB_SOLUTIONS=1)."""

import torch
import torch.nn.functional as F


def normalised_distance(theta_end, theta_start, theta_target):
    """||theta_end - theta_target||^2 / ||theta_start - theta_target||^2, as a differentiable scalar."""
    reached = (theta_end - theta_target).square().sum()
    segment = (theta_start - theta_target).square().sum()
    return reached / segment


def unrolled_student(f, theta0, images, labels, alpha, steps):
    """theta_N after `steps` differentiable SGD steps of f(theta, images) on cross-entropy."""
    theta = theta0.detach().clone().requires_grad_(True)
    for _ in range(steps):
        loss = F.cross_entropy(f(theta, images), labels)
        (gradient,) = torch.autograd.grad(loss, theta, create_graph=True)
        theta = theta - alpha * gradient
    return theta
