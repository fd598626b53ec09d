"""What a chapter ran with, for the book's execution-statistics page.

:func:`record_run` glues one value, ``run_info``: the profile, the models (name and where their
weights came from) and the device, as a JSON string.  The book's Sphinx extension
``book/_ext/exec_stats.py`` reads it back from every executed chapter and shows it in the
``{execution-statistics}`` table of ``book/execution_statistics.md``, next to when the chapter
ran, how long it took and whether it succeeded.  Outside the book (Colab, plain Jupyter) the
value is shown in the cell's output, which says the same thing to the person running it.
"""
from __future__ import annotations

import json

import torch
from torch import nn

from ..utils import cpu_info
from .notebook import glue

__all__ = ["RUN_INFO_KEY", "record_run", "describe_device", "describe_model"]

#: The glue key of the record (one per chapter; myst-nb's glue keys are per page).
RUN_INFO_KEY = "run_info"


def describe_model(model: nn.Module) -> str:
    """``"efficientnet_lite0"``, ``"mnist_cnn (true labels)"``, or the class name of a model
    that sanitylib did not load (e.g. ``"ResNet"`` for torchvision's resnet18)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    info = getattr(model, "sanity_info", None)
    if info is None:
        return type(model).__name__
    name = info.name
    if info.extra.get("fallback_from"):
        name += f" (fallback from {info.extra['fallback_from']})"
    labels = (info.extra.get("training") or {}).get("labels")
    if labels:
        name += f" ({labels} labels)"
    return name


def describe_device(model: nn.Module | None = None) -> str:
    """Where ``model`` runs: ``"CPU (2 threads; Intel(R) Xeon(R) Processor)"``, with the CPU's
    model name (float32 results and times depend on it), or the GPU's name
    (``"cuda: NVIDIA H200"``)."""
    param = next(model.parameters(), None) if model is not None else None
    device = param.device if param is not None else torch.device("cpu")
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    n = torch.get_num_threads()
    return f"{device.type.upper()} ({n} thread{'' if n == 1 else 's'}; {cpu_info()['model']})"


def record_run(profile, *models: nn.Module) -> dict:
    """Glue what this chapter runs with under :data:`RUN_INFO_KEY` and return it.

    Args:
        profile: the chapter's :class:`~sanitylib.book.Profile` (or its name).
        *models: the models the chapter explains (at least one).

    Returns:
        ``{"profile": str, "models": [str, ...], "device": str, "torch": str}``.
    """
    name = getattr(profile, "name", profile)
    if not isinstance(name, str):
        raise ValueError(f"profile must be a Profile or a profile name, got {profile!r}")
    if not models:
        raise ValueError("record_run needs at least one model")
    info = {
        "profile": name,
        "models": list(dict.fromkeys(describe_model(m) for m in models)),
        "device": describe_device(models[0]),
        "torch": torch.__version__,
    }
    glue(RUN_INFO_KEY, json.dumps(info), display=False)
    return info
