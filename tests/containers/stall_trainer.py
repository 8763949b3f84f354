"""A numpy trainer that stalls in the middle of one upload, so a test can ``podman kill`` it right there.

Run from a ConfigMap in the quickstart image. Every site sends ``w`` (STALL_SIZE float32 elements) plus
``b``. On the site whose env has STALL_AT_ROUND=N, the trainer's download service stops handing out chunks of
round N's result after STALL_AFTER_CHUNKS of them (default 2), writes ``upload-stalled`` into its work
directory (an emptyDir the test can see) and waits there: the kill lands while bytes are moving, without
racing the transfer.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

import fedkube.trainer_sdk as fk

STALLED = "upload-stalled"


def stall_after_chunks(chunks: int, marker: Path) -> None:
    from fedkube.transfer import service

    original = service.DownloadService._chunks  # fails loudly if the seam moves
    served = 0

    def chunks_then_stall(txn: Any, view: memoryview, receiver: str, offset: int, chunk: int
                          ) -> Iterator[tuple[int, memoryview]]:
        nonlocal served
        for item in original(txn, view, receiver, offset, chunk):
            if served >= chunks:
                print(f"stalled after {served} result chunks were served", flush=True)
                marker.touch()
                while True:
                    time.sleep(1)
            served += 1
            yield item

    service.DownloadService._chunks = staticmethod(chunks_then_stall)  # type: ignore[method-assign]


def main() -> int:
    size = int(os.environ.get("STALL_SIZE", "16"))
    stall_at = int(os.environ.get("STALL_AT_ROUND", "0"))
    fk.init()
    while fk.is_running():
        model = fk.receive()
        if model.params is None:
            params = {"w": np.zeros(size, dtype=np.float32), "b": np.zeros(1, dtype=np.float32)}
        else:
            params = {name: (arr + 1).astype(np.float32) for name, arr in model.params.items()}
        if stall_at and model.round == stall_at:
            stall_after_chunks(int(os.environ.get("STALL_AFTER_CHUNKS", "2")),
                               Path(os.environ["FEDKUBE_WORKDIR"]) / STALLED)
        fk.send(fk.FLModel(params=params, num_examples=10))
    return 0


if __name__ == "__main__":
    sys.exit(main())
