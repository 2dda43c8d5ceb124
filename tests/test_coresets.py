"""Coresets: random, herding, K-center, and the expert embedder they select with."""

import pytest
import torch

from family_data import toy_dataset

from mtt_lab.coresets import expert_embedder, herding, herding_order, k_center, k_center_order, random_coreset
from mtt_lab.data import ImageDataset
from mtt_lab.experts import ExpertConfig, TrajectoryStore, build_model, model_spec
from mtt_lab.models import Functional

TINY = {"width": 8, "depth": 2}


def table_dataset(table: torch.Tensor, labels: torch.Tensor):
    """Images [n, 1, 1, 1] holding their own index; the embed looks their features up in ``table``."""
    images = torch.arange(len(table), dtype=torch.float32).view(-1, 1, 1, 1)
    classes = [str(c) for c in range(int(labels.max()) + 1)]
    train = ImageDataset("table", images, labels, classes, (0.0,), (1.0,))
    return train, lambda x: table[x.flatten(1)[:, 0].long()]


def mean_pixel_embed(x):
    """A cheap 2-D feature: mean of the left and of the right half of the image."""
    half = x.shape[-1] // 2
    return torch.stack([x[..., :half].mean(dim=(1, 2, 3)), x[..., half:].mean(dim=(1, 2, 3))], dim=1)


@pytest.mark.parametrize("select", [
    lambda t, k: random_coreset(t, k, torch.Generator().manual_seed(0)),
    lambda t, k: herding(t, k, mean_pixel_embed),
    lambda t, k: k_center(t, k, mean_pixel_embed),
    lambda t, k: k_center(t, k, mean_pixel_embed, torch.Generator().manual_seed(1)),
], ids=["random", "herding", "k_center", "k_center_random_first"])
def test_coresets_are_distinct_real_images_grouped_by_class(select):
    train = toy_dataset()
    ipc = 8  # the whole smallest class: any repeat would have to show
    images, labels = select(train, ipc)
    assert images.shape == (3 * ipc, 1, 8, 8) and labels.shape == (3 * ipc,)
    assert labels.tolist() == [c for c in range(3) for _ in range(ipc)]
    for c in range(3):
        real = train.images_of_class(c).flatten(1)
        chosen = images[labels == c].flatten(1)
        match = (chosen[:, None] == real[None]).all(dim=2)  # [ipc, n_c]
        assert (match.sum(dim=1) == 1).all(), "every pick is exactly one real image of its class"
        assert len(set(match.float().argmax(dim=1).tolist())) == ipc, "no image picked twice"


@pytest.mark.parametrize("select", [
    lambda t, k: random_coreset(t, k),
    lambda t, k: herding(t, k, mean_pixel_embed),
    lambda t, k: k_center(t, k, mean_pixel_embed),
], ids=["random", "herding", "k_center"])
def test_coresets_reject_bad_ipc(select):
    train = toy_dataset()
    for bad in (0, -1, 9):  # the smallest class holds 8
        with pytest.raises(ValueError, match="ipc|k="):
            select(train, bad)


def test_herding_follows_the_greedy_order_by_hand():
    # features 0, 1, 2, 3, 10 (mean 3.2); step j adds the x that puts (s + x) / j closest to 3.2:
    # j=1: x near 3.2 -> 3;  j=2: x near 3.4 -> 2;  j=3: x near 4.6 -> 1 (3.6 off; 10 is 5.4 off)
    # j=4: x near 6.8 -> 10 (0 is 6.8 off);  j=5: 0.  Nearest-to-the-mean order would take 0 before 10.
    features = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    assert herding_order(features, 5).tolist() == [3, 2, 1, 4, 0]
    # the same through herding(): two classes, the second a shifted copy of the first
    train, embed = table_dataset(torch.cat([features, features + 100]), torch.tensor([0] * 5 + [1] * 5))
    images, labels = herding(train, 4, embed)
    assert images.flatten().tolist() == [3, 2, 1, 4, 8, 7, 6, 9]
    assert labels.tolist() == [0] * 4 + [1] * 4


def test_herding_tracks_the_class_mean_better_than_random():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(2 * 60, 5, generator=g) ** 3  # heavy-tailed features
    labels = torch.tensor([0] * 60 + [1] * 60)
    train, embed = table_dataset(table, labels)

    def mean_error(images, chosen_labels):
        feats = embed(images)
        return sum(float((feats[chosen_labels == c].mean(0) - embed(train.images_of_class(c)).mean(0)).norm())
                   for c in range(2))

    for ipc in (1, 3, 10):
        herd = mean_error(*herding(train, ipc, embed))
        random_errors = [mean_error(*random_coreset(train, ipc, g)) for _ in range(30)]
        assert herd <= sum(random_errors) / len(random_errors)
        if ipc == 1:  # one image: herding takes the one nearest the mean, the exact optimum
            assert herd <= min(random_errors) + 1e-6


def test_k_center_picks_the_far_outliers():
    # a tight cluster near the origin and two outliers; the mean is (1.7, -1.3)
    features = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1], [10.0, 0.0], [0.0, -8.0]])
    # nearest the mean: (0.1, 0) (index 1); farthest from it: (10, 0) (index 4); then (0, -8) (index 5)
    assert k_center_order(features, 3).tolist() == [1, 4, 5]
    for seed in range(5):  # any first centre: the two outliers are always among 3 centres
        picks = k_center_order(features, 3, torch.Generator().manual_seed(seed)).tolist()
        assert {4, 5} <= set(picks) and len(set(picks)) == 3
    train, embed = table_dataset(features, torch.zeros(6, dtype=torch.long))
    images, _ = k_center(train, 3, embed)
    assert images.flatten().tolist() == [1, 4, 5]


def test_k_center_never_repeats_with_duplicate_features():
    features = torch.zeros(4, 2)  # all points identical: distances are all zero
    assert sorted(k_center_order(features, 4).tolist()) == [0, 1, 2, 3]
    assert sorted(herding_order(features, 4).tolist()) == [0, 1, 2, 3]


def test_expert_embedder_gives_the_experts_penultimate_features(tmp_path):
    train = toy_dataset()
    config = ExpertConfig(dataset="toy", model_kwargs=TINY, epochs=2)
    spec = model_spec(config, train.channels, train.num_classes, train.image_size)
    model = build_model(spec)
    num_params = Functional(model).num_params
    store = TrajectoryStore.create(tmp_path, spec, config, num_params)
    store.append(torch.randn(3, num_params, generator=torch.Generator().manual_seed(0)), {"seed": 0})

    embed = expert_embedder(store, batch_size=7)  # batches of 7 over 30 images
    features = embed(train.images)
    Functional(model).load_into(store[0][-1])
    with torch.no_grad():
        expected = model.eval().embed(train.images)
    assert features.shape == (30, 8 * 2 * 2) and not features.requires_grad
    torch.testing.assert_close(features, expected)
    first = expert_embedder(store, epoch=0)(train.images)
    assert not torch.allclose(first, features)  # another snapshot, other features

    images, labels = herding(train, 2, embed)
    assert images.shape == (6, 1, 8, 8) and labels.tolist() == [0, 0, 1, 1, 2, 2]
