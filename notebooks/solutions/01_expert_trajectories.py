"""Reference solutions for notebook 01_expert_trajectories (used when MTT_LAB_SOLUTIONS=1)."""

import torch


def split_flat(theta, model):
    """theta [P] -> {name: tensor with the parameter's shape}, in named_parameters() order."""
    pieces, offset = {}, 0
    for name, parameter in model.named_parameters():
        count = parameter.numel()
        pieces[name] = theta[offset:offset + count].view(parameter.shape)
        offset += count
    if offset != theta.numel():
        raise ValueError(f"theta has {theta.numel()} numbers but the model has {offset} parameters")
    return pieces


def epoch_step_sizes(trajectory):
    """[E + 1, P] -> [E]: the length of each epoch's move in parameter space."""
    return torch.linalg.vector_norm(trajectory[1:] - trajectory[:-1], dim=1)
