"""Coresets (random, herding, K-center) and the original dataset distillation (DD)."""

from dataclasses import replace

import pytest
import torch

from mtt_lab.baselines import (DDConfig, DDistiller, distill_dd, expert_embedder, herding, herding_order,
                               k_center, k_center_order, random_coreset)
from mtt_lab.data import ImageDataset
from mtt_lab.experts import ExpertConfig, TrajectoryStore, build_model, model_spec
from mtt_lab.models import Functional

TINY = {"width": 8, "depth": 2}


def toy_dataset(per_class=(12, 10, 8), size=8, seed=0) -> ImageDataset:
    """Classes = a bright quadrant of an 8x8 image (top-left, top-right, bottom-left) plus noise."""
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for c, n in enumerate(per_class):
        x = 0.5 * torch.randn(n, 1, size, size, generator=g)
        rows, cols = divmod(c, 2)
        h = size // 2
        x[:, :, rows * h:(rows + 1) * h, cols * h:(cols + 1) * h] += 1.5
        images.append(x)
        labels.append(torch.full((n,), c))
    return ImageDataset("toy", torch.cat(images), torch.cat(labels), [str(c) for c in range(len(per_class))],
                        (0.0,), (1.0,))


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


# ------------------------------------------------------------------------------------------------
# Coresets


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


# ------------------------------------------------------------------------------------------------
# Dataset distillation (Wang et al. 2018)


def tiny_dd(**changes) -> DDConfig:
    return replace(DDConfig(ipc=1, steps=4, lr_img=0.05, lr_lr=0.05, lr_init=0.05, batch_real=30,
                            iterations=30, device="cpu", init="fixed"), **changes)


@pytest.mark.parametrize("init", ["fixed", "random"])
def test_dd_learns_images_and_positive_lrs(init):
    train = toy_dataset()
    result = distill_dd(train, tiny_dd(init=init), model_kwargs=TINY, progress=False)
    assert result.images.shape == (3, 1, 8, 8) and result.labels.tolist() == [0, 1, 2]
    assert result.lrs.shape == (4,) and (result.lrs > 0).all()
    assert len(result.losses) == 30 and all(torch.isfinite(torch.tensor(result.losses)))
    first, last = result.losses[:5], result.losses[-5:]
    assert sum(last) / 5 < 0.8 * sum(first) / 5, f"{init}: loss did not fall ({first} -> {last})"


def test_dd_gradients_reach_images_and_lrs():
    train = toy_dataset()
    distiller = DDistiller(train, tiny_dd(pix_init="real"), model_kwargs=TINY)
    images, lrs = distiller.images, distiller.lrs
    torch.testing.assert_close(lrs, torch.full((4,), 0.05))
    assert any(torch.equal(images[0], real) for real in train.images_of_class(0))  # real init
    distiller.step()
    assert (distiller.images - images).abs().amax(dim=(1, 2, 3)).min() > 0, "every image moved"
    assert (distiller.lrs != lrs).all(), "every step size moved"


def test_dd_lrs_stay_positive_under_a_huge_lr_step():
    distiller = DDistiller(toy_dataset(), tiny_dd(lr_lr=50.0, iterations=3), model_kwargs=TINY)
    for _ in range(3):
        distiller.step()
    assert (distiller.lrs > 0).all()


def test_dd_is_reproducible_and_leaves_the_global_rng_alone():
    train = toy_dataset()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = distill_dd(train, tiny_dd(init="random", iterations=5), model_kwargs=TINY, progress=False)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = distill_dd(train, tiny_dd(init="random", iterations=5), model_kwargs=TINY, progress=False)
    c = distill_dd(train, tiny_dd(init="random", iterations=5, seed=1), model_kwargs=TINY, progress=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.lrs, b.lrs) and a.losses == b.losses
    assert not torch.equal(a.images, c.images)


def test_dd_rejects_bad_configs():
    train = toy_dataset()
    for bad in (dict(init="pretrained"), dict(ipc=0), dict(steps=0), dict(lr_init=0.0), dict(pix_init="zeros")):
        with pytest.raises(ValueError):
            DDistiller(train, tiny_dd(**bad), model_kwargs=TINY)
    with pytest.raises(ValueError, match="ipc"):  # 9 real images per class, the smallest class holds 8
        DDistiller(train, tiny_dd(ipc=9, pix_init="real"), model_kwargs=TINY)
    assert DDistiller(train, tiny_dd(ipc=9), model_kwargs=TINY).images.shape == (27, 1, 8, 8)  # noise: fine
