"""The sidecar's pure parts: task book, trainer tracker, backoff, config."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.sidecar.config import SIDECAR_EXIT_ON_STOP, SidecarConfig
from fedkube.sidecar.state import TaskBook, TrainerTracker, backoff_delay
from fedkube.wire.v1 import control_pb2, tensor_pb2, trainer_pb2
from tests.support.tls import session_pki


def _task(tid: str) -> control_pb2.Task:
    return control_pb2.Task(task_id=tid, round=1)


def _ann(tid: str, sizes: dict[str, int]) -> control_pb2.ResultAnnouncement:
    refs = [tensor_pb2.TensorRef(source="a", transaction_id=f"{tid}-tx", ref_id=r, name=r, nbytes=n)
            for r, n in sizes.items()]
    return control_pb2.ResultAnnouncement(task_id=tid, round=1, refs=refs)


def test_duplicate_task_ids_are_queued_once() -> None:
    book = TaskBook()
    assert book.offer(_task("t1"))
    assert not book.offer(_task("t1"))
    assert book.offer(_task("t2"))
    got = [book.take(0), book.take(0), book.take(0)]
    assert [g.task_id if isinstance(g, control_pb2.Task) else g for g in got] == ["t1", "t2", None]


def test_a_task_whose_result_the_trainer_already_sent_is_not_handed_out_again() -> None:
    # A restarted sidecar: the server re-sends t1, the trainer (which took t1 from the old sidecar) sends its result.
    book = TaskBook()
    assert book.offer(_task("t1"))
    book.announce(_ann("t1", {"a": 10}))
    assert book.take(0) is None
    assert not book.offer(_task("t1"))  # a later re-send of it is ignored too
    assert book.offer(_task("t2"))
    got = book.take(0)
    assert isinstance(got, control_pb2.Task) and got.task_id == "t2"


def test_stop_comes_after_queued_tasks_and_wakes_a_waiter() -> None:
    book = TaskBook()
    book.offer(_task("t1"))
    book.stop(control_pb2.Stop(success=True, reason="Done"))
    assert isinstance(book.take(0), control_pb2.Task)
    assert isinstance(book.take(0), control_pb2.Stop)
    book2 = TaskBook()
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(book2.take(10)))
    t.start()
    book2.stop(control_pb2.Stop(reason="Done"))
    t.join(5)
    assert isinstance(out[0], control_pb2.Stop)


def test_resume_task_id_tracks_the_task_until_its_result_is_received() -> None:
    book = TaskBook()
    assert book.resume_task_id() == ""
    book.offer(_task("t1"))
    assert book.resume_task_id() == "t1"
    book.announce(_ann("t1", {"a": 10}))
    assert book.resume_task_id() == "t1"
    assert book.received("t1", ok=True, reason="", message="") == {"t1-tx"}
    assert book.resume_task_id() == ""
    assert book.received("t1", ok=True, reason="", message="") is None  # a second ResultReceived is ignored


def test_progress_counts_each_byte_once_across_resumed_pushes() -> None:
    book = TaskBook()
    ann = _ann("t1", {"a": 100, "b": 50})
    book.announce(ann)
    a, b = ann.refs
    book.relayed(a, 60)
    book.relayed(a, 40)  # a resumed push re-sends from offset 0: no double counting
    book.relayed(b, 50)
    p = book.progress("t1", after_version=-1, timeout=0)
    assert p is not None and (p.bytes_done, p.bytes_total, p.finished) == (110, 150, False)
    assert book.downloads_outstanding() == ["t1"]
    book.received("t1", ok=False, reason="InvalidResult", message="shape")
    p = book.progress("t1", after_version=p.version, timeout=1)
    assert p is not None and p.finished and not p.ok and p.reason == "InvalidResult"
    assert book.downloads_outstanding() == []
    assert book.pending_announcements() == []


def test_metrics_only_result_is_not_an_outstanding_download() -> None:
    book = TaskBook()
    book.announce(_ann("v1", {}))
    assert book.downloads_outstanding() == []
    assert [a.task_id for a in book.pending_announcements()] == ["v1"]


def test_trainer_gone_with_outstanding_download_is_exited_before_download() -> None:
    tr = TrainerTracker()
    session, change = tr.attached()
    assert change is not None and change.phase == control_pb2.TRAINER_PHASE_RUNNING
    gone = tr.gone(session, downloads_outstanding=True)
    assert gone is not None and gone.phase == control_pb2.TRAINER_PHASE_FAILED
    assert gone.kind == control_pb2.FAILURE_KIND_EXITED_BEFORE_DOWNLOAD


def test_trainer_gone_after_finishing_is_not_a_failure() -> None:
    tr = TrainerTracker()
    session, _ = tr.attached()
    assert tr.reported(control_pb2.TrainerState(phase=control_pb2.TRAINER_PHASE_FINISHED)) is not None
    assert tr.gone(session, downloads_outstanding=False) is None
    assert tr.state.phase == control_pb2.TRAINER_PHASE_FINISHED


def test_trainer_gone_without_a_word_is_exited_and_exception_kind_is_kept() -> None:
    tr = TrainerTracker()
    session, _ = tr.attached()
    gone = tr.gone(session, downloads_outstanding=False)
    assert gone is not None and gone.phase == control_pb2.TRAINER_PHASE_EXITED and gone.kind == 0
    tr2 = TrainerTracker()
    s2, _ = tr2.attached()
    tr2.reported(control_pb2.TrainerState(phase=control_pb2.TRAINER_PHASE_FAILED,
                                          kind=control_pb2.FAILURE_KIND_EXCEPTION, message="ValueError: x"))
    assert tr2.gone(s2, downloads_outstanding=True) is None  # the explicit kind stays
    assert tr2.state.kind == control_pb2.FAILURE_KIND_EXCEPTION


def test_stale_session_end_is_ignored() -> None:
    tr = TrainerTracker()
    old, _ = tr.attached()
    new, _ = tr.attached()  # a restarted trainer
    assert tr.gone(old, downloads_outstanding=True) is None
    assert tr.state.phase == control_pb2.TRAINER_PHASE_RUNNING
    assert tr.gone(new, downloads_outstanding=False) is not None


def test_wait_final_returns_when_state_becomes_final() -> None:
    tr = TrainerTracker()
    assert tr.wait_final(0.01) is None
    s, _ = tr.attached()
    threading.Timer(0.05, lambda: tr.gone(s, downloads_outstanding=False)).start()
    got = tr.wait_final(5)
    assert got is not None and got.phase == control_pb2.TRAINER_PHASE_EXITED


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(a, base_s=0.5, max_s=15, rng=rng) for a in range(1, 10)]
    for a, d in enumerate(delays, start=1):
        nominal = min(15, 0.5 * 2 ** (a - 1))
        assert 0.8 * nominal <= d <= min(15, 1.2 * nominal)
    assert delays[-1] <= 15
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(0, base_s=1, max_s=2)


def _env(tmp_path: Path, **over: str) -> dict[str, str]:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    env = {envvars.JOB: "j", envvars.SITE: "a", envvars.SERVER_ADDRESS: "server:7070", envvars.TOKEN_FILE: str(token),
           **session_pki("j").site_env("a")}
    env.update(over)
    return {k: v for k, v in env.items() if v != "<unset>"}


def test_config_from_env(tmp_path: Path) -> None:
    cfg = SidecarConfig.from_env(_env(tmp_path, **{envvars.TRAINER_PORT: "7171", SIDECAR_EXIT_ON_STOP: "1"}))
    assert (cfg.job, cfg.site, cfg.server_address, cfg.token, cfg.trainer_port, cfg.exit_on_stop) == (
        "j", "a", "server:7070", "s3cret", 7171, True)
    assert SidecarConfig.from_env(_env(tmp_path)).trainer_port == envvars.DEFAULT_TRAINER_PORT
    assert SidecarConfig.from_env(_env(tmp_path)).bulk_handoff
    assert not SidecarConfig.from_env(_env(tmp_path, **{envvars.BULK_HANDOFF: "0"})).bulk_handoff


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({envvars.SERVER_ADDRESS: "<unset>"}, f"{envvars.SERVER_ADDRESS} is not set"),
        ({envvars.SERVER_ADDRESS: "no-port"}, "is not host:port"),
        ({envvars.TOKEN_FILE: "<unset>"}, f"{envvars.TOKEN_FILE} is not set"),
        ({envvars.TOKEN_FILE: "/nonexistent/token"}, "cannot be read"),
        ({envvars.TRAINER_PORT: "abc"}, "is not a port number"),
        ({SIDECAR_EXIT_ON_STOP: "maybe"}, "must be 1 or 0"),
        ({envvars.BULK_HANDOFF: "off"}, "FEDKUBE_BULK_HANDOFF='off' must be 1 or 0"),
    ],
)
def test_config_errors_name_the_variable(tmp_path: Path, over: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        SidecarConfig.from_env(_env(tmp_path, **over))


def test_empty_token_file_is_a_config_error(tmp_path: Path) -> None:
    env = _env(tmp_path)
    Path(env[envvars.TOKEN_FILE]).write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        SidecarConfig.from_env(env)


class _Context:
    def __init__(self) -> None:
        self.active = True

    def is_active(self) -> bool:
        return self.active

    def abort(self, code: object, details: str) -> None:
        raise AssertionError(f"aborted: {code} {details}")


def test_watch_result_coalesces_progress_but_reports_the_end_at_once() -> None:
    import time

    from fedkube.sidecar import local
    from fedkube.sidecar.local import TrainerLinkServicer

    book = TaskBook()
    ann = _ann("t1", {"a": 10_000})
    book.announce(ann)
    link = TrainerLinkServicer(
        job="j", site="a", tasks=book, trainer=TrainerTracker(), on_hello=lambda _: None, on_state=lambda _: None,
        on_result=lambda _: None, on_metric=lambda _: None, closing=threading.Event(),
    )  # fmt: skip
    messages: list[tuple[float, int, bool]] = []

    def watch() -> None:
        for p in link.WatchResult(trainer_pb2.ResultStatusRequest(task_id="t1"), _Context()):  # type: ignore[arg-type]
            messages.append((time.monotonic(), p.bytes_done, p.finished))

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    start = time.monotonic()
    for end in range(1, 501):  # 500 frames in about half a second: one message each would be 500
        book.relayed(ann.refs[0], end * 20)
        time.sleep(0.001)  # the scenario itself: bytes relayed over time, not a wait for something
    book.received("t1", ok=True, reason="", message="")
    done_at = time.monotonic()
    t.join(5)
    assert not t.is_alive() and messages[-1][1:] == (10_000, True)
    assert messages[-1][0] - done_at < 0.1  # the end is not held back by the interval
    spread = done_at - start
    assert len(messages) <= spread / local.WATCH_MIN_INTERVAL_S + 3, (len(messages), spread)
    assert len(messages) >= 2  # progress still flows while the bytes move
    done = [m[1] for m in messages]
    assert done == sorted(done)
