"""DM: the mean-embedding loss against a hand-written reference, its image gradient against finite
differences, the Siamese property, exact resume and bad input."""

import math

import pytest
import torch
from family_data import few_digits, through_disk

from mtt_lab.augment import dsa, seeded_generator
from mtt_lab.distribution_matching import DistributionMatching, DMConfig, mean_embedding_loss
from mtt_lab.models import ConvNet

STRATEGY = "color_crop_cutout_scale_rotate"


def tiny_embed():
    torch.manual_seed(0)
    net = ConvNet(1, 3, 8, width=3, depth=1).to(torch.float64)
    return net.embed


def reference_loss(embed, syn, real, seeds, strategy) -> float:
    """sum_c sum_k (mean_i e_ik(real) - mean_j e_jk(syn))^2, image by image, in Python floats."""
    total = 0.0
    for s, r, seed in zip(syn, real, seeds):
        # Siamese, by hand: each image augmented alone from the same generator state (one transform for all)
        er = [embed(dsa(x[None], strategy, seeded_generator(seed))).flatten().tolist() for x in r]
        es = [embed(dsa(x[None], strategy, seeded_generator(seed))).flatten().tolist() for x in s]
        for k in range(len(er[0])):
            mr = sum(e[k] for e in er) / len(er)
            ms = sum(e[k] for e in es) / len(es)
            total += (mr - ms) ** 2
    return total


def batches(seed):
    g = torch.Generator().manual_seed(seed)
    syn = [torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    real = [torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    return syn, real


def test_loss_matches_hand_written_reference():
    embed = tiny_embed()
    syn, real = batches(0)
    with torch.no_grad():
        expected = reference_loss(embed, syn, real, [5, 6, 7], STRATEGY)
    loss = mean_embedding_loss(embed, syn, real, [5, 6, 7], STRATEGY)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-10)
    assert expected > 0


def test_same_images_same_seed_give_zero_and_other_seeds_do_not():
    embed = tiny_embed()
    syn, _ = batches(1)
    assert float(mean_embedding_loss(embed, syn, syn, [1, 2, 3], STRATEGY).detach()) == 0.0
    # the real side gets its own seed when not Siamese: the loss is no longer zero
    seeds_real = [4, 5, 6]
    with torch.no_grad():
        mixed = sum(float((embed(dsa(s, STRATEGY, seeded_generator(a))).mean(0)
                           - embed(dsa(s, STRATEGY, seeded_generator(b))).mean(0)).pow(2).sum())
                    for s, a, b in zip(syn, [1, 2, 3], seeds_real))
    assert mixed > 0


def test_image_gradient_gradcheck():
    embed = tiny_embed()
    _, real = batches(2)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda images: mean_embedding_loss(embed, list(images.split(2)), real, [1, 2, 3], STRATEGY), (x,))


@pytest.fixture(scope="module")
def digits(mnist_train):
    return few_digits(mnist_train, per_class=12)


def small_config(**changes) -> DMConfig:
    base = dict(ipc=2, iterations=4, batch_real=6, model_kwargs={"width": 4, "depth": 1}, device="cpu")
    return DMConfig(**{**base, **changes})


def test_resume_is_exact(digits):
    run = DistributionMatching(digits, small_config())
    list(run.steps(2))
    state = through_disk(run.state_dict())
    later = [r.loss for r in run.steps(2)]
    resumed = DistributionMatching(digits, small_config())
    resumed.load_state_dict(state)
    assert [r.loss for r in resumed.steps(2)] == later
    assert torch.equal(resumed.images, run.images) and resumed.iteration == 4
    assert all(math.isfinite(v) for v in later)
    assert not torch.equal(DistributionMatching(digits, small_config()).images, run.images)


def test_steps_lower_the_loss_on_average(digits):
    """On one fixed network and batch, a few SGD steps lower the loss (the update has the right sign)."""
    run = DistributionMatching(digits, small_config(lr_img=1.0))
    net = run._network()
    for p in net.parameters():
        p.requires_grad_(False)
    real = run._real_per_class(6)
    seeds = [run._seed() for _ in range(10)]
    losses = []
    for _ in range(4):
        loss = mean_embedding_loss(net.embed, list(run._images.split(2)), real, seeds, run.strategy)
        (run._images.grad,) = torch.autograd.grad(loss, run._images)
        run.optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("changes, message", [
    (dict(ipc=13), r"ipc=13 real images per class requested, but the smallest class of mnist10k has only 12"),
    (dict(model="MLP"), r"model must be one of .*; got 'MLP'"),
    (dict(batch_real=0), r"batch_real must be an integer >= 1; got 0"),
    (dict(lr_img=float("nan")), r"lr_img must be a finite number > 0"),
    (dict(dtype="float16"), r"dtype must be one of float32, float64; got 'float16'"),
])
def test_bad_input(digits, changes, message):
    with pytest.raises(ValueError, match=message):
        DistributionMatching(digits, small_config(**changes))
