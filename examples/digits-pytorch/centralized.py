"""The centralized baseline: the same model trained on all the training data, for as many epochs as rounds.

    python centralized.py [--epochs 20]

Prints the held-out test accuracy after each epoch, then the final one. One
epoch over all the data matches one federated round in which every site runs
one local epoch over its part (LOCAL_EPOCHS in train.py).
"""

from __future__ import annotations

import argparse

import data

LR = 0.05
BATCH = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    x_train, y_train, x_test, y_test = data.train_test()
    model = data.make_model(seed=0)
    acc = 0.0
    for epoch in range(1, args.epochs + 1):
        loss = data.train_epoch(model, x_train, y_train, lr=LR, batch=BATCH, seed=epoch)
        acc = data.accuracy(model, x_test, y_test)
        print(f"epoch {epoch:2d}: train loss {loss:.4f}, test accuracy {acc:.4f}")
    print(f"centralized baseline: test accuracy {acc:.4f} after {args.epochs} epochs")


if __name__ == "__main__":
    main()
