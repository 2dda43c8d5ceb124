"""Figures of ``mtt_lab.viz`` (trajectory PCA, curves, bars and heatmaps) and the image mosaics of ``mtt_lab.images``.

The tiny expert store (2 experts x 3 epochs of a width-8, depth-2 ConvNet) is trained once per
session into a fixed folder; ``test_widgets`` imports these fixtures (its copy of ``tiny_store``
finds the folder complete and returns at once).
"""

import contextlib
import io
import json
import re

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from PIL import Image

from mtt_lab.data import ImageDataset
from mtt_lab.distill import DistillConfig, Distiller
from mtt_lab.evaluate import EvalResult
from mtt_lab.experts import ExpertConfig, train_experts
from mtt_lab.family import ProtocolCard, Result
from mtt_lab.images import class_of, grid_png, mosaic, mosaic_shape
from mtt_lab.viz import (
    accuracy_bars, curves_figure, expert_pca_figure, family_figure, feature_space_figure, fit_pca, image_grid,
    mtt_iteration_figure, project_record, project_store, running_mean, step_size_figure, sweep_heatmap,
    trajectory_figure, unroll_window_figure,
)

TINY_CONFIG = dict(syn_steps=3, expert_epochs=1, max_start_epoch=2, device="cpu", iterations=1000)


@contextlib.contextmanager
def one_thread():
    """One torch intra-op thread: on two shared CPU cores more threads only fight each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    config = ExpertConfig(model_kwargs={"width": 8, "depth": 2}, num_experts=2, epochs=3, device="cpu")
    with one_thread():  # session fixtures are set up before the module's autouse one
        return train_experts(config, tmp_path_factory.getbasetemp() / "tiny_experts", progress=False)


@pytest.fixture(scope="module")
def records(tiny_store, mnist_train):
    distiller = Distiller(tiny_store, mnist_train, DistillConfig(**TINY_CONFIG))
    return [distiller.step(return_path=True) for _ in range(2)]


def toy_dataset(channels: int, classes: int = 3) -> ImageDataset:
    """A dataset whose normalisation is x -> 2x - 1, so denormalize(2p - 1) = p."""
    return ImageDataset("toy", torch.zeros(classes, channels, 4, 4), torch.arange(classes),
                        [f"class {c}" for c in range(classes)], (0.5,) * channels, (0.5,) * channels)


def constant_images(values, channels=1, size=4) -> torch.Tensor:
    """Model-space images ``[n, c, size, size]`` whose pixels display as ``values[i]`` everywhere."""
    pixels = torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, channels, size, size)
    return 2 * pixels - 1


# -- images ------------------------------------------------------------------------------------


def test_mosaic_puts_each_image_in_its_class_row():
    dataset = toy_dataset(1)
    values = [0.1, 0.2, 0.3, 0.4, 0.5]
    labels = torch.tensor([2, 0, 2, 1, 0])  # class 0: 0.2, 0.5; class 1: 0.4; class 2: 0.1, 0.3
    grid = mosaic(constant_images(values), dataset, labels, pad=1, background=1.0)
    assert grid.shape == (3 * 5 - 1, 2 * 5 - 1, 1)
    expected = {(0, 0): 0.2, (0, 1): 0.5, (1, 0): 0.4, (2, 0): 0.1, (2, 1): 0.3, (1, 1): 1.0}
    for (row, col), value in expected.items():
        block = grid[row * 5: row * 5 + 4, col * 5: col * 5 + 4, 0]
        np.testing.assert_allclose(block, value, atol=1e-6)
    assert (grid[4, :, 0] == 1.0).all() and (grid[:, 4, 0] == 1.0).all()  # the padding lines


def test_mosaic_infers_ipc_and_reads_soft_labels():
    dataset = toy_dataset(3)
    images = constant_images([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], channels=3)
    by_ipc = mosaic(images, dataset, 2)
    assert by_ipc.shape == (3 * 5 - 1, 2 * 5 - 1, 3)
    np.testing.assert_allclose(mosaic(images, dataset), by_ipc)
    soft = torch.nn.functional.one_hot(torch.arange(3).repeat_interleave(2), 3).float() * 0.8 + 0.05
    np.testing.assert_allclose(mosaic(images, dataset, soft), by_ipc)
    np.testing.assert_allclose(by_ipc[5:9, 5:9], 0.4, atol=1e-6)  # class 1, second image
    with pytest.raises(ValueError, match="pass the labels"):
        class_of(None, 5, 3)


def test_image_grid_draws_grey_as_heatmap_and_colour_as_image(mnist_train):
    images, labels = mnist_train.sample_per_class(2, torch.Generator().manual_seed(0))
    fig = image_grid(images, labels, mnist_train, title="real digits")
    (trace,) = fig.data
    assert isinstance(trace, go.Heatmap)
    np.testing.assert_allclose(trace.z, mosaic(images, mnist_train, labels)[..., 0])
    assert list(fig.layout.yaxis.ticktext) == mnist_train.class_names

    colour = image_grid(constant_images([0.0, 1.0, 0.5], channels=3), 1, toy_dataset(3))
    (trace,) = colour.data
    assert isinstance(trace, go.Image)
    z = np.asarray(trace.z)
    assert z.shape == (4, 14, 3) and z.dtype == np.uint8  # one image per class: the classes side by side
    assert z[0, 0, 0] == 0 and z[0, 5, 0] == 255 and z[0, 10, 0] == 128
    assert [a.text for a in colour.layout.annotations] == ["class 0", "class 1", "class 2"]


def test_one_image_per_class_is_a_2x5_block_and_more_is_classes_by_ipc(mnist_train):
    assert mosaic_shape(10, 1) == (2, 5) and mosaic_shape(10, 3) == (10, 3) and mosaic_shape(3, 1) == (1, 3)
    images, labels = mnist_train.sample_per_class(1, torch.Generator().manual_seed(0))
    grid = mosaic(images, mnist_train, labels)
    assert grid.shape == (2 * 29 - 1, 5 * 29 - 1, 1)
    pixels = mnist_train.denormalize(images)
    for c in (0, 4, 5, 9):  # class c sits in row c // 5, column c % 5
        row, col = divmod(c, 5)
        np.testing.assert_allclose(grid[row * 29: row * 29 + 28, col * 29: col * 29 + 28, 0], pixels[c, 0], atol=1e-6)
    fig = image_grid(images, labels, mnist_train)
    assert [a.text for a in fig.layout.annotations] == mnist_train.class_names
    picture = Image.open(io.BytesIO(grid_png(images, mnist_train, scale=2)))
    assert picture.size == (2 * (5 * 29 - 1), 2 * (2 * 29 - 1))  # wider than tall, as in grid.png

    images, labels = mnist_train.sample_per_class(3, torch.Generator().manual_seed(0))
    three = mosaic(images, mnist_train, labels)
    assert three.shape == (10 * 29 - 1, 3 * 29 - 1, 1)


def test_a_long_title_fits_in_the_image_grid(mnist_train):
    images, labels = mnist_train.sample_per_class(1, torch.Generator().manual_seed(0))
    title = "left: random real start · right: distilled, ten classes"
    assert image_grid(images, labels, mnist_train, title=title).layout.width >= 9 * len(title)


def test_grid_png_is_the_scaled_mosaic():
    dataset = toy_dataset(1)
    images = constant_images([0.0, 1.0, 0.6])
    picture = Image.open(io.BytesIO(grid_png(images, dataset, scale=3)))
    assert picture.format == "PNG" and picture.size == (14 * 3, 4 * 3)
    pixels = np.asarray(picture)
    assert pixels[0, 0] == 0 and pixels[0, 5 * 3] == 255 and pixels[11, 10 * 3 + 2] == round(0.6 * 255)


# -- trajectories --------------------------------------------------------------------------------


def test_pca_explained_variance_and_projection(tiny_store):
    pca = fit_pca(tiny_store, k=3)
    explained = pca.explained
    assert explained.shape == (3,) and float(explained.sum()) <= 1 + 1e-6
    assert (explained[:-1] >= explained[1:]).all() and (explained > 0).all()
    torch.testing.assert_close(pca.components @ pca.components.T, torch.eye(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(pca.project(pca.mean), torch.zeros(3), atol=1e-4, rtol=0)
    # the projected snapshots are centred and their variances are in the ratio of `explained`
    coords = project_store(tiny_store, pca).reshape(-1, 3)
    torch.testing.assert_close(coords.mean(dim=0), torch.zeros(3), atol=1e-3, rtol=0)
    total = sum(float((tiny_store[i] - pca.mean).pow(2).sum()) for i in range(len(tiny_store)))
    torch.testing.assert_close(coords.pow(2).sum(dim=0) / total, explained, atol=1e-3, rtol=1e-3)

    one = fit_pca(tiny_store, experts=[1], epochs=[0, 1, 2], k=5)
    assert one.k == 3  # three snapshots have at most three components
    torch.testing.assert_close(one.mean, tiny_store[1][:3].mean(dim=0))


def test_trajectory_figure_2d_with_overlay(tiny_store, records):
    pca = fit_pca(tiny_store)
    record = records[-1]
    fig = trajectory_figure(tiny_store, pca, dims=2, overlay=record)
    assert [t.type for t in fig.data] == ["scatter"] * (len(tiny_store) + 3)
    expert = fig.data[0]
    assert len(expert.x) == tiny_store.epochs + 1
    assert [epoch for epoch, _ in expert.customdata] == list(range(tiny_store.epochs + 1))
    np.testing.assert_allclose([acc for _, acc in expert.customdata],
                               [100 * a for a in tiny_store.metrics(0)["test_acc"]], rtol=1e-6)
    assert "%" in fig.layout.xaxis.title.text and "%" in fig.layout.yaxis.title.text

    student, start, target = fig.data[-3:]
    assert len(student.x) == record.syn_steps + 1
    anchors = pca.project(tiny_store[record.expert][[record.start_epoch, record.start_epoch + record.expert_epochs]])
    np.testing.assert_allclose([start.x[0], start.y[0]], anchors[0, :2], atol=1e-4)
    np.testing.assert_allclose([target.x[0], target.y[0]], anchors[1, :2], atol=1e-4)
    np.testing.assert_allclose([student.x[0], student.y[0]], anchors[0, :2], atol=1e-4)  # theta_0 = theta*_t


def test_expert_pca_figure_shows_each_experts_training(tiny_store):
    joint = fit_pca(tiny_store, k=2)
    fig = expert_pca_figure(tiny_store)
    assert [t.name for t in fig.data] == [f"expert {i}" for i in range(len(tiny_store))]
    E = tiny_store.epochs
    for n, trace in enumerate(fig.data):
        own = fit_pca(tiny_store, experts=[n], k=2)
        x, y = np.array(trace.x), np.array(trace.y)
        # the expert's own PCA coordinates (PC1 oriented: epoch 0 left of epoch E), not the joint ones
        expected = own.project(tiny_store[n]).numpy()
        expected[:, 0] *= np.sign(expected[-1, 0] - expected[0, 0])
        np.testing.assert_allclose(np.stack([x, y], axis=1), expected, rtol=1e-5, atol=1e-7)
        assert x[-1] > x[0] and np.ptp(x) >= np.ptp(y)  # training runs along PC1, rightwards
        assert (trace.text[0], trace.text[-1]) == ("epoch 0", f"epoch {E}")
        xaxis, yaxis = fig.layout[f"xaxis{n + 1 if n else ''}"], fig.layout[f"yaxis{n + 1 if n else ''}"]
        assert yaxis.scaleanchor == ("x" if n == 0 else f"x{n + 1}") and yaxis.scaleratio == 1  # equal scales
        assert xaxis.title.text == f"PC1 ({100 * float(own.explained[0]):.1f}%)"
        assert trace.xaxis == ("x" if n == 0 else f"x{n + 1}")  # its own panel
        # in the joint PCA the same expert barely moves along PC1 next to the gap between experts
        along_joint = np.ptp(joint.project(tiny_store[n])[:, 0].numpy())
        gap = abs(float(joint.project(tiny_store[0])[0, 0] - joint.project(tiny_store[1])[0, 0]))
        assert along_joint < gap
    wrapped = expert_pca_figure(tiny_store, experts=[1, 0, 1], columns=2)
    assert [t.name for t in wrapped.data] == ["expert 1", "expert 0", "expert 1"] and wrapped.data[2].xaxis == "x3"
    with pytest.raises(ValueError, match="at least one expert"):
        expert_pca_figure(tiny_store, experts=[])


def test_trajectory_figure_3d_subset(tiny_store, records, mnist_train):
    pca = fit_pca(tiny_store)
    fig = trajectory_figure(tiny_store, pca, dims=3, experts=[1], epochs=[1, 2, 3],
                            overlay=project_record(tiny_store, pca, records[0]))
    assert [t.type for t in fig.data] == ["scatter3d"] * 4
    assert fig.data[0].name == "expert 1" and len(fig.data[0].z) == 3
    assert fig.layout.scene.zaxis.title.text.startswith("PC3 (")
    with pytest.raises(ValueError, match="dims"):
        trajectory_figure(tiny_store, fit_pca(tiny_store, k=2), dims=3)
    without_path = Distiller(tiny_store, mnist_train, DistillConfig(**TINY_CONFIG)).step()
    with pytest.raises(ValueError, match="return_path"):
        project_record(tiny_store, pca, without_path)


# -- training signals -----------------------------------------------------------------------


def test_step_size_figure(tiny_store):
    fig = step_size_figure(tiny_store)
    assert len(fig.data) == 2 * len(tiny_store)
    steps, accuracy = fig.data[0], fig.data[1]
    trajectory = tiny_store[0]
    expected = [float((trajectory[e] - trajectory[e - 1]).norm()) for e in range(1, tiny_store.epochs + 1)]
    np.testing.assert_allclose(steps.y, expected, rtol=1e-5)
    assert list(steps.x) == [1, 2, 3] and list(accuracy.x) == [0, 1, 2, 3]


def test_curves_figure_takes_records_and_dicts(records):
    fig = curves_figure([records[0], records[1].as_dict()], window=5)
    loss, alpha, mean = fig.data
    assert list(loss.x) == [1, 2] and list(alpha.x) == [1, 2] and list(mean.x) == [1, 2]
    assert list(loss.y) == [r.loss for r in records] and list(alpha.y) == [r.syn_lr for r in records]
    assert list(mean.y) == pytest.approx([records[0].loss, (records[0].loss + records[1].loss) / 2])
    assert [len(t.x) for t in curves_figure().data] == [0, 0, 0]
    marked = curves_figure(records, changes=[(1.5, "N 3 → 5")])
    assert [s.x0 for s in marked.layout.shapes] == [1.5]
    assert [a.text for a in marked.layout.annotations][-1] == "N 3 → 5"  # after the two subplot titles


def test_running_mean_against_a_loop():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]
    expected = [sum(values[max(0, i - 2): i + 1]) / len(values[max(0, i - 2): i + 1]) for i in range(len(values))]
    assert running_mean(values, 3) == pytest.approx(expected)
    assert running_mean([], 3) == [] and running_mean(values, 1) == pytest.approx(values)
    with pytest.raises(ValueError, match="window"):
        running_mean(values, 0)


RAW_TEX = re.compile(r"[_^]\{|[_^][A-Za-z0-9]|\\[A-Za-z]+|\|\|")  # θ*_t, x^{2}, \theta, ||x||


def figure_texts(fig: go.Figure) -> list[str]:
    """Every string a reader sees in a figure: trace names and hover templates, titles, annotations."""
    texts = [t.name for t in fig.data] + [t.hovertemplate for t in fig.data if "hovertemplate" in t]
    layout = fig.layout.to_plotly_json()
    texts += [a.get("text") for a in layout.get("annotations", [])]
    for key, value in layout.items():
        if key.startswith(("xaxis", "yaxis", "title", "scene")):
            texts.append(json.dumps(value, ensure_ascii=False))
    return [t for t in texts if t]


def test_figure_legends_and_titles_hold_no_raw_tex(tiny_store, records):
    pca = fit_pca(tiny_store)
    figures = [trajectory_figure(tiny_store, pca, overlay=records[0]), step_size_figure(tiny_store),
               curves_figure(records), sweep_heatmap([[1.0]], [1], [1]), accuracy_bars({"a": [0.5, 0.6]})]
    texts = [text for fig in figures for text in figure_texts(fig)]
    assert any("θ*<sub>t+M</sub>" in t for t in texts)  # the notation is there, as HTML plotly renders
    bad = [t for t in texts if RAW_TEX.search(re.sub(r"%\{[^}]*\}", "", t))]  # %{y} is plotly's, not TeX
    assert not bad, f"raw TeX in figure text (plotly shows it literally): {bad}"
    assert RAW_TEX.search("target θ*_{t+M}") and RAW_TEX.search("‖θ‖ or ||θ||")  # the check can fail


def test_accuracy_bars_mean_and_std():
    result = EvalResult("ConvNet", (0.8, 0.9), epochs=10, lr=0.01)
    fig = accuracy_bars({"random real": [0.5, 0.6, 0.7], "MTT": result, "one run": [0.4]})
    (bars,) = fig.data
    assert list(bars.x) == ["random real", "MTT", "one run"]
    np.testing.assert_allclose(bars.y, [60, 85, 40])
    np.testing.assert_allclose(bars.error_y.array, [100 * np.std([0.5, 0.6, 0.7]), 5, 0])
    assert list(bars.text) == ["60.0 ± 8.2", "85.0 ± 5.0", "40.0 (1 run)"]  # no "± 0.0" for a single run


def test_sweep_heatmap():
    values = np.arange(6.0).reshape(3, 2)
    fig = sweep_heatmap(values, Ns=[10, 20, 40], Ms=[1, 2], title="loss")
    (heat,) = fig.data
    np.testing.assert_array_equal(np.asarray(heat.z), values)
    assert list(heat.y) == ["10", "20", "40"] and list(heat.x) == ["1", "2"]
    with pytest.raises(ValueError, match="expected"):
        sweep_heatmap(values, Ns=[10, 20], Ms=[1, 2])


def test_mtt_iteration_figure_draws_the_settings_it_is_given():
    fig = mtt_iteration_figure(syn_steps=7, expert_epochs=2, max_start_epoch=3, epochs=5, start_epoch=1)
    expert, starts, student, start, target = fig.data[:5]
    assert len(expert.x) == 6 and len(starts.x) == 3 and len(student.x) == 7 + 1
    assert (start.x[0], start.y[0]) == (expert.x[1], expert.y[1]) == (student.x[0], student.y[0])
    assert (target.x[0], target.y[0]) == (expert.x[3], expert.y[3])  # theta*_{t+M}
    steps = np.hypot(np.diff(expert.x), np.diff(expert.y))
    assert (np.diff(steps) < 0).all()  # the expert's steps shrink, as real ones do
    assert "N = 7" in student.name and "M = 2" in target.name and "T+ = 3" in starts.name
    with pytest.raises(ValueError, match="T\\+ - 1 \\+ M <= E"):
        mtt_iteration_figure(syn_steps=5, expert_epochs=3, max_start_epoch=3, epochs=4)
    assert not [t for t in figure_texts(fig) if RAW_TEX.search(t)]


def test_trajectories_label_their_first_and_last_epoch(tiny_store):
    fig = trajectory_figure(tiny_store, fit_pca(tiny_store), epochs=[1, 2, 3])
    assert list(fig.data[0].text) == ["epoch 1", "", "epoch 3"]


def test_unroll_window_figure_marks_the_prefix_the_window_and_the_rest():
    fig = unroll_window_figure(max_unroll=12, window=4, end=9)
    prefix, window, rest = fig.data
    assert list(prefix.x) == list(range(0, 6)) and list(window.x) == [6, 7, 8, 9] and list(rest.x) == [10, 11, 12]
    assert "W = 4" in window.name and "n = 9" in fig.layout.title.text
    dd = unroll_window_figure(max_unroll=5, window=5, end=5)  # DD: every step in the graph, nothing left over
    assert [len(t.x) for t in dd.data] == [1, 5]
    with pytest.raises(ValueError, match="need 1 <= W <= n <= T; got W = 6, n = 5, T = 8"):
        unroll_window_figure(max_unroll=8, window=6, end=5)
    assert not [t for t in figure_texts(fig) if RAW_TEX.search(t)]


def test_family_figure_one_panel_per_ipc_one_colour_per_method():
    def result(method, ipc, accs, seconds, peak):
        card = ProtocolCard(method, ipc, "hard", False, True, True, "ConvNet", 32, 10, len(accs))
        return Result(card, EvalResult("ConvNet", accs, 10, 0.01), seconds, 5, peak)

    results = [result("DM", 1, (0.8, 0.9), 2.0, 100 * 2**20), result("Random", 1, (0.5, 0.5), 0.001, None),
               result("DM", 10, (0.9, 0.95), 4.0, 400 * 2**20)]
    fig = family_figure(results)
    assert [(t.name, t.xaxis, t.showlegend) for t in fig.data] == [("DM", "x", True), ("DM", "x2", False),
                                                                    ("Random", "x", True)]
    dm1, dm10, random = fig.data
    assert dm1.x[0] == 2.0 and dm1.y[0] == pytest.approx(85) and dm1.error_y.array[0] == pytest.approx(5)
    assert dm1.marker.color == dm10.marker.color != random.marker.color
    assert dm1.marker.symbol == dm10.marker.symbol != random.marker.symbol
    assert dm10.marker.size > dm1.marker.size > random.marker.size  # area grows with peak memory (None: smallest)
    assert "DM · IPC 1" in dm1.hovertext[0] and "100 MiB" in dm1.hovertext[0]
    assert fig.layout.xaxis.type == "log" and [a.text for a in fig.layout.annotations] == ["IPC 1", "IPC 10"]


def test_feature_space_figure_projects_on_the_real_features_top_directions():
    g = torch.Generator().manual_seed(0)
    real = [torch.randn(20, 1, 2, 2, generator=g) + 3 * c for c in range(3)]
    sets = {"start": torch.stack([r[0] for r in real]), "DM": torch.stack([r.mean(0) for r in real])}
    fig = feature_space_figure(lambda x: x.flatten(1), real, sets, ["a", "b", "c"])
    assert len(fig.data) == 3 * (2 + 2) and [t.name for t in fig.data if t.showlegend is not False] == [
        "class a", "class b", "class c"]
    dots, mean, start, dm = fig.data[:4]
    assert len(dots.x) == 20 and (mean.x[0], mean.y[0]) == pytest.approx((np.mean(dots.x), np.mean(dots.y)), abs=1e-5)
    assert (dm.x[0], dm.y[0]) == pytest.approx((mean.x[0], mean.y[0]), abs=1e-4)  # a set at the class mean sits on it
    assert start.marker.symbol == "circle-open" and dm.marker.symbol == "star" and "star: DM" in fig.layout.title.text
    with pytest.raises(ValueError, match="at most 5 sets"):
        feature_space_figure(lambda x: x.flatten(1), real, {str(k): sets["DM"] for k in range(6)}, ["a", "b", "c"])
