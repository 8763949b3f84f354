"""The trainer of the soak benchmark (bench/soak.py): adds a known per-site value, and straggles on request.

Site ``<anything>-<i>`` adds ``0.5 * (i + 1)`` to every element and reports the
same ``num_examples`` as every other site, so a FedAvg round moves the model by
the plain mean of its participants' offsets. The soak's initial model holds
multiples of 1/1024 and the offsets are multiples of 0.5, so every value stays
exactly representable in float32 and the harness can check the final model
exactly from the list of participants per round.

Straggling: when the file ``<FEDKUBE_SOAK_CONTROL>/straggle-<site>`` exists at
the start of a round, the trainer removes it, sleeps the number of seconds it
holds (the harness writes more than the round deadline), then sends anyway, as
a slow site would. It writes ``straggled-<site>-r<round>`` so the harness
knows which round the delay hit.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

import fedkube.trainer_sdk as fk

CONTROL_ENV = "FEDKUBE_SOAK_CONTROL"
NUM_EXAMPLES = 1000


def site_offset(site: str) -> np.float32:
    """0.5·(i+1) for the site named ``...-<i>``."""
    suffix = site.rsplit("-", 1)[-1]
    if not suffix.isdigit():
        raise SystemExit(f"soak_trainer: site name {site!r} must end in -<index> (e.g. site-0)")
    return np.float32(0.5 * (int(suffix) + 1))


def straggle(control: Path | None, site: str, round_: int) -> None:
    """Sleep once if the harness asked this site to straggle."""
    if control is None:
        return
    order = control / f"straggle-{site}"
    try:
        seconds = float(order.read_text().strip())
        order.unlink()
    except (OSError, ValueError):
        return
    (control / f"straggled-{site}-r{round_}").write_text(f"{seconds}\n")
    print(f"soak_trainer: site {site} round {round_}: straggling for {seconds:g} s", flush=True)
    time.sleep(seconds)


def main() -> int:
    control_dir = os.environ.get(CONTROL_ENV)
    control = Path(control_dir) if control_dir else None
    site = fk.site()
    offset = site_offset(site)
    fk.init()
    while fk.is_running():
        model = fk.receive()
        if model.params is None:
            raise SystemExit("soak_trainer: got an init task; the soak's FLJob must use model source file")
        params = model.params
        for arr in params.values():
            np.add(arr, offset, out=arr)
        straggle(control, site, model.round)
        fk.send(fk.FLModel(params=params, num_examples=NUM_EXAMPLES))
        del model, params  # the next receive() must not overlap with this round's arrays (LESSONS.md 8)
    return 0


if __name__ == "__main__":
    sys.exit(main())
