"""A training script with fault knobs, for the fault-injection suite (run by fedkube's runtime as the trainer).

Every site adds its own constant to every tensor each round, so the server's
aggregate is predictable to the last bit (see ``tests.faults.support.expected_fedavg``).
Knobs come from the environment (the FLJob's ``trainer.env`` and ``clients[].env``):

FAULT_STEP=X              add X to every tensor each round (default 1)
FAULT_EXAMPLES=N          num_examples of every result (default 10)
FAULT_SIZE=N              elements of tensor ``w`` (float32; default 16); ``b`` has one
GATE_DIR=DIR              hold the result of round FAULT_HOLD_ROUND (default: the last) until DIR/go exists, so
                          a test can look at the live job; bounded by FAULT_GATE_TIMEOUT seconds (default 60)
                          (and touch DIR/holding-<site> meanwhile, for FAULT_RAISE_WHEN); the fault suite's job
                          classes set it
FAULT_GATE_THEN=exit      once the gate opens, end the script without sending (for a job that failed meanwhile:
                          a held send() would wait for a server that is gone)
FAULT_RAISE_AT_ROUND=N    raise in user code when round N's task arrives (kind ``exception``)
FAULT_RAISE_WHEN=PATH     ... but only once PATH exists (bounded by FAULT_GATE_TIMEOUT), e.g. once another site
                          holds its result at the gate
FAULT_KILL_IN_UPLOAD_AT_ROUND=N
                          SIGKILL this process while the server downloads round N's result, after
                          FAULT_KILL_AFTER_CHUNKS chunks of it were served (default 2)
FAULT_EXIT_AFTER_LAST=C   once the last round's send() returned (the server has the bytes), exit with code C
FAULT_NAN_FROM_ROUND=N    from round N on, the last element of ``w`` is NaN (the server rejects it: InvalidResult)
FAULT_BAD_RESULT=R:K,...  in round R send a result that does not match the global model; K is ``shape``
                          (``w`` one element short), ``dtype`` (``w`` as float64) or ``name`` (``b`` renamed)
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

import fedkube.trainer_sdk as fk


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


def arm_kill_after_chunks(chunks: int) -> None:
    """SIGKILL this process when the server asks for result chunk ``chunks + 1``.

    The kill has to land while bytes are moving, never before the first chunk
    or after the last: a timer or an outside observer would race the
    transfer. So the trainer's own download service is wrapped at the point
    where it hands out chunks. SIGKILL, because no exit hook may run: the
    sidecar must notice the death on its own.
    """
    from fedkube.transfer import service

    original = service.DownloadService._chunks  # fails loudly if the seam moves
    served = 0

    def chunks_then_die(txn: Any, view: memoryview, receiver: str, offset: int, chunk: int
                        ) -> Iterator[tuple[int, memoryview]]:
        nonlocal served
        for item in original(txn, view, receiver, offset, chunk):
            if served >= chunks:
                print(f"fault: SIGKILL after {served} result chunks were served", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            served += 1
            yield item

    service.DownloadService._chunks = staticmethod(chunks_then_die)  # type: ignore[method-assign]


def hold(gate: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)


def bad(params: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    out = dict(params)
    if kind == "shape":
        out["w"] = params["w"][:-1].copy()
    elif kind == "dtype":
        out["w"] = params["w"].astype(np.float64)
    elif kind == "name":
        out["bias"] = out.pop("b")
    else:
        raise ValueError(f"FAULT_BAD_RESULT: unknown kind {kind!r}; use shape, dtype or name")
    return out


def main() -> int:
    step = np.float32(float(os.environ.get("FAULT_STEP", "1")))
    examples = _int("FAULT_EXAMPLES", 10)
    size = _int("FAULT_SIZE", 16)
    gate = os.environ.get("GATE_DIR", "")
    hold_round = _int("FAULT_HOLD_ROUND", 0)
    gate_timeout = float(os.environ.get("FAULT_GATE_TIMEOUT", "60"))
    raise_at = _int("FAULT_RAISE_AT_ROUND", 0)
    kill_at = _int("FAULT_KILL_IN_UPLOAD_AT_ROUND", 0)
    exit_after_last = os.environ.get("FAULT_EXIT_AFTER_LAST", "")
    bad_rounds = {
        int(r): k for r, k in (item.split(":") for item in os.environ.get("FAULT_BAD_RESULT", "").split(",") if item)
    }
    site = fk.site()
    fk.init()
    while fk.is_running():
        model = fk.receive()
        rnd = model.round
        print(f"{site} round {rnd} received", flush=True)
        if raise_at and rnd == raise_at:
            if os.environ.get("FAULT_RAISE_WHEN"):
                hold(os.environ["FAULT_RAISE_WHEN"], gate_timeout)
            raise RuntimeError(f"injected failure in user code at round {rnd} of {site}")
        if model.params is None:  # the init task: this site's initial weights
            params = {"w": np.zeros(size, dtype=np.float32), "b": np.zeros(1, dtype=np.float32)}
        else:
            params = {name: (arr + step).astype(np.float32) for name, arr in model.params.items()}
        if rnd in bad_rounds:
            params = bad(params, bad_rounds[rnd])
        if 0 < _int("FAULT_NAN_FROM_ROUND", 0) <= rnd:
            params["w"][-1] = np.nan
        if kill_at and rnd == kill_at:
            arm_kill_after_chunks(_int("FAULT_KILL_AFTER_CHUNKS", 2))
        last = rnd == model.total_rounds
        if gate and rnd == (hold_round or model.total_rounds):
            print(f"{site} round {rnd} holding at the gate", flush=True)
            open(os.path.join(gate, f"holding-{site}"), "w").close()
            hold(os.path.join(gate, "go"), gate_timeout)
            if os.environ.get("FAULT_GATE_THEN") == "exit":
                print(f"{site} round {rnd}: leaving at the gate without sending", flush=True)
                break
        try:
            fk.send(fk.FLModel(params=params, num_examples=examples))
        except fk.ResultRejectedError as exc:
            # A round-scoped refusal: this site sits the round out and takes the next task.
            print(f"{site} round {rnd} rejected: {exc.reason}: {exc}", flush=True)
            continue
        except fk.JobStoppedError:
            print(f"{site} round {rnd}: the job ended while this result was held", flush=True)
            break
        print(f"{site} round {rnd} sent", flush=True)
        if last and exit_after_last:
            print(f"{site}: exiting with code {exit_after_last} after the last result was delivered", flush=True)
            sys.stdout.flush()
            os._exit(int(exit_after_last))
    return 0


if __name__ == "__main__":
    sys.exit(main())
