"""Reference solutions for notebook 04 (evaluating distilled data)."""

import torch

from mtt_lab.augment import default_strategy
from mtt_lab.models import get_model
from mtt_lab.train import accuracy, train_epoch


def train_and_track(images, labels, test, lr, epochs, every, seed=0, model="ConvNet", model_kwargs=None):
    """The evaluation protocol for one network, with the test accuracy every ``every`` epochs.

    Returns ``[(epoch, accuracy), ...]`` for epochs ``every, 2 * every, ..., epochs``; the last entry
    equals ``evaluate_synset(..., runs=1, seed=seed)`` because the random draws happen in the same
    order: the global seed before the network is built, then one generator for shuffling and DSA.
    """
    images, labels = images.detach().to(test.device, torch.float32), labels.detach().to(test.device)
    torch.manual_seed(seed)
    net = get_model(model, test.channels, test.num_classes, test.image_size, **(model_kwargs or {})).to(test.device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[epochs // 2], gamma=0.1)
    generator = torch.Generator().manual_seed(seed)
    strategy = default_strategy(test.name)
    curve = []
    for epoch in range(1, epochs + 1):
        train_epoch(net, optimizer, images, labels, 256, generator, strategy)
        scheduler.step()
        if epoch % every == 0 or epoch == epochs:
            curve.append((epoch, accuracy(net, test.images, test.labels)))
    return curve
