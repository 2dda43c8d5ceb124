"""Seconds per MTT outer iteration and its peak memory, for every gradient mode and the reference.

Inputs 28x28x1 (mnist10k, the bundled digits) and 32x32x3 (random images standing in for
CIFAR-10), ConvNet width 128, IPC 10 (IPC 50 too on CUDA), N in {10, 20, 40, 80}. Each *variant*
runs one outer iteration on the whole synthetic set (batch_syn = None) with DSA:

  exact, checkpoint, constant   ``Distiller.step()`` in that mode (gradient + image/alpha update)
  reference                     ``tests/mtt_reference.py: mtt_reference_grad`` on the same plan:
                                exact-mode math written with plain autograd over a parameter dict
  sgd                           the floor: N plain SGD steps (``nn.Module`` + ``torch.optim.SGD``)
                                on the same mini-batches with the same augmentation, no graph kept

The expert store is fake: one random walk from the initialisation, written with
``TrajectoryStore.create`` + ``append`` (time and memory do not depend on the values).

How it is measured
------------------
* On the CPU every (configuration, variant, repeat) runs in a fresh subprocess, so that one
  measurement's memory can never be reused by the next. On CUDA (``--in-process``, its default) the
  points run one after the other in this process: the peak is read per point from CUDA's own
  counters, and a fresh process per point would cost more time than a GPU lease holds (about 260
  points, seconds each). Repeats are interleaved: repeat 1 of every variant of every configuration,
  then repeat 2, ...; within a repeat the cheapest configurations (IPC x N x K) come first. The
  tables show medians, so background load that comes and goes hits all variants alike.
* ``--max-seconds S``: no point starts after S seconds; the points that did not run (the most
  expensive ones) show as ``time``, so a sweep fits a fixed budget and still prints every table.
* Time on the CPU: the process's CPU time (``time.process_time``) around the iteration, with one
  intra-op thread (``--threads``). Other jobs on a shared machine stretch wall time but hardly
  CPU time; wall time is in the JSON output. On CUDA: wall time after ``torch.cuda.synchronize``.
* ``--warmup K`` untimed iterations run first (default: none on the CPU, one on CUDA); a long run
  is in the steady state that ``--warmup 1`` measures. Their mean CPU time is in the JSON
  (``warmup_cpu``).
* ``--memory default kept``: each point is measured with glibc's default allocator settings and/or
  after ``mtt_lab.cpu_memory.keep_freed_memory()`` (as ``mtt-lab`` and the notebooks run); with both,
  a last table sets the engine as shipped (kept) against the plain script in a default process.
* Peak memory on the CPU: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the process's peak
  resident set) at the end minus the same before the warm-up, i.e. how far the iterations
  pushed the high-water mark above what import, data and setup had reached (tracemalloc does not
  see torch's allocations). On CUDA: ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``, minus the memory allocated before the iteration.
* Memory guard (CPU): the limit is ``--mem-limit-gib`` (24), lowered to ``--mem-fraction`` (0.6)
  of the memory available when the run starts, so that other jobs on the machine survive. ``exact`` and
  ``reference`` grow linearly in N; a point whose memory, extrapolated from the smaller N already
  measured, exceeds the limit is skipped and shown as ``>limit (~X GiB)``. A child also runs
  under ``RLIMIT_AS`` = its address space + the limit; hitting it shows as ``OOM``. A point whose
  smaller N ran out of memory is not tried (``OOM``).

Usage::

    .venv/bin/python benchmarks/bench_distill.py            # the full sweep
    .venv/bin/python benchmarks/bench_distill.py --quick    # mnist10k only, N in {10, 20}
    .venv/bin/python benchmarks/bench_distill.py --profile  # torch.profiler table of one exact iteration
    .venv/bin/python benchmarks/bench_distill.py --memory default kept --warmup 1   # the allocator's share
    .venv/bin/python benchmarks/bench_distill.py --device cuda   # adds IPC 50
    .venv/bin/python benchmarks/bench_distill.py --trajectories 1 4 8   # K unrolls per iteration (modes only)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from mtt_lab.augment import dsa, seeded_generator  # noqa: E402
from mtt_lab.cpu_memory import keep_freed_memory  # noqa: E402
from mtt_lab.data import NORMALISATION, ImageDataset, load_splits  # noqa: E402
from mtt_lab.distill import MODES, DistillConfig, Distiller  # noqa: E402
from mtt_lab.experts import ExpertConfig, TrajectoryStore, build_model, model_spec  # noqa: E402
from mtt_lab.models import Functional  # noqa: E402
from mtt_reference import mtt_reference_grad  # noqa: E402

VARIANTS = (*MODES, "reference", "sgd")
GROWS_WITH_N = ("exact", "reference")  # memory linear in N: guarded by extrapolation
INPUTS = {"mnist": ("mnist10k", 1, 28), "cifar": ("cifar10", 3, 32)}
EPOCHS = 2  # of the fake expert
GIB = 2**30


# ------------------------------------------------------------------------------------------------
# the setup every child repeats


def dataset(inputs: str, device: str) -> ImageDataset:
    """The real digits, or 60 random 32x32x3 images per class named cifar10 (its DSA strategy)."""
    name, channels, size = INPUTS[inputs]
    if inputs == "mnist":
        return load_splits(name, device=device)[0]
    labels = torch.arange(10).repeat_interleave(60)
    images = torch.randn(len(labels), channels, size, size, generator=torch.Generator().manual_seed(0))
    mean, std = NORMALISATION[name]
    return ImageDataset(name, images, labels, [str(c) for c in range(10)], mean, std).to(device)


def make_store(folder: Path, inputs: str, width: int) -> TrajectoryStore:
    """A store with one fake expert: a random walk of EPOCHS steps from a fresh initialisation."""
    name, channels, size = INPUTS[inputs]
    config = ExpertConfig(dataset=name, model_kwargs={"width": width}, epochs=EPOCHS, device="cpu")
    spec = model_spec(config, channels, 10, size)
    torch.manual_seed(0)
    theta0 = Functional(build_model(spec)).flat_params()
    store = TrajectoryStore.create(folder, spec, config, theta0.numel())
    walk = 1e-3 * torch.randn(EPOCHS, theta0.numel(), generator=torch.Generator().manual_seed(0))
    store.append(torch.cat([theta0[None], theta0 + walk.cumsum(0)]), {"seed": 0})
    return store


def one_point_arguments(p) -> None:
    """--device, --inputs, --width, --ipc, --steps: the one configuration bench_batched / bench_precision measure."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--inputs", default="mnist", choices=list(INPUTS))
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--steps", type=int, default=10, help="N")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_work(job: dict):
    """The callable that runs one outer iteration of ``job["variant"]`` (setup done here)."""
    device, variant = job["device"], job["variant"]
    store, train = TrajectoryStore(job["store"]), dataset(job["inputs"], device)
    d = Distiller(store, train, DistillConfig(
        ipc=job["ipc"], syn_steps=job["N"], expert_epochs=1, max_start_epoch=1, iterations=10**6,
        mode=variant if variant in MODES else "exact", trajectories=job.get("K", 1), device=device))
    if variant in MODES:
        return d.step
    # the same draws as the engine's first step: expert 0, start epoch 0, then the plan
    torch.randint(1, (1,), generator=d.generator), torch.randint(0, 1, (1,), generator=d.generator)
    plans, images, labels = d._plan(), d.images, d.labels
    trajectory = store[0].to(device)
    model = store.build_model().to(device)
    if variant == "reference":
        alpha = torch.tensor(d.syn_lr, device=device)
        steps = [(p.index, p.seed) for p in plans]
        return lambda: mtt_reference_grad(model, trajectory[0], trajectory[1], images.requires_grad_(True),
                                          labels, alpha.requires_grad_(True), steps, d.strategy)
    Functional(model).load_into(trajectory[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=d.syn_lr)

    def sgd():
        model.train()
        for plan in plans:
            x = dsa(images[plan.index], d.strategy, seeded_generator(plan.seed))
            loss = F.cross_entropy(model(x), labels[plan.index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return sgd


def vm_size() -> int:
    """This process's address space in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def child(job: dict, fresh: bool = True) -> dict:
    """Run one measurement and return its figures. ``fresh``: this process measures nothing else, so the
    CPU memory guard may be set and the CPU peak is this point's own (otherwise it is left out)."""
    torch.set_num_threads(job["threads"])
    device = job["device"]
    if job["memory"] == "kept" and not keep_freed_memory():
        raise RuntimeError("--memory kept: mallopt is not available here (glibc Linux only)")
    work = build_work(job)
    cuda = device.startswith("cuda")
    cpu_peak = fresh and not cuda
    if cpu_peak:  # the guard and the baseline come before the warm-up, which a CPU peak includes
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (vm_size() + job["limit"], hard))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    try:
        first = time.process_time()
        for _ in range(job["warmup"]):
            work()
        first = (time.process_time() - first) / max(job["warmup"], 1)
        gc.collect()
        sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        cpu, wall = time.process_time(), time.perf_counter()
        work()
        sync(device)
    except (RuntimeError, MemoryError) as exc:  # CPU allocator failure under RLIMIT_AS, or CUDA OOM
        if "memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
            raise
        return {"oom": True}
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    figures = {"seconds": wall if cuda else cpu, "cpu": cpu, "wall": wall,
               "faulted": faults * resource.getpagesize(), "warmup_cpu": first}
    if cuda:
        figures["peak"] = torch.cuda.max_memory_allocated() - base
    elif cpu_peak:
        figures["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return figures


def in_process(job: dict) -> dict:
    """:func:`child` in this process, then everything it allocated handed back (an OOM included)."""
    try:
        return child(job, fresh=False)
    finally:
        gc.collect()
        if job["device"].startswith("cuda"):
            torch.cuda.empty_cache()


def spawn(job: dict, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                         env={**os.environ, **env})
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    if out.returncode < 0 or "MemoryError" in out.stderr or "memory" in out.stderr[-500:].lower():
        return {"oom": True}
    raise RuntimeError(f"child failed for {job}:\n{out.stderr[-3000:]}")


# ------------------------------------------------------------------------------------------------
# the sweep


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 2**62


def extrapolate(points: dict[int, float], n: int) -> float | None:
    """Peak memory at N = n from the measured {N: bytes} (linear through the two largest N)."""
    known = sorted(k for k in points if k < n)
    if not known:
        return None
    if len(known) == 1:
        return points[known[0]] * n / known[0]
    a, b = known[-2:]
    return points[b] + (points[b] - points[a]) / (b - a) * (n - b)


def fmt_s(x) -> str:
    return f"{x:.2f}" if isinstance(x, float) else x


def fmt_mib(x) -> str:
    return f"{x / 2**20:.0f}" if isinstance(x, float) else x


def ratio(a, b, digits=2) -> str:
    return f"{a / b:.{digits}f}" if isinstance(a, float) and isinstance(b, float) and b > 0 else "-"


def sweep(args) -> None:
    device = args.device
    cuda = device.startswith("cuda")
    limit = args.mem_limit_gib * GIB
    if not cuda:
        limit = min(limit, int(args.mem_fraction * available_memory()))
    env = dict(kv.split("=", 1) for kv in args.env)
    configs = [(inputs, ipc, n, k, memory) for memory in args.memory for inputs in args.inputs for ipc in args.ipc
               for n in sorted(args.steps) for k in args.trajectories]
    results: dict[tuple, list[dict]] = defaultdict(list)
    skipped: dict[tuple, str] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        stores = {inputs: str(make_store(Path(tmp) / inputs, inputs, args.width).path) for inputs in args.inputs}
        P = {inputs: TrajectoryStore(path).num_params for inputs, path in stores.items()}
        for rep in range(args.reps):
            # cheapest first (cost ~ IPC x N x K), so a --max-seconds cut drops the most expensive points
            for inputs, ipc, n, k, memory in sorted(configs, key=lambda c: c[1] * c[2] * c[3]):
                for variant in args.variants:
                    key = (inputs, ipc, n, k, memory, variant)
                    if key in skipped or (n > args.long and rep >= args.reps_long) or (k > 1 and variant not in MODES):
                        continue  # the reference and SGD are one unroll
                    if args.max_seconds is not None and time.perf_counter() - started > args.max_seconds:
                        if not results.get(key):
                            skipped[key] = "time"
                        continue
                    if any(skipped.get((inputs, ipc, m, k, memory, variant)) == "OOM" for m in args.steps if m < n):
                        skipped[key] = "OOM"  # a smaller N already ran out of memory
                        continue
                    if variant in GROWS_WITH_N and not cuda:
                        measured = {c[2]: statistics.median(r["peak"] for r in v) for c, v in results.items()
                                    if c[:2] == (inputs, ipc) and c[3:] == (k, memory, variant) and v}
                        guess = extrapolate(measured, n)
                        if guess is not None and guess > limit:
                            skipped[key] = f">limit (~{guess / GIB:.0f} GiB)"
                            continue
                    job = {"inputs": inputs, "ipc": ipc, "N": n, "K": k, "variant": variant, "device": device,
                           "memory": memory,
                           "threads": args.threads, "store": stores[inputs], "limit": limit,
                           "warmup": args.warmup if args.warmup is not None else int(cuda)}
                    r = in_process(job) if args.in_process else spawn(job, env)
                    if r.get("oom"):
                        skipped[key] = "OOM"
                    else:
                        results[key].append(r)
                    print(f"[{time.perf_counter() - started:6.0f}s] rep {rep + 1} {inputs} ipc={ipc} N={n} K={k} "
                          f"memory={memory} {variant}: {r}", file=sys.stderr, flush=True)

    def med(key, field):
        if key in skipped:
            return skipped[key]
        values = [r[field] for r in results.get(key, []) if field in r]
        return float(statistics.median(values)) if values else "-"

    unit = "wall s" if cuda else "CPU s"
    cut = f"; points not started within {args.max_seconds:g} s: time" if args.max_seconds is not None else ""
    print(f"\n### Seconds per outer iteration ({unit}; median of {args.reps} runs, {args.reps_long} beyond N = "
          f"{args.long}; torch {torch.__version__}, device {device}, {args.threads} thread(s), ConvNet width "
          f"{args.width}, {'one process' if args.in_process else 'a fresh process a point'}"
          f"{', env ' + ' '.join(args.env) if args.env else ''}{cut})\n")
    print("| input | IPC | N | K | memory | exact | checkpoint | constant | reference | N SGD steps | reference / exact "
          "| checkpoint / exact | constant / exact | exact / SGD | checkpoint / SGD |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for config in configs:
        s = {v: med((*config, v), "seconds") for v in VARIANTS}
        print("| " + " | ".join(map(str, config)) + " | " + " | ".join(fmt_s(s[v]) for v in VARIANTS) + " | "
              + " | ".join([ratio(s["reference"], s["exact"]), ratio(s["checkpoint"], s["exact"]),
                            ratio(s["constant"], s["exact"]), ratio(s["exact"], s["sgd"]),
                            ratio(s["checkpoint"], s["sgd"])]) + " |")

    what = ("torch.cuda.max_memory_allocated" if cuda else
            "not measured: the CPU peak needs a fresh process a point" if args.in_process else "peak RSS growth (ru_maxrss)")
    guard = f"; limit {limit / GIB:.1f} GiB" if not (cuda or args.in_process) else ""
    print(f"\n### Peak memory of one outer iteration (MiB, {what}, median{guard})\n")
    print("| input | IPC | N | K | memory | exact | checkpoint | constant | reference | N SGD steps | checkpoint / exact "
          "| constant / exact | checkpoint less N+1 vectors | constant less N+1 vectors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for config in configs:
        inputs, n = config[0], config[2]
        m = {v: med((*config, v), "peak") for v in VARIANTS}
        path = (n + 1) * P[inputs] * 4  # float32 theta_0..theta_N
        beyond = [fmt_mib(m[v] - path) if isinstance(m[v], float) else "-" for v in ("checkpoint", "constant")]
        print("| " + " | ".join(map(str, config)) + " | " + " | ".join(fmt_mib(m[v]) for v in VARIANTS) + " | "
              + f"{ratio(m['checkpoint'], m['exact'])} | {ratio(m['constant'], m['exact'])} | "
              + " | ".join(beyond) + " |")
    if not (cuda or args.in_process):  # in one process, later points reuse what earlier ones touched
        print("\n### Fresh memory the iteration touched (GiB: minor page faults x page size, median)\n")
        print("| input | IPC | N | K | memory | " + " | ".join(VARIANTS) + " |")
        print("|---|---|---|---|---|" + "---|" * len(VARIANTS))
        for config in configs:
            print("| " + " | ".join(map(str, config)) + " | " + " | ".join(
                f"{x / GIB:.1f}" if isinstance(x := med((*config, v), "faulted"), float) else x
                for v in VARIANTS) + " |")
    if {"default", "kept"} <= set(args.memory):
        print("\n### The engine as `mtt-lab` runs it (memory kept) against the plain script in a default process\n")
        print("| input | IPC | N | reference (default) / exact (kept) | reference (default) / checkpoint (kept) "
              "| exact: default / kept | N SGD steps: default / kept |")
        print("|---|---|---|---|---|---|---|")
        for config in configs:
            if config[4] == "kept" and config[3] == 1:
                kept = {v: med((*config, v), "seconds") for v in VARIANTS}
                default = {v: med((*config[:4], "default", v), "seconds") for v in VARIANTS}
                print("| " + " | ".join(map(str, config[:3])) + " | " + " | ".join([
                    ratio(default["reference"], kept["exact"]), ratio(default["reference"], kept["checkpoint"]),
                    ratio(default["exact"], kept["exact"]), ratio(default["sgd"], kept["sgd"])]) + " |")
    print(f"\nP = {', '.join(f'{k}: {v:,}' for k, v in P.items())} parameters; "
          f"one parameter vector = {max(P.values()) * 4 / 2**20:.2f} MiB. Sweep took "
          f"{time.perf_counter() - started:.0f} s wall.")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "skipped": {str(k): v for k, v in skipped.items()},
                                               "results": {str(k): v for k, v in results.items()}}, indent=1))


def profile(args) -> None:
    """torch.profiler table of one exact outer iteration (after one warm-up iteration)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    torch.set_num_threads(args.threads)
    kept = "kept" in args.memory and keep_freed_memory()
    inputs, ipc, n = args.inputs[0], args.ipc[0], min(args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        job = {"inputs": inputs, "ipc": ipc, "N": n, "variant": "exact", "device": args.device,
               "store": str(make_store(Path(tmp), inputs, args.width).path)}
        work = build_work(job)
        work()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        with torch_profile(activities=activities) as prof:
            work()
            sync(args.device)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    groups = {"convolution (forward, backward, double backward)": ("conv",), "group norm kernels": ("group_norm",),
              "pooling": ("pool",), "ReLU": ("threshold", "relu", "clamp_min"),
              "other elementwise and reductions": ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::fill_",
                                                   "aten::sum", "aten::copy_", "aten::neg", "aten::pow")}
    share = dict.fromkeys(groups, 0.0)
    for e in events:
        for group, keys in groups.items():
            if any(k in e.key for k in keys):
                share[group] += e.self_cpu_time_total / total
                break
    print(f"### torch.profiler: one exact outer iteration, {inputs}, IPC {ipc}, N {n}, width {args.width}, "
          f"memory {'kept' if kept else 'default'}\n")
    print("| ops | share of self time |\n|---|---|")
    for group, x in share.items():
        print(f"| {group} | {100 * x:.0f} % |")
    print(f"| everything else | {100 * (1 - sum(share.values())):.0f} % |")
    gn = next((e.cpu_time_total / total for e in events if e.key == "NativeGroupNormBackward0"), 0.0)
    print(f"\nGroup norm's differentiable backward (NativeGroupNormBackward0, with the ops it calls): "
          f"{100 * gn:.0f} % of the time.\n")
    print("```")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=45))
    print("```")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--inputs", nargs="+", choices=list(INPUTS), default=list(INPUTS))
    p.add_argument("--steps", nargs="+", type=int, default=[10, 20, 40, 80], help="values of N")
    p.add_argument("--ipc", nargs="+", type=int, default=None, help="default 10 (10 and 50 on CUDA)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--trajectories", nargs="+", type=int, default=[1],
                   help="values of K (unrolls per iteration; K > 1 runs the modes only)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--reps", type=int, default=2, help="repeats per point (median)")
    p.add_argument("--reps-long", type=int, default=1, help="repeats for N > --long (these are slow)")
    p.add_argument("--long", type=int, default=20)
    p.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE",
                   help="environment of the measured processes, e.g. MALLOC_MMAP_MAX_=0")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations per child (default 0 CPU, 1 CUDA)")
    p.add_argument("--memory", nargs="+", choices=["default", "kept"], default=["default"],
                   help="CPU allocator: glibc's default, or mtt_lab.cpu_memory.keep_freed_memory() (as mtt-lab runs)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--mem-limit-gib", type=float, default=24.0)
    p.add_argument("--mem-fraction", type=float, default=0.6, help="at most this part of the available memory")
    p.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=None,
                   help="run every point in this process (default on CUDA); the CPU peak then goes unmeasured")
    p.add_argument("--max-seconds", type=float, default=None, help="start no point after this many seconds")
    p.add_argument("--quick", action="store_true", help="mnist only, N in {10, 20}, 2 repeats")
    p.add_argument("--profile", action="store_true", help="profile one exact iteration instead of the sweep")
    p.add_argument("--rows", type=int, default=25, help="rows of the profile table")
    p.add_argument("--json", help="also write the raw measurements here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if args.ipc is None:
        args.ipc = [10, 50] if args.device.startswith("cuda") else [10]
    if args.in_process is None:
        args.in_process = args.device.startswith("cuda")
    if args.in_process and (args.env or "kept" in args.memory):
        p.error("--env and --memory kept change a whole process: they need a fresh process a point (--no-in-process)")
    if args.quick:
        args.inputs, args.steps, args.reps = ["mnist"], [10, 20], 2
    args.reps_long = min(args.reps_long, args.reps)
    if args.profile:
        profile(args)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
