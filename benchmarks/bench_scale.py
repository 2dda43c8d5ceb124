"""Two processes with one thread each against one process with two threads, as ``mtt-lab`` runs.

Both arms run the real command line in fresh processes, on the same work, alternating
(1x2, 2x1, 1x2, 2x1, ...) so that background load that comes and goes hits both alike:

  experts   ``mtt-lab experts`` trains the same experts (same seeds) into a fresh store; the
            figure is training images per second over the training itself (the experts'
            recorded seconds: their sum in one process, the slower rank's sum under torchrun),
            plus the whole command's wall time (process start, data loading, rendezvous).
  distill   ``mtt-lab distill --trajectories K`` on one store; the figure is the median of the
            log's seconds per outer iteration after ``--warmup`` iterations (rank 0's records:
            its own unrolls plus the wait in the all_reduce).

``2x1`` is ``torchrun --standalone --nproc_per_node 2`` with ``OMP_NUM_THREADS=1``; ``1x2`` is a
plain process with ``OMP_NUM_THREADS=2``. The machine's load average (``os.getloadavg``) is
recorded before every run: on a shared machine say it with the ratio.

Usage::

    .venv/bin/python benchmarks/bench_scale.py experts --width 128 --experts 2 --epochs 1 --rounds 2
    .venv/bin/python benchmarks/bench_scale.py distill --store runs/w128 --ipc 10 --trajectories 2 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "1x2": ([sys.executable, "-m", "mtt_lab.cli"], "2"),
    "2x1": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "-m", "mtt_lab.cli"], "1"),
}


def run_arm(arm: str, args: list[str]) -> float:
    """Run ``mtt-lab ARGS`` the way ``arm`` says; return the command's wall seconds."""
    command, threads = ARMS[arm]
    start = time.perf_counter()
    subprocess.run([*command, *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": threads})
    return time.perf_counter() - start


def alternate(a, work: Path, what: str, command, measure) -> list[dict]:
    """``a.rounds`` rounds of (1x2, 2x1): ``mtt-lab command(out)``, then ``measure(arm, out)`` -> figures."""
    rows = []
    for round_ in range(a.rounds):
        for arm in ("1x2", "2x1"):
            out = work / f"{what}_{arm}_{round_}"
            load = os.getloadavg()[0]
            wall = run_arm(arm, command(out))
            rows.append({"arm": arm, "round": round_, "load": load, "wall_s": wall, **measure(arm, out)})
            print(f"{what} {arm} round {round_}: {rows[-1]}", flush=True)
            shutil.rmtree(out)
    return rows


def bench_experts(a, work: Path) -> list[dict]:
    def measure(arm, out):
        seconds = [e["seconds"] for e in json.loads((out / "manifest.json").read_text())["experts"]]
        ranks = 2 if arm == "2x1" else 1
        training = max(sum(seconds[r::ranks]) for r in range(ranks))
        return {"training_s": training, "img_per_s": a.experts * a.epochs * 8000 / training}

    return alternate(a, work, "experts", lambda out: [
        "experts", "--model", f"ConvNetW{a.width}", "--experts", str(a.experts), "--epochs", str(a.epochs),
        "--device", "cpu", "--out", str(out)], measure)


def bench_distill(a, work: Path) -> list[dict]:
    def measure(arm, out):
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        return {"s_per_iteration": statistics.median(r["seconds"] for r in log[a.warmup:])}

    return alternate(a, work, "distill", lambda out: [
        "distill", "--experts", a.store, "--out", str(out), "--ipc", str(a.ipc), "--syn-steps", str(a.syn_steps),
        "--expert-epochs", "1", "--max-start-epoch", "1", "--trajectories", str(a.trajectories), "--mode", a.mode,
        "--iterations", str(a.iterations), "--device", "cpu"], measure)


def summary(rows: list[dict], key: str, higher_is_better: bool) -> str:
    med = {arm: statistics.median(r[key] for r in rows if r["arm"] == arm) for arm in ARMS}
    ratio = med["2x1"] / med["1x2"] if higher_is_better else med["1x2"] / med["2x1"]
    loads = [r["load"] for r in rows]
    return (f"median {key}: 1x2 {med['1x2']:.3g}, 2x1 {med['2x1']:.3g}; 2x1 is {ratio:.2f}x faster "
            f"(load average {min(loads):.2f}-{max(loads):.2f} at the runs' starts)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    e = sub.add_parser("experts")
    e.add_argument("--width", type=int, default=128)
    e.add_argument("--experts", type=int, default=2)
    e.add_argument("--epochs", type=int, default=1)
    d = sub.add_parser("distill")
    d.add_argument("--store", required=True, help="a trajectory store with >= 2 epochs")
    d.add_argument("--ipc", type=int, default=10)
    d.add_argument("--syn-steps", type=int, default=10)
    d.add_argument("--trajectories", type=int, default=2)
    d.add_argument("--mode", default="checkpoint")
    d.add_argument("--iterations", type=int, default=4)
    d.add_argument("--warmup", type=int, default=1)
    for p in (e, d):
        p.add_argument("--rounds", type=int, default=2)
        p.add_argument("--json", default=None, help="write the rows here")
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if a.what == "experts":
            rows, line = bench_experts(a, Path(tmp)), None
            line = summary(rows, "img_per_s", higher_is_better=True)
        else:
            rows = bench_distill(a, Path(tmp))
            line = summary(rows, "s_per_iteration", higher_is_better=False)
    print(line)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows, "summary": line}, indent=1))


if __name__ == "__main__":
    main()
