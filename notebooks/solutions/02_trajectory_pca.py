"""Reference solutions for notebook 02_trajectory_pca (used when MTT_LAB_SOLUTIONS=1)."""

import torch


def pca_by_hand(snapshots, k):
    """[n, P] -> (components [k, P], explained [k]) of the centred snapshots."""
    x = snapshots.double()
    x = x - x.mean(dim=0)
    _, singular, vt = torch.linalg.svd(x, full_matrices=False)
    variance = singular**2
    return vt[:k], variance[:k] / variance.sum()


def path_length(trajectory):
    """[E + 1, P] -> sum over epochs of ||theta*_e - theta*_(e-1)||, a float."""
    steps = trajectory[1:].double() - trajectory[:-1].double()
    return float(steps.norm(dim=1).sum())
