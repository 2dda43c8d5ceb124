"""RaT-BPTT: the window gradient against plain autograd through the same window (float64, an
independent reference on the module), checkpointed == exact, the truncation really truncates,
exact resume and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from family_data import few_digits, through_disk
from torch.func import functional_call

from mtt_lab.augment import dsa, seeded_generator
from mtt_lab.rat_bptt import RaTBPTT, RaTBPTTConfig


@pytest.fixture(scope="module")
def digits(mnist_train):
    return few_digits(mnist_train, per_class=6, classes=3, size=8, dtype=torch.float64)


def config(**changes) -> RaTBPTTConfig:
    base = dict(ipc=2, window=3, max_unroll=6, batch_syn=4, batch_real=9, lr_init=0.1, dsa=True,
                model_kwargs={"width": 3, "depth": 1}, device="cpu", dtype="float64")
    return RaTBPTTConfig(**{**base, **changes})


def reference_gradient(run, theta0, plans, real, window):
    """Plain autograd on the nn.Module (torch.func.functional_call, PyTorch's own group norm): no grad
    through the first len(plans) - window steps, a full graph through the last window ones."""
    model = run.fn.model
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def logits(theta, x):
        params = {n: t.view(s) for n, t, s in zip(names, theta.split([math.prod(s) for s in shapes]), shapes)}
        return functional_call(model, params, (x,))

    images = run._images.detach().clone().requires_grad_(True)
    rho = run._log_lr.detach().clone().requires_grad_(True)
    labels, strategy = run._labels, run.strategy
    theta = theta0.detach().requires_grad_(True)
    for k, plan in enumerate(plans):
        inside = k >= len(plans) - window
        if not inside:  # the truncated prefix: each step starts from a constant
            theta = theta.detach().requires_grad_(True)
        x = dsa((images if inside else images.detach())[plan.index], strategy, seeded_generator(plan.seed))
        ce = F.cross_entropy(logits(theta, x), labels[plan.index])
        (g,) = torch.autograd.grad(ce, theta, create_graph=inside)
        theta = theta - (rho.exp() if inside else rho.exp().detach()) * g
    loss = F.cross_entropy(logits(theta, run.train.images[real]), run.train.labels[real])
    return (loss.detach(), *torch.autograd.grad(loss, [images, rho]))


def draw_of_length(run, steps):
    """A draw whose end point is ``steps`` (draws again until one is)."""
    while True:
        theta0, plans, real = run.draw()
        if len(plans) == steps:
            return theta0, plans, real


@pytest.mark.parametrize("mode", ["exact", "checkpoint"])
def test_window_gradient_matches_plain_autograd(digits, mode):
    run = RaTBPTT(digits, config())
    theta0, plans, real = draw_of_length(run, 6)  # a 3-step prefix, then the 3-step window
    loss, g_images, g_rho = run.window_gradient(theta0, plans, real, mode=mode)
    ref_loss, ref_images, ref_rho = reference_gradient(run, theta0, plans, real, window=3)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-12)
    assert torch.allclose(g_images, ref_images, rtol=1e-9, atol=1e-13)
    assert float(g_rho) == pytest.approx(float(ref_rho), rel=1e-9)
    assert g_images.abs().max() > 0


def test_checkpoint_equals_exact_and_truncation_matters(digits):
    run = RaTBPTT(digits, config(window=2, max_unroll=8))
    theta0, plans, real = draw_of_length(run, 7)  # a 5-step prefix that the window cuts off
    exact = run.window_gradient(theta0, plans, real, mode="exact")
    checkpoint = run.window_gradient(theta0, plans, real, mode="checkpoint")
    assert torch.allclose(exact[1], checkpoint[1], rtol=1e-10, atol=1e-14)
    assert float(exact[2]) == pytest.approx(float(checkpoint[2]), rel=1e-10)
    # backpropagating through every step gives another gradient: the window is a real truncation
    full = reference_gradient(run, theta0, plans, real, window=len(plans))
    assert (full[1] - exact[1]).norm() > 1e-3 * exact[1].norm()


def test_end_point_is_uniform_between_window_and_max_unroll(digits):
    run = RaTBPTT(digits, config(window=2, max_unroll=5))
    lengths = {len(run.draw()[1]) for _ in range(60)}
    assert lengths == {2, 3, 4, 5}


@pytest.mark.parametrize("mode", ["exact", "checkpoint"])
def test_resume_is_exact(digits, mode):
    run = RaTBPTT(digits, config(mode=mode))
    list(run.steps(2))
    state = through_disk(run.state_dict())
    later = [r.loss for r in run.steps(2)]
    resumed = RaTBPTT(digits, config(mode=mode))
    resumed.load_state_dict(state)
    assert [r.loss for r in resumed.steps(2)] == later
    assert torch.equal(resumed.images, run.images) and resumed.lr == run.lr != 0.1
    assert not torch.equal(RaTBPTT(digits, config(mode=mode)).images, run.images)


@pytest.mark.parametrize("changes, message", [
    (dict(window=7, max_unroll=6), r"window W=7 is longer than the unroll length max_unroll=6"),
    (dict(window=0), r"window must be an integer >= 1; got 0"),
    (dict(mode="approximate"), r"mode must be one of exact, checkpoint; got 'approximate'"),
    (dict(ipc=7), r"ipc=7 real images per class requested, but the smallest class of mnist10k has only 6"),
    (dict(lr_init=0.0), r"lr_init must be a finite number > 0"),
    (dict(batch_syn=0), r"batch_syn must be an integer >= 1; got 0"),
])
def test_bad_input(digits, changes, message):
    with pytest.raises(ValueError, match=message):
        RaTBPTT(digits, config(**changes))
