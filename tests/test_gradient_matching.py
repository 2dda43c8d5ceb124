"""DC with DSA: the papers' distance against a hand-written reference, the matching loss against
gradients taken by plain autograd on the module, its image gradient against finite differences,
exact resume and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from family_data import few_digits, through_disk
from torch.func import functional_call

from mtt_lab.augment import dsa, seeded_generator
from mtt_lab.gradient_matching import DCConfig, GradientMatching, gradient_distance, layer_distance, matching_loss
from mtt_lab.models import ConvNet, Functional


def reference_distance(real: list[torch.Tensor], syn: list[torch.Tensor]) -> float:
    """sum over tensors with >= 2 dims and over their output channels i of 1 - cos(row i), in Python floats."""
    total = 0.0
    for a, b in zip(real, syn):
        if a.dim() < 2:
            continue  # biases and norm vectors: the papers leave them out
        for i in range(a.shape[0]):
            ra, rb = a[i].flatten().tolist(), b[i].flatten().tolist()
            dot = sum(x * y for x, y in zip(ra, rb))
            norms = math.sqrt(sum(x * x for x in ra)) * math.sqrt(sum(y * y for y in rb))
            total += 1 - dot / (norms + 1e-6)
    return total


def test_distance_matches_hand_written_reference():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 2, 3, 3), (3,), (4, 5), (4,), (2, 3, 4)]
    real = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    syn = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    assert float(gradient_distance(real, syn)) == pytest.approx(reference_distance(real, syn), rel=1e-12)


def test_distance_special_cases():
    a = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    assert float(layer_distance(a, a)) == pytest.approx(0.0, abs=1e-6)  # parallel rows: 0 each
    assert float(layer_distance(a, -a)) == pytest.approx(4.0, abs=1e-6)  # opposite rows: 2 each
    orth = torch.tensor([[-2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    assert float(layer_distance(a, orth)) == pytest.approx(2.0, abs=1e-9)  # orthogonal rows: 1 each
    # a scale per row does not change the distance (cosine), a 1-D tensor contributes nothing
    scaled = a * torch.tensor([[5.0], [0.5]], dtype=torch.float64)
    assert float(layer_distance(a, scaled)) == pytest.approx(0.0, abs=1e-6)
    assert float(layer_distance(torch.ones(3), -torch.ones(3))) == 0.0
    with pytest.raises(ValueError, match=r"different shapes \[2, 2\] and \[2, 3\]"):
        layer_distance(a, torch.zeros(2, 3))


def tiny_net(dtype=torch.float64) -> ConvNet:
    torch.manual_seed(0)
    return ConvNet(1, 2, 8, width=3, depth=1).to(dtype)


def test_matching_loss_equals_module_gradients_and_reference():
    """The loss at theta equals the reference distance of per-class gradients taken on the module itself."""
    net = tiny_net()
    fn = Functional(net)
    theta = fn.flat_params()
    g = torch.Generator().manual_seed(1)
    syn = [torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    real = [torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    seeds, strategy = [11, 12], "color_crop_cutout_scale_rotate"
    expected = 0.0
    params = dict(net.named_parameters())
    for c in range(2):
        grads = []
        for x, seed in ((real[c], seeds[c]), (syn[c], seeds[c])):
            # Siamese, by hand: every image augmented alone from the same generator state, one transform for all
            x_aug = torch.cat([dsa(image[None], strategy, seeded_generator(seed)) for image in x])
            logits = functional_call(net, params, (x_aug,))
            ce = F.cross_entropy(logits, torch.full((len(x),), c))
            grads.append(torch.autograd.grad(ce, list(params.values())))
        expected += reference_distance(list(grads[0]), list(grads[1]))
    loss = matching_loss(fn, theta, syn, real, seeds, strategy)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-10)


def test_matching_loss_image_gradient_gradcheck():
    fn = Functional(tiny_net())
    theta = fn.flat_params()
    g = torch.Generator().manual_seed(2)
    real = [torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    x = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)

    def loss(images):
        return matching_loss(fn, theta, list(images.split(2)), real, [3, 4], "color_crop_scale_rotate")

    assert torch.autograd.gradcheck(loss, (x,), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.fixture(scope="module")
def digits(mnist_train):
    return few_digits(mnist_train, per_class=12)


def small_config(**changes) -> DCConfig:
    base = dict(ipc=2, iterations=4, outer_loop=2, inner_loop=2, batch_real=6, batch_train=8,
                model_kwargs={"width": 4, "depth": 1}, device="cpu")
    return DCConfig(**{**base, **changes})


@pytest.mark.parametrize("inner_data", ["synthetic", "real"])
def test_resume_is_exact(digits, inner_data):
    config = small_config(inner_data=inner_data)
    run = GradientMatching(digits, config)
    first = [r.loss for r in run.steps(2)]
    state = through_disk(run.state_dict())
    later = [r.loss for r in run.steps(2)]
    resumed = GradientMatching(digits, small_config(inner_data=inner_data))
    resumed.load_state_dict(state)
    assert [r.loss for r in resumed.steps(2)] == later
    assert torch.equal(resumed.images, run.images) and resumed.iteration == run.iteration == 4
    assert all(math.isfinite(v) for v in first + later)
    start = GradientMatching(digits, config)
    assert not torch.equal(start.images, run.images)  # the pixels did move
    assert torch.equal(run.labels, torch.arange(10).repeat_interleave(2))


def test_matching_steps_lower_the_loss_on_one_network(digits):
    """Plain descent on the distance for a fixed network and fixed batches lowers it (the sign is right)."""
    run = GradientMatching(digits, small_config(lr_img=0.05))
    fn = Functional(run._network())
    theta = fn.flat_params()
    real = run._real_per_class(6)
    seeds = [run._seed() for _ in range(10)]
    before = float(matching_loss(fn, theta, list(run._images.split(2)), real, seeds, run.strategy).detach())
    for _ in range(5):
        loss = matching_loss(fn, theta, list(run._images.split(2)), real, seeds, run.strategy)
        (run._images.grad,) = torch.autograd.grad(loss, run._images)
        run.optimizer.step()
    after = float(matching_loss(fn, theta, list(run._images.split(2)), real, seeds, run.strategy).detach())
    assert after < before


def test_paper_loops():
    assert DCConfig(ipc=1).loops() == (1, 1)
    assert DCConfig(ipc=10).loops() == (10, 50)
    assert DCConfig(ipc=10, inner_loop=0).loops() == (10, 0)


@pytest.mark.parametrize("changes, message", [
    (dict(ipc=13), r"ipc=13 real images per class requested, but the smallest class of mnist10k has only 12"),
    (dict(inner_data="test"), r"inner_data must be one of synthetic, real; got 'test'"),
    (dict(model="ConvNetX"), r"model must be one of .*ConvNet.*; got 'ConvNetX'"),
    (dict(pix_init="zeros"), r"pix_init must be one of real, noise; got 'zeros'"),
    (dict(ipc=3, outer_loop=None), r"no paper value of outer_loop/inner_loop for ipc=3"),
    (dict(lr_img=-1.0), r"lr_img must be a finite number > 0"),
    (dict(batch_real=0), r"batch_real must be an integer >= 1; got 0"),
    (dict(dsa_strategy="color_blur"), r"unknown DSA op group\(s\) \['blur'\]"),
])
def test_bad_input(digits, changes, message):
    with pytest.raises(ValueError, match=message):
        GradientMatching(digits, small_config(**changes))


def test_noise_init_allows_any_ipc(digits):
    run = GradientMatching(digits, small_config(ipc=13, pix_init="noise"))
    assert run.images.shape == (130, 1, 28, 28)


def test_resume_refuses_another_config(digits):
    state = GradientMatching(digits, small_config()).state_dict()
    with pytest.raises(ValueError, match=r"differs in \['lr_img'\]"):
        GradientMatching(digits, small_config(lr_img=0.5)).load_state_dict(state)


@pytest.mark.parametrize("group", ["color", "crop", "cutout", "scale", "rotate", "flip"])
def test_siamese_dsa_gives_every_image_of_both_batches_one_transform(group):
    """What the module docstring says: one generator state, a 256-image and a 2-image batch, one
    transform for all 258 images (the copies of one image stay equal); without ``siamese`` they differ."""
    image = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    real, syn = image.expand(256, -1, -1, -1), image.expand(2, -1, -1, -1)
    for s in range(4):
        a = dsa(real, group, seeded_generator(s), siamese=True)
        b = dsa(syn, group, seeded_generator(s), siamese=True)
        assert torch.allclose(a, a[:1].expand_as(a)) and torch.allclose(b, a[:2])
    per_image = [dsa(real, group, seeded_generator(s)) for s in range(4)]
    assert not all(torch.allclose(a, a[:1].expand_as(a)) for a in per_image)


@pytest.mark.parametrize("ipc, batch_train, steps", [(2, 8, 6), (2, 16, 4), (2, 20, 2)])
def test_inner_loop_counts_epochs_over_the_synthetic_set(digits, monkeypatch, ipc, batch_train, steps):
    """inner_loop = 2 epochs between the 2 matching steps: 20 synthetic images in batches of 8 take
    3 steps an epoch, of 16 two, of 20 one (the papers' count; at small IPC one step is one epoch)."""
    import mtt_lab.gradient_matching as gm

    taken = []
    real_step = gm.student_step
    monkeypatch.setattr(gm, "student_step", lambda *a, **k: taken.append(len(a[5].index)) or real_step(*a, **k))
    GradientMatching(digits, small_config(ipc=ipc, batch_train=batch_train)).step()
    assert len(taken) == steps and sum(taken) == 2 * 10 * ipc  # two whole epochs of the 10 * ipc images
