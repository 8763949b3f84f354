"""The trainer of the round benchmark (bench/round.py): adds a per-site offset to every parameter.

Site ``<anything>-<i>`` adds ``0.5 * (i + 1)`` to every element. The mode comes
from the environment (``FEDKUBE_BENCH_TRAINER_MODE``, set in the FLJob):

* ``inplace``: updates the received arrays in place and sends those same arrays
  back (the SDK serves them without copying), so the trainer needs ~1xS;
* ``copy``: builds new arrays (``a + offset``) and sends them, so it briefly
  holds the received model and the new one, ~2xS.

How it receives comes from ``FEDKUBE_BENCH_TRAINER_RECEIVE``:

* ``into`` (default): it hands the arrays it sent back to the next
  ``fk.receive(into=...)``, which writes the new global model into them, so
  the loop allocates nothing per round (in ``copy`` mode ``a + offset`` still
  does);
* ``fresh``: plain ``fk.receive()``. The script drops its references to the
  round's arrays after ``send()`` so the next ``receive()`` does not overlap
  with them (what a memory-conscious loop does, and what the SDK's memory
  targets assume); the SDK maps fresh arrays every round.

Every site reports the same ``num_examples`` so the FedAvg of the two offsets
is their plain mean.

With ``model.source: firstClient`` the server first sends one site an init
task; the trainer answers it with the initial model the file source would
have loaded (the ``.npz`` named by ``FEDKUBE_BENCH_INITIAL_MODEL``), so the
rounds and the final model are the same as with ``model.source: file``.
"""

from __future__ import annotations

import os
import sys

import numpy as np

import fedkube.trainer_sdk as fk
from fedkube.protocol import INIT_TASK, TASK_KIND_KEY

MODE_ENV = "FEDKUBE_BENCH_TRAINER_MODE"
MODES = ("inplace", "copy")
RECEIVE_ENV = "FEDKUBE_BENCH_TRAINER_RECEIVE"
RECEIVES = ("into", "fresh")
INITIAL_MODEL_ENV = "FEDKUBE_BENCH_INITIAL_MODEL"
NUM_EXAMPLES = 1000


def site_offset(site: str) -> np.float32:
    """0.5·(i+1) for the site named ``...-<i>``."""
    suffix = site.rsplit("-", 1)[-1]
    if not suffix.isdigit():
        raise SystemExit(f"round_trainer: site name {site!r} must end in -<index> (e.g. site-0)")
    return np.float32(0.5 * (int(suffix) + 1))


def initial_model() -> dict[str, np.ndarray]:
    """The benchmark's initial weights, as ``model.source: file`` would load them."""
    path = os.environ.get(INITIAL_MODEL_ENV)
    if not path:
        raise SystemExit(f"round_trainer: got an init task but {INITIAL_MODEL_ENV} is not set; fix: run bench/round.py")
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def main() -> int:
    mode = os.environ.get(MODE_ENV, "inplace")
    if mode not in MODES:
        print(f"round_trainer: {MODE_ENV}={mode!r} is not one of {', '.join(MODES)}", file=sys.stderr)
        return 2
    receive = os.environ.get(RECEIVE_ENV, "into")
    if receive not in RECEIVES:
        print(f"round_trainer: {RECEIVE_ENV}={receive!r} is not one of {', '.join(RECEIVES)}", file=sys.stderr)
        return 2
    offset = site_offset(fk.site())
    fk.init()
    handed_back = None
    while fk.is_running():
        model = fk.receive(into=handed_back)
        if model.config.get(TASK_KIND_KEY) == INIT_TASK:
            init = initial_model()
            fk.send(fk.FLModel(params=init))
            # The next receive() writes round 1's model into these arrays, as into last round's result.
            handed_back = init if receive == "into" else None
            del model, init
            continue
        if model.params is None:
            raise SystemExit(f"round_trainer: a {model.config.get(TASK_KIND_KEY)!r} task without a model")
        params = model.params
        if mode == "inplace":
            for arr in params.values():
                np.add(arr, offset, out=arr)
            result = params
        else:
            result = {name: arr + offset for name, arr in params.items()}
        fk.send(fk.FLModel(params=result, num_examples=NUM_EXAMPLES))
        handed_back = result if receive == "into" else None
        del model, params, result  # with "fresh", the next receive() must not overlap with this round's arrays
    return 0


if __name__ == "__main__":
    sys.exit(main())
