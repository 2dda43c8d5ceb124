"""Interactive widgets for the notebooks (ipywidgets 8 + plotly ``FigureWidget``).

:class:`DistillDashboard`
    runs a :class:`~mtt_lab.distill.Distiller` live: Start / Pause / Step / Reset, sliders for
    N, M, T+ and lr_img applied between steps, the synthetic images, the loss and alpha curves.
:class:`TrajectoryExplorer`
    the experts' trajectories in PCA coordinates, with a replay of recorded iterations.

Neither needs a browser to work: every control is an ordinary widget whose ``.value`` can be
set and whose buttons can be ``.click()``-ed from Python, which is how the tests drive them.
Display either object (or its ``.widget``) in a cell to get the interactive version.
"""

from __future__ import annotations

import asyncio
import copy
import html
import math
import threading
import time
import traceback

import ipywidgets as widgets
import plotly.graph_objects as go

from .distill import Distiller, StepRecord
from .experts import TrajectoryStore
from .images import grid_png
from .viz import (
    PCA, Overlay, change_marks, curves_figure, fit_pca, overlay_traces, pca_layout, project_record, project_store,
    running_mean, trajectory_traces,
)

MIN_REFRESH_SECONDS = 0.2  # at most 5 image / curve updates per second while running
SETTINGS = {"syn_steps": "N", "expert_epochs": "M", "max_start_epoch": "T+", "lr_img": "lr_img"}  # slider -> label


def _slider(kind, description: str, **kwargs):
    """A slider that reports only on release, with room for a long description."""
    return kind(description=description, continuous_update=False, style={"description_width": "initial"},
                layout=widgets.Layout(width="330px"), **kwargs)


class DistillDashboard:
    """Live control panel of a distillation run.

    Start runs steps in a background thread until Pause (or ``config.iterations``); ``await
    dash.run_async(n)`` runs n steps in the cell itself, yielding to the kernel between steps.
    Slider changes are applied with ``distiller.update`` before the next step and marked on the
    curves; a combination the store cannot serve (T+ - 1 + M > E) is reported in the dashboard,
    the sliders snap back to the values in use and the run goes on unchanged. Code that drives
    the dashboard (``step()``, ``run_async()``) or the distiller (``distiller.step()``) while
    Start's run is going pauses that run first and says so; ``distiller.step()`` while a cell's
    ``run_async`` drives it is refused in one line. Reset restores the distiller as it was when the
    dashboard was made and clears the curves, their axes, the marks and the messages.
    """

    def __init__(self, distiller: Distiller, update_every: int = 1, scale: int = 3, window: int = 10):
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        self.distiller, self.update_every, self.scale, self.window = distiller, update_every, scale, window
        self.records: list[StepRecord] = []
        self.changes: list[tuple[float, str]] = []  # (x on the curves, "N 10 → 5"): settings changed there
        self.error: Exception | None = None  # the exception that stopped the last run
        self._initial = copy.deepcopy(distiller.state_dict())
        self._busy = threading.Lock()  # held while a step or an update touches the distiller
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._active = False  # a run (thread, async loop or single step) is going
        self._stepping: int | None = None  # the thread inside the dashboard's own distiller.step()
        distiller.before_step = self._guard_direct_step
        self._pending: dict | None = None  # slider values not applied yet
        self._syncing = False  # True while the sliders are set from the config
        self._last_refresh = -math.inf
        self._run_started, self._run_steps = time.perf_counter(), 0

        c, epochs = distiller.config, distiller.store.epochs
        self.start_button = widgets.Button(description="Start", icon="play", button_style="success")
        self.pause_button = widgets.Button(description="Pause", icon="pause", disabled=True)
        self.step_button = widgets.Button(description="Step", icon="step-forward")
        self.reset_button = widgets.Button(description="Reset", icon="undo", button_style="warning")
        self.start_button.on_click(lambda _: self.start())
        self.pause_button.on_click(lambda _: self.pause(wait=False))
        self.step_button.on_click(lambda _: self.step())
        self.reset_button.on_click(lambda _: self.reset())

        # each bound is valid for some value of the other sliders; the combination is checked on use
        self.n_slider = _slider(widgets.IntSlider, "N (student steps)", min=1, max=max(100, c.syn_steps))
        self.m_slider = _slider(widgets.IntSlider, "M (expert epochs)", min=1, max=epochs - c.min_start_epoch)
        self.t_slider = _slider(widgets.IntSlider, "T+ (max start epoch)", min=c.min_start_epoch + 1, max=epochs)
        exponent = math.log10(c.lr_img)
        self.lr_slider = _slider(widgets.FloatLogSlider, "lr_img (pixels)", base=10, min=math.floor(exponent) - 3,
                                 max=math.ceil(exponent) + 2, step=0.1, readout_format=".3g")
        self._sync_sliders()
        for slider in self.sliders:
            slider.observe(self._on_slider, names="value")

        self.status = widgets.HTML()
        self.message = widgets.HTML()
        self.message_text = ""  # what the message says, as plain text (for print)
        self.error_box = widgets.HTML()
        self.image = widgets.Image(format="png")
        self.curves = go.FigureWidget(curves_figure(window=window))
        self.curves.update_layout(width=520, height=460)
        self._titles = tuple(self.curves.layout.annotations)  # the subplot titles; change marks come after
        for w, name in [(self.status, "status"), (self.image, "grid"), (self.n_slider, "n-slider"),
                        (self.m_slider, "m-slider"), (self.t_slider, "t-slider"), (self.message, "message"),
                        (self.error_box, "error"), (self.curves, "curves")]:
            w.add_class(f"mtt-{name}")
        self.widget = widgets.VBox([
            widgets.HBox([self.start_button, self.pause_button, self.step_button, self.reset_button]),
            widgets.HBox([widgets.VBox([self.n_slider, self.m_slider]), widgets.VBox([self.t_slider, self.lr_slider])]),
            self.status, self.message,
            widgets.HBox([self.image, self.curves], layout=widgets.Layout(align_items="flex-start")),
            self.error_box,
        ])
        self.widget.add_class("mtt-dashboard")
        self._refresh(force=True)

    @property
    def sliders(self) -> tuple:
        return self.n_slider, self.m_slider, self.t_slider, self.lr_slider

    @property
    def running(self) -> bool:
        return self._active

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    # -- controls ------------------------------------------------------------------------------
    def start(self) -> None:
        """Run steps in a background thread until :meth:`pause` or ``config.iterations``."""
        if self.running:
            self._say("Already running; press Pause first.")
            return
        if self._thread is not None:
            self._thread.join()  # the previous run has stopped stepping; let it finish its last refresh
        self._begin_run()
        self._thread = threading.Thread(target=self._run_in_thread, name="mtt-dashboard", daemon=True)
        self._thread.start()

    def pause(self, wait: bool = True) -> None:
        """Stop after the current step; with ``wait``, return only once the run has stopped."""
        self._stop.set()
        thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    def step(self, return_path: bool = False) -> StepRecord | None:
        """One step now; a run started with Start is paused first (and the cell says so).

        Returns the step's record (with ``student_path`` if ``return_path``), or None when the
        step failed (the error is shown in the dashboard, not raised) or another cell's
        ``run_async`` is going (the message says so).
        """
        note = self._pause_for_code("step()")
        if self.running:
            return None
        self._begin_run(note)
        try:
            return self._one_step(return_path)
        except Exception as exc:
            self._show_error(exc)
            return None
        finally:
            self._end_run()

    async def run_async(self, iterations: int) -> list[StepRecord]:
        """Run ``iterations`` steps in this cell, awaiting the event loop between steps.

        ``await dash.run_async(20)``: slider and button events are handled between steps, so
        Pause stops the loop early. A run started with Start is paused first (and the cell says
        so). Returns the new records; errors are shown, not raised.
        """
        note = self._pause_for_code(f"run_async({iterations})")
        if self.running:
            return []
        self._begin_run(note)
        done = []
        try:
            for _ in range(iterations):
                if self._stop.is_set():
                    break
                done.append(self._one_step())
                await asyncio.sleep(0)
        except Exception as exc:
            self._show_error(exc)
        finally:
            self._end_run()
        return done

    def reset(self) -> None:
        """Stop any run and restore the distiller's images, alpha, optimisers, RNG and config."""
        self.pause(wait=True)
        with self._busy:
            self.distiller.load_state_dict(copy.deepcopy(self._initial))
            self._pending = None
        self.records.clear()
        self.changes.clear()
        self._run_steps = 0
        self.error, self.error_box.value = None, ""
        self._sync_sliders()
        with self.curves.batch_update():  # forget ranges from the old run (or from zooming)
            self.curves.update_xaxes(autorange=True)
            self.curves.update_yaxes(autorange=True)
        self._say("Reset to the initial images and settings.")
        self._refresh(force=True)

    # -- the run ------------------------------------------------------------------------------
    def _pause_for_code(self, what: str) -> str:
        """Pause Start's run before code drives the dashboard; returns the note shown (and printed)."""
        if not self.running:
            return ""
        if self._thread is None or not self._thread.is_alive():
            note = f"{what} did nothing: another cell is running the dashboard; wait for it or press Pause."
        else:
            self.pause(wait=True)
            note = (f"The dashboard was running: paused it at iteration {self.distiller.iteration} so that {what} "
                    f"can run from this cell. Press Start to continue the run.")
        print(note)
        self._say(note)
        return note

    def _guard_direct_step(self) -> None:
        """``distiller.step()`` called by other code: pause Start's run first, refuse during a cell's run_async."""
        if not self.running or self._stepping == threading.get_ident():
            return
        if self._thread is not None and self._thread.is_alive():
            self._pause_for_code("distiller.step()")  # the step then runs; the dashboard's curves do not show it
            return
        raise RuntimeError("distiller.step() while the dashboard is running it from another cell (run_async): "
                           "press Pause or call dash.pause() first, or step with dash.step()")

    def _begin_run(self, note: str = "") -> None:
        self._active = True
        self._stop.clear()
        self._say(note)  # messages from before this run are out of date
        self.error, self.error_box.value = None, ""
        self._run_started, self._run_steps = time.perf_counter(), 0
        self._set_buttons(running=True)

    def _end_run(self) -> None:
        self._active = False
        while self._pending is not None:  # slider moves that came in during the last step
            with self._busy:
                self._apply_pending()
        self._set_buttons(running=False)
        self._refresh(force=True)

    def _run_in_thread(self) -> None:
        try:
            while not self._stop.is_set() and self.distiller.iteration < self.distiller.config.iterations:
                self._one_step()
            if not self._stop.is_set():
                self._say(f"Finished: config.iterations = {self.distiller.config.iterations} reached.")
        except Exception as exc:
            self._show_error(exc)
        finally:
            self._end_run()

    def _one_step(self, return_path: bool = False) -> StepRecord:
        """Apply pending slider values, take one distillation step, update the display."""
        with self._busy:
            self._apply_pending()
            self._stepping = threading.get_ident()
            try:
                record = self.distiller.step(return_path=return_path)
            finally:
                self._stepping = None
        self.records.append(record)
        self._run_steps += 1
        self._refresh(force=False)
        return record

    def _set_buttons(self, running: bool) -> None:
        self.start_button.disabled = self.step_button.disabled = running
        self.pause_button.disabled = not running

    # -- sliders -----------------------------------------------------------------------------
    def _sync_sliders(self) -> None:
        """Show the distiller's current N, M, T+ and lr_img on the sliders."""
        c = self.distiller.config
        self._syncing = True
        try:
            self.n_slider.max = max(self.n_slider.max, c.syn_steps)
            self.n_slider.value, self.m_slider.value = c.syn_steps, c.expert_epochs
            self.t_slider.value, self.lr_slider.value = c.max_start_epoch, c.lr_img
        finally:
            self._syncing = False

    def _on_slider(self, change) -> None:
        if self._syncing:
            return
        self._pending = dict(syn_steps=self.n_slider.value, expert_epochs=self.m_slider.value,
                             max_start_epoch=self.t_slider.value, lr_img=self.lr_slider.value)
        if self._busy.acquire(blocking=False):  # no step in progress: apply now
            try:
                self._apply_pending()
            finally:
                self._busy.release()
            self._refresh(force=True)  # the status line and the change mark
        else:
            self._say("New settings apply from the next step.")

    def _apply_pending(self) -> None:
        """``distiller.update`` with the pending slider values (call with ``_busy`` held).

        A refused combination puts the sliders back to the values in use; an accepted change is
        marked on the curves halfway between the last iteration and the next.
        """
        changes, self._pending = self._pending, None
        if changes is None:
            return
        old = {name: getattr(self.distiller.config, name) for name in SETTINGS}
        try:
            self.distiller.update(**changes)
        except ValueError as exc:
            self._sync_sliders()
            c = self.distiller.config
            hint = " To raise M, lower T+ first (or the other way round)." if "T+ - 1 + M" in str(exc) else ""
            self._say(f"Not applied: {exc}. The sliders are back at the values in use (N = {c.syn_steps}, "
                      f"M = {c.expert_epochs}, T+ = {c.max_start_epoch}).{hint}", error=True)
            return
        moved = [f"{label} {_short(old[name])} → {_short(changes[name])}" for name, label in SETTINGS.items()
                 if changes[name] != old[name]]
        if moved:
            self.changes.append((self.distiller.iteration + 0.5, ", ".join(moved)))
        self._say("")

    # -- display -------------------------------------------------------------------------------
    def _say(self, text: str, error: bool = False) -> None:
        colour = "crimson" if error else "dimgray"
        self.message_text = text
        self.message.value = f'<span style="color:{colour}">{html.escape(text)}</span>' if text else ""

    def _show_error(self, exc: Exception) -> None:
        self.error = exc
        trace = "".join(traceback.format_exception(exc))
        self.error_box.value = (f'<div style="color:crimson"><b>The run stopped with {type(exc).__name__}: '
                                f'{html.escape(str(exc))}</b><pre>{html.escape(trace)}</pre></div>')

    def _refresh_status(self) -> None:
        c, d = self.distiller.config, self.distiller
        elapsed = time.perf_counter() - self._run_started
        rate = self._run_steps / elapsed if self._run_steps and elapsed > 0 else 0.0
        loss = f"{self.records[-1].loss:.4f}" if self.records else "–"
        state = "running" if self.running else "idle"
        self.status.value = (f"<b>iteration {d.iteration}</b> · {rate:.2f} it/s · loss {loss} · α {d.syn_lr:.4g}"
                             f" · N = {c.syn_steps}, M = {c.expert_epochs}, T+ = {c.max_start_epoch},"
                             f" lr_img = {c.lr_img:.3g} · {state}")

    def _refresh(self, force: bool) -> None:
        """Status every time; images and curves every ``update_every`` steps, at most 5 times a second."""
        self._refresh_status()
        now = time.perf_counter()
        due = self.distiller.iteration % self.update_every == 0 and now - self._last_refresh >= MIN_REFRESH_SECONDS
        if not (force or due):
            return
        self._last_refresh = now
        d = self.distiller
        self.image.value = grid_png(d.images, d.train, self.scale, labels=d.labels)
        iterations, losses = [r.iteration for r in self.records], [r.loss for r in self.records]
        shapes, notes = change_marks(self.changes)
        with self.curves.batch_update():
            loss, alpha, mean = self.curves.data
            loss.x, loss.y = iterations, losses
            alpha.x, alpha.y = iterations, [r.syn_lr for r in self.records]
            mean.x, mean.y = iterations, running_mean(losses, self.window)
            self.curves.layout.shapes = shapes
            self.curves.layout.annotations = self._titles + tuple(notes)


def _short(value) -> str:
    """A setting for a change mark: integers as they are, lr_img with 3 significant digits."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class TrajectoryExplorer:
    """The experts' trajectories in PCA space, with a replay of distillation iterations.

    The PCA is fitted once (on every snapshot of every expert, unless ``pca`` is given); the
    expert and epoch choices only filter what is drawn. ``records`` from
    ``distiller.step(return_path=True)`` are projected once; the iteration slider then moves
    the student overlay (theta*_t, the N student steps, theta*_{t+M}) without recomputing.
    """

    def __init__(self, store: TrajectoryStore, records: list[StepRecord] | None = None, pca: PCA | None = None):
        self.store = store
        self.pca = pca or fit_pca(store)
        self.coords = project_store(store, self.pca)  # [experts, E + 1, k]
        self.test_acc = [store.metrics(i)["test_acc"] for i in range(len(store))]
        self.overlays = [project_record(store, self.pca, r) for r in records or () if r.student_path is not None]

        self.expert_select = widgets.SelectMultiple(options=[(f"expert {i}", i) for i in range(len(store))],
                                                    value=tuple(range(len(store))), rows=min(len(store), 6),
                                                    description="experts")
        self.epoch_range = widgets.IntRangeSlider(value=(0, store.epochs), min=0, max=store.epochs,
                                                  description="epochs", continuous_update=False)
        self.dims_toggle = widgets.ToggleButtons(options=[("2D", 2), ("3D", 3)] if self.pca.k >= 3 else [("2D", 2)],
                                                 value=2, description="view")
        last = max(len(self.overlays) - 1, 0)
        self.iteration_slider = widgets.IntSlider(min=0, max=last, description="recorded iteration",
                                                  disabled=not self.overlays, style={"description_width": "initial"})
        self.play = widgets.Play(min=0, max=last, interval=400, disabled=not self.overlays)
        widgets.jslink((self.play, "value"), (self.iteration_slider, "value"))
        self.info = widgets.HTML()
        self.figure = go.FigureWidget()
        self.figure.add_class("mtt-pca")
        for control in (self.expert_select, self.epoch_range, self.dims_toggle):
            control.observe(lambda _: self.redraw(), names="value")
        self.iteration_slider.observe(lambda _: self.move_overlay(), names="value")
        self.widget = widgets.VBox([
            widgets.HBox([self.expert_select, widgets.VBox([self.epoch_range, self.dims_toggle])]),
            widgets.HBox([self.play, self.iteration_slider]), self.info, self.figure,
        ])
        self.widget.add_class("mtt-explorer")
        self.redraw()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    @property
    def overlay(self) -> Overlay | None:
        """The :class:`~mtt_lab.viz.Overlay` the iteration slider points at (None without records)."""
        return self.overlays[self.iteration_slider.value] if self.overlays else None

    def redraw(self) -> None:
        """Rebuild every trace for the chosen experts, epochs and 2D / 3D view."""
        dims = self.dims_toggle.value
        lo, hi = self.epoch_range.value
        experts = sorted(self.expert_select.value)
        traces = trajectory_traces(self.coords, self.test_acc, dims, experts, range(lo, hi + 1))
        with self.figure.batch_update():
            self.figure.data = ()
            self.figure.add_traces(traces + overlay_traces(self.overlay, dims))
            self.figure.layout = go.Layout(pca_layout(self.pca.explained, dims))
        self._show_info()

    def move_overlay(self) -> None:
        """Point the three overlay traces (always the last three) at the chosen iteration."""
        fresh = overlay_traces(self.overlay, self.dims_toggle.value)
        with self.figure.batch_update():
            for trace, new in zip(self.figure.data[-3:], fresh):
                trace.update(x=new.x, y=new.y, **({"z": new.z} if self.dims_toggle.value == 3 else {}))
        self._show_info()

    def _show_info(self) -> None:
        self.info.value = (html.escape(self.overlay.label()) if self.overlays else
                           "No recorded iterations: pass records from distiller.step(return_path=True).")
