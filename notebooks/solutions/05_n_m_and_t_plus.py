"""Reference solutions for notebook 05 (N, M and T+)."""

import torch


def segment_lengths(trajectory: torch.Tensor, m: int) -> torch.Tensor:
    """``trajectory [E + 1, P]`` -> ``[E + 1 - m]``: ||theta*_{t+m} - theta*_t|| for t = 0 .. E - m.

    Row t of ``trajectory[m:]`` is theta*_{t+m} and row t of ``trajectory[:-m]`` is theta*_t, so one
    subtraction gives every segment at once.
    """
    return (trajectory[m:] - trajectory[:-m]).norm(dim=1)
