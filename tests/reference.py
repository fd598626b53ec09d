"""numpy ports of the paper's normalizations (the paper's Section 3 and the authors' code), shared by the tests."""

import numpy as np
import torch
from torch import nn


def ref_abs(e: np.ndarray) -> np.ndarray:
    """(H, W, C) or (H, W) raw map -> ABS-normalized (H, W)."""
    if e.ndim == 2:
        return np.abs(e) / np.abs(e).max()
    m = np.abs(e).sum(-1)
    return np.clip((m - m.min()) / (np.percentile(m, 99) - m.min()), 0, 1)


def ref_div(e: np.ndarray) -> np.ndarray:
    """(H, W, C) or (H, W) raw map -> diverging-normalized (H, W)."""
    if e.ndim == 2:
        return e / np.abs(e).max()
    s = e.sum(-1)
    span = abs(np.percentile(s, 99))
    return np.clip((s + span) / (2 * span), -1, 1)


def ref_unit(e: np.ndarray) -> np.ndarray:
    """Global min-max to [0, 1]."""
    return (e - e.min()) / (e.max() - e.min())


def to_t(x: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) -> (N, C, H, W); (N, H, W) -> (N, 1, H, W)."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t[:, None] if t.ndim == 3 else t.permute(0, 3, 1, 2)


class TinyCNN(nn.Module):
    """A tiny random CNN (nn.ReLU modules, 1x16x16 input, 5 classes) for fast API tests."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x):
        x = self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        return self.fc(x.flatten(1))
