"""Test accuracy of every global model a run's server checkpointed.

    python evaluate.py RUN_DIR       # e.g. runs/digits-pytorch-20261122-031700

The sites evaluate the global model they receive at the start of each round,
so nobody evaluates the model of the last round; its checkpoint does. The
server keeps the newest few checkpoints (the last 3 by default).
"""

from __future__ import annotations

import sys
from pathlib import Path

import data
import torch

from fedkube.server import checkpoint


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python evaluate.py RUN_DIR (the --run-dir of `fedkube run`)")
    run_dir = Path(sys.argv[1])
    rounds = sorted(run_dir.glob("pods/*-server/volumes/*/*/round-*")) + sorted(run_dir.glob("volumes/*/*/round-*"))
    if not rounds:
        raise SystemExit(f"no checkpoints under {run_dir}; fix: pass the --run-dir of a finished `fedkube run`")
    _, _, x_test, y_test = data.train_test()
    for path in rounds:
        ck = checkpoint.load(path)
        model = data.make_model()
        model.load_state_dict({name: torch.from_numpy(array.copy()) for name, array in ck.model.items()})
        print(f"round {ck.round:2d}: global model test accuracy {data.accuracy(model, x_test, y_test):.4f}")


if __name__ == "__main__":
    main()
