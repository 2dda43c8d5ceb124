"""mtt_lab.train (the training loop) and mtt_lab.experts (trajectories and their store on disk).

One real run (2 experts x 2 epochs of a width-8, depth-2 ConvNet on all 8,000 training digits,
about 5 s) is shared by the tests that check what training produces. The tests of resuming,
crashes and reproducibility train on a 300-image subset instead (a fraction of a second each).
"""

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtt_lab import experts
from mtt_lab.data import ImageDataset
from mtt_lab.files import FileError
from mtt_lab.experts import (
    MANIFEST,
    ExpertConfig,
    TrajectoryStore,
    TrajectoryStoreError,
    train_experts,
)
from mtt_lab.models import Functional, get_model
from mtt_lab.train import accuracy, batches, resolve_device, train_epoch

# ----------------------------------------------------------------------------------------------
# the training loop


def separable_problem(n=64, seed=0):
    """Two classes of 8x8 images: a bright top half or a bright bottom half, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    images[labels == 0, :, :4] += 1
    images[labels == 1, :, 4:] += 1
    return images, labels


def test_train_epoch_decreases_the_loss():
    images, labels = separable_problem()
    torch.manual_seed(0)
    model = get_model("ConvNet", 1, 2, 8, width=4, depth=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    losses = [train_epoch(model, optimizer, images, labels, 16, g) for _ in range(6)]
    assert all(isinstance(v, float) for v in losses)
    assert losses[-1] < 0.5 * losses[0]
    assert accuracy(model, images, labels) == 1.0


def test_train_epoch_returns_the_mean_loss():
    # with lr 0 the model never changes, so the epoch's loss is the loss on the whole set
    images, labels = separable_problem(n=50)
    torch.manual_seed(0)
    model = get_model("ConvNet", 1, 2, 8, width=4, depth=1)
    before = Functional(model).flat_params()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss = train_epoch(model, optimizer, images, labels, 16, torch.Generator().manual_seed(0))  # 16+16+16+2
    assert torch.equal(Functional(model).flat_params(), before)
    assert model.training
    assert loss == pytest.approx(F.cross_entropy(model(images), labels).item(), rel=1e-5)
    # soft targets go through the same default loss
    soft = F.one_hot(labels, 2).float() * 0.8 + 0.1
    loss = train_epoch(model, optimizer, images, soft, 16, torch.Generator().manual_seed(0))
    assert loss == pytest.approx(F.cross_entropy(model(images), soft).item(), rel=1e-5)


class NearestValue(nn.Module):
    """Predicts the class whose number is nearest to the (single) pixel value of each image."""

    def forward(self, x):
        return -(x.flatten(1)[:, :1] - torch.arange(3.0)).square()


def test_accuracy_is_exact():
    values = torch.tensor([0.1, 0.9, 2.2, 1.1, 0.0, 1.8, 2.0])  # predicted 0 1 2 1 0 2 2
    labels = torch.tensor([0, 1, 2, 0, 0, 1, 2])  # 5 of 7 right
    model = NearestValue().train()
    assert accuracy(model, values.view(-1, 1, 1, 1), labels, batch_size=3) == 5 / 7
    assert not model.training  # measured in eval mode


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: 'auto' is cuda and 'cuda' is valid")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="cuda"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="cuda"):
        resolve_device("cuda:0")


def test_batches_cover_every_index_once():
    parts = batches(10, 3, torch.Generator().manual_seed(0), "cpu")
    assert [len(p) for p in parts] == [3, 3, 3, 1]
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(10))
    again = batches(10, 3, torch.Generator().manual_seed(0), "cpu")
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = batches(10, 3, torch.Generator().manual_seed(1), "cpu")
    assert not torch.equal(torch.cat(parts), torch.cat(other))
    assert [len(p) for p in batches(8, 8, torch.Generator(), "cpu")] == [8]


# ----------------------------------------------------------------------------------------------
# experts on the full digits


def full_config(**changes):
    settings = dict(model="ConvNet", model_kwargs={"width": 8, "depth": 2}, num_experts=2, epochs=2, device="cpu")
    return ExpertConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def full_store(tmp_path_factory):
    return train_experts(full_config(), tmp_path_factory.mktemp("experts"), progress=False)


def test_store_holds_the_trajectories(full_store):
    assert len(full_store) == 2 and full_store.epochs == 2 and full_store.dataset == "mnist10k"
    P = Functional(full_store.build_model()).num_params
    assert full_store.num_params == P
    assert full_store.model_spec == {"name": "ConvNet", "channels": 1, "num_classes": 10, "image_size": 28,
                                     "kwargs": {"width": 8, "depth": 2}}
    assert sorted(p.name for p in full_store.path.iterdir()) == ["expert_000.pt", "expert_001.pt", MANIFEST]
    for i in range(2):
        trajectory = full_store[i]
        assert trajectory.shape == (3, P) and trajectory.dtype == torch.float32
        assert torch.isfinite(trajectory).all()
        assert not torch.equal(trajectory[0], trajectory[1]) and not torch.equal(trajectory[1], trajectory[2])
    assert not torch.equal(full_store[0][0], full_store[1][0])  # each expert has its own init
    assert full_store.validate() == []
    assert torch.equal(full_store[-1], full_store[1])
    with pytest.raises(IndexError, match="expert 2 out of range"):
        full_store[2]


def test_snapshot_zero_is_the_seeded_init(full_store):
    for i in range(2):
        torch.manual_seed(full_config().seed * 1000 + i)
        init = Functional(full_store.build_model()).flat_params()
        assert torch.equal(full_store[i][0], init)
        assert full_store.metrics(i)["seed"] == i


def test_manifest_metrics_match_the_snapshots(full_store, mnist_test):
    manifest = json.loads((full_store.path / MANIFEST).read_text())
    assert manifest["num_params"] == full_store.num_params and manifest["epochs"] == 2
    assert manifest["config"]["lr"] == 0.01 and manifest["config"]["dsa"] is True
    assert "num_experts" not in manifest["config"] and "device" not in manifest["config"]
    model = full_store.build_model()
    flat = Functional(model)
    for i in range(2):
        m = full_store.metrics(i)
        assert m["file"] == f"expert_{i:03d}.pt"
        assert len(m["train_loss"]) == 2 and len(m["test_acc"]) == 3
        assert m["train_loss"][1] < m["train_loss"][0]
        assert m["test_acc"][-1] > 0.3  # chance is 0.1
        # the recorded accuracy is the accuracy of the recorded parameters
        for e in (0, 2):
            flat.load_into(full_store[i][e])
            assert accuracy(model, mnist_test.images, mnist_test.labels) == m["test_acc"][e]


def test_check_compatible(full_store):
    full_store.check_compatible(full_store.model_spec, "mnist10k")  # the store's own: no error
    other = {**full_store.model_spec, "name": "LeNet", "kwargs": {}}
    with pytest.raises(TrajectoryStoreError) as info:
        full_store.check_compatible(other)
    assert "'ConvNet'" in str(info.value) and "'LeNet'" in str(info.value)
    with pytest.raises(TrajectoryStoreError, match="'mnist10k', not 'cifar10'"):
        full_store.check_compatible(dataset="cifar10")


# ----------------------------------------------------------------------------------------------
# resuming, crashes, reproducibility: on a 300-image subset


@pytest.fixture(scope="module")
def small_splits(mnist_train, mnist_test):
    g = torch.Generator().manual_seed(0)
    small = []
    for ds, k in ((mnist_train, 30), (mnist_test, 10)):
        images, labels = ds.sample_per_class(k, g)
        small.append(ImageDataset("mnist10k", images, labels, ds.class_names, ds.mean, ds.std))
    return tuple(small)


def use_small_splits(monkeypatch, splits):
    def load_splits(name, zca=False, device="cpu", root=None):
        assert (name, zca) == ("mnist10k", False)
        return splits

    monkeypatch.setattr(experts, "load_splits", load_splits)


@pytest.fixture
def small_data(monkeypatch, small_splits):
    use_small_splits(monkeypatch, small_splits)


def small_config(**changes):
    return full_config(**{"batch_size": 64, **changes})


@pytest.fixture(scope="module")
def straight_run(small_splits, tmp_path_factory):
    """2 experts x 2 epochs on the subset in one go (the reference for resumed runs); read-only."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_small_splits(monkeypatch, small_splits)
        return train_experts(small_config(), tmp_path_factory.mktemp("straight"), progress=False)


def without_seconds(store):
    return [{k: v for k, v in store.metrics(i).items() if k != "seconds"} for i in range(len(store))]


def temp_files(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_training_is_reproducible(straight_run, small_data, tmp_path):
    again = train_experts(small_config(), tmp_path / "again", progress=False)
    assert len(again) == 2
    for i in range(2):
        assert torch.equal(again[i], straight_run[i])
    assert without_seconds(again) == without_seconds(straight_run)
    other_seed = train_experts(small_config(seed=1, num_experts=1), tmp_path / "seed1", progress=False)
    assert not torch.equal(other_seed[0], straight_run[0])


def test_resume_keeps_finished_experts(straight_run, small_data, tmp_path):
    folder = tmp_path / "resumed"
    first = train_experts(small_config(num_experts=1), folder, progress=False)
    assert len(first) == 1
    file = folder / "expert_000.pt"
    stat, content = file.stat(), file.read_bytes()
    resumed = train_experts(small_config(num_experts=2, device="auto"), folder, progress=False)  # device may differ
    assert len(resumed) == 2
    assert file.read_bytes() == content and file.stat().st_mtime_ns == stat.st_mtime_ns
    for i in range(2):
        assert torch.equal(resumed[i], straight_run[i])
    assert without_seconds(resumed) == without_seconds(straight_run)
    # asking for no more experts than the store holds trains nothing
    assert len(train_experts(small_config(num_experts=1), folder, progress=False)) == 2


def test_crash_in_the_middle_of_an_expert(straight_run, small_data, tmp_path, monkeypatch):
    folder = tmp_path / "crashed"
    calls = []

    def crashing_train_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # expert 1, epoch 2 (2 epochs per expert)
            raise KeyboardInterrupt("simulated crash")
        return train_epoch(*args, **kwargs)

    monkeypatch.setattr(experts, "train_epoch", crashing_train_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_experts(small_config(), folder, progress=False)
    store = TrajectoryStore(folder)
    assert len(store) == 1 and store.metrics(0)["file"] == "expert_000.pt"
    assert sorted(p.name for p in folder.iterdir()) == ["expert_000.pt", MANIFEST]
    assert temp_files(folder) == []

    monkeypatch.setattr(experts, "train_epoch", train_epoch)
    resumed = train_experts(small_config(), folder, progress=False)
    assert len(resumed) == 2 and resumed.validate() == []
    for i in range(2):
        assert torch.equal(resumed[i], straight_run[i])


def test_crash_while_writing_an_expert_file(small_data, tmp_path, monkeypatch):
    folder = tmp_path / "half_written"
    real_save = torch.save
    saves = []

    def failing_save(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # expert 1's file: write part of it, then die
            f.write(b"PK\x03\x04 partial")
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train_experts(small_config(), folder, progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in folder.iterdir()) == ["expert_000.pt", MANIFEST]  # no .tmp, no expert_001
    store = TrajectoryStore(folder)
    assert len(store) == 1 and store.validate() == []


def test_other_settings_on_an_existing_folder_are_refused(small_data, tmp_path):
    folder = tmp_path / "store"
    train_experts(small_config(num_experts=1, epochs=1), folder, progress=False)
    manifest = (folder / MANIFEST).read_bytes()
    for changes in ({"lr": 0.02}, {"model_kwargs": {"width": 16, "depth": 2}}, {"dsa": False}):
        config = small_config(num_experts=2, epochs=1)
        for key, value in changes.items():
            setattr(config, key, value)
        with pytest.raises(TrajectoryStoreError, match="other settings"):
            train_experts(config, folder, progress=False)
    assert (folder / MANIFEST).read_bytes() == manifest  # untouched
    assert sorted(p.name for p in folder.iterdir()) == ["expert_000.pt", MANIFEST]


@pytest.mark.parametrize("field, value", [("num_experts", 0), ("epochs", 0), ("batch_size", 0), ("lr", 0.0)])
def test_invalid_config_names_the_value(tmp_path, field, value):
    config = full_config()
    setattr(config, field, value)
    with pytest.raises(ValueError, match=rf"{field} must be .*got {value}"):
        train_experts(config, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


# ----------------------------------------------------------------------------------------------
# damaged stores


@pytest.fixture
def store_copy(straight_run, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(straight_run.path, folder)
    return folder


def test_truncated_expert_file(store_copy):
    file = store_copy / "expert_001.pt"
    content = file.read_bytes()
    file.write_bytes(content[: len(content) // 2])
    store = TrajectoryStore(store_copy)
    assert store[0].shape == (3, store.num_params)
    with pytest.raises(FileError, match="expert_001.pt: expected expert 1's trajectory.*found a damaged or truncated"):
        store[1]
    problems = store.validate()
    assert len(problems) == 1 and "expert_001.pt" in problems[0]


def test_wrong_shape_and_non_tensor_files(store_copy):
    store = TrajectoryStore(store_copy)
    P = store.num_params
    torch.save(torch.zeros(2, P), store_copy / "expert_000.pt")
    torch.save({"theta": torch.zeros(3, P)}, store_copy / "expert_001.pt")
    with pytest.raises(FileError, match=rf"expert_000.pt: expected .*\[3, {P}\], found a float32 tensor of shape \[2, {P}\]"):
        store[0]
    with pytest.raises(FileError, match=r"expert_001.pt: expected .* found a dict with keys \[theta\]"):
        store[1]
    torch.save(torch.zeros(3, P, dtype=torch.float64), store_copy / "expert_001.pt")
    with pytest.raises(FileError, match=r"found a float64 tensor"):
        store[1]
    assert len(store.validate()) == 2


def test_non_finite_values_are_reported(store_copy):
    store = TrajectoryStore(store_copy)
    bad = store[0].clone()
    bad[1, 5] = float("nan")
    torch.save(bad, store_copy / "expert_000.pt")
    problems = TrajectoryStore(store_copy).validate()
    assert len(problems) == 1 and "expert_000.pt" in problems[0] and "non-finite" in problems[0]


class Payload:
    """Unpickling this runs os.mkdir(marker): the code execution weights_only must refuse."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickled_objects_are_refused(store_copy, tmp_path):
    marker = tmp_path / "code_ran"
    torch.save(Payload(marker), store_copy / "expert_000.pt")
    store = TrajectoryStore(store_copy)
    with pytest.raises(FileError, match="expert_000.pt: .*refused: unpickling them could run code"):
        store[0]
    assert not marker.exists()


def test_missing_or_broken_manifest(tmp_path, store_copy):
    with pytest.raises(FileError, match="manifest.json: expected a trajectory manifest .*found no such file"):
        TrajectoryStore(tmp_path / "nothing")
    (store_copy / MANIFEST).write_text("{not json")
    with pytest.raises(FileError, match="manifest.json: expected a trajectory manifest .*not valid JSON"):
        TrajectoryStore(store_copy)
    (store_copy / MANIFEST).write_text(json.dumps({"experts": []}))
    with pytest.raises(FileError, match=r"expected a trajectory manifest .*found a dict with keys \[experts\]"):
        TrajectoryStore(store_copy)
