"""FedAvg against SCAFFOLD on the three non-IID digits sites, with more local training per round.

    python drift.py [--rounds 20] [--epochs 1 5]

Client drift grows with the local work per round: each site's model moves
toward its own label-skewed optimum. The sites train exactly as train.py does
(SGD with momentum, the same seeds), for ``--epochs`` local epochs per round;
the results are combined by the server's own strategies in this process
(fedkube.server.strategies and fedkube.server.scaffold: the aggregation of a
real job without the processes and the network), and SCAFFOLD's client side is
fedkube.trainer_sdk.scaffold, with each site's variate kept in a directory of
its own as in a real job. Printed: the held-out accuracy of the last global
model, and as a share of the centralized baseline (centralized.py's training
for as many epochs as rounds).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import data
import numpy as np
import torch

from fedkube.server.strategies import build_strategy
from fedkube.server.strategy_report import published
from fedkube.trainer_sdk.model import FLModel
from fedkube.trainer_sdk.scaffold import Scaffold

SITES = ["site-a", "site-b", "site-c"]
LR, BATCH = 0.05, 32
Params = dict[str, np.ndarray]


def _numpy(params: dict) -> Params:
    return {k: (t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)).copy()
            for k, t in params.items()}  # fmt: skip


def federated(strategy_name: str, rounds: int, epochs: int, workdir: Path) -> list[float]:
    """The global model's test accuracy after each round."""
    strategy = build_strategy(strategy_name, {}, sites=len(SITES))
    parts = {site: data.site_train(site, SITES) for site in SITES}
    _, _, x_test, y_test = data.train_test()
    model = data.make_model(seed=0)
    global_model = _numpy(model.state_dict())
    accuracies = []
    for rnd in range(1, rounds + 1):
        sent = published(strategy, global_model)  # the model, plus SCAFFOLD's c
        agg = strategy.begin_round(global_model)
        for site in SITES:
            x, y = parts[site]
            task = FLModel(params={k: v.copy() for k, v in sent.items()}, round=rnd, total_rounds=rounds)
            scaffold = None
            if strategy_name == "scaffold":
                scaffold = Scaffold.from_task(model, task, lr=LR / (1 - data.MOMENTUM), workdir=workdir / site)
            model.load_state_dict({k: torch.tensor(v) for k, v in task.params.items()})
            for epoch in range(epochs):
                data.train_epoch(model, x, y, lr=LR, batch=BATCH, seed=1000 * rnd + 10 * SITES.index(site) + epoch,
                                 after_backward=scaffold.correct if scaffold else None)  # fmt: skip
            result = FLModel(params=model.state_dict(), num_examples=len(y))
            if scaffold is not None:
                result = scaffold.result(result)
                scaffold.save()  # the server takes every result here
            for tensor, arr in _numpy(result.params or {}).items():
                agg.add(site, tensor, arr, float(len(y)))
            agg.commit(site)
        global_model = {k: np.array(v, copy=True) for k, v in agg.finish().items()}
        model.load_state_dict({k: torch.tensor(v) for k, v in global_model.items()})
        accuracies.append(data.accuracy(model, x_test, y_test))
    return accuracies


def centralized(epochs: int) -> float:
    x_train, y_train, x_test, y_test = data.train_test()
    model = data.make_model(seed=0)
    for epoch in range(1, epochs + 1):
        data.train_epoch(model, x_train, y_train, lr=LR, batch=BATCH, seed=epoch)
    return data.accuracy(model, x_test, y_test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 5])
    args = parser.parse_args()
    torch.set_num_threads(1)
    baseline = centralized(args.rounds)
    print(f"centralized baseline, {args.rounds} epochs: test accuracy {baseline:.4f}\n")
    marks = sorted({3, 5, 10, args.rounds} & set(range(1, args.rounds + 1)))
    print("| local epochs | strategy | " + " | ".join(f"round {r}" for r in marks) + " | % of baseline |")
    print("|---:|---|" + "---:|" * (len(marks) + 1))
    for epochs in args.epochs:
        for name in ("fedavg", "scaffold"):
            with tempfile.TemporaryDirectory(prefix="digits-scaffold-") as work:
                acc = federated(name, args.rounds, epochs, Path(work))
            cells = " | ".join(f"{acc[r - 1]:.4f}" for r in marks)
            print(f"| {epochs} | {name} | {cells} | {100 * acc[-1] / baseline:.1f} % |", flush=True)


if __name__ == "__main__":
    main()
