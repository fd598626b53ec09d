"""Forward replay: reuse the activations of the modules a model state leaves unchanged.

A :class:`Recorder` records the module calls of one forward pass (their order, nesting and
outputs) and the first operation that used each parameter or buffer.  In a later forward pass,
after some tensors changed (a randomization stage), the calls that ended before the first
operation using a changed tensor return their recorded outputs instead of recomputing them.
Replay is exact (same operations on the same inputs); it raises :class:`ReplayMismatch` when
the pass does not follow the recording (data-dependent module calls, outputs changed in place),
and :meth:`Recorder.supported` refuses models with forward hooks of their own.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["Recorder", "ReplayMismatch"]


class _Call:
    __slots__ = ("module", "start", "end", "out", "version")

    def __init__(self, module: nn.Module, start: int) -> None:
        self.module, self.start, self.end, self.out, self.version = module, start, -1, None, -1


class ReplayMismatch(RuntimeError):
    """The forward pass did not follow the recorded module calls."""


class _UseTracker(TorchFunctionMode):
    """Records the first time each parameter or buffer of the model enters an operation."""

    def __init__(self, rec: "Recorder") -> None:
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ids, first = self.rec.tensor_ids, self.rec.first_use
        for a in (*args, *kwargs.values()):
            for t in (a if isinstance(a, (list, tuple)) else (a,)):
                if isinstance(t, Tensor) and id(t) in ids and id(t) not in first:
                    first[id(t)] = self.rec.clock
        return func(*args, **kwargs)


class Recorder:
    """Records the module calls of one forward pass (their order, nesting and outputs) and
    replays, in a later forward pass, the outputs of the calls that end before the first
    operation using a changed tensor."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = [m for _, m in model.named_modules()]
        self.tensor_ids = {id(t) for t in model.state_dict(keep_vars=True).values()}
        self.recording = False
        self.calls: list[_Call] = []
        self.first_use: dict[int, int] = {}
        self.clock = 0
        self._stack: list[_Call] = []
        self.handles = []
        for m in self.modules:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))

    @staticmethod
    def supported(model: nn.Module) -> bool:
        """Replay needs plain modules without other forward hooks (they could change outputs)."""
        from torch.nn.modules import module as M

        if M._global_forward_hooks or M._global_forward_pre_hooks:
            return False
        for m in model.modules():
            if isinstance(m, torch.jit.ScriptModule) or m._forward_hooks or m._forward_pre_hooks:
                return False
        return True

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.calls, self._stack = [], []

    def last_out(self, module: nn.Module) -> Tensor | None:
        """Output of the last recorded call of ``module`` (``None`` if not replayable)."""
        for c in reversed(self.calls):
            if c.module is module:
                return c.out
        return None

    def _pre(self, module, args) -> None:
        if self.recording:
            c = _Call(module, self.clock)
            self.clock += 1
            self.calls.append(c)
            self._stack.append(c)

    def _post(self, module, args, out) -> None:
        if self.recording:
            c = self._stack.pop()
            c.end = self.clock
            self.clock += 1
            if isinstance(out, Tensor):
                c.out, c.version = out, out._version

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        self.calls, self._stack, self.first_use, self.clock = [], [], {}, 0
        self.recording = True
        try:
            with _UseTracker(self):
                yield
        finally:
            self.recording = False
        for c in self.calls:  # an output changed in place later in the pass cannot be replayed
            if c.out is not None and c.out._version != c.version:
                c.out = None

    def cut(self, changed: Sequence[Tensor]) -> float:
        """Clock of the first operation of the recorded pass that used one of ``changed``."""
        times = [self.first_use[id(t)] for t in changed if id(t) in self.first_use]
        return min(times) if times else math.inf

    def plan(self, cut: float) -> dict[nn.Module, list[_Call | None]]:
        """Per module, its calls in a replayed pass: a recorded call to replay or ``None``."""
        expected: dict[nn.Module, list[_Call | None]] = {}
        skip_until = -1
        for c in self.calls:
            if c.start < skip_until:
                continue  # inside a replayed call: never runs
            if c.end < cut and c.out is not None:
                expected.setdefault(c.module, []).append(c)
                skip_until = c.end
            else:
                expected.setdefault(c.module, []).append(None)
        return {m: v for m, v in expected.items() if any(c is not None for c in v)}

    @contextlib.contextmanager
    def replay(self, plan: dict[nn.Module, list[_Call | None]]) -> Iterator[None]:
        queues = {m: list(v) for m, v in plan.items()}
        saved = {}
        for m, queue in queues.items():
            saved[m] = m.__dict__.get("forward")
            original = m.forward

            def forward(*args, _q=queue, _orig=original, **kwargs):
                if not _q:
                    raise ReplayMismatch("more module calls than recorded")
                c = _q.pop(0)
                return _orig(*args, **kwargs) if c is None else c.out

            m.forward = forward
        try:
            yield
        finally:
            for m, prev in saved.items():
                if prev is None:
                    del m.forward
                else:
                    m.forward = prev
        if any(c is not None for q in queues.values() for c in q):
            raise ReplayMismatch("recorded module calls were not replayed")
        for v in plan.values():
            for c in v:
                if c is not None and c.out._version != c.version:
                    raise ReplayMismatch("a replayed output was modified in place")
