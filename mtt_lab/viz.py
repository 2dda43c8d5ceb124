"""Plotly figures for the course: synthetic images, expert trajectories in PCA space, curves.

Every function returns a static ``go.Figure``; the live versions in :mod:`mtt_lab.widgets`
wrap the same traces in a ``go.FigureWidget`` and update them in place.

Images
    :func:`image_grid` shows a synthetic set as a figure, laid out by :func:`mtt_lab.images.mosaic`
    as classes x images (2 x 5 for one image per class).
Trajectories
    :func:`fit_pca` finds the top principal directions of the experts' snapshots theta*_e;
    :func:`trajectory_figure` draws the experts in those coordinates, optionally with one
    distillation iteration on top (theta*_t, the student's N steps, the target theta*_{t+M});
    :func:`expert_pca_figure` draws each expert in a PCA of its own, where training is visible.
Training signals
    :func:`step_size_figure`, :func:`curves_figure`, :func:`accuracy_bars`, :func:`sweep_heatmap`.
Methods
    :func:`mtt_iteration_figure` and :func:`unroll_window_figure` draw one iteration of MTT and of
    RaT-BPTT / DD; :func:`feature_space_figure` shows sets among real images in a network's features
    (what DM matches); :func:`family_figure` puts the family's results on accuracy-against-seconds axes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.colors import qualitative
from plotly.subplots import make_subplots
from torch import Tensor

from .data import ImageDataset
from .distill import StepRecord
from .evaluate import EvalResult
from .experts import TrajectoryStore
from .family import Result
from .images import class_of, mosaic, mosaic_shape

PALETTE = qualitative.Plotly
STUDENT_COLOUR = "black"


def expert_colour(i: int) -> str:
    """The colour of expert ``i`` in every figure."""
    return PALETTE[i % len(PALETTE)]


# ----------------------------------------------------------------------------------------------
# Images


def image_grid(images: Tensor, labels: Tensor | int | None, dataset: ImageDataset, title: str | None = None
               ) -> go.Figure:
    """The synthetic set as a figure (the :func:`~mtt_lab.images.mosaic` layout), every image's class named.

    images ``[n, c, h, w]`` in model space; labels: ``[n]``, ``[n, C]``, an ipc or ``None``.
    Grey-scale sets are drawn as a heatmap (hover shows the pixel value), colour sets as ``go.Image``.
    """
    pad = 1
    grid = mosaic(images, dataset, labels, pad)
    h, w = images.shape[-2:]
    classes = class_of(labels, len(images), dataset.num_classes)
    per_class = max(int(torch.bincount(classes, minlength=dataset.num_classes).max()), 1)
    if grid.shape[-1] == 1:
        trace = go.Heatmap(z=grid[..., 0], colorscale="gray", zmin=0, zmax=1, showscale=False,
                           hovertemplate="row %{y}, col %{x}: %{z:.2f}<extra></extra>")
    else:
        trace = go.Image(z=(grid * 255).round().astype(np.uint8))
    fig = go.Figure(trace)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    if per_class > 1:  # one row per class: its name on the y axis
        rows = [r * (h + pad) + (h - 1) / 2 for r in range(dataset.num_classes)]
        fig.update_yaxes(tickvals=rows, ticktext=dataset.class_names)
    else:  # wrapped: each class named in its image's corner
        _, columns = mosaic_shape(dataset.num_classes, 1)
        for r, name in enumerate(dataset.class_names):
            fig.add_annotation(x=(r % columns) * (w + pad) - 0.5, y=(r // columns) * (h + pad) - 0.5, text=name,
                               showarrow=False, xanchor="left", yanchor="top", bgcolor="white",
                               font=dict(size=11, color="black"))
        fig.update_yaxes(showticklabels=False)
    fig.update_yaxes(autorange="reversed", scaleanchor="x", showgrid=False, zeroline=False)
    zoom = min(max(600 / max(grid.shape[:2]), 1), 8)  # screen pixels per image pixel
    top = 40 if title else 10
    title_width = 9 * len(title or "") + 40  # about 9 screen pixels per character at plotly's title size
    fig.update_layout(title=title, width=max(250, zoom * grid.shape[1] + 80, title_width), height=zoom * grid.shape[0] + top + 20,
                      margin=dict(l=60, r=20, t=top, b=10), plot_bgcolor="white")
    return fig


# ----------------------------------------------------------------------------------------------
# Trajectories in PCA coordinates


@dataclass(frozen=True)
class PCA:
    """Principal directions of flat parameter vectors.

    mean ``[P]``, components ``[k, P]`` (orthonormal rows), explained ``[k]``: the fraction of the
    total variance of the fitted snapshots along each component, largest first.
    """

    mean: Tensor
    components: Tensor
    explained: Tensor

    @property
    def k(self) -> int:
        return self.components.shape[0]

    def project(self, flat: Tensor) -> Tensor:
        """``[..., P]`` parameter vectors -> ``[..., k]`` coordinates."""
        return (flat.to(self.mean) - self.mean) @ self.components.T


def fit_pca(store: TrajectoryStore, experts: Sequence[int] | None = None, epochs: Sequence[int] | None = None,
            k: int = 3) -> PCA:
    """PCA of the snapshots theta*_e of ``experts`` (default all) at ``epochs`` (default 0..E).

    With X ``[n, P]`` the centred snapshots and X = U S V^T, the components are the first k rows
    of V^T and explained_j = S_j^2 / sum(S^2).
    """
    experts = range(len(store)) if experts is None else experts
    epochs = range(store.epochs + 1) if epochs is None else epochs
    snapshots = torch.cat([store[i][list(epochs)] for i in experts]).double()
    if len(snapshots) < 2:
        raise ValueError("PCA needs at least two snapshots; choose more experts or epochs")
    mean = snapshots.mean(dim=0)
    _, s, vt = torch.linalg.svd(snapshots - mean, full_matrices=False)
    variance = s.pow(2)
    k = min(k, len(s))
    return PCA(mean.float(), vt[:k].float(), (variance[:k] / variance.sum()).float())


def project_store(store: TrajectoryStore, pca: PCA) -> Tensor:
    """Every expert's trajectory in PCA coordinates, ``[experts, E + 1, k]``."""
    return torch.stack([pca.project(store[i]) for i in range(len(store))])


@dataclass(frozen=True)
class Overlay:
    """One distillation iteration in PCA coordinates (from a record with ``student_path``).

    start ``[k]`` = theta*_t, student ``[N + 1, k]`` = theta_0..theta_N (theta_0 = theta*_t),
    target ``[k]`` = theta*_{t+M}.
    """

    iteration: int
    expert: int
    start_epoch: int
    expert_epochs: int
    loss: float
    start: Tensor
    student: Tensor
    target: Tensor

    def label(self) -> str:
        return (f"iteration {self.iteration}: expert {self.expert}, t = {self.start_epoch}, "
                f"N = {len(self.student) - 1}, M = {self.expert_epochs}, loss {self.loss:.3f}")


def project_record(store: TrajectoryStore, pca: PCA, record: StepRecord) -> Overlay:
    """The :class:`Overlay` of a record made with ``step(return_path=True)``."""
    if record.student_path is None:
        raise ValueError("this record has no student path; make it with distiller.step(return_path=True)")
    t, m = record.start_epoch, record.expert_epochs
    anchors = pca.project(store[record.expert][[t, t + m]])
    return Overlay(record.iteration, record.expert, t, m, record.loss, anchors[0],
                   pca.project(record.student_path), anchors[1])


def _scatter(points: Tensor, dims: int, **kwargs) -> go.Scatter | go.Scatter3d:
    """A 2D or 3D scatter trace of ``points [n, >= dims]``."""
    xyz = dict(zip("xyz", points[:, :dims].T.tolist()))
    return go.Scatter3d(**xyz, **kwargs) if dims == 3 else go.Scatter(**xyz, **kwargs)


def trajectory_traces(coords: Tensor, test_acc: Sequence[Sequence[float]], dims: int = 2,
                      experts: Iterable[int] | None = None, epochs: Sequence[int] | None = None) -> list:
    """One line per expert through its snapshots, a marker per epoch (bigger as training goes on).

    The first and last epoch drawn are labelled ("epoch 0", "epoch E"), so the direction of training reads at once.

    coords ``[experts, E + 1, k]`` (:func:`project_store`); test_acc: per expert, ``E + 1`` accuracies.
    """
    experts = range(len(coords)) if experts is None else experts
    epochs = list(range(coords.shape[1]) if epochs is None else epochs)
    traces = []
    for i in experts:
        accuracy = [100 * test_acc[i][e] for e in epochs]
        ends = [f"epoch {e}" if j in (0, len(epochs) - 1) else "" for j, e in enumerate(epochs)]
        traces.append(_scatter(
            coords[i, epochs], dims, mode="lines+markers+text", name=f"expert {i}", legendgroup=f"expert {i}",
            text=ends, textposition="top center", textfont=dict(color=expert_colour(i), size=11),
            line=dict(color=expert_colour(i)),
            marker=dict(color=expert_colour(i), size=[4 + 8 * e / max(max(epochs), 1) for e in epochs]),
            customdata=list(zip(epochs, accuracy)),
            hovertemplate=f"expert {i}<br>epoch %{{customdata[0]}}<br>test acc %{{customdata[1]:.1f}}%<extra></extra>",
        ))
    return traces


def overlay_traces(overlay: Overlay | None, dims: int = 2) -> list:
    """Three traces: the student's path, theta*_t and theta*_{t+M} (empty when ``overlay`` is None)."""
    empty = torch.empty(0, dims)
    student, start, target = ((overlay.student, overlay.start[None], overlay.target[None]) if overlay
                              else (empty, empty, empty))
    return [
        _scatter(student, dims, mode="lines+markers", name="student θ̂<sub>0</sub> … θ̂<sub>N</sub>",
                 line=dict(color=STUDENT_COLOUR, dash="dot"), marker=dict(color=STUDENT_COLOUR, size=4),
                 hovertemplate="student step %{pointNumber}<extra></extra>"),
        _scatter(start, dims, mode="markers", name="start θ*<sub>t</sub>",
                 marker=dict(color=STUDENT_COLOUR, size=12, symbol="circle-open", line=dict(width=3)),
                 hovertemplate="θ*<sub>t</sub><extra></extra>"),
        _scatter(target, dims, mode="markers", name="target θ*<sub>t+M</sub>",
                 marker=dict(color="crimson", size=10, symbol="diamond"), hovertemplate="θ*<sub>t+M</sub><extra></extra>"),
    ]


def pca_layout(explained: Tensor, dims: int = 2, title: str | None = None) -> dict:
    """Layout for a PCA figure: axis titles carry the explained variance of each component."""
    names = [f"PC{j + 1} ({100 * float(explained[j]):.1f}%)" for j in range(dims)]
    layout = dict(title=title or "Expert trajectories (PCA of the parameters)", height=520,
                  legend=dict(itemsizing="constant"), margin=dict(l=10, r=10, t=50, b=10))
    if dims == 3:
        layout["scene"] = {f"{axis}axis": dict(title=dict(text=name)) for axis, name in zip("xyz", names)}
    else:
        layout["xaxis"], layout["yaxis"] = dict(title=dict(text=names[0])), dict(title=dict(text=names[1]))
    return layout


def trajectory_figure(store: TrajectoryStore, pca: PCA, dims: int = 2, experts: Iterable[int] | None = None,
                      overlay: StepRecord | Overlay | None = None, epochs: Sequence[int] | None = None) -> go.Figure:
    """Expert trajectories in the first ``dims`` (2 or 3) principal components.

    overlay: a record from ``distiller.step(return_path=True)`` (or its :class:`Overlay`) to draw
    theta*_t, the student's N steps and the target theta*_{t+M} on top.
    """
    if dims not in (2, 3) or dims > pca.k:
        raise ValueError(f"dims must be 2 or 3 and at most the PCA's k = {pca.k}, got {dims}")
    if isinstance(overlay, StepRecord):
        overlay = project_record(store, pca, overlay)
    test_acc = [store.metrics(i)["test_acc"] for i in range(len(store))]
    traces = trajectory_traces(project_store(store, pca), test_acc, dims, experts, epochs)
    if overlay is not None:
        traces += overlay_traces(overlay, dims)
    return go.Figure(traces, layout=pca_layout(pca.explained, dims, overlay.label() if overlay else None))


def expert_pca_figure(store: TrajectoryStore, experts: Iterable[int] | None = None, columns: int = 3) -> go.Figure:
    """Every expert in a PCA of its *own* snapshots, one panel each, PC1 and PC2 at the same scale.

    A joint PCA of experts from different initialisations spends its first directions on the gaps
    between them; fitted to one expert, PC1 is that expert's training. PC1 is oriented so that
    epoch 0 lies left of epoch E; equal axis scales keep the path's shape true (a long thin path
    is one that mostly moves along PC1). The axis titles give each component's share of that
    expert's variance.
    """
    experts = list(range(len(store)) if experts is None else experts)
    if not experts:
        raise ValueError("expert_pca_figure needs at least one expert")
    cols = max(1, min(columns, len(experts)))
    rows = math.ceil(len(experts) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"expert {i}, its own PCA" for i in experts],
                        horizontal_spacing=0.1, vertical_spacing=0.18)
    coords = torch.zeros(len(store), store.epochs + 1, 2)  # [experts, E + 1, 2]: only the drawn rows are used
    test_acc = [store.metrics(i)["test_acc"] for i in range(len(store))]
    for n, i in enumerate(experts):
        pca = fit_pca(store, experts=[i], k=2)
        coords[i] = pca.project(store[i])
        if coords[i, -1, 0] < coords[i, 0, 0]:  # a principal direction's sign is arbitrary: training runs rightwards
            coords[i, :, 0] *= -1
        row, col = n // cols + 1, n % cols + 1
        for trace in trajectory_traces(coords, test_acc, 2, experts=[i]):
            fig.add_trace(trace, row=row, col=col)
        x_axis = "x" if n == 0 else f"x{n + 1}"
        fig.update_xaxes(title_text=f"PC1 ({100 * float(pca.explained[0]):.1f}%)", row=row, col=col)
        fig.update_yaxes(title_text=f"PC2 ({100 * float(pca.explained[1]):.1f}%)", scaleanchor=x_axis,
                         scaleratio=1, row=row, col=col)
    fig.update_layout(title="Each expert in a PCA of its own snapshots: PC1 is training", height=80 + 340 * rows,
                      showlegend=False, margin=dict(l=10, r=10, t=90, b=10))
    return fig


# ----------------------------------------------------------------------------------------------
# Training signals


def step_size_figure(store: TrajectoryStore) -> go.Figure:
    """Per expert: ||theta*_e - theta*_{e-1}|| per epoch (left) and test accuracy per epoch (right).

    Most of the movement and of the accuracy gain come in the first epochs; MTT draws its start
    epochs from that early part of the trajectories by capping them at T+.
    """
    titles = ("parameter step ‖θ*<sub>e</sub> − θ*<sub>e−1</sub>‖", "test accuracy (%)")
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles)
    for i in range(len(store)):
        trajectory = store[i]
        steps = (trajectory[1:] - trajectory[:-1]).norm(dim=1).tolist()
        style = dict(line=dict(color=expert_colour(i)), legendgroup=f"expert {i}", name=f"expert {i}")
        fig.add_trace(go.Scatter(x=list(range(1, len(steps) + 1)), y=steps, mode="lines+markers", **style), 1, 1)
        accuracy = [100 * a for a in store.metrics(i)["test_acc"]]
        fig.add_trace(go.Scatter(x=list(range(len(accuracy))), y=accuracy, mode="lines+markers",
                                 showlegend=False, **style), 1, 2)
    fig.update_xaxes(title_text="epoch e", dtick=1)
    fig.update_layout(height=380, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def _field(record: StepRecord | Mapping, name: str):
    """A field of a record, or of its ``as_dict()`` (e.g. read back from a JSON log)."""
    return record[name] if isinstance(record, Mapping) else getattr(record, name)


def running_mean(values: Sequence[float], window: int = 10) -> list[float]:
    """Mean of the last ``window`` values at every position (fewer at the start), same length as ``values``."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    sums = np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=float))])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    # mean_i = (S_i - S_{max(i - window, 0)}) / (i - max(i - window, 0)),  S_i = v_1 + ... + v_i
    return ((sums[ends] - sums[starts]) / (ends - starts)).tolist()


def change_marks(changes: Sequence[tuple[float, str]]) -> tuple[list[dict], list[dict]]:
    """Layout shapes and annotations marking setting changes: a dotted vertical line at each x, its text on top.

    changes: ``(x, text)`` pairs, e.g. ``(40.5, "N 10 → 5")`` for a change applied after iteration 40.
    """
    shapes = [dict(type="line", xref="x", yref="paper", x0=x, x1=x, y0=0, y1=1,
                   line=dict(color="gray", width=1, dash="dot")) for x, _ in changes]
    notes = [dict(x=x, xref="x", y=1, yref="y domain", text=text, showarrow=False, xanchor="left", yanchor="top",
                  font=dict(size=10, color="dimgray"), bgcolor="rgba(255,255,255,0.7)") for x, text in changes]
    return shapes, notes


def curves_figure(records: Sequence[StepRecord | Mapping] = (), window: int = 10,
                  changes: Sequence[tuple[float, str]] = ()) -> go.Figure:
    """The matching loss with its running mean (top) and the learned step size α (bottom) per iteration.

    Three traces, in that order: loss, α, the mean of the last ``window`` losses; the dashboard
    extends their x / y as the run goes. ``changes``: see :func:`change_marks`.
    """
    iterations = [_field(r, "iteration") for r in records]
    losses = [_field(r, "loss") for r in records]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("matching loss", "student step size α"))
    fig.add_trace(go.Scatter(x=iterations, y=losses, mode="lines", name="loss", line=dict(color="lightsteelblue")),
                  1, 1)
    fig.add_trace(go.Scatter(x=iterations, y=[_field(r, "syn_lr") for r in records], mode="lines", name="α",
                             line=dict(color="darkorange")), 2, 1)
    fig.add_trace(go.Scatter(x=iterations, y=running_mean(losses, window), mode="lines",
                             name=f"mean of the last {window}", line=dict(color="navy", width=2.5)), 1, 1)
    shapes, notes = change_marks(changes)
    fig.update_xaxes(title_text="iteration", row=2, col=1)
    fig.update_layout(height=420, showlegend=True, legend=dict(orientation="h", x=0, y=-0.18),
                      margin=dict(l=10, r=20, t=50, b=10), shapes=shapes,
                      annotations=list(fig.layout.annotations) + notes)
    return fig


def accuracy_bars(results: Mapping[str, Sequence[float] | EvalResult], title: str | None = None) -> go.Figure:
    """Mean test accuracy (%) per method with a ± one standard deviation error bar.

    results: name -> accuracies in [0, 1] of several runs, or an :class:`EvalResult`.
    """
    names, means, stds, texts = [], [], [], []
    for name, result in results.items():
        result = result if isinstance(result, EvalResult) else EvalResult.of(name, result)
        names.append(name)
        means.append(100 * result.mean)
        stds.append(100 * result.std)
        # one run has no spread to show: say "1 run" rather than a "± 0.0" that looks like a measurement
        texts.append(f"{means[-1]:.1f} ± {stds[-1]:.1f}" if len(result.accuracies) > 1 else f"{means[-1]:.1f} (1 run)")
    fig = go.Figure(go.Bar(x=names, y=means, error_y=dict(type="data", array=stds, visible=True),
                           text=texts, textposition="inside"))
    fig.update_layout(title=title, yaxis=dict(title_text="test accuracy (%)", range=[0, 105]), height=380)
    return fig


def sweep_heatmap(values, Ns: Sequence[int], Ms: Sequence[int], title: str | None = None) -> go.Figure:
    """A sweep's results ``values [len(Ns), len(Ms)]`` as a heatmap: rows N, columns M, cells labelled."""
    z = np.asarray(values, dtype=float)
    if z.shape != (len(Ns), len(Ms)):
        raise ValueError(f"values has shape {z.shape}, expected (len(Ns), len(Ms)) = {(len(Ns), len(Ms))}")
    fig = go.Figure(go.Heatmap(z=z, x=[str(m) for m in Ms], y=[str(n) for n in Ns], colorscale="Viridis",
                               texttemplate="%{z:.3g}", hovertemplate="N = %{y}, M = %{x}: %{z}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="M (expert epochs)", yaxis_title="N (student steps)", height=380)
    return fig


# ----------------------------------------------------------------------------------------------
# The method as a picture


def mtt_iteration_figure(syn_steps: int = 10, expert_epochs: int = 2, max_start_epoch: int = 3, epochs: int = 4,
                         start_epoch: int = 1) -> go.Figure:
    """A diagram of one MTT iteration, drawn for the given N, M, T+, E and start epoch t.

    A schematic, not data: the expert's path θ*_0 … θ*_E with steps that shrink as training goes
    on, the start epochs t < T+ that may be drawn, the student's N steps from θ*_t, the target
    θ*_{t+M}, and the two distances whose ratio is the loss. The arguments are checked the way
    :meth:`DistillConfig.validate` checks them, so the picture cannot show an impossible setting.
    """
    if not (syn_steps >= 1 and expert_epochs >= 1 and 0 <= start_epoch < max_start_epoch
            and max_start_epoch - 1 + expert_epochs <= epochs):
        raise ValueError(f"need N, M >= 1, 0 <= t < T+ and T+ - 1 + M <= E; got N = {syn_steps}, M = {expert_epochs}, "
                         f"t = {start_epoch}, T+ = {max_start_epoch}, E = {epochs}")
    # the expert: arc length s_e = sum of steps 0.75^k (shrinking, like real experts), on a gentle curve
    s = np.concatenate([[0.0], np.cumsum(0.75 ** np.arange(epochs))])
    expert = np.stack([s, 0.45 * np.sin(1.3 * s)], axis=1)
    start, target = expert[start_epoch], expert[start_epoch + expert_epochs]
    # the student: N steps toward the target that stop short of it and stray off the path
    chord = target - start
    normal = np.array([-chord[1], chord[0]]) / max(np.linalg.norm(chord), 1e-9)
    f = np.arange(syn_steps + 1) / syn_steps
    student = start + 0.7 * f[:, None] * chord + 0.25 * np.linalg.norm(chord) * (f * (1.4 - f))[:, None] * normal
    end = student[-1]

    fig = go.Figure()
    fig.add_trace(go.Scatter(x=expert[:, 0], y=expert[:, 1], mode="lines+markers+text", name="expert θ*<sub>0</sub> … θ*<sub>E</sub>",
                             line=dict(color=expert_colour(0), width=3), marker=dict(size=9, color=expert_colour(0)),
                             text=[f"θ*<sub>{e}</sub>" for e in range(epochs + 1)], textposition="bottom center",
                             hoverinfo="skip"))
    starts = expert[:max_start_epoch]
    fig.add_trace(go.Scatter(x=starts[:, 0], y=starts[:, 1], mode="markers", name=f"possible starts t < T+ = {max_start_epoch}",
                             marker=dict(size=22, color="rgba(99,110,250,0.3)", line=dict(width=0)), hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=student[:, 0], y=student[:, 1], mode="lines+markers", name=f"student: N = {syn_steps} steps of size α",
                             line=dict(color=STUDENT_COLOUR, dash="dot"), marker=dict(size=5, color=STUDENT_COLOUR),
                             hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=[start[0]], y=[start[1]], mode="markers", name=f"start θ*<sub>t</sub> (t = {start_epoch})",
                             marker=dict(size=16, symbol="circle-open", color=STUDENT_COLOUR, line=dict(width=3)),
                             hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=[target[0]], y=[target[1]], mode="markers", name=f"target θ*<sub>t+M</sub> (M = {expert_epochs})",
                             marker=dict(size=14, symbol="diamond", color="crimson"), hoverinfo="skip"))
    for a, b, colour, text, shift in [(end, target, "crimson", "‖θ̂<sub>N</sub> − θ*<sub>t+M</sub>‖²: numerator", 0),
                                      (start, target, "gray", "‖θ*<sub>t</sub> − θ*<sub>t+M</sub>‖²: denominator", -18)]:
        fig.add_trace(go.Scatter(x=[a[0], b[0]], y=[a[1], b[1]], mode="lines", showlegend=False, hoverinfo="skip",
                                 line=dict(color=colour, dash="dash", width=1.5)))
        fig.add_annotation(x=(a[0] + b[0]) / 2, y=(a[1] + b[1]) / 2, text=text, showarrow=False, yshift=shift,
                           xshift=0 if shift else 18, xanchor="center" if shift else "left", font=dict(size=12, color=colour))
    fig.add_annotation(x=end[0], y=end[1], text="θ̂<sub>N</sub>", showarrow=True, arrowhead=0, ax=0, ay=-30)
    fig.update_layout(
        title=dict(text="One MTT iteration: loss = ‖θ̂<sub>N</sub> − θ*<sub>t+M</sub>‖² / ‖θ*<sub>t</sub> − θ*<sub>t+M</sub>‖²,"
                   " backpropagated through the N steps into the pixels and α", font=dict(size=14)),
        height=440, width=900, margin=dict(l=10, r=10, t=60, b=10), plot_bgcolor="white",
        legend=dict(orientation="h", x=0, y=-0.02, yanchor="top"),
        xaxis=dict(visible=False), yaxis=dict(visible=False, scaleanchor="x"))
    return fig


def unroll_window_figure(max_unroll: int = 30, window: int = 10, end: int = 22) -> go.Figure:
    """A diagram of one RaT-BPTT iteration (DD's is the case ``window = end = max_unroll``).

    A fresh theta_0, then ``end`` = n student steps on the synthetic set, n drawn from W..T
    (``window``..``max_unroll``): the first n - W without a graph, the last W with one; the loss of
    theta_n on real data is backpropagated through those W steps only. A schematic, not data.
    """
    if not 1 <= window <= end <= max_unroll:
        raise ValueError(f"need 1 <= W <= n <= T; got W = {window}, n = {end}, T = {max_unroll}")
    cut = end - window
    fig = go.Figure()
    if window < max_unroll:  # the end points a draw may pick
        fig.add_shape(type="rect", x0=window - 0.4, x1=max_unroll + 0.4, y0=-0.55, y1=0.3, line_width=0,
                      fillcolor="rgba(99,110,250,0.12)")
        fig.add_annotation(x=(window + max_unroll) / 2, y=-0.55, yanchor="bottom", showarrow=False,
                           text=f"n is drawn from W = {window} … T = {max_unroll}", font=dict(size=12, color="#636efa"))
    groups = [("steps without a graph (θ<sub>n−W</sub> is a constant)", range(0, cut + 1), "gray", 8),
              (f"the window: W = {window} steps kept and backpropagated", range(cut + 1, end + 1), "crimson", 11),
              ("not taken in this draw", range(end + 1, max_unroll + 1), "lightgray", 6)]
    for name, steps, colour, size in groups:
        if len(steps):
            fig.add_trace(go.Scatter(x=list(steps), y=[0] * len(steps), mode="markers", name=name, hoverinfo="skip",
                                     marker=dict(size=size, color=colour)))
    fig.add_shape(type="line", x0=cut, x1=end, y0=-0.18, y1=-0.18, line=dict(color="crimson", width=2, dash="dot"))
    fig.add_annotation(x=(cut + end) / 2, y=-0.18, yanchor="top", showarrow=False, font=dict(size=12, color="crimson"),
                       text="gradient into the pixels and η")
    fig.add_annotation(x=0, y=0, text="fresh θ<sub>0</sub>", showarrow=True, arrowhead=0, ax=0, ay=-30)
    fig.add_annotation(x=end, y=0, text=f"θ<sub>n</sub>, n = {end}: loss on real images", showarrow=True,
                       arrowhead=2, ax=0, ay=-30, xanchor="right" if end > 0.7 * max_unroll else "center",
                       font=dict(color="crimson"))
    fig.update_layout(title=dict(text=f"Unroll n = {end} steps from a fresh θ<sub>0</sub>, backpropagate through the "
                                      f"last W = {window}", font=dict(size=14)),
                      height=280, margin=dict(l=20, r=20, t=50, b=10), plot_bgcolor="white",
                      legend=dict(orientation="h", x=0, y=-0.25, yanchor="top"),
                      xaxis=dict(range=[-1, max_unroll + 1], showgrid=False, zeroline=False),
                      yaxis=dict(visible=False, range=[-0.65, 0.55]))
    return fig


METHOD_SYMBOLS = ("circle", "square", "diamond", "cross", "triangle-up", "pentagon", "star", "hexagon", "x",
                  "triangle-down")


def family_figure(results: Sequence[Result], title: str | None = None) -> go.Figure:
    """Accuracy against the seconds spent building each set, one panel per IPC.

    Each method keeps one colour and one symbol across panels (the legend names them); error bars are
    ± one standard deviation over the evaluation runs; a larger marker is a larger peak memory;
    hovering shows the protocol card.
    """
    ipcs = sorted({r.card.ipc for r in results})
    methods = list(dict.fromkeys(r.card.method for r in results))
    biggest = max((r.peak_bytes or 0) for r in results) or 1
    fig = make_subplots(rows=1, cols=len(ipcs), subplot_titles=[f"IPC {ipc}" for ipc in ipcs])
    for m, method in enumerate(methods):
        for col, ipc in enumerate(ipcs, 1):
            rows = [r for r in results if r.card.method == method and r.card.ipc == ipc]
            if not rows:
                continue
            r = rows[0]
            mib = (r.peak_bytes or 0) / 2**20
            fig.add_trace(go.Scatter(
                x=[r.seconds], y=[100 * r.accuracy.mean], mode="markers", name=method, legendgroup=method,
                showlegend=col == 1,
                error_y=dict(type="data", array=[100 * r.accuracy.std], visible=True),
                marker=dict(size=9 + 25 * math.sqrt((r.peak_bytes or 0) / biggest), color=PALETTE[m % len(PALETTE)],
                            symbol=METHOD_SYMBOLS[m % len(METHOD_SYMBOLS)], line=dict(width=1, color="white")),
                hovertext=[f"{r.card.line()}<br>{r.seconds:.3g} s to build, peak {mib:.0f} MiB"],
                hoverinfo="text"), 1, col)
    fig.update_xaxes(type="log", title_text="seconds to build the set (log)")
    fig.update_yaxes(title_text="test accuracy (%)", col=1)
    fig.update_layout(title=title or "The family: accuracy against compute (marker area: peak memory)", height=460,
                      margin=dict(l=10, r=10, t=60, b=10))
    return fig


SET_SYMBOLS = ("circle-open", "star", "diamond", "square-open", "triangle-up")


def feature_space_figure(embed, real: Sequence[Tensor], sets: Mapping[str, Tensor], class_names: Sequence[str],
                         title: str | None = None) -> go.Figure:
    """Real images and synthetic sets in a network's feature space, projected on two directions.

    embed: ``x [n, c, h, w] -> [n, d]``; real: one ``[b, c, h, w]`` batch per class; sets: name ->
    images ``[C, c, h, w]``, one per class in class order. The directions are the top two principal
    components of the real features; each class has one colour: its real images as faint dots, their
    mean as a cross, the images of each set as that set's symbol (circle, star, diamond, ...).
    """
    if len(sets) > len(SET_SYMBOLS):
        raise ValueError(f"at most {len(SET_SYMBOLS)} sets can be told apart, got {len(sets)}")
    with torch.no_grad():
        features = [embed(x).float() for x in real]
        marked = {name: embed(x).float() for name, x in sets.items()}
    centre = torch.cat(features).mean(0)
    # the top two principal directions of the real features, [2, d]
    directions = torch.linalg.svd(torch.cat(features) - centre, full_matrices=False).Vh[:2]

    def project(f: Tensor) -> np.ndarray:
        return ((f - centre) @ directions.T).cpu().numpy()

    fig = go.Figure()
    for c, (f, name) in enumerate(zip(features, class_names, strict=True)):
        colour, points = PALETTE[c % len(PALETTE)], project(f)
        fig.add_trace(go.Scatter(x=points[:, 0], y=points[:, 1], mode="markers", name=f"class {name}",
                                 legendgroup=name, marker=dict(size=4, color=colour, opacity=0.25), hoverinfo="skip"))
        mean = points.mean(0)
        fig.add_trace(go.Scatter(x=[mean[0]], y=[mean[1]], mode="markers", legendgroup=name, showlegend=False,
                                 marker=dict(size=14, symbol="x", color=colour), hovertext=[f"mean of real {name}"],
                                 hoverinfo="text"))
        for (set_name, f_set), symbol in zip(marked.items(), SET_SYMBOLS):
            point = project(f_set[c:c + 1])
            fig.add_trace(go.Scatter(x=point[:, 0], y=point[:, 1], mode="markers", legendgroup=name, showlegend=False,
                                     marker=dict(size=13, symbol=symbol, color=colour, line=dict(width=2, color=colour)),
                                     hovertext=[f"{set_name}, class {name}"], hoverinfo="text"))
    keys = ", ".join(f"{symbol.split('-')[0]}: {name}" for name, symbol in zip(sets, SET_SYMBOLS))
    fig.update_layout(title=title or f"Features in the top two real directions (cross: class mean; {keys})",
                      height=520, margin=dict(l=10, r=10, t=50, b=10))
    return fig
