"""One of three digits sites is poisoned: FedAvg against the robust configurations and the centralized baseline.

    python robustness.py [--rounds 20] [--markdown]

The sites train exactly as train.py does (one local epoch per round on their
non-IID part, the same seeds), and each round's results are combined by the
server's own strategies (fedkube.server.strategies, in this process: the
aggregation of a real job, without the processes and the network, so the whole
table takes a few minutes on a busy 2-core box). site-c is the attacker, in one of two ways:

* ``scale``: it sends its update (its trained model minus the global one)
  multiplied by 100, with its true num_examples;
* ``claim``: it claims 10^6 examples for its honestly trained model;
* ``claim+negate``: it claims 10^6 examples and sends its update negated and
  multiplied by 10 (both at once: stronger than the issue asks).

Printed: the held-out test accuracy of the last global model for each
configuration and attack, and as a share of the centralized baseline trained
for as many epochs as rounds (centralized.py).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import data
import numpy as np
import torch

from fedkube.server.influence import Influence
from fedkube.server.strategies import build_strategy
from fedkube.server.strategy_api import BoundsInfluence

SITES = ["site-a", "site-b", "site-c"]
ATTACKER = "site-c"
LR, BATCH = 0.05, 32
Params = dict[str, np.ndarray]
Attack = Callable[[Params, Params, int], tuple[Params, int]]

ATTACKS: dict[str, Attack] = {
    "none": lambda g, x, n: (x, n),
    "scale": lambda g, x, n: ({k: g[k] + 100.0 * (x[k] - g[k]) for k in x}, n),
    "claim": lambda g, x, n: (x, 1_000_000),
    "claim+negate": lambda g, x, n: ({k: g[k] - 10.0 * (x[k] - g[k]) for k in x}, 1_000_000),
}
# name -> (strategy, its parameters, influence bounds). The clip bound is a few times an honest update's norm
# here (about 0.5-1.5 after one epoch); the cap is above every honest site's num_examples (at most 589).
CONFIGS: dict[str, tuple[str, dict[str, Any], Influence]] = {
    "fedavg": ("fedavg", {}, Influence()),
    "fedavg + cap 1000 + clipNorm 2": ("fedavg", {}, Influence("examples", 1000, 2.0)),
    "fedavg + equal weights + clipNorm 2": ("fedavg", {}, Influence("equal", None, 2.0)),
    "median": ("median", {}, Influence()),
    "trimmedmean (trimFraction 0.34)": ("trimmedmean", {"trimFraction": 0.34}, Influence()),
}


def _numpy(model: Any) -> Params:
    return {k: t.detach().cpu().numpy().copy() for k, t in model.state_dict().items()}


def federated(config: str, attack: str, rounds: int, spill: Path) -> float:
    """The last global model's test accuracy."""
    name, options, influence = CONFIGS[config]
    strategy = build_strategy(name, options, influence, spill_dir=spill)
    parts = {site: data.site_train(site, SITES) for site in SITES}
    _, _, x_test, y_test = data.train_test()
    model = data.make_model(seed=0)
    global_model = _numpy(model)
    for rnd in range(1, rounds + 1):
        agg = strategy.begin_round(global_model)
        sent: dict[str, Params] = {}
        for site in SITES:
            x, y = parts[site]
            model.load_state_dict({k: torch.tensor(v) for k, v in global_model.items()})
            data.train_epoch(model, x, y, lr=LR, batch=BATCH, seed=1000 * rnd + 10 * data.site_index(site, SITES))
            params, claimed = _numpy(model), len(y)
            if site == ATTACKER:
                params, claimed = ATTACKS[attack](global_model, params, claimed)
            if not all(np.isfinite(a).all() for a in params.values()):
                continue  # the server rejects a result with NaN/Inf (InvalidResult): it contributes nothing
            sent[site] = {k: a.astype(np.float32) for k, a in params.items()}
            for tensor, arr in sent[site].items():
                agg.add(site, tensor, arr, float(claimed))
            if isinstance(agg, BoundsInfluence):
                for tensor, keys in agg.bound(site).rebuild.items():  # a clip: the server pulls these again
                    for key in keys:
                        agg.refold(key, tensor, sent[key][tensor])
            agg.commit(site)
        if not sent:  # training diverged everywhere: a real job fails here (QuorumLost); keep the last model
            break
        global_model = {k: np.array(v, copy=True) for k, v in agg.finish().items()}
    model.load_state_dict({k: torch.tensor(v) for k, v in global_model.items()})
    return data.accuracy(model, x_test, y_test)


def centralized(epochs: int) -> float:
    x_train, y_train, x_test, y_test = data.train_test()
    model = data.make_model(seed=0)
    for epoch in range(1, epochs + 1):
        data.train_epoch(model, x_train, y_train, lr=LR, batch=BATCH, seed=epoch)
    return data.accuracy(model, x_test, y_test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    baseline = centralized(args.rounds)
    print(f"centralized baseline, {args.rounds} epochs: test accuracy {baseline:.4f}\n")
    attacks = list(ATTACKS)
    print("| configuration | " + " | ".join(f"{a}: accuracy (% of baseline)" for a in attacks) + " |")
    print("|---|" + "---:|" * len(attacks))
    with tempfile.TemporaryDirectory(prefix="digits-robust-") as spill:
        for config in CONFIGS:
            cells = []
            for attack in attacks:
                acc = federated(config, attack, args.rounds, Path(spill))
                cells.append(f"{acc:.4f} ({100 * acc / baseline:.1f} %)")
            print(f"| {config} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
