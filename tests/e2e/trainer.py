"""The quickstart trainer with failure knobs for lifecycle tests (set per site through the FLJob's env).

E2E_CRASH_AT_ROUND=N   raise in user code when round N's task arrives (client crash)
E2E_EXIT_AFTER=N       exit with code N after the job is over and the last result was delivered (teardown noise)
E2E_ROUND_SLEEP=S      sleep S seconds per round (so a test can act mid-job)
E2E_ROUNDS_LOG=PATH    append "site round" for every task received (shows where a resumed job continues)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

import fedkube.trainer_sdk as fk

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "quickstart-numpy"))
from train import FEATURES, LEARNING_RATE, LOCAL_STEPS, mse, site_data  # type: ignore[import-not-found]


def main() -> int:
    site = fk.site() or "local"
    crash_at = int(os.environ.get("E2E_CRASH_AT_ROUND", "0"))
    exit_after = int(os.environ.get("E2E_EXIT_AFTER", "0"))
    pause = float(os.environ.get("E2E_ROUND_SLEEP", "0"))
    rounds_log = os.environ.get("E2E_ROUNDS_LOG")
    x, y, x_held_out, y_held_out = site_data(site)
    fk.init()
    while fk.is_running():
        model = fk.receive()
        if model.kind == "evaluate":  # the quickstart FLJob evaluates every round: metrics only, no knobs
            assert model.params is not None
            fk.send(fk.FLModel(num_examples=len(y_held_out),
                               metrics={"loss": mse(model.params["w"], model.params["b"], x_held_out, y_held_out)}))
            continue
        if rounds_log:
            with open(rounds_log, "a") as f:
                f.write(f"{site} {model.round}\n")
        if crash_at and model.round == crash_at:
            raise RuntimeError(f"site {site}: injected crash in round {model.round}")
        if model.params is None:
            w, b = np.zeros(FEATURES, dtype=np.float32), np.zeros(1, dtype=np.float32)
        else:
            w, b = model.params["w"].copy(), model.params["b"].copy()
        for _ in range(LOCAL_STEPS):
            err = x @ w + b - y
            w -= LEARNING_RATE * (2.0 / len(y)) * (x.T @ err)
            b -= LEARNING_RATE * 2.0 * np.mean(err, keepdims=True)
        time.sleep(pause)
        fk.send(fk.FLModel(params={"w": w, "b": b}, num_examples=len(y), metrics={"loss": mse(w, b, x, y)}))
    return exit_after


if __name__ == "__main__":
    sys.exit(main())
