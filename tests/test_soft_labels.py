"""The soft-label baseline: labels are the expert's tempered softmax (computed by hand), evaluation
really trains on the soft targets, and bad input (no store, bad expert/epoch/temperature) errors."""

import math

import pytest
import torch

import mtt_lab.evaluate as evaluate_module
from mtt_lab.evaluate import evaluate_synset
from mtt_lab.experts import ExpertConfig, TrajectoryStore, TrajectoryStoreError, build_model, model_spec
from mtt_lab.models import Functional
from mtt_lab.soft_labels import SoftLabelConfig, soft_label_set

TINY = {"width": 4, "depth": 1}


@pytest.fixture(scope="module")
def store(mnist_train, tmp_path_factory):
    """One 'expert' with a random 3-snapshot trajectory (the values do not matter for these tests)."""
    config = ExpertConfig(model_kwargs=TINY, epochs=2)
    spec = model_spec(config, mnist_train.channels, mnist_train.num_classes, mnist_train.image_size)
    num_params = Functional(build_model(spec)).num_params
    store = TrajectoryStore.create(tmp_path_factory.mktemp("store"), spec, config, num_params)
    store.append(0.3 * torch.randn(3, num_params, generator=torch.Generator().manual_seed(0)), {"seed": 0})
    return store


def expert_logits(store, epoch, images):
    model = build_model(store.model_spec)
    Functional(model).load_into(store[0][epoch])
    with torch.no_grad():
        return model.eval()(images)


@pytest.mark.parametrize("temperature, epoch", [(1.0, -1), (4.0, -1), (0.5, 1)])
def test_labels_are_the_experts_tempered_softmax(store, mnist_train, temperature, epoch):
    result = soft_label_set(store, mnist_train, SoftLabelConfig(ipc=2, temperature=temperature, epoch=epoch))
    assert result.images.shape == (20, 1, 28, 28) and result.labels.shape == (20, 10)
    assert result.hard.tolist() == torch.arange(10).repeat_interleave(2).tolist()
    # the images are real training images of their class
    for x, c in zip(result.images, result.hard):
        assert (mnist_train.images_of_class(int(c)) == x).flatten(1).all(1).any()
    logits = expert_logits(store, epoch, result.images).tolist()
    for row, z in zip(result.labels.tolist(), logits):
        weights = [math.exp(v / temperature) for v in z]
        assert row == pytest.approx([w / sum(weights) for w in weights], rel=1e-5, abs=1e-7)


def entropy(p):
    return float(-(p * p.log()).sum(1).mean())


def test_higher_temperature_is_softer_and_seed_picks_images(store, mnist_train):
    cold = soft_label_set(store, mnist_train, SoftLabelConfig(ipc=1, temperature=0.5))
    warm = soft_label_set(store, mnist_train, SoftLabelConfig(ipc=1, temperature=5.0))
    assert torch.equal(cold.images, warm.images)
    assert entropy(warm.labels) > entropy(cold.labels)
    other = soft_label_set(store, mnist_train, SoftLabelConfig(ipc=1, seed=1))
    assert not torch.equal(other.images, cold.images)


def test_evaluation_trains_on_the_soft_targets(store, mnist_train, mnist_test, monkeypatch):
    """evaluate_synset with the soft labels and with their arg-max give different trained weights for the
    same seed (so the soft targets reach the loss); the same labels twice give the same weights."""
    result = soft_label_set(store, mnist_train, SoftLabelConfig(ipc=2, temperature=2.0))
    hard = result.labels.argmax(1)

    def weights_fingerprint(net, images, labels):  # stands in for accuracy(): what was trained
        weights = torch.cat([p.detach().double().flatten() for p in net.parameters()])
        return float((weights * torch.arange(1, len(weights) + 1)).sum())

    monkeypatch.setattr(evaluate_module, "accuracy", weights_fingerprint)
    kwargs = dict(test=mnist_test, model_kwargs=TINY, epochs=2, runs=1, lr=0.05, progress=False)
    soft = evaluate_synset(result.images, result.labels, **kwargs).accuracies
    again = evaluate_synset(result.images, result.labels, **kwargs).accuracies
    argmax = evaluate_synset(result.images, hard, **kwargs).accuracies
    assert soft == again
    assert soft != argmax


def test_no_store_is_a_clear_error(mnist_train):
    with pytest.raises(ValueError, match=r"needs an expert TrajectoryStore to label its images; got None"):
        soft_label_set(None, mnist_train)


@pytest.mark.parametrize("changes, message", [
    (dict(temperature=0.0), r"temperature must be a finite number > 0; got 0.0"),
    (dict(temperature=float("inf")), r"temperature must be a finite number > 0; got inf"),
    (dict(expert=1), r"expert must be in 0..0 \(.* holds 1\); got 1"),
    (dict(epoch=3), r"epoch must be in 0..2 \(or -1 for the last\); got 3"),
    (dict(ipc=0), r"ipc must be an integer >= 1; got 0"),
    (dict(ipc=10**6), r"cannot sample k=1000000 images per class"),
])
def test_bad_input(store, mnist_train, changes, message):
    with pytest.raises(ValueError, match=message):
        soft_label_set(store, mnist_train, SoftLabelConfig(**changes))


def test_store_of_another_dataset(store, mnist_train):
    from dataclasses import replace
    other = replace(mnist_train, name="fashion_mnist")
    with pytest.raises(TrajectoryStoreError, match=r"not 'fashion_mnist'"):
        soft_label_set(store, other)
