"""Knowledge distillation and DLB (mtt_lab.kd): losses, schedule, soft targets, label noise, runs."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtt_lab import kd
from mtt_lab.data import load_splits
from mtt_lab.evaluate import EvalResult
from mtt_lab.models import get_model
from mtt_lab.train import accuracy


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def digits():
    """200 training digits (20 per class) and 500 test digits."""
    train, test = load_splits("mnist10k")
    images, labels = train.sample_per_class(20, torch.Generator().manual_seed(0))
    return images, labels, test.images[:500], test.labels[:500]


# ----------------------------------------------------------------------------------------------
# losses


def test_kd_loss_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g, dtype=torch.float64), 3 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(5, (6,), generator=g)
    T, alpha = 4.0, 0.7
    s_np, t_np, y_np = s.numpy(), t.numpy(), y.numpy()
    ce = -np.log(_softmax(s_np)[np.arange(6), y_np]).mean()
    p, q = _softmax(t_np / T), _softmax(s_np / T)
    kl = (p * (np.log(p) - np.log(q))).sum(axis=1).mean()
    expected = (1 - alpha) * ce + alpha * T**2 * kl
    assert float(kd.kd_loss(s, t, y, T, alpha)) == pytest.approx(expected, rel=1e-10)


def test_kd_loss_with_alpha_zero_is_cross_entropy_and_zero_kl_for_equal_logits():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(10, (8,), generator=g)
    assert torch.allclose(kd.kd_loss(s, t, y, T=4.0, alpha=0.0), F.cross_entropy(s, y))
    assert float(kd.kd_loss(s, s, y, T=4.0, alpha=1.0)) == pytest.approx(0.0, abs=1e-6)


def test_T_squared_keeps_the_gradient_scale_independent_of_T():
    g = torch.Generator().manual_seed(2)
    s0, t = torch.randn(32, 10, generator=g, dtype=torch.float64), torch.randn(32, 10, generator=g, dtype=torch.float64)
    y = torch.zeros(32, dtype=torch.long)

    def grad_norm(T, drop_t_squared=False):
        s = s0.clone().requires_grad_(True)
        loss = kd.kd_loss(s, t, y, T=T, alpha=1.0) / (T**2 if drop_t_squared else 1)
        (grad,) = torch.autograd.grad(loss, s)
        return float(grad.norm())

    # with T^2: d/ds = T (q - p) -> (s - t)_centred / (C b) as T grows, the same for T = 10 and 20
    assert grad_norm(20.0) / grad_norm(10.0) == pytest.approx(1.0, abs=0.05)
    # without T^2 the gradient would shrink like 1 / T^2: four times smaller from T = 10 to T = 20
    assert grad_norm(10.0, True) / grad_norm(20.0, True) == pytest.approx(4.0, rel=0.05)


# ----------------------------------------------------------------------------------------------
# label noise


def test_noisy_labels_change_exactly_the_requested_fraction_seeded():
    labels = torch.arange(10).repeat(100)  # n = 1000
    noisy = kd.noisy_labels(labels, 0.3, 10, torch.Generator().manual_seed(0))
    changed = noisy != labels
    assert int(changed.sum()) == 300
    assert noisy.min() >= 0 and noisy.max() <= 9 and noisy.dtype == labels.dtype
    assert torch.equal(labels, torch.arange(10).repeat(100))  # the input is not modified
    # every corrupted sample really moved, to each of the other nine classes
    moves = {(int(a), int(b)) for a, b in zip(labels[changed], noisy[changed])}
    assert all(a != b for a, b in moves) and {(b - a) % 10 for a, b in moves} == set(range(1, 10))
    again = kd.noisy_labels(labels, 0.3, 10, torch.Generator().manual_seed(0))
    other = kd.noisy_labels(labels, 0.3, 10, torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)
    assert int((kd.noisy_labels(labels[:7], 0.5, 10, torch.Generator()) != labels[:7]).sum()) == round(3.5)
    assert torch.equal(kd.noisy_labels(labels, 0.0, 10, torch.Generator()), labels)
    with pytest.raises(ValueError, match="fraction"):
        kd.noisy_labels(labels, 1.5, 10, torch.Generator())


# ----------------------------------------------------------------------------------------------
# DLB


@pytest.mark.parametrize("n, batch", [(12, 4), (11, 4), (7, 6)])
def test_dlb_schedule_repeats_each_half_batch_once_across_sweeps(n, batch):
    half = batch // 2
    per_sweep = -(-n // half)
    schedule = kd.dlb_schedule(n, batch, torch.Generator().manual_seed(0))
    steps = [next(schedule) for _ in range(3 * per_sweep)]
    fresh, carried = [f.tolist() for f, _ in steps], [c.tolist() for _, c in steps]
    assert carried[0] == [] and all(1 <= len(f) <= half for f in fresh)
    # the first half of every batch is the second half of the previous one, also across sweeps
    assert all(carried[t] == fresh[t - 1] for t in range(1, len(steps)))
    assert carried[per_sweep] == fresh[per_sweep - 1] != []
    for sweep in range(3):  # one sweep of fresh halves covers the data exactly once
        chunk = fresh[sweep * per_sweep:(sweep + 1) * per_sweep]
        assert sorted(i for f in chunk for i in f) == list(range(n))
    # per sweep, every sample sits in exactly two consecutive iterations: fresh at t, carried at t + 1
    for i in range(n):
        as_fresh = [t for t in range(len(steps)) if i in fresh[t]]
        as_carried = [t for t in range(len(steps)) if i in carried[t]]
        assert len(as_fresh) == 3 and as_carried == [t + 1 for t in as_fresh if t + 1 < len(steps)]
    again = kd.dlb_schedule(n, batch, torch.Generator().manual_seed(0))
    assert all(torch.equal(next(again)[0], f) for f, _ in steps)


def test_dlb_step_soft_targets_are_the_previous_weights_predictions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(0)
    x1, y1 = torch.randn(5, 1, 4, 4, generator=g), torch.randint(4, (5,), generator=g)
    x2, y2 = torch.randn(5, 1, 4, 4, generator=g), torch.randint(4, (5,), generator=g)
    tau, alpha = 3.0, 1.0

    before_1 = copy.deepcopy(model)
    _, targets = kd.dlb_step(model, optimizer, x1[:0], y1[:0], x1, y1, torch.empty(0), tau, alpha)
    assert torch.allclose(targets, F.softmax(before_1(x1) / tau, dim=1))
    assert not torch.allclose(targets, F.softmax(model(x1) / tau, dim=1), atol=1e-3)  # weights have moved
    assert not targets.requires_grad

    # iteration 2: x1 is carried; the loss is CE over the whole batch + tau^2 KL(targets || now)
    before_2 = copy.deepcopy(model)
    loss, _ = kd.dlb_step(model, optimizer, x1, y1, x2, y2, targets, tau, alpha)
    with torch.no_grad():
        logits = before_2(torch.cat([x1, x2]))
    p, log_q = targets, F.log_softmax(logits[:5] / tau, dim=1)
    expected = F.cross_entropy(logits, torch.cat([y1, y2])) + alpha * tau**2 * (p * (p.log() - log_q)).sum(1).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("fresh_view", [False, True])
def test_train_dlb_feeds_last_iterations_predictions_at_equal_exposures(digits, monkeypatch, fresh_view):
    images, labels = digits[0][:40], digits[1][:40]
    calls, real_step = [], kd.dlb_step

    def recording_step(model, optimizer, x_carried, y_carried, x_fresh, y_fresh, soft_targets, tau, alpha):
        weights = copy.deepcopy(model)
        result = real_step(model, optimizer, x_carried, y_carried, x_fresh, y_fresh, soft_targets, tau, alpha)
        calls.append(dict(weights=weights, x_carried=x_carried, x_fresh=x_fresh, soft_targets=soft_targets,
                          size=len(x_carried) + len(x_fresh)))
        return result

    monkeypatch.setattr(kd, "dlb_step", recording_step)
    torch.manual_seed(0)
    model = get_model("ConvNet", 1, 10, 28, width=4, depth=1)
    losses = kd.train_dlb(model, images, labels, epochs=3, batch_size=16, tau=3.0, strategy="color_crop",
                          fresh_view=fresh_view, generator=torch.Generator().manual_seed(0))
    assert len(losses) == 3 and all(np.isfinite(losses))
    # budget: 3 x 40 exposures to within one batch, in as many steps as plain training with batch 16
    assert 120 <= sum(c["size"] for c in calls) < 120 + 16
    assert len(calls) == pytest.approx(3 * 40 / 16, abs=1.5)
    for prev, now in zip(calls, calls[1:]):
        # p_{t-1}^tau: the weights *before* step t-1 applied to that step's fresh (augmented) images
        expected = F.softmax(prev["weights"](prev["x_fresh"]) / 3.0, dim=1)
        assert torch.allclose(now["soft_targets"], expected, atol=1e-6)
        assert torch.equal(now["x_carried"], prev["x_fresh"]) != fresh_view


# ----------------------------------------------------------------------------------------------
# end to end


def test_student_learns_with_kd_and_dlb_and_teacher_stays_frozen(digits):
    images, labels, test_images, test_labels = digits
    torch.manual_seed(0)
    teacher = get_model("ConvNet", 1, 10, 28, width=8, depth=2)
    kd.train_plain(teacher, images, labels, epochs=8, lr=0.05, batch_size=32)
    frozen = copy.deepcopy(teacher.state_dict())
    student = get_model("ConvNet", 1, 10, 28, width=4, depth=2)
    losses = kd.train_student(teacher, student, images, labels, T=4.0, alpha=0.9, epochs=8, lr=0.05, batch_size=32,
                              strategy="crop")
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in frozen.items())
    assert not teacher.training
    assert accuracy(student, test_images, test_labels) > 0.4  # chance is 0.1
    dlb_model = get_model("ConvNet", 1, 10, 28, width=4, depth=2)
    kd.train_dlb(dlb_model, images, labels, epochs=8, lr=0.05, batch_size=32)
    assert accuracy(dlb_model, test_images, test_labels) > 0.4


def test_run_folders_hold_config_results_and_log(tmp_path):
    tiny = dict(per_class=10, epochs=2, batch_size=50, runs=2, device="cpu", dsa=False)
    results = kd.run_kd(kd.KDConfig(teacher_kwargs={"width": 4, "depth": 1}, teacher_epochs=1,
                                    student_kwargs={"width": 4, "depth": 1}, **tiny), tmp_path / "kd", progress=False)
    assert set(results) >= {"teacher_accuracy", "student", "kd", "seconds", "total_seconds"}
    assert len(results["kd"]["accuracies"]) == 2 and results["teacher_accuracy"] > 0.5
    results = kd.run_dlb(kd.DLBConfig(model_kwargs={"width": 4, "depth": 1}, noise=0.2, **tiny), tmp_path / "dlb",
                         progress=False)
    saved = json.loads((tmp_path / "dlb" / "results.json").read_text())
    assert saved["plain"]["accuracies"] == results["plain"]["accuracies"] and len(saved["dlb"]["accuracies"]) == 2
    assert saved["exposures"] == 2 * 100 and set(saved["seconds_per_exposure"]) == {"plain", "dlb"}
    assert json.loads((tmp_path / "dlb" / "config.json").read_text())["noise"] == 0.2
    log = [json.loads(line) for line in (tmp_path / "dlb" / "log.jsonl").read_text().splitlines()]
    assert [row["method"] for row in log] == ["plain", "plain", "DLB", "DLB"]
    assert isinstance(kd.dlb_experiment(kd.DLBConfig(model_kwargs={"width": 4, "depth": 1}, **tiny),
                                        progress=False)["dlb"], EvalResult)
