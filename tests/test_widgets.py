"""The dashboard and the trajectory explorer, driven from Python the way a learner's clicks would.

No kernel is needed: widget values are set directly, buttons are ``.click()``-ed, and the tests
read back the distiller, the image bytes, the curve traces and the status / error text.
"""

import asyncio
import io
import time

import pytest
import torch
from test_viz import TINY_CONFIG, one_torch_thread, records, tiny_store  # noqa: F401  (shared fixtures)

from mtt_lab.distill import DistillConfig, Distiller
from mtt_lab.widgets import DistillDashboard, TrajectoryExplorer

TIMEOUT = 60.0  # generous: the CPU is shared


def wait_for(condition, timeout=TIMEOUT):
    """Poll ``condition()`` every 10 ms until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the dashboard"
        time.sleep(0.01)


@pytest.fixture
def distiller(tiny_store, mnist_train):
    return Distiller(tiny_store, mnist_train, DistillConfig(**{**TINY_CONFIG, "syn_steps": 2}))


@pytest.fixture
def dash(distiller):
    dashboard = DistillDashboard(distiller)
    yield dashboard
    dashboard.pause()


def curve_lengths(dash):
    return [len(trace.x) for trace in dash.curves.data]  # loss, alpha, running mean


# -- the dashboard ---------------------------------------------------------------------------------


def test_sliders_start_at_the_config_and_update_the_distiller(dash, distiller):
    assert (dash.n_slider.value, dash.m_slider.value, dash.t_slider.value) == (2, 1, 2)
    assert dash.t_slider.max == distiller.store.epochs and dash.m_slider.max == distiller.store.epochs
    assert all(not s.continuous_update for s in dash.sliders)
    dash.n_slider.value = 5
    dash.lr_slider.value = 10.0
    assert distiller.config.syn_steps == 5 and distiller.config.lr_img == pytest.approx(10.0)
    assert distiller.opt_img.param_groups[0]["lr"] == pytest.approx(10.0)
    assert "N = 5" in dash.status.value and dash.message.value == ""


def test_an_invalid_combination_is_reported_and_the_slider_snaps_back(dash, distiller):
    dash.m_slider.value = 3  # T+ = 2: start epoch 1 + M = 3 > E = 3
    assert distiller.config.expert_epochs == 1 and distiller.config.max_start_epoch == 2
    assert dash.m_slider.value == 1  # the slider shows the M the run uses, not the refused one
    assert "Not applied" in dash.message.value and "T+ - 1 + M" in dash.message.value
    assert "lower T+ first" in dash.message.value and "crimson" in dash.message.value
    assert dash.message_text.startswith("Not applied: start epochs") and "M <= 3" in dash.message_text  # no markup
    dash.t_slider.value = 1  # the way round the message suggests
    dash.m_slider.value = 3
    assert (distiller.config.expert_epochs, distiller.config.max_start_epoch) == (3, 1)
    assert (dash.m_slider.value, dash.t_slider.value) == (3, 1) and dash.message.value == ""


def test_a_refused_slider_during_a_run_snaps_back_too(dash, distiller):
    dash.start()
    wait_for(lambda: distiller.iteration >= 1)
    dash.m_slider.value = 3  # refused now or before the next step
    wait_for(lambda: "Not applied" in dash.message.value)
    assert dash.m_slider.value == 1 and distiller.config.expert_epochs == 1
    dash.pause()
    assert all(r.expert_epochs == 1 for r in dash.records)


def test_step_advances_and_redraws(dash, distiller):
    before = dash.image.value
    assert curve_lengths(dash) == [0, 0, 0]
    dash.step_button.click()
    assert distiller.iteration == 1 and len(dash.records) == 1
    assert dash.image.value != before and bytes(dash.image.value).startswith(b"\x89PNG")
    assert curve_lengths(dash) == [1, 1, 1]
    assert list(dash.curves.data[0].y) == [dash.records[0].loss]
    assert "iteration 1" in dash.status.value and f"{dash.records[0].loss:.4f}" in dash.status.value


def test_start_runs_in_the_background_and_pause_stops_it(dash, distiller):
    dash.start()
    assert dash.running and dash.start_button.disabled and not dash.pause_button.disabled
    dash.start()  # a second run is refused, not started
    assert "Already running" in dash.message.value
    wait_for(lambda: distiller.iteration >= 2)
    dash.n_slider.value = 3  # applied between steps
    wait_for(lambda: any(r.syn_steps == 3 for r in dash.records))
    dash.pause()
    assert not dash.running and not dash._thread.is_alive() and not dash.start_button.disabled
    stopped = distiller.iteration
    time.sleep(0.05)
    assert distiller.iteration == stopped == len(dash.records)
    assert curve_lengths(dash) == [stopped] * 3 and f"iteration {stopped}" in dash.status.value


def test_pause_button_and_slider_moved_during_the_last_step(dash, distiller):
    dash.start_button.click()
    wait_for(lambda: distiller.iteration >= 1)
    dash.pause_button.click()  # does not wait: the run stops after its current step
    dash.n_slider.value = 4
    wait_for(lambda: not dash.running)
    dash._thread.join(TIMEOUT)
    assert distiller.config.syn_steps == 4  # applied after the run, not lost


def test_a_run_stops_at_config_iterations(tiny_store, mnist_train):
    distiller = Distiller(tiny_store, mnist_train, DistillConfig(**{**TINY_CONFIG, "syn_steps": 1, "iterations": 2}))
    dash = DistillDashboard(distiller)
    dash.start()
    wait_for(lambda: not dash.running)
    assert distiller.iteration == 2 and "Finished" in dash.message.value


def test_run_async(dash, distiller):
    done = asyncio.run(dash.run_async(3))
    assert [r.iteration for r in done] == [1, 2, 3] and distiller.iteration == 3
    assert curve_lengths(dash) == [3, 3, 3] and not dash.running


def test_errors_inside_a_run_are_shown(dash, distiller, monkeypatch):
    def broken(return_path=False):
        raise RuntimeError("the student diverged")

    monkeypatch.setattr(distiller, "step", broken)
    dash.step_button.click()
    assert "the student diverged" in dash.error_box.value and "Traceback" in dash.error_box.value
    assert isinstance(dash.error, RuntimeError) and not dash.running

    dash.start()  # a new run clears the old error and shows its own
    wait_for(lambda: not dash.running)
    assert "RuntimeError" in dash.error_box.value and not dash.start_button.disabled

    assert asyncio.run(dash.run_async(2)) == [] and "the student diverged" in dash.error_box.value


def test_reset_restores_the_initial_state(dash, distiller):
    initial_images, initial_png = distiller.images, dash.image.value
    dash.n_slider.value = 3
    for _ in range(2):
        dash.step()
    assert not torch.equal(distiller.images, initial_images)
    dash.reset_button.click()
    assert torch.equal(distiller.images, initial_images) and distiller.iteration == 0
    assert distiller.syn_lr == pytest.approx(distiller.config.lr_teacher)
    assert dash.image.value == initial_png and curve_lengths(dash) == [0, 0, 0]
    assert dash.n_slider.value == distiller.config.syn_steps == 2
    # the run continues exactly as a fresh one would
    again = dash.step()
    fresh = Distiller(distiller.store, distiller.train, DistillConfig(**{**TINY_CONFIG, "syn_steps": 2})).step()
    assert again.loss == pytest.approx(fresh.loss) and again.start_epoch == fresh.start_epoch


def test_code_that_drives_a_running_dashboard_pauses_it_first(dash, distiller, capsys):
    """Press Start, then run the notebook's next cells: they pause the run and say so, no traceback."""
    dash.start_button.click()
    wait_for(lambda: distiller.iteration >= 1)
    record = dash.step(return_path=True)
    assert record is not None and record.student_path is not None and not dash.running
    assert not dash._thread.is_alive() and record.iteration == distiller.iteration == len(dash.records)
    out = capsys.readouterr().out
    assert "paused it at iteration" in out and "Press Start to continue" in out
    assert "paused it" in dash.message.value

    dash.start()
    wait_for(lambda: distiller.iteration >= record.iteration + 1)
    before = distiller.iteration
    done = asyncio.run(dash.run_async(2))
    assert len(done) == 2 and not dash.running and "run_async(2)" in capsys.readouterr().out
    assert distiller.iteration == len(dash.records) and distiller.iteration >= before + 2
    assert [r.iteration for r in dash.records] == list(range(1, distiller.iteration + 1))

    assert dash.step() is not None and capsys.readouterr().out == ""  # not running: nothing to say


def test_stepping_the_distiller_itself_during_a_run_pauses_or_refuses_in_one_line(dash, distiller, capsys):
    """``distiller.step()`` (not ``dash.step()``) while the dashboard runs: never two threads on one distiller."""
    dash.start_button.click()
    wait_for(lambda: distiller.iteration >= 1)
    record = distiller.step()
    assert not dash.running and not dash._thread.is_alive() and record.iteration == distiller.iteration
    assert distiller.iteration == len(dash.records) + 1  # the dashboard stopped first; this step is not on its curves
    out = capsys.readouterr().out
    assert "paused it at iteration" in out and "distiller.step()" in out and len(out.strip().splitlines()) == 1

    async def step_inside_run_async():
        task = asyncio.ensure_future(dash.run_async(50))
        await asyncio.sleep(0)  # the loop has taken its first step and yielded
        assert dash.running
        try:
            with pytest.raises(RuntimeError, match=r"^distiller\.step\(\) while the dashboard is running it .*"
                                                   r"dash\.pause\(\)") as refused:
                distiller.step()
        finally:
            dash.pause(wait=False)
        await task
        return refused

    before = distiller.iteration
    refused = asyncio.run(step_inside_run_async())
    assert "\n" not in str(refused.value) and not dash.running
    assert distiller.iteration == len(dash.records) + 1 > before  # the refused call took no step
    assert distiller.step().iteration == distiller.iteration and capsys.readouterr().out == ""  # idle: no note


def test_setting_changes_are_marked_on_the_curves_with_a_running_mean(tiny_store, mnist_train):
    distiller = Distiller(tiny_store, mnist_train, DistillConfig(**{**TINY_CONFIG, "syn_steps": 2}))
    dash = DistillDashboard(distiller, window=2)
    titles = len(dash.curves.layout.annotations)
    for _ in range(2):
        dash.step()
    dash.n_slider.value = 3
    dash.step()
    dash.m_slider.value = 2
    assert dash.changes == [(2.5, "N 2 → 3"), (3.5, "M 1 → 2")]  # between the iterations before and after
    assert [s.x0 for s in dash.curves.layout.shapes] == [x for x, _ in dash.changes]
    assert [a.text for a in dash.curves.layout.annotations[titles:]] == [text for _, text in dash.changes]
    losses = [r.loss for r in dash.records]
    mean = dash.curves.data[2]
    assert list(mean.y) == pytest.approx([losses[0], (losses[0] + losses[1]) / 2, (losses[1] + losses[2]) / 2])
    dash.m_slider.value = 1  # back to the old value: marked too
    assert dash.changes[-1] == (3.5, "M 2 → 1")


def test_reset_clears_marks_messages_and_axis_ranges(dash, distiller):
    dash.step()
    dash.n_slider.value = 3
    dash.m_slider.value = 3  # refused: a red message
    dash.curves.update_xaxes(range=[0, 50])  # as if the learner had zoomed
    dash.reset()
    assert dash.changes == [] and len(dash.curves.layout.shapes) == 0
    assert "Reset" in dash.message.value and "Not applied" not in dash.message.value
    assert dash.curves.layout.xaxis.autorange is True and dash.curves.layout.yaxis.autorange is True
    assert dash.curves.layout.xaxis2.autorange is True and dash.curves.layout.yaxis2.autorange is True


def test_the_dashboard_grid_is_2x5_for_one_image_per_class(tiny_store, mnist_train):
    from PIL import Image

    distiller = Distiller(tiny_store, mnist_train, DistillConfig(**{**TINY_CONFIG, "ipc": 1}))
    dash = DistillDashboard(distiller)
    width, height = Image.open(io.BytesIO(dash.image.value)).size
    assert (width, height) == (dash.scale * (5 * 29 - 1), dash.scale * (2 * 29 - 1)) and width >= 400


# -- the trajectory explorer --------------------------------------------------------------------------


def test_explorer_replays_recorded_iterations(tiny_store, records):
    explorer = TrajectoryExplorer(tiny_store, records)
    figure = explorer.figure
    assert len(figure.data) == len(tiny_store) + 3 and explorer.iteration_slider.max == len(records) - 1
    student = figure.data[-3]
    first = (student.x, student.y)
    assert len(student.x) == records[0].syn_steps + 1
    explorer.iteration_slider.value = 1
    assert (student.x, student.y) != first and len(figure.data) == len(tiny_store) + 3
    assert f"iteration {records[1].iteration}" in explorer.info.value
    expected = explorer.pca.project(records[1].student_path)
    torch.testing.assert_close(torch.tensor(student.x), expected[:, 0], atol=1e-5, rtol=0)


def test_explorer_filters_and_switches_to_3d(tiny_store, records):
    explorer = TrajectoryExplorer(tiny_store, records)
    explorer.expert_select.value = (1,)
    explorer.epoch_range.value = (1, 2)
    assert len(explorer.figure.data) == 1 + 3 and len(explorer.figure.data[0].x) == 2
    explorer.dims_toggle.value = 3
    assert {t.type for t in explorer.figure.data} == {"scatter3d"}
    assert explorer.figure.layout.scene.xaxis.title.text.startswith("PC1")
    explorer.iteration_slider.value = 1
    assert len(explorer.figure.data[-3].z) == records[1].syn_steps + 1
    explorer.dims_toggle.value = 2
    assert {t.type for t in explorer.figure.data} == {"scatter"} and explorer.figure.layout.xaxis.title.text


def test_explorer_without_records(tiny_store):
    explorer = TrajectoryExplorer(tiny_store)
    assert explorer.iteration_slider.disabled and "No recorded iterations" in explorer.info.value
    assert [len(t.x) for t in explorer.figure.data[-3:]] == [0, 0, 0]
