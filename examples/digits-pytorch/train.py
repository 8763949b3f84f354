"""fedkube digits example: a small torch MLP trained with FedAvg (or SCAFFOLD) on non-IID parts of sklearn's digits.

Each site trains one local epoch per round on its label-skewed part of the
training set (data.py) and evaluates on the shared held-out test set: the
accuracy of the global model it received (``global_accuracy``, the same for
every site) and of its local model after training (``local_accuracy``) are
logged with ``fk.log_metric`` and returned in the result's metrics.
"""

from __future__ import annotations

import os

import data

import fedkube.trainer_sdk as fk
from fedkube.protocol import SCAFFOLD_PREFIX
from fedkube.trainer_sdk.scaffold import Scaffold

LOCAL_EPOCHS = 1
LR = 0.05
BATCH = 32
# Every site must compute the same partition, so each needs the job's site list.
SITES = [s for s in os.environ.get("DIGITS_SITES", "site-a,site-b,site-c").split(",") if s]


def main() -> None:
    site = fk.site() or SITES[0]
    x, y = data.site_train(site, SITES)
    _, _, x_test, y_test = data.train_test()
    model = data.make_model(seed=0)
    fk.init()
    while fk.is_running():
        task = fk.receive()
        if task.params is None:
            # Round 0 with model source firstClient: this site supplies the initial weights, untrained, so
            # that round 1 starts from the same model as the centralized baseline.
            initial = {name: t.detach().cpu().numpy() for name, t in model.state_dict().items()}
            fk.send(fk.FLModel(params=initial, num_examples=len(y)))
            continue
        # With spec.strategy.name scaffold the task also carries the server's control variate (docs/scaffold.md).
        # Momentum 0.9 makes the effective SGD step lr / (1 - 0.9), which SCAFFOLD's variate update needs.
        scaffold = None
        if task.kind == "train" and any(name.startswith(SCAFFOLD_PREFIX) for name in task.params):
            scaffold = Scaffold.from_task(model, task, lr=LR / (1 - data.MOMENTUM))
        model.load_state_dict(task.params_torch())
        global_acc = data.accuracy(model, x_test, y_test)
        if task.kind == "evaluate":  # with spec.evaluation: the held-out accuracy of the global model, metrics only
            print(f"site {site} round {task.round}/{task.total_rounds}: evaluation of the global model: held-out "
                  f"accuracy {global_acc:.4f}")
            fk.send(fk.FLModel(num_examples=len(y_test), metrics={"accuracy": global_acc}))
            continue
        loss = 0.0
        for epoch in range(LOCAL_EPOCHS):
            seed = 1000 * task.round + 10 * data.site_index(site, SITES) + epoch
            loss = data.train_epoch(model, x, y, lr=LR, batch=BATCH, seed=seed,
                                    after_backward=scaffold.correct if scaffold is not None else None)
        local_acc = data.accuracy(model, x_test, y_test)
        print(
            f"site {site} round {task.round}/{task.total_rounds}: global model test accuracy {global_acc:.4f}, "
            f"after local training {local_acc:.4f} (loss {loss:.4f}, {len(y)} examples)"
        )
        fk.log_metric("global_accuracy", global_acc)
        fk.log_metric("local_accuracy", local_acc)
        params = {name: t.detach().cpu().numpy() for name, t in model.state_dict().items()}
        metrics = {"global_accuracy": global_acc, "local_accuracy": local_acc, "loss": loss}
        result = fk.FLModel(params=params, num_examples=len(y), metrics=metrics)
        if scaffold is not None:
            scaffold.send(result)  # adds this site's variate delta; keeps its variate once the server used it
        else:
            fk.send(result)


if __name__ == "__main__":
    main()
