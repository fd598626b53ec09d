"""Diagnostics the randomization runners can attach to their tables.

:func:`activation_scales` (Binder et al. 2023): the scale of every block's output at each stage of
a randomization schedule, relative to the trained model's (``run_randomization(...,
activations=True)`` stores it in ``df.activations``).
"""

from __future__ import annotations

import math
from typing import Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from .attribution import DEFAULT_BATCH_SIZE, check_batch_size, check_input, check_seed
from .models import Block, block_member, get_submodule
from .randomize import (ModelStates, Perturbation, check_schedule, evaluating, get_blocks,
                        schedule_stages)  # fmt: skip

__all__ = ["activation_scales"]


def _block_outputs(model: nn.Module, blocks: Sequence[Block]) -> tuple[dict, list]:
    """Forward hooks recording the output of the last-executed module of every block.  The
    rest of the model gets a copy of it, so that an in-place operation after the block
    (``nn.ReLU(inplace=True)``) cannot overwrite the recorded output (nor make a gradient with
    respect to it the gradient of the ReLU's output)."""
    outs: dict[str, Tensor] = {}
    hooks = []
    for b in blocks:
        for path in b.modules:
            if isinstance(block_member(model, path), nn.Parameter):
                continue  # a parameter (a ViT's class token) has no output of its own
            def hook(_m, _inp, out, name=b.name):
                if isinstance(out, Tensor):
                    outs[name] = out
                    return out.clone()
                return None
            hooks.append(get_submodule(model, path).register_forward_hook(hook))
    return outs, hooks


def activation_scales(model: nn.Module, x: Tensor, blocks=None, *, schedule: str = "cascading",
                      order: str = "top_down", seed: int = 0,
                      perturbation: Perturbation | None = None,
                      batch_size: int | None = None) -> pd.DataFrame:  # fmt: skip
    """Activation-scale diagnostic (Binder et al. 2023): the root-mean-square of every block's
    output (and of the logits) at each stage of a randomization schedule, relative to the
    trained model's.  Under top-down randomization the blocks below the randomized ones keep
    their activations exactly (ratio 1) and randomized blocks often keep a similar scale, which
    bounds how much a map can change.

    Returns:
        Columns ``schedule, order, stage_index, stage, block, rms, trained_rms, ratio``
        (``block = "logits"`` for the output).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_input(model, x)
    check_seed(seed)
    check_schedule(schedule, order)
    check_batch_size(batch_size)
    dev = next((p.device for p in model.parameters()), x.device)
    x = x.detach().to(dev)
    blocks_ = get_blocks(model, blocks, x)
    stages = schedule_stages(blocks_, schedule, order)

    def measure(m: nn.Module) -> dict[str, float]:
        outs, hooks = _block_outputs(m, blocks_)
        sums: dict[str, float] = {}
        count: dict[str, int] = {}
        try:
            with torch.no_grad():
                for xc in x.split(batch_size or DEFAULT_BATCH_SIZE):
                    y = m(xc)
                    for name, v in list(outs.items()) + [("logits", y)]:
                        sums[name] = sums.get(name, 0.0) + float(v.double().pow(2).sum())
                        count[name] = count.get(name, 0) + v.numel()
                    outs.clear()
        finally:
            for h in hooks:
                h.remove()
        return {k: math.sqrt(sums[k] / count[k]) for k in sums}

    rows = []
    with evaluating(model):
        trained = measure(model)
        # each block's random weights are drawn once (as in the runners) and swapped in per stage
        states = ModelStates(model, [st.blocks for st in stages], perturbation or Perturbation(), seed)
        try:
            measured = []
            for k in range(len(stages)):
                states.set(k)
                measured.append(measure(model))
        finally:
            states.restore()
        for k, (st, now) in enumerate(zip(stages, measured)):
            for name in [b.name for b in blocks_[::-1]] + ["logits"]:
                if name in now:
                    rows.append({"schedule": schedule, "order": order, "stage_index": k,
                                 "stage": st.name, "block": name, "rms": now[name],
                                 "trained_rms": trained[name],
                                 "ratio": now[name] / trained[name] if trained[name] > 0 else math.nan})  # fmt: skip
    return pd.DataFrame(rows)
