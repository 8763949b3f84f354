"""The fedkube trainer SDK: what a training script imports.

Example::

    import fedkube.trainer_sdk as fk

    fk.init()                                  # connect to the sidecar
    while fk.is_running():                     # False once the job is over
        model = fk.receive()                   # FLModel: params (name -> np.ndarray), round, kind, config
        if model.kind == "evaluate":           # spec.evaluation: measure the global model, send metrics only
            net.load_state_dict(model.params_torch())
            loss, n = evaluate(net, held_out)
            fk.send(fk.FLModel(num_examples=n, metrics={"loss": loss}))
            continue
        params = model.params_torch()          # same memory as torch tensors (or None: send initial weights)
        if params is not None:
            net.load_state_dict(params)
        loss, n = train(net)
        fk.send(fk.FLModel(params=net.state_dict(), num_examples=n, metrics={"loss": loss}))
        fk.log_metric("train_loss", loss)

``send()`` blocks until the server has downloaded the result, so the script
never exits while its result is still needed. At exit the SDK tells the
sidecar the trainer finished; an unhandled exception is reported as a failure
(kind ``exception``, or ``config error`` for :class:`fedkube.errors.ConfigError`)
before the process ends.

The process is configured by the environment the pod or ``fedkube run``
gives it: ``FEDKUBE_SIDECAR_ADDRESS``, ``FEDKUBE_SITE``, ``FEDKUBE_JOB``,
``FEDKUBE_WORKDIR``.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from fedkube import envvars
from fedkube.trainer_sdk._hooks import install_hooks
from fedkube.trainer_sdk._session import Session, SessionSettings
from fedkube.trainer_sdk.errors import (
    InvalidParamsError,
    JobStoppedError,
    NotInitializedError,
    ReceiveWithoutSendError,
    ResultRejectedError,
    ResultTransferError,
    SDKError,
    SendWithoutReceiveError,
    SidecarUnreachableError,
)
from fedkube.trainer_sdk.model import FLModel
from fedkube.wire.v1 import control_pb2

__all__ = [
    "FLModel",
    "InvalidParamsError",
    "JobStoppedError",
    "NotInitializedError",
    "ReceiveWithoutSendError",
    "ResultRejectedError",
    "ResultTransferError",
    "SDKError",
    "SendWithoutReceiveError",
    "SidecarUnreachableError",
    "finish",
    "init",
    "is_evaluate",
    "is_running",
    "log_metric",
    "receive",
    "send",
    "site",
    "workdir",
]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_session: Session | None = None
_hooks_installed = False


def _current() -> Session | None:
    return _session


def _require(call: str) -> Session:
    s = _session
    if s is None:
        raise NotInitializedError(f"fk.{call}() was called before fk.init(); fix: call fk.init() once at the start")
    return s


def _default_logging() -> None:
    """One INFO handler on the root logger, only when the script configured no logging at all.

    Otherwise the script's own setup stands untouched (LESSONS.md 21: silent
    trainers without any handler; doubled lines when we add ours to theirs).
    """
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def init(*, settings: SessionSettings | None = None) -> None:
    """Connect to this pod's sidecar and start serving results; call once, first.

    Raises :class:`SidecarUnreachableError` (naming the address and
    ``FEDKUBE_SIDECAR_ADDRESS``) when the sidecar does not answer, and
    :class:`SDKError` when the environment lacks a required variable.
    """
    global _session, _hooks_installed
    with _lock:
        if _session is not None:
            return
        _default_logging()
        missing = [v for v in (envvars.SIDECAR_ADDRESS, envvars.SITE) if not os.environ.get(v)]
        if missing:
            raise SDKError(
                f"{' and '.join(missing)} not set; the trainer SDK is configured by the fedkube sidecar's pod or by "
                "`fedkube run`; fix: run the script through fedkube, or set them to the sidecar's host:port and "
                "the site name"
            )
        session = Session(
            os.environ[envvars.SIDECAR_ADDRESS],
            site=os.environ[envvars.SITE],
            job=os.environ.get(envvars.JOB, ""),
            settings=settings or SessionSettings(),
        )
        session.connect()
        _session = session
        if not _hooks_installed:
            _hooks_installed = True
            install_hooks(_current)
            atexit.register(finish)


def is_running() -> bool:
    """True while the job has a task for this site; waits for the next task (False after the job's Stop).

    Raises :class:`ReceiveWithoutSendError` while the task last received is still unanswered (call
    ``send()`` first): the next task comes only after its result.
    """
    return _require("is_running").is_running()


def is_evaluate() -> bool:
    """Whether the task last received (and not yet answered) is an evaluate task (``spec.evaluation``).

    Same as ``model.kind == "evaluate"`` on the model ``receive()`` returned.
    Answer it with ``send(FLModel(num_examples=n, metrics={...}))``, measured
    on held-out data with the received global model; params sent on an
    evaluate task are dropped (a script unaware of evaluation keeps working:
    its training metrics then stand for the evaluation's).
    """
    return _require("is_evaluate").is_evaluate()


def receive(into: FLModel | Mapping[str, Any] | None = None) -> FLModel:
    """The next task's model: ``params`` fetched into fresh arrays that are yours to modify.

    ``params`` is None for an "init" task (``config["fedkube.task"] == "init"``):
    answer it by sending your initial weights.

    Each received task must be answered with exactly one ``send()`` before the
    next ``receive()``; a second ``receive()`` raises
    :class:`ReceiveWithoutSendError` at once (the server would wait for the
    missing result until the round's deadline).

    ``into`` gives buffers to receive into instead: the params you sent last
    round (``into=model``), or a network's ``state_dict()``, whose weights are
    then overwritten in place (a GPU tensor is filled through a host buffer of
    one tensor at a time). Every tensor whose name, dtype and shape match a
    writable C-contiguous array or tensor in ``into`` is written there, and
    ``params[name]`` is that same object; the others arrive in fresh arrays,
    and one log line says which and why. A loop that hands its buffers back
    this way allocates nothing per round (no fresh S bytes to map and zero),
    and a ``state_dict`` needs no ``load_state_dict`` copy. Their contents
    are undefined if ``receive`` raises.
    """
    return _require("receive").receive(into)


def send(model: FLModel) -> bool:
    """Send the result of the task last received; returns once the server has all of it.

    Tensors are served straight from your arrays (no copy): do not modify
    them until your next ``is_running()``/``receive()`` has returned. A result
    the server used stays served until the next task arrives, because the
    server may pull tensors of it again to take another client's excluded
    result out of the average exactly. Names, dtypes and shapes must match
    the model you received.

    Returns True when the server downloaded, verified and used the result,
    False when it set this round's result aside for a round-scoped reason
    (the site was a straggler past the round deadline, or the transfer
    failed): a warning is logged and the site simply takes the next task.
    Raises :class:`SendWithoutReceiveError`, :class:`ResultRejectedError`
    (reason ``InvalidResult``: names, dtypes or shapes differ from the global
    model — a bug in the script), :class:`ResultTransferError` (the download
    never started or stalled).
    """
    return _require("send").send(model)


def log_metric(name: str, value: float, round: int | None = None) -> None:
    """Report a scalar metric (for the current round unless ``round`` is given) to the server."""
    _require("log_metric").log_metric(name, value, round)


def finish() -> None:
    """Close the link to the sidecar (runs automatically at exit).

    The trainer counts as finished cleanly only when the job's end reached it
    (``is_running()`` returned False). A script that stops earlier (it broke
    out of the loop, or called ``sys.exit``, whose code Python does not show
    to exit hooks) is reported by the sidecar as having exited: teardown noise
    once its last result was delivered (LESSONS.md 19), ExitedBeforeDownload
    while one was still wanted. Does nothing if the trainer already reported
    a failure or was never initialized.
    """
    global _session
    with _lock:
        s, _session = _session, None
    if s is None:
        return
    if not s.final_reported:
        if s.job_over:
            s.report(control_pb2.TRAINER_PHASE_FINISHED, message="trainer finished")
            log.info("job %s site %s: trainer finished", s.job, s.site)
        else:
            log.warning("job %s site %s: the trainer is ending before the job is over; the sidecar will report "
                        "that it exited", s.job, s.site)
    s.close()


def site() -> str:
    """This client's site name (FEDKUBE_SITE)."""
    s = _session
    return s.site if s is not None else os.environ.get(envvars.SITE, "")


def workdir() -> str:
    """This client's own working directory (FEDKUBE_WORKDIR, else the current directory)."""
    return os.environ.get(envvars.WORKDIR) or os.getcwd()
