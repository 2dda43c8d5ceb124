"""benchmarks/gpu.sh cannot rot: its CPU dry run takes every step a CUDA machine takes, tiny."""

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
