"""Training of the paper's MNIST models, with a seeded data order and a checkpoint cache.

The authors' recipe: Adam with learning rate 1e-4, batch size 50, inputs in [0, 1] without
mean/std normalization, cross-entropy (+ 0.001 * sum of 0.5*||W||^2 over the CNN's conv1, conv2
and fc1 weights).  Checkpoints are cached under a key of the full configuration and written
atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import MnistData, cache_dir, load_mnist

__all__ = ["train_mnist_model", "pretrained_mnist", "accuracy"]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of correctly classified examples."""
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum())
                  for xb, yb in zip(x.split(batch_size), y.split(batch_size)))  # fmt: skip
    return correct / len(y)


def train_mnist_model(name: str, data: MnistData, labels: str = "true", epochs: int = 10,
                      seed: int = 0, lr: float = 1e-4, batch_size: int = 50,
                      progress: bool = True) -> tuple[nn.Module, dict]:  # fmt: skip
    """Train ``"mnist_cnn"`` or ``"mnist_mlp"`` with the authors' recipe.

    Args:
        labels: ``"true"`` or ``"random"`` (a seeded permutation of the training labels, which
            keeps the class frequencies: the data randomization test).
    Returns:
        The trained model (eval mode) and a dict of training/test accuracy and settings.
    """
    from .models import load_model

    if labels not in ("true", "random"):
        raise ValueError(f"labels must be 'true' or 'random', got {labels!r}")
    gen = torch.Generator().manual_seed(seed)
    model = load_model(name, pretrained=False)
    y = data.y_train
    if labels == "random":
        y = y[torch.randperm(len(y), generator=gen)]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    decay = [model.hidden1.weight, model.hidden2.weight, model.fc1.weight] if name == "mnist_cnn" else []
    model.train()
    for _ in tqdm(range(epochs), desc=f"training {name} ({labels} labels)", disable=not progress):
        order = torch.randperm(len(y), generator=gen)
        for idx in order.split(batch_size):
            loss = F.cross_entropy(model(data.x_train[idx]), y[idx])
            if decay:
                loss = loss + 0.001 * sum(0.5 * (w * w).sum() for w in decay)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    stats = {"train_accuracy": accuracy(model, data.x_train, y),
             "test_accuracy": accuracy(model, data.x_test, data.y_test),
             "labels": labels, "epochs": epochs, "seed": seed, "source": data.source}  # fmt: skip
    return model, stats


def pretrained_mnist(name: str, labels: str = "true", epochs: int = 10, seed: int = 0,
                     source: str = "auto", progress: bool = True) -> tuple[dict, str]:  # fmt: skip
    """State dict of a trained MNIST model, trained once and cached on disk.

    Returns:
        ``(state_dict, description)``; the description names the data source and accuracies.
    """
    data = load_mnist(source=source, verbose=progress)
    config = {"name": name, "labels": labels, "epochs": epochs, "seed": seed,
              "source": data.source, "recipe": "adam1e-4-b50-v1"}  # fmt: skip
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir("checkpoints") / f"{name}-{labels}-{key}.pt"
    if path.exists():
        saved = torch.load(path)
    else:
        model, stats = train_mnist_model(name, data, labels, epochs, seed, progress=progress)
        saved = {"state_dict": model.state_dict(), "stats": stats}
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        torch.save(saved, tmp)
        os.replace(tmp, path)
    s = saved["stats"]
    desc = (f"trained here on {s['source']} ({s['labels']} labels, {s['epochs']} epochs): "
            f"train accuracy {s['train_accuracy']:.3f}, test accuracy {s['test_accuracy']:.3f}")
    return saved["state_dict"], desc
