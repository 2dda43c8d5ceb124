"""The original dataset distillation (DD, Wang et al. 2018) on the shared outer loop."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from family_data import through_disk, toy_dataset

from mtt_lab.dataset_distillation import DDConfig, DDistiller
from mtt_lab.models import Functional

TINY = {"width": 8, "depth": 2}


def tiny_dd(**changes) -> DDConfig:
    return replace(DDConfig(ipc=1, steps=4, lr_img=0.05, lr_lr=0.05, lr_init=0.05, batch_real=30, iterations=30,
                            device="cpu", init="fixed", model_kwargs=TINY), **changes)


def run(train, config) -> DDistiller:
    distiller = DDistiller(train, config)
    for _ in distiller.steps():
        pass
    return distiller


@pytest.mark.parametrize("init", ["fixed", "random"])
def test_dd_learns_images_and_positive_lrs(init):
    train = toy_dataset()
    result = run(train, tiny_dd(init=init))
    assert result.images.shape == (3, 1, 8, 8) and result.labels.tolist() == [0, 1, 2]
    assert result.lrs.shape == (4,) and (result.lrs > 0).all()
    assert len(result.losses) == 30 and all(torch.isfinite(torch.tensor(result.losses)))
    first, last = result.losses[:5], result.losses[-5:]
    assert sum(last) / 5 < 0.8 * sum(first) / 5, f"{init}: loss did not fall ({first} -> {last})"


def test_dd_gradient_is_the_hand_written_unroll():
    """The objective's gradients equal plain autograd through N full-batch steps, each with its own eta_i."""
    train = toy_dataset()
    distiller = DDistiller(train, tiny_dd(pix_init="real", dtype="float64"))
    state = distiller.generator.get_state()
    images, log_lrs = distiller.images.requires_grad_(True), distiller._log_lrs.detach().clone().requires_grad_(True)
    distiller.objective()
    got = distiller._images.grad.clone(), distiller._log_lrs.grad.clone()
    # the same draws by hand: N DSA seeds (unused: no DSA), then the real batch
    g = torch.Generator().set_state(state)
    for _ in range(4):
        torch.randint(2**62, (1,), generator=g)
    real = torch.randperm(len(train), generator=g)[:30]
    fn, theta = distiller.fn, distiller.fn.flat_params().detach().requires_grad_(True)
    for eta in log_lrs.exp():
        ce = F.cross_entropy(fn(theta, images), distiller.labels)
        (grad,) = torch.autograd.grad(ce, theta, create_graph=True)
        theta = theta - eta * grad  # theta_{i+1} = theta_i - eta_i g_i
    loss = F.cross_entropy(fn(theta, train.images[real].double()), train.labels[real])
    want = torch.autograd.grad(loss, [images, log_lrs])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_dd_gradients_reach_images_and_lrs():
    train = toy_dataset()
    distiller = DDistiller(train, tiny_dd(pix_init="real"))
    images, lrs = distiller.images, distiller.lrs
    torch.testing.assert_close(lrs, torch.full((4,), 0.05))
    assert any(torch.equal(images[0], real) for real in train.images_of_class(0))  # real init
    distiller.step()
    assert (distiller.images - images).abs().amax(dim=(1, 2, 3)).min() > 0, "every image moved"
    assert (distiller.lrs != lrs).all(), "every step size moved"


def test_dd_lrs_stay_positive_under_a_huge_lr_step():
    # Adam moves rho by up to ~50 a step: eta = exp(rho) stays > 0 (float64: float32's exp underflows
    # to 0 below rho = -104, which three such steps can reach)
    distiller = run(toy_dataset(), tiny_dd(lr_lr=50.0, iterations=3, dtype="float64"))
    assert (distiller.lrs > 0).all() and torch.isfinite(distiller.images).all()


def test_dd_is_reproducible_and_leaves_the_global_rng_alone():
    train = toy_dataset()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = run(train, tiny_dd(init="random", iterations=5))
    assert torch.equal(torch.random.get_rng_state(), before)
    b = run(train, tiny_dd(init="random", iterations=5))
    c = run(train, tiny_dd(init="random", iterations=5, seed=1))
    assert torch.equal(a.images, b.images) and torch.equal(a.lrs, b.lrs) and a.losses == b.losses
    assert not torch.equal(a.images, c.images)


@pytest.mark.parametrize("init", ["fixed", "random"])
def test_dd_resumes_exactly(init):
    train = toy_dataset()
    straight = run(train, tiny_dd(init=init, iterations=4))
    first = run(train, tiny_dd(init=init, iterations=2))
    resumed = DDistiller(train, tiny_dd(init=init, iterations=2))  # the same config, then 2 more iterations
    resumed.load_state_dict(through_disk(first.state_dict()))
    list(resumed.steps(2))
    assert resumed.iteration == 4
    assert torch.equal(resumed.images, straight.images) and torch.equal(resumed.lrs, straight.lrs)


def test_dd_fixed_init_is_the_networks_own_parameters():
    distiller = DDistiller(toy_dataset(), tiny_dd(init="fixed"))
    assert torch.equal(distiller._fixed_theta, distiller.fn.flat_params())
    assert isinstance(distiller.fn, Functional)


def test_dd_rejects_bad_configs():
    train = toy_dataset()
    for bad, needle in ((dict(init="pretrained"), "init must be one of fixed, random"), (dict(ipc=0), "ipc"),
                        (dict(steps=0), "steps must be an integer >= 1"), (dict(lr_init=0.0), "lr_init"),
                        (dict(pix_init="zeros"), "pix_init")):
        with pytest.raises(ValueError, match=needle):
            DDistiller(train, tiny_dd(**bad))
    with pytest.raises(ValueError, match="ipc=9 real images per class"):  # the smallest class holds 8
        DDistiller(train, tiny_dd(ipc=9, pix_init="real"))
    assert DDistiller(train, tiny_dd(ipc=9, pix_init="noise")).images.shape == (27, 1, 8, 8)  # noise: fine
