"""benchmarks/gpu.sh cannot rot: its CPU dry run takes every step a CUDA machine takes, tiny."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_dry_run_writes_every_table(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run", str(tmp_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "gpu.md").read_text()
    for title in ("### Seconds per outer iteration", "### Peak memory", "### K unrolls: loop vs stacked",
                  "### Image gradient against float32",
                  "### Expert training", "### Two ranks against one process"):
        assert title in report, title
    assert "| mnist | 1 | 2 | 2 | default |" in report  # the K = 2 row
    two = json.loads((tmp_path / "two_ranks.json").read_text())
    assert two["experts_identical"] and two["images_rel"] == 0.0  # gloo on the CPU: bit for bit
    for name in ("distill.json", "batched.json", "precision.json", "experts.json"):
        assert json.loads((tmp_path / name).read_text())


def engine_table(monkeypatch, argv: list[str], fake_point=None) -> str:
    """benchmarks/bench_distill.py's sweep on a width-8 store, points in this process (or ``fake_point``)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_distill

    if fake_point is not None:
        monkeypatch.setattr(bench_distill, "in_process", fake_point)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        bench_distill.main(["--inputs", "mnist", "--ipc", "1", "--width", "8", "--reps", "1", "--in-process", *argv])
    return output.getvalue()


def test_the_engine_table_starts_no_point_after_its_budget(monkeypatch):
    table = engine_table(monkeypatch, ["--steps", "2", "--max-seconds", "0"])
    assert "points not started within 0 s: time" in table
    assert "| mnist | 1 | 2 | 1 | default | time | time | time | time | time |" in table


def test_a_point_whose_smaller_n_ran_out_of_memory_is_not_tried(monkeypatch):
    tried = []

    def fake_point(job):
        tried.append((job["variant"], job["N"]))
        if job["variant"] == "exact":
            return {"oom": True}
        return {"seconds": 1.0, "cpu": 1.0, "wall": 1.0, "faulted": 0, "warmup_cpu": 0.0}

    table = engine_table(monkeypatch, ["--steps", "2", "4", "--variants", "exact", "checkpoint"], fake_point)
    assert tried == [("exact", 2), ("checkpoint", 2), ("checkpoint", 4)]
    assert "| mnist | 1 | 4 | 1 | default | OOM | 1.00 |" in table
