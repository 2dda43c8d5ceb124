"""An outer iteration never makes the host wait for the device, checked on a machine without one.

On CUDA the host waits (a synchronisation) when it reads a device tensor's value (``.item()``,
``float()``, ``bool()``, ``.tolist()``, an ``if`` on a tensor), runs an op whose output size
depends on the values (``nonzero``, boolean masks), or copies pageable host memory to the device
(an index tensor or random numbers made on the CPU and used with device tensors).
``torch.cuda.set_sync_debug_mode`` reports these on a GPU; :class:`HostDeviceAudit` finds the same
things on the CPU by following where each tensor would live:

* tensors drawn from a CPU ``torch.Generator`` (the plans, DSA's parameters) and the expert
  trajectories are *host* tensors, and so is everything computed from host tensors only;
* everything else (images, alpha, the student, the losses) would be on the device;
* :func:`mtt_lab.augment.to_device` is the one road from host to device (pinned, non-blocking).

The audit counts value reads of device tensors, value-dependent ops on them, and ops that mix
host tensors with device tensors (an implicit transfer). A step must show none of them, and
exactly one ``.tolist()`` of a device tensor: the record's numbers.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from mtt_lab import augment, distill
from mtt_lab.data import load_splits
from mtt_lab.distill import MODES, DistillConfig, Distiller
from mtt_lab.experts import ExpertConfig, train_experts

aten = torch.ops.aten
VALUE_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}
VALUE_SHAPED = {aten.nonzero.default, aten.masked_select.default, aten.repeat_interleave.Tensor,
                aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default}


class HostDeviceAudit(TorchDispatchMode):
    """Counts, on the CPU, what would synchronise a CUDA run (see the module docstring)."""

    def __init__(self, host_tensors=()):
        super().__init__()
        self._host: dict[int, weakref.ref] = {}  # id -> the tensor (ids of dead tensors get reused)
        for t in host_tensors:
            self.mark(t, host=True)
        self.reads, self.mixed, self.transfers, self.tolists = [], [], 0, 0

    def mark(self, t: torch.Tensor, host: bool) -> None:
        if host:
            self._host[id(t)] = weakref.ref(t)
        else:
            self._host.pop(id(t), None)

    def is_host(self, t) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        host_inputs = [t for t in inputs if self.is_host(t)]
        if func in VALUE_READS | VALUE_SHAPED and len(host_inputs) < len(inputs):
            self.reads.append(str(func))
        if host_inputs and len(host_inputs) < len(inputs) and any(t.dim() > 0 for t in host_inputs):
            self.mixed.append(str(func))
        if kwargs.get("generator") is not None or (inputs and len(host_inputs) == len(inputs)):
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.mark(t, host=True)
        return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    config = ExpertConfig(model_kwargs={"width": 8, "depth": 2}, num_experts=2, epochs=3, device="cpu")
    return train_experts(config, tmp_path_factory.mktemp("experts"), progress=False)


@pytest.fixture(scope="module")
def train():
    return load_splits("mnist10k")[0]


def audited_step(d: Distiller, monkeypatch) -> HostDeviceAudit:
    """One ``d.step()`` under the audit, with ``to_device`` and ``Tensor.tolist`` counted."""
    trajectories = [d._trajectory(i) for i in range(len(d.store))]  # read from disk: host tensors
    audit = HostDeviceAudit(trajectories)
    original_to_device, original_tolist = augment.to_device, torch.Tensor.tolist

    def to_device(t, device, dtype=None):
        audit.transfers += 1
        moved = original_to_device(t, device, dtype).clone()
        audit.mark(moved, host=False)  # on CUDA this copy is on the device
        return moved

    def tolist(t):
        audit.tolists += not audit.is_host(t)
        return original_tolist(t)

    for module in (augment, distill):
        monkeypatch.setattr(module, "to_device", to_device)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    with audit:
        d.step()
    monkeypatch.undo()
    return audit


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("trajectories, ema, batched", [(1, None, False), (2, 0.9, False), (2, None, True)])
def test_an_outer_iteration_reads_the_device_once(store, train, monkeypatch, mode, trajectories, ema, batched):
    d = Distiller(store, train, DistillConfig(ipc=2, syn_steps=3, expert_epochs=1, max_start_epoch=2, batch_syn=7,
                                              mode=mode, trajectories=trajectories, ema_decay=ema, batched=batched,
                                              device="cpu"))
    d.step()  # a first step creates the momentum buffers; audit the second, steady one
    audit = audited_step(d, monkeypatch)
    assert audit.reads == [] and audit.mixed == []
    assert audit.tolists == 1  # the record
    # two trajectory rows and 3 mini-batch indices per unroll, plus DSA's random parameters
    assert audit.transfers >= trajectories * (2 + 3)


def test_the_audit_sees_what_would_synchronise(store, train, monkeypatch):
    """The audit can fail: a host-side ``if`` on the loss, or an index not sent with to_device."""
    d = Distiller(store, train, DistillConfig(syn_steps=2, expert_epochs=1, max_start_epoch=2, device="cpu"))
    step = Distiller.step
    monkeypatch.setattr(Distiller, "step", lambda self, **kw: (bool(self._syn_lr > 0), step(self, **kw))[1])
    assert "aten._local_scalar_dense.default" in audited_step(d, monkeypatch).reads

    plan = Distiller._plan
    host_index = lambda: torch.randperm(10, generator=torch.Generator())  # noqa: E731
    monkeypatch.setattr(Distiller, "_plan", lambda self: [distill.StepPlan(host_index(), p.seed)
                                                          for p in plan(self)])
    assert "aten.index.Tensor" in audited_step(d, monkeypatch).mixed


# ------------------------------------------------------------------------------------------------
# lower precision (off by default)


def test_bfloat16_autocast_is_close_to_float32_but_not_equal(store, train):
    grads = {}
    for precision in ("float32", "bfloat16"):
        d = Distiller(store, train, DistillConfig(ipc=2, syn_steps=4, expert_epochs=1, max_start_epoch=2,
                                                  precision=precision, device="cpu"))
        record = d.step()
        grads[precision] = d.gradients[0]
        assert not record.skipped and d.images.dtype == torch.float32
    a, b = grads["bfloat16"].flatten(), grads["float32"].flatten()
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.95
    assert float((a - b).norm() / b.norm()) > 1e-4  # the unroll really ran in bfloat16


@pytest.mark.parametrize("overrides, message", [
    (dict(precision="float16"), r"precision must be one of \('float32', 'bfloat16', 'tf32'\), got 'float16'"),
    (dict(precision="bfloat16", dtype="float64"), r"precision 'bfloat16' lowers float32 arithmetic; it needs dtype"),
    (dict(precision="tf32"), r"precision 'tf32' is a CUDA mode; this distiller runs on cpu"),
])
def test_bad_precisions_are_refused(store, train, overrides, message):
    config = DistillConfig(syn_steps=2, expert_epochs=1, max_start_epoch=2, device="cpu", **overrides)
    with pytest.raises(ValueError, match=message):
        Distiller(store, train, config)
