"""Tests of the evaluation protocol (mtt_lab.evaluate.evaluate_synset) on tiny networks."""

from __future__ import annotations

import statistics

import pytest
import torch

import mtt_lab.evaluate as evaluate_module
from mtt_lab.data import load_splits
from mtt_lab.evaluate import EvalResult, evaluate_synset

TINY = {"width": 8, "depth": 2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared; more threads only fight for the cores
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def splits(one_thread):
    return load_splits("mnist10k")


@pytest.fixture(scope="module")
def test_set(splits):
    return splits[1]


def real_subset(splits, k: int, seed: int = 0):
    """``k`` real training images per class and their labels."""
    return splits[0].sample_per_class(k, torch.Generator().manual_seed(seed))


def tiny_eval(images, labels, test, **kw) -> EvalResult:
    return evaluate_synset(images, labels, test, **{"model_kwargs": TINY, "epochs": 4, "runs": 2,
                                                    "progress": False, **kw})


def test_runs_and_summary(splits, test_set):
    images, labels = real_subset(splits, 3)
    result = tiny_eval(images, labels, test_set, runs=3, lr=0.02)
    assert isinstance(result, EvalResult)
    assert len(result.accuracies) == 3
    assert all(0.0 <= a <= 1.0 for a in result.accuracies)
    assert result.mean == pytest.approx(sum(result.accuracies) / 3)
    assert result.std == pytest.approx(statistics.pstdev(result.accuracies))
    assert min(result.accuracies) <= result.mean <= max(result.accuracies)
    assert (result.model, result.epochs, result.lr) == ("ConvNet", 4, 0.02)
    assert "(3 runs)" in str(result)
    single = tiny_eval(images, labels, test_set, runs=1)
    assert single.std == 0.0 and single.mean == single.accuracies[0]


def test_reproducible_with_a_seed(splits, test_set):
    images, labels = real_subset(splits, 2)
    first = tiny_eval(images, labels, test_set, seed=5)
    again = tiny_eval(images, labels, test_set, seed=5)
    assert first.accuracies == again.accuracies
    # run r starts from seed + r: the second run of seed 5 is the first run of seed 6
    shifted = tiny_eval(images, labels, test_set, seed=6, runs=1)
    assert shifted.accuracies[0] == first.accuracies[1]


def test_curves_measure_along_the_way_without_changing_the_result(splits, test_set):
    images, labels = real_subset(splits, 2)
    plain = tiny_eval(images, labels, test_set, epochs=5, seed=2)
    tracked = tiny_eval(images, labels, test_set, epochs=5, seed=2, every=2)
    assert plain.curves == () and tracked.accuracies == plain.accuracies  # measuring only reads the network
    assert [[e for e, _ in curve] for curve in tracked.curves] == [[2, 4, 5], [2, 4, 5]]
    assert [curve[-1][1] for curve in tracked.curves] == list(tracked.accuracies)
    # run 0 alone draws the same numbers as run 0 of two runs
    short = tiny_eval(images, labels, test_set, epochs=5, seed=2, every=2, runs=1)
    assert short.curves[0] == tracked.curves[0]
    assert len({a for _, a in tracked.curves[0]}) > 1, "the accuracy should change while training"


def test_soft_labels(splits, test_set):
    images, labels = real_subset(splits, 2)
    soft = torch.full((len(labels), 10), 0.02)
    soft[torch.arange(len(labels)), labels] = 0.82
    assert torch.allclose(soft.sum(1), torch.ones(len(labels)))
    result = tiny_eval(images, soft, test_set)
    assert len(result.accuracies) == 2 and all(0.0 <= a <= 1.0 for a in result.accuracies)


def test_cross_architecture_lenet(splits, test_set):
    images, labels = real_subset(splits, 2)
    result = evaluate_synset(images, labels, test_set, model="LeNet", epochs=2, runs=1, progress=False)
    assert result.model == "LeNet"
    assert 0.0 <= result.accuracies[0] <= 1.0


def test_learns_above_chance_from_ten_real_images_per_class(splits, test_set):
    images, labels = real_subset(splits, 10)
    result = evaluate_synset(images, labels, test_set, model_kwargs={"width": 16, "depth": 2}, lr=0.01,
                             epochs=30, runs=1, progress=False)
    assert result.mean > 0.4  # chance is 0.1


@pytest.mark.parametrize("kw, message", [
    (dict(runs=0), r"runs=0"),
    (dict(epochs=0), r"epochs=0"),
    (dict(every=-1), r"every=-1"),
    (dict(lr=0.0), r"lr must be a finite number > 0 .*got 0\.0"),
    (dict(lr=-0.5), r"lr must be a finite number > 0 .*got -0\.5"),
    (dict(lr=float("inf")), r"lr must be a finite number > 0 .*got inf"),
])
def test_bad_arguments_name_the_values(splits, test_set, kw, message):
    images, labels = real_subset(splits, 1)
    with pytest.raises(ValueError, match=message):
        tiny_eval(images, labels, test_set, **kw)


def test_shape_mismatch_names_both_shapes(test_set):
    images, labels = torch.randn(10, 3, 28, 28), torch.arange(10)
    with pytest.raises(ValueError, match=r"\[3, 28, 28\].*\[1, 28, 28\]"):
        tiny_eval(images, labels, test_set)
    with pytest.raises(ValueError, match=r"\[1, 32, 32\]"):
        tiny_eval(torch.randn(10, 1, 32, 32), labels, test_set)


@pytest.mark.parametrize("epochs, drop_at", [(6, 3), (5, 2)])
def test_lr_drops_tenfold_at_half_the_epochs(splits, test_set, monkeypatch, epochs, drop_at):
    seen = []

    def spy(model, optimizer, images, labels, batch_size, generator, strategy="", loss_fn=None):
        group = optimizer.param_groups[0]
        seen.append((group["lr"], group["momentum"], group["weight_decay"]))
        optimizer.step()  # no gradients, so a no-op: training is not needed to watch the schedule
        return 0.0

    monkeypatch.setattr(evaluate_module, "train_epoch", spy)
    images, labels = real_subset(splits, 1)
    tiny_eval(images, labels, test_set, lr=0.03, epochs=epochs, runs=2)
    assert len(seen) == 2 * epochs
    for run in range(2):
        lrs = [lr for lr, _, _ in seen[run * epochs:(run + 1) * epochs]]
        expected = [0.03] * drop_at + [0.003] * (epochs - drop_at)
        assert lrs == pytest.approx(expected, rel=1e-12)
    assert all((m, wd) == (0.9, 5e-4) for _, m, wd in seen)


def test_the_recipe_is_plain_sgd_with_one_drop(splits, test_set):
    """evaluate_synset = fit under repeat_runs: the same accuracies as SGD + MultiStepLR written out by hand,
    with the draws in the same order (global seed, init, then one generator for shuffling and DSA)."""
    from mtt_lab.augment import default_strategy
    from mtt_lab.models import get_model
    from mtt_lab.train import accuracy, train_epoch

    images, labels = real_subset(splits, 2)
    got = tiny_eval(images, labels, test_set, epochs=4, runs=2, seed=5, lr=0.02).accuracies
    want = []
    for run in range(2):
        torch.manual_seed(5 + run)
        net = get_model("ConvNet", 1, 10, 28, **TINY)
        opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
        schedule = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.1)
        g = torch.Generator().manual_seed(5 + run)
        for _ in range(4):
            train_epoch(net, opt, images, labels, 256, g, default_strategy(test_set.name))
            schedule.step()
        want.append(accuracy(net, test_set.images, test_set.labels))
    assert got == tuple(want)
    log = []
    evaluate_module.evaluate_synset(images, labels, test_set, model_kwargs=TINY, epochs=2, runs=2, progress=False,
                                    log=log)
    assert [row["seed"] for row in log] == [0, 1] and all(len(row["losses"]) == 2 for row in log)


def test_eval_result_is_the_one_summary():
    r = EvalResult.of("experts", [0.8, 0.9])
    assert r.mean == pytest.approx(0.85) and r.std == pytest.approx(0.05)
    assert r.percent() == "85.00 ± 5.00 %" and str(r) == "experts: 85.00 ± 5.00 % (2 runs)"
    assert str(EvalResult.of("experts", [0.8])) == "experts: 80.00 ± 0.00 % (1 run)"
    d = r.as_dict()
    assert d["accuracies"] == [0.8, 0.9] and d["mean"] == pytest.approx(0.85) and d["std"] == pytest.approx(0.05)


@pytest.mark.parametrize("epochs, rates", [(1, [0.1]), (2, [0.1, 0.01]), (5, [0.1, 0.1, 0.01, 0.01, 0.01])])
def test_the_learning_rate_drops_tenfold_at_half_the_epochs(epochs, rates):
    """The rate each epoch trains with: x 0.1 after epochs // 2 of them; a single epoch keeps the rate."""
    optimizer, scheduler = evaluate_module.sgd_with_schedule([torch.zeros(1, requires_grad=True)], 0.1, epochs)
    seen = []
    for _ in range(epochs):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx(rates)


def test_evaluation_leaves_the_callers_random_state_alone(mnist_test):
    """Every run seeds its own init, inside ``fork_rng``: a caller's next global draw is the one it expects."""
    x, y = mnist_test.sample_per_class(1, torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    evaluate_synset(x, y, mnist_test, lr=0.01, epochs=1, runs=2, model_kwargs={"width": 4, "depth": 1}, progress=False)
    assert torch.equal(torch.rand(3), expected)
