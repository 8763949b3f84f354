"""Data and model shared by train.py (federated) and centralized.py (the baseline).

sklearn's bundled digits (1,797 8x8 images, no download) are split once into a
stratified held-out test set and a training set; the training set is divided
among the sites **non-IID** by label skew: for every class, the share each
site gets is drawn from a Dirichlet(ALPHA) distribution with a fixed seed, so
each site sees a few classes often and others rarely. The split depends only
on the seed and the number of sites, so every site computes the same
partition on its own and takes its part.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

SEED = 42
ALPHA = 0.5  # smaller = more skewed; 0.5 leaves some sites with almost no examples of some classes
TEST_FRACTION = 0.2
HIDDEN = 64
CLASSES = 10


def _all_data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    return x, y


def train_test() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): a stratified split with a fixed seed."""
    from sklearn.model_selection import train_test_split

    x, y = _all_data()
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=TEST_FRACTION, random_state=SEED, stratify=y)
    return x_train, y_train, x_test, y_test


def partition(y: np.ndarray, num_sites: int, alpha: float = ALPHA, seed: int = SEED) -> list[np.ndarray]:
    """Indices of ``y`` for each site: label skew by a per-class Dirichlet split (every index used once)."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_sites)]
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        shares = rng.dirichlet(np.full(num_sites, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for site, chunk in enumerate(np.split(idx, cuts)):
            parts[site].extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def site_index(site: str, sites: list[str]) -> int:
    """Position of ``site`` among the job's sites (sorted, so every site agrees)."""
    ordered = sorted(sites)
    if site not in ordered:
        raise ValueError(f"site {site!r} is not one of {ordered}; fix: set DIGITS_SITES to the job's client names")
    return ordered.index(site)


def site_train(site: str, sites: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """This site's part of the training set."""
    x_train, y_train, _, _ = train_test()
    idx = partition(y_train, len(sites))[site_index(site, sites)]
    return x_train[idx], y_train[idx]


def make_model(seed: int = 0) -> Any:
    """The small MLP both trainings use (64 -> HIDDEN -> 10), initialized from ``seed``."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


MOMENTUM = 0.9


def train_epoch(
    model: Any, x: np.ndarray, y: np.ndarray, *, lr: float, batch: int, seed: int,
    after_backward: Callable[[], None] | None = None,
) -> float:  # fmt: skip
    """One epoch of SGD (momentum 0.9) over (x, y) in a seeded order; returns the mean loss.

    ``after_backward`` runs between each backward and step (SCAFFOLD's gradient correction).
    """
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    total, count = 0.0, 0
    for idx in torch.randperm(len(yt), generator=gen).split(batch):
        opt.zero_grad()
        loss = loss_fn(model(xt[idx]), yt[idx])
        loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()
        total += loss.item() * len(idx)
        count += len(idx)
    return total / max(count, 1)


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Share of correctly classified examples."""
    import torch

    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((pred == y).mean())
