"""fedkube quickstart: federated linear regression in plain numpy (no torch).

Every site generates its own data from a generator seeded by its site name, so
the sites' inputs differ (different means and scales) while the relationship
y = X @ w_true + b_true they learn is shared. Each round the site loads the
global model, takes a few gradient steps on its data, and sends the update
back; the server averages the updates weighted by num_examples (FedAvg).
After each round (``spec.evaluation``) the server sends an evaluate task: the
site measures the new global model on its held-out data and sends metrics only.
"""

from __future__ import annotations

import zlib

import numpy as np

import fedkube.trainer_sdk as fk

FEATURES = 8
LOCAL_STEPS = 25
LEARNING_RATE = 0.05
HELD_OUT = 100  # examples per site kept out of training, for the evaluate tasks


def site_data(site: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """This site's training and held-out data: the same true model everywhere, a different input distribution
    per site; (x, y, x_held_out, y_held_out)."""
    truth = np.random.default_rng(0)
    w_true = truth.normal(size=FEATURES).astype(np.float32)
    b_true = np.float32(0.5)
    rng = np.random.default_rng(zlib.crc32(site.encode()))
    n = int(rng.integers(200, 400))
    loc, scale = rng.uniform(-1, 1), rng.uniform(0.5, 1.5)

    def draw(count: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(loc=loc, scale=scale, size=(count, FEATURES)).astype(np.float32)
        return x, x @ w_true + b_true + rng.normal(scale=0.1, size=count).astype(np.float32)

    x, y = draw(n)
    x_held_out, y_held_out = draw(HELD_OUT)
    return x, y, x_held_out, y_held_out


def mse(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((x @ w + b - y) ** 2))


def main() -> None:
    site = fk.site() or "local"
    x, y, x_held_out, y_held_out = site_data(site)
    fk.init()
    while fk.is_running():
        model = fk.receive()
        if model.kind == "evaluate":  # spec.evaluation: measure the global model on held-out data, metrics only
            assert model.params is not None
            loss = mse(model.params["w"], model.params["b"], x_held_out, y_held_out)
            print(f"site {site} round {model.round}: evaluation of the global model: held-out loss {loss:.4f}")
            fk.send(fk.FLModel(num_examples=len(y_held_out), metrics={"loss": loss}))
            continue
        if model.params is None:  # round 0 with model source firstClient: this site supplies the initial weights
            w = np.zeros(FEATURES, dtype=np.float32)
            b = np.zeros(1, dtype=np.float32)
        else:
            w = model.params["w"].copy()
            b = model.params["b"].copy()
        global_loss = mse(w, b, x, y)
        for _ in range(LOCAL_STEPS):
            err = x @ w + b - y
            w -= LEARNING_RATE * (2.0 / len(y)) * (x.T @ err)
            b -= LEARNING_RATE * 2.0 * np.mean(err, keepdims=True)
        loss = mse(w, b, x, y)
        print(f"site {site} round {model.round}: global model loss {global_loss:.4f} -> local loss {loss:.4f}")
        fk.log_metric("train_loss", loss)
        fk.send(
            fk.FLModel(params={"w": w, "b": b}, num_examples=len(y), metrics={"loss": loss, "global_loss": global_loss})
        )


if __name__ == "__main__":
    main()
