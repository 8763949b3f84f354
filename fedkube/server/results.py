"""Taking in the clients' results: announcements, their downloads' outcomes, and the answers.

The workflow hands each announcement and each finished download to
:class:`ResultDesk` on its own thread. The desk checks the result against the
round in progress (a :class:`~fedkube.server.live_round.LiveRound`), starts
its download, takes or discards what arrived, and answers the client
(``ResultReceived``) exactly once; client failures go back to the workflow
through ``fail`` and status changes through ``on_change``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from fedkube.server import outbox
from fedkube.server.control import ResultAnnounced
from fedkube.server.downloads import Download, Downloader
from fedkube.server.live_round import LiveRound, TrainRound
from fedkube.server.registry import ClientState, Registry, SessionLike
from fedkube.server.reverse import SendFn
from fedkube.status import Reason

log = logging.getLogger(__name__)


class FailFn(Protocol):
    """Fails a client (registry and metrics); True when that changed it."""

    def __call__(self, site: str, reason: Reason, message: str, *, task_id: str | None = None) -> bool: ...


class ResultDesk:
    """Handles result announcements and download outcomes for the workflow (on its thread)."""

    def __init__(
        self,
        job: str,
        registry: Registry,
        downloader: Downloader,
        send: SendFn,
        *,
        clock: Callable[[], float],
        post: Callable[..., None],
        fail: FailFn,
        on_change: Callable[[], None],
    ) -> None:
        self._job = job
        self._registry = registry
        self._downloader = downloader
        self._send = send
        self._clock = clock
        self._post = post
        self._fail = fail
        self._on_change = on_change

    def on_result(self, rnd: LiveRound | None, session: SessionLike, result: ResultAnnounced) -> None:
        """A client announced its result for ``rnd`` (the round in progress, if any)."""
        if not self._registry.heartbeat(session):
            return  # from a replaced connection
        site = session.site
        job = self._job
        rec = self._registry.get(site)
        if rnd is None or rnd.tasks.get(site) != result.task_id or rnd.closed:
            # An old task's result (e.g. a straggler's): answer so its send() returns; never count it.
            log.info("job %s: result for task %s from %s is not for the current round; ignored", job,
                     result.task_id, site)
            self.result_received(site, result.task_id, False, Reason.ROUND_TIMEOUT.value,
                                  "the round this result belongs to is over")
            return
        if site in rnd.results:
            self.answer(rnd, site, True, "", "already received", again=True)
            return
        if site in rnd.downloads:
            log.info("job %s round %s: duplicate result announcement from %s ignored", job, rnd.number, site)
            return
        if not rnd.expects_result(rec):
            log.info("job %s round %s: result from %s in state %s ignored", job, rnd.number, site, rec.state.value)
            return
        rnd.announced.add(site)
        problem = rnd.check_result(site, result)
        if problem:
            if not rnd.keep_failure(site, Reason.INVALID_RESULT.value, problem):
                self._fail(site, Reason.INVALID_RESULT, problem, task_id=result.task_id)
            log.warning("job %s round %s: invalid result from %s: %s", job, rnd.number, site, problem)
            self.answer(rnd, site, False, Reason.INVALID_RESULT.value, problem)
            self._on_change()
            return
        if not rnd.claim(self._registry, session, result.task_id):
            return
        if rnd.metrics_only:
            rnd.results[site] = (rnd.weight_of(site, result.num_examples), dict(result.metrics))
            self.answer(rnd, site, True, "", "")
            self._on_change()
            return
        self._start_download(rnd, site, result)

    def _start_download(self, rnd: LiveRound, site: str, result: ResultAnnounced) -> None:
        order = rnd.tensor_order
        refs = sorted(result.refs, key=lambda r: order.get(r.name, 0))
        rnd.attempts += 1
        dl = Download(
            site=site, task_id=result.task_id, key=f"{site}#{rnd.attempts}", num_examples=result.num_examples,
            metrics=dict(result.metrics), bytes_total=sum(r.nbytes for r in refs), started=self._clock(),
        )  # fmt: skip
        rnd.continue_attempt(site, dl.key)
        rnd.downloads[site] = dl
        rnd.sources[dl.key] = dl
        dl.refs = refs
        self._downloader.start(
            rnd.number, dl, refs, rnd.sink, rnd.tasks,
            on_finished=lambda d, ok, reason, message: self._post(self.on_download_finished, rnd, d, ok, reason,
                                                                  message),
        )  # fmt: skip
        log.info("job %s round %s: pulling %d tensor(s), %d bytes, from %s", self._job, rnd.number, len(refs),
                 dl.bytes_total, site)
        self._on_change()

    def on_download_finished(self, rnd: LiveRound, dl: Download, ok: bool, reason: str, message: str) -> None:
        if rnd.downloads.get(dl.site) is not dl:
            rnd.discard(dl)  # superseded by a re-sent task's download
            self.start_rebuilds(rnd)
            return
        del rnd.downloads[dl.site]
        job = self._job
        if ok and rnd.accept(self._registry, dl):
            # The round's metrics are weighted as the result was: a claim the cap cut counts capped there too.
            rnd.results[dl.site] = (rnd.weight_of(dl.site, dl.num_examples), dl.metrics)
            self.start_rebuilds(rnd)  # a clipped update is refolded scaled (fedkube.server.influence)
            self.answer(rnd, dl.site, True, "", "")
            self._on_change()
            return
        note = rnd.discard(dl)
        self.start_rebuilds(rnd)
        if ok:
            return  # the client left the round while its bytes arrived; already answered or failed
        if note:
            message = f"{message}; {note}" if message else note
        if not rnd.keep_failure(dl.site, reason, message) and reason != Reason.ABORTED.value:
            self._fail(dl.site, Reason(reason), message, task_id=dl.task_id)
        log.warning("job %s round %s: result of %s not used: %s (%s)", job, rnd.number, dl.site, reason, message)
        rec = self._registry.get(dl.site)
        if reason != Reason.ABORTED.value or rec.state is ClientState.FAILED:
            shown = rec.reason.value if rec.reason is not None and reason == Reason.ABORTED.value else reason
            self.answer(rnd, dl.site, False, shown, message if reason != Reason.ABORTED.value else rec.message)
        self._on_change()

    def start_rebuilds(self, rnd: LiveRound) -> None:
        """Pull again the tensors that discards emptied (``LiveRound.to_rebuild``), from their other contributors."""
        if not isinstance(rnd, TrainRound):
            return
        while rnd.to_rebuild:
            key, names = rnd.to_rebuild.pop(0)
            first = rnd.sources.get(key)
            if first is None:
                rnd.rebuild_failures.append(f"{names} of {key}: no download of {key} is known (a bug)")
                continue
            wanted = set(names)
            refs = [r for r in first.refs if r.name in wanted]
            again = Download(site=first.site, task_id=first.task_id, key=key, num_examples=first.num_examples,
                             metrics={}, bytes_total=sum(r.nbytes for r in refs), started=self._clock(), refs=refs)
            rnd.rebuilds.append(again)
            log.info("job %s round %s: pulling %d tensor(s) of %s again: %s", self._job, rnd.number, len(refs),
                     first.site, ", ".join(r.name for r in refs))
            self._downloader.rebuild(
                rnd.number, again, refs, rnd.aggregator,
                on_finished=lambda d, ok, reason, message: self._post(self.on_rebuild_finished, rnd, d, ok, reason,
                                                                      message),
            )  # fmt: skip

    def on_rebuild_finished(self, rnd: LiveRound, dl: Download, ok: bool, reason: str, message: str) -> None:
        rnd.rebuilds[:] = [d for d in rnd.rebuilds if d is not dl]  # by identity: two pulls may look alike
        if ok and isinstance(rnd, TrainRound):  # a rebuild's bytes moved too (its result counted when accepted)
            rnd.telemetry.transferred("from_clients", dl.bytes_done, max(0.0, self._clock() - dl.started))
        owed = rnd.aggregator.owed() if isinstance(rnd, TrainRound) else {}
        if not ok and any(dl.key in owed.get(r.name, ()) for r in dl.refs):  # else: excluded meanwhile itself
            names = ", ".join(repr(r.name) for r in dl.refs)
            rnd.rebuild_failures.append(f"tensor(s) {names} of {dl.site} could not be pulled again ({reason}: "
                                        f"{message})")
        self._on_change()

    def answer(self, rnd: LiveRound, site: str, ok: bool, reason: str, message: str, *, again: bool = False) -> None:
        """ResultReceived for ``site``'s task of ``rnd``, once (``again`` repeats a positive answer)."""
        if site in rnd.answered and not again:
            return
        rnd.answered.add(site)
        self.result_received(site, rnd.tasks[site], ok, reason, message)

    def result_received(self, site: str, task_id: str, ok: bool, reason: str, message: str) -> None:
        self._send(site, outbox.result_received(task_id, ok, reason, message))
