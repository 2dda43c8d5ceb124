"""mtt_lab.distributed and the runs it splits: launched by ``torchrun`` exactly as a user would.

Each multi-process test starts ``torchrun --standalone --nproc_per_node 2`` in a subprocess (gloo on
the CPU, one thread per process) and compares what it wrote with a one-process run. Torch's own
launcher and collectives are used throughout; nothing here imitates them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distributed_worker import distill_every_mode
from mtt_lab import distributed
from mtt_lab.cli import main
from mtt_lab.data import load_splits
from mtt_lab.distill import MODES, DistillConfig, Distiller
from mtt_lab.experts import ExpertConfig, TrajectoryStore, train_experts

HERE = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY_EXPERTS = ["--model", "ConvNetW16", "--epochs", "1", "--experts", "3", "--device", "cpu"]


def torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``torchrun --nproc_per_node 2 ARGS`` (a script path or ``-m module``), output captured."""
    return subprocess.run([*TORCHRUN, *args], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=HERE)


@pytest.fixture(scope="module")
def one_process_experts(tmp_path_factory) -> Path:
    """``mtt-lab experts TINY_EXPERTS`` in this process: what every multi-process run must write."""
    out = tmp_path_factory.mktemp("one_process") / "experts"
    assert main(["experts", *TINY_EXPERTS, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> TrajectoryStore:
    config = ExpertConfig(model_kwargs={"width": 8, "depth": 2}, num_experts=2, epochs=4, device="cpu")
    return train_experts(config, tmp_path_factory.mktemp("experts"), progress=False)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------------
# one process: the layer is a no-op, bad input is refused before any work


def test_a_plain_process_is_rank_0_of_1(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.init("cpu")
    try:
        assert (ctx.rank, ctx.world_size, ctx.active, ctx.is_main) == (0, 1, False, True)
        assert ctx.device == torch.device("cpu") and distributed.current() is ctx
        assert ctx.shard(3) == [0, 1, 2] and list(ctx.block(4)) == [0, 1, 2, 3]
        t = torch.ones(3)
        ctx.all_reduce_sum_([t])
        assert torch.equal(t, torch.ones(3))
        assert ctx.agree(lambda x: x + 1, 1) == 2
        with pytest.raises(FileNotFoundError, match="missing"):
            ctx.agree(lambda: (_ for _ in ()).throw(FileNotFoundError("missing")))
    finally:
        distributed.shutdown()


def test_shares_of_a_world_of_three():
    ranks = [distributed.Context(rank=r, world_size=3) for r in range(3)]
    assert [c.shard(7) for c in ranks] == [[0, 3, 6], [1, 4], [2, 5]]
    assert [list(c.block(6)) for c in ranks] == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_nccl_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="backend 'nccl' needs a CUDA GPU"):
        distributed.init("auto", "nccl")
    with pytest.raises(ValueError, match=r"backend must be one of \('gloo', 'nccl'\) or None.*'mpi'"):
        distributed.init("auto", "mpi")
    assert distributed.current().world_size == 1


@pytest.mark.parametrize("k, world, message", [
    (0, 1, r"trajectories \(K\) must be >= 1, got 0"),
    (3, 2, r"trajectories \(K\) = 3 is not a multiple of the 2 processes; use K = 2 or 4"),
    (2, 4, r"4 processes but trajectories \(K\) = 2"),
])
def test_bad_trajectories_for_the_world(store, k, world, message):
    # a context as rank 0 of `world` would have it; the check comes before any collective
    ctx = distributed.Context(rank=0, world_size=world)
    config = DistillConfig(trajectories=k, syn_steps=2, expert_epochs=1, max_start_epoch=2, device="cpu")
    with pytest.raises(ValueError, match=message):
        Distiller(store, load_splits("mnist10k")[0], config, ctx=ctx)


def test_more_processes_than_experts_is_refused(tmp_path):
    ctx = distributed.Context(rank=0, world_size=3)
    with pytest.raises(ValueError, match="3 processes for 2 experts"):
        train_experts(ExpertConfig(num_experts=2, epochs=1, device="cpu"), tmp_path / "s", ctx=ctx)
    assert not (tmp_path / "s").exists()  # refused before any work


# ------------------------------------------------------------------------------------------------
# two processes


def test_two_processes_equal_one_process_in_every_mode(store, tmp_path):
    """K = 2 split over 2 gloo ranks vs both unrolls in one process: 3 iterations, float64."""
    out = tmp_path / "two.pt"
    result = torchrun("distributed_worker.py", "distill", str(store.path), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    two = torch.load(out, weights_only=True)
    one = distill_every_mode(str(store.path))
    again = distill_every_mode(str(store.path))
    for mode in MODES:
        a, b = two[mode], one[mode]
        assert rel(a["images"], b["images"]) <= 1e-10 and rel(a["ema"], b["ema"]) <= 1e-10, mode
        assert abs(a["syn_lr"] - b["syn_lr"]) <= 1e-10 * abs(b["syn_lr"]), mode
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-10) and a["experts"] == b["experts"]
        assert not torch.equal(b["images"], store[0].new_zeros(0))  # the run moved the images
        assert torch.equal(again[mode]["images"], b["images"])  # same seed, same run
    assert any(len(set(e)) > 1 for e in one["exact"]["experts"])  # the two unrolls use different experts


def test_a_rank_that_cannot_see_the_store_fails_every_rank(store):
    result = torchrun("distributed_worker.py", "unseen-store", str(store.path), timeout=60)
    assert result.returncode != 0
    # both ranks raise the same one-line error, naming the rank that failed and the path
    assert result.stderr.count(f"FileError: rank 1: {store.path}-not-here/manifest.json: expected a trajectory manifest") == 2


def test_cli_refuses_bad_k_on_every_rank(store, tmp_path):
    result = torchrun("-m", "mtt_lab.cli", "distill", "--experts", str(store.path), "--out", str(tmp_path / "r"),
                      "--trajectories", "3", "--syn-steps", "2", "--expert-epochs", "1", "--max-start-epoch", "2",
                      "--device", "cpu", timeout=60)
    assert result.returncode != 0
    line = "mtt-lab distill: error: trajectories (K) = 3 is not a multiple of the 2 processes; use K = 2 or 4"
    assert result.stderr.count(line) == 2
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_nccl_without_a_gpu_fails_every_rank_before_work(tmp_path):
    result = torchrun("-m", "mtt_lab.cli", "experts", *TINY_EXPERTS, "--backend", "nccl", "--out", str(tmp_path / "s"),
                      timeout=60)
    assert result.returncode != 0
    assert result.stderr.count("mtt-lab experts: error: rank 0: backend 'nccl' needs a CUDA GPU on every rank") == 2
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_cli_distill_under_torchrun_resumes_and_matches_one_process(store, tmp_path):
    def args(out, iterations, *extra):
        return ["distill", "--experts", str(store.path), "--out", str(out), "--trajectories", "2", "--syn-steps", "3",
                "--expert-epochs", "1", "--max-start-epoch", "3", "--iterations", str(iterations),
                "--checkpoint-every", "2", "--device", "cpu", *extra]

    one, two = tmp_path / "one", tmp_path / "two"
    assert main(args(one, 5)) == 0
    for extra in ([], ["--resume"]):  # 4 iterations, "killed", then resumed to 5
        result = torchrun("-m", "mtt_lab.cli", *args(two, 5 if extra else 4, *extra))
        assert result.returncode == 0, result.stderr[-3000:]
    a = torch.load(one / "images.pt", weights_only=True)
    b = torch.load(two / "images.pt", weights_only=True)
    assert torch.equal(a["images"], b["images"]) and a["syn_lr"] == b["syn_lr"]
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
    log_a, log_b = [(run / "log.jsonl").read_text().splitlines() for run in (one, two)]
    assert [strip(x) for x in log_a] == [strip(x) for x in log_b] and len(log_b) == 5  # one writer


def _expert_files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.glob("expert_*.pt"))}


def _manifest_without_times(folder: Path) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    for expert in manifest["experts"]:
        expert.pop("seconds")
    return manifest


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun worker ``rank`` among ``parent``'s children (read from /proc)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.slow
def test_experts_under_torchrun_are_bit_identical_and_survive_kill_9(one_process_experts, tmp_path):
    one, two = one_process_experts, tmp_path / "two"

    # start 2 ranks, kill -9 rank 1 as soon as rank 0 has finished its first expert
    launcher = subprocess.Popen([*TORCHRUN, "-m", "mtt_lab.cli", "experts", *TINY_EXPERTS,
                                 "--out", str(two)], env=ENV, cwd=HERE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (two / "expert_000.metrics.json").exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = _rank_pid(launcher.pid, 1)
    assert victim is not None, "rank 1 had already finished: make the experts larger"
    os.kill(victim, signal.SIGKILL)
    launcher.communicate(timeout=60)
    assert launcher.returncode != 0  # torchrun saw a rank die and stopped the run
    assert json.loads((two / "manifest.json").read_text())["experts"] == []  # nothing listed yet...

    result = torchrun("-m", "mtt_lab.cli", "experts", *TINY_EXPERTS, "--out", str(two))
    assert result.returncode == 0, result.stderr[-3000:]
    assert _expert_files(two) == _expert_files(one) and len(_expert_files(one)) == 3
    assert _manifest_without_times(two) == _manifest_without_times(one)
    assert not list(two.glob("*.metrics.json")) and not list(two.glob(".*.tmp"))


def test_a_killed_run_is_listed_then_finished(tmp_path):
    """What a killed 2-rank run leaves (expert 0 listed, 2 written but not listed, 1 and 3 lost)
    is finished by a one-process rerun into the store one process writes."""
    config = ExpertConfig(model_kwargs={"width": 8, "depth": 2}, num_experts=4, epochs=1, device="cpu")
    straight = train_experts(config, tmp_path / "straight", progress=False)
    killed = tmp_path / "killed"
    train_experts(ExpertConfig(**{**config.__dict__, "num_experts": 1}), killed, progress=False)
    partial = TrajectoryStore(killed)
    partial.write_expert(2, straight[2], {k: v for k, v in straight.metrics(2).items() if k != "file"})
    (killed / ".expert_001.pt.abc.tmp").write_bytes(b"half a file")
    assert partial.finished(2) and not partial.finished(1) and len(TrajectoryStore(killed)) == 1

    resumed = train_experts(config, killed, progress=False)
    assert len(resumed) == 4
    assert [resumed.metrics(i)["seed"] for i in range(4)] == [0, 1, 2, 3]
    for i in range(4):
        assert torch.equal(resumed[i], straight[i])
    assert not list(killed.glob("*.metrics.json"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(*args: str, timeout: float = 180) -> list[subprocess.CompletedProcess]:
    """``mtt-lab ARGS`` as a 2-node run: two torchrun launchers (``--nnodes 2 --node_rank 0|1``, one
    process each) meeting at a static rendezvous on this machine, so each rank sees ``LOCAL_RANK`` 0
    and only ``RANK`` tells them apart, as on two machines sharing a filesystem."""
    port = str(_free_port())
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port, "-m", "mtt_lab.cli", *args],
        env=ENV, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    results = []
    for launcher in launchers:
        out, err = launcher.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(launcher.args, launcher.returncode, out, err))
    return results


@pytest.mark.slow
def test_two_nodes_write_what_one_process_writes(store, one_process_experts, tmp_path):
    """Experts and distillation across two 'nodes' (rank = node, local rank 0 on both): the same files.
    Three experts: node 0 trains experts 0 and 2, node 1 expert 1."""
    one, two = tmp_path / "one", tmp_path / "two"
    for result in two_nodes("experts", *TINY_EXPERTS, "--out", str(two / "experts")):
        assert result.returncode == 0, result.stderr[-3000:]
    assert _expert_files(two / "experts") == _expert_files(one_process_experts)
    assert _manifest_without_times(two / "experts") == _manifest_without_times(one_process_experts)

    distill = ["distill", "--experts", str(store.path), "--trajectories", "2", "--syn-steps", "3", "--expert-epochs",
               "1", "--max-start-epoch", "3", "--iterations", "3", "--device", "cpu"]
    assert main([*distill, "--out", str(one / "run")]) == 0
    for result in two_nodes(*distill, "--out", str(two / "run")):
        assert result.returncode == 0, result.stderr[-3000:]
    a, b = (torch.load(run / "run" / "images.pt", weights_only=True) for run in (one, two))
    assert torch.equal(a["images"], b["images"]) and a["syn_lr"] == b["syn_lr"]
    assert len((two / "run" / "log.jsonl").read_text().splitlines()) == 3  # rank 0 alone wrote the log
