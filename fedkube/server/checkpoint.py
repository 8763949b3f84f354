"""Checkpoints: the model, the completed round and the strategy's state, written atomically.

Layout (no pickle anywhere)::

    <dir>/<job>/round-000003/manifest.json     format, job, round, strategy name+meta, metrics,
                                                the evaluation curve so far (optional, see below),
                                                and per tensor: group, name, dtype, shape, file,
                                                nbytes, checksum
    <dir>/<job>/round-000003/tensors/00000.bin raw C-order little-endian bytes of one tensor

Atomicity. ``save`` writes everything into ``<dir>/<job>/.tmp-round-…``,
fsyncs every file and the directory, then renames the directory into place
with ``os.replace`` and fsyncs the parent. A crash leaves either the previous
state or the complete new checkpoint, plus possibly a ``.tmp-*`` directory that
is never read and is removed by the next ``save``.

CPU. The server saves S bytes after every round on a background thread that
competes with the next round for the cores, so a save avoids touching the
bytes with the CPU (bench/checkpoint_cost.py, ``variants_per_gib_steady``):

* a tensor whose memory starts on a 4096-byte boundary (what
  ``fedkube.server.pool.ArrayPool.take`` hands the aggregator) is written with
  ``O_DIRECT`` from that memory: the device reads the array's pages, nothing is
  copied into the page cache and nothing must be dropped from it; only a
  sub-block tail goes through the page cache. Other tensors, and filesystems
  that refuse ``O_DIRECT`` (EINVAL; remembered per device, one DEBUG line),
  are written through the page cache and dropped from it after the fsync
  (``posix_fadvise(DONTNEED)``; the files are read only on a restart), so no
  S bytes of cache are left per round for the kernel to reclaim later;
* checksums the caller already has (the server's publish of the same arrays
  for the next round hashes them anyway) are written as given instead of
  hashing S again; see ``save``'s ``checksums``.

Verification. ``load_latest`` tries checkpoints newest first; a missing or
unparsable manifest, a missing or short file, or a checksum mismatch (xxh3_64,
the transfer layer's algorithm) makes it warn and fall back to the previous
one. bfloat16 round-trips bit-exactly: bytes are written and read back as they
are, typed by ml_dtypes.

Resuming (``resume_point``, what a restarted server calls). When a job has
checkpoints but not one of them loads, training from round 1 would silently
throw away the job's progress, and the next save would prune the rejected
ones. So the server refuses to start instead (``NoUsableCheckpoint``, a
configuration error naming each checkpoint and why it was rejected) and
deletes nothing; only ``spec.server.checkpoint.onUnusable: StartFresh`` starts
from round 1, after moving each rejected checkpoint aside to
``<dir>/<job>/unusable-round-…`` (never read, pruned or deleted by fedkube).

Evaluation curve. ``evaluation`` holds the newest ``ROUND_HISTORY`` points of
``spec.evaluation`` known when the round's checkpoint was submitted, so a
resumed job's ``status.evaluation`` goes on from them. The evaluation after
the checkpoint's own round runs after the submit and is not in it; a resumed
server runs it before its first round (``evaluation.owed_on_resume``), or before it ends the job when the
checkpoint is the last round's (``resumed_end``). The key is optional within format version 1: a
checkpoint written before it existed loads with an empty curve, and a curve
that does not parse is dropped with a warning rather than costing the job its
model (it is status only).

Retention: the newest ``keep`` checkpoints stay (default 3); older ones are
deleted after a new one is in place, never before. Checkpoints of rounds after
the one just saved are deleted too: the server resumed from an older one, so
they were unusable, and they must not outrank the new one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import TypeAdapter, ValidationError

from fedkube.errors import ConfigError, FedkubeError
from fedkube.server.model import Model, dtype_name, numpy_dtype
from fedkube.server.strategy_api import StrategyState
from fedkube.status import ROUND_HISTORY, EvaluationPoint
from fedkube.transfer.refs import as_bytes, checksum_of, parse_checksum

log = logging.getLogger(__name__)

FORMAT = "fedkube-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_KEEP = 3
_ROUND_DIR = re.compile(r"^round-(\d{6,})$")
_JOB_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class CheckpointError(FedkubeError):
    """A checkpoint could not be written, or one that was asked for explicitly is unusable."""


START_FRESH = "StartFresh"
"""``spec.server.checkpoint.onUnusable`` value that trains from round 1 when no checkpoint can be resumed from."""


@dataclass(frozen=True)
class Rejected:
    """A checkpoint that could not be resumed from, and why."""

    round: int
    path: Path
    why: str


class NoUsableCheckpoint(CheckpointError, ConfigError):
    """A job has checkpoints and none of them can be resumed from; ``rejected`` says which and why."""

    def __init__(self, job: str, job_dir: Path, rejected: list[Rejected]) -> None:
        listed = "; ".join(f"{r.path.name}: {r.why}" for r in rejected)
        super().__init__(
            f"job {job}: none of the {len(rejected)} checkpoint(s) under {job_dir} can be resumed from ({listed}); "
            "they were left as they are. Fix: restore them (or find what damaged them) and start the server "
            f"again, or set spec.server.checkpoint.onUnusable: {START_FRESH} to train from round 1 "
            "(the unusable checkpoints are then moved aside, not deleted)"
        )
        self.rejected = rejected


@dataclass
class Checkpoint:
    """A loaded checkpoint: the state after ``round`` completed rounds."""

    job: str
    round: int
    model: Model
    strategy_state: StrategyState
    metrics: dict[str, float] = field(default_factory=dict)
    evaluation: list[EvaluationPoint] = field(default_factory=list)
    """The evaluation curve up to the round before ``round`` (newest ROUND_HISTORY points), oldest first."""
    created: float = 0.0
    """Unix time of the save."""
    path: Path | None = None


def _job_dir(directory: Path, job: str) -> Path:
    if not _JOB_NAME.match(job):
        raise CheckpointError(
            f"job name {job!r} cannot name a checkpoint directory; use a Kubernetes object name "
            "(lowercase letters, digits, '-' and '.')"
        )
    return directory / job


def round_dir_name(round: int) -> str:
    """The directory name of round ``round``'s checkpoint inside its job's directory."""
    return f"round-{round:06d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_DROP_CACHE = getattr(os, "POSIX_FADV_DONTNEED", None)
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
DIRECT_ALIGN = 4096
"""O_DIRECT needs the buffer address, the file offset and the length aligned to the device's logical
block; 4096 covers every block size Linux filesystems use in practice."""
_no_direct_devices: set[int] = set()  # filesystems that refused O_DIRECT once: not asked again


def _address(data: memoryview) -> int:
    return int(np.frombuffer(data, np.uint8).ctypes.data) if data.nbytes else 0


def _write_all(fd: int, data: memoryview) -> None:
    done = 0
    while done < data.nbytes:
        done += os.write(fd, data[done:])


def _write_direct(fd: int, data: memoryview) -> int:
    """Write the block-aligned prefix of ``data`` with O_DIRECT set on ``fd``; returns the bytes written.

    Stops early (returning an aligned count) when the filesystem refuses with EINVAL.
    """
    prefix = data.nbytes - data.nbytes % DIRECT_ALIGN
    done = 0
    while done < prefix:
        try:
            n = os.write(fd, data[done:prefix])
        except OSError as exc:
            if exc.errno != errno.EINVAL or done % DIRECT_ALIGN:
                raise
            return done
        done += n
        if n == 0 or done % DIRECT_ALIGN:
            break  # a short, unaligned write: the rest goes through the page cache
    return done


def _write_tensor(path: Path, array: np.ndarray, device: int) -> int:
    data = as_bytes(array)  # zero-copy for contiguous little-endian arrays
    direct = (
        _O_DIRECT != 0
        and device not in _no_direct_devices
        and data.nbytes >= DIRECT_ALIGN
        and _address(data) % DIRECT_ALIGN == 0
    )
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    fd = -1
    if direct:
        try:
            fd = os.open(path, flags | _O_DIRECT, 0o644)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # tmpfs (e.g. /dev/shm) has no O_DIRECT; such a filesystem keeps refusing.
            _no_direct_devices.add(device)
            log.debug("checkpoint: %s refuses O_DIRECT (%s); writing through the page cache", path.parent, exc)
            direct = False
    if fd < 0:
        fd = os.open(path, flags, 0o644)
    try:
        written = 0
        if direct:
            # The device reads the array's own pages: no copy into the page cache and nothing to
            # drop afterwards (bench/checkpoint_cost.py: the copy was ~0.25 CPU-s per GiB saved).
            written = _write_direct(fd, data)
            if written == 0:
                _no_direct_devices.add(device)
                log.debug("checkpoint: %s refuses O_DIRECT writes; writing through the page cache", path.parent)
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
        if written < data.nbytes:
            _write_all(fd, data[written:])  # the sub-block tail, or all of it when O_DIRECT did not apply
        os.fsync(fd)
        if written < data.nbytes and _DROP_CACHE is not None:
            # The bytes are on disk now and are read again only after a restart. Left in the page
            # cache, every round's S bytes must later be reclaimed under memory pressure, which
            # bench/checkpoint_cost.py measured at ~1 s of system CPU per GiB saved (0.4 s with this).
            os.posix_fadvise(fd, written, 0, _DROP_CACHE)
    finally:
        os.close(fd)
    return data.nbytes


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    return {str(k): float(v) for k, v in metrics.items() if math.isfinite(float(v))}


def save(
    directory: str | os.PathLike[str],
    job: str,
    round: int,
    model: Mapping[str, np.ndarray],
    strategy_state: StrategyState,
    *,
    metrics: Mapping[str, float] | None = None,
    keep: int = DEFAULT_KEEP,
    checksums: Mapping[str, str] | None = None,
    evaluation: Sequence[EvaluationPoint] = (),
) -> Path:
    """Atomically write the checkpoint of ``round`` completed rounds; returns its directory.

    Re-saving a round that already has a checkpoint replaces it (a server
    that restarted mid-round redoes that round). Raises CheckpointError on
    bad input or I/O failure; nothing partial is ever visible under a round
    directory's name.

    ``checksums`` maps model tensor names (the manifest's group ``model``;
    strategy tensors are always hashed here) to the xxh3 checksum of exactly
    the bytes of that array, as the transfer service's refs carry them when it
    published the same arrays; those tensors are not hashed again. It is read
    only after every tensor file is written, so a caller may fill it in while
    the write runs; a tensor it lacks then is hashed here. A wrong checksum is
    written as given and makes :func:`load` reject the checkpoint.

    ``evaluation`` is the job's evaluation curve so far; its newest ROUND_HISTORY points are kept.
    """
    if round < 0:
        raise CheckpointError(f"round must be >= 0, got {round}")
    if keep < 1:
        raise CheckpointError(f"keep must be >= 1, got {keep}")
    if not model:
        raise CheckpointError(f"job {job}: refusing to checkpoint an empty model at round {round}")
    job_dir = _job_dir(Path(directory), job)
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(job_dir)
        tmp = job_dir / f".tmp-{round_dir_name(round)}-{uuid.uuid4().hex[:8]}"
        (tmp / "tensors").mkdir(parents=True)
        device = os.stat(tmp / "tensors").st_dev
        entries: list[dict[str, Any]] = []
        arrays: list[np.ndarray] = []
        groups = (("model", model), ("strategy", strategy_state.tensors))
        for group, tensors in groups:
            for name, array in tensors.items():
                if not isinstance(array, np.ndarray):
                    raise CheckpointError(
                        f"job {job}: {group} tensor {name!r} is a {type(array).__name__}, not a numpy array"
                    )
                file = f"tensors/{len(entries):05d}.bin"
                nbytes = _write_tensor(tmp / file, array, device)
                entries.append(
                    {
                        "group": group,
                        "name": name,
                        "dtype": dtype_name(array.dtype),
                        "shape": list(array.shape),
                        "file": file,
                        "nbytes": nbytes,
                    }
                )
                arrays.append(array)
        given = 0
        for entry, array in zip(entries, arrays, strict=True):
            known = checksums.get(entry["name"]) if checksums is not None and entry["group"] == "model" else None
            if isinstance(known, str) and parse_checksum(known) is not None:
                entry["checksum"] = known
                given += 1
            else:
                entry["checksum"] = checksum_of(as_bytes(array))
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "job": job,
            "round": round,
            "created": time.time(),
            "strategy": {"name": strategy_state.name, "meta": strategy_state.meta},
            "metrics": _finite(metrics or {}),
            "evaluation": [p.to_dict() for p in list(evaluation)[-ROUND_HISTORY:]],
            "tensors": entries,
        }
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp / "tensors")
        _fsync_dir(tmp)
        final = job_dir / round_dir_name(round)
        old: Path | None = None
        if final.exists():
            # os.replace cannot overwrite a non-empty directory: move the old one aside first.
            old = job_dir / f".tmp-old-{round_dir_name(round)}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(job_dir)
    except (OSError, TypeError, ValueError) as exc:
        raise CheckpointError(f"job {job}: writing the checkpoint of round {round} to {job_dir} failed: {exc}") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _prune(job_dir, keep, round)
    log.info("job %s: checkpoint of round %d written to %s (%d tensors, %d checksums given)", job, round, final,
             len(entries), given)
    return final


def _remove_stale_temps(job_dir: Path) -> None:
    # One server writes a job's checkpoints, so any temp dir here is a leftover of a crash.
    for p in job_dir.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _round_dirs(job_dir: Path) -> list[tuple[int, Path]]:
    found = []
    if job_dir.is_dir():
        for p in job_dir.iterdir():
            m = _ROUND_DIR.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def _prune(job_dir: Path, keep: int, current: int) -> None:
    dirs = _round_dirs(job_dir)
    # The server resumes from the newest valid checkpoint, so any newer one is unusable (or from a
    # history it no longer follows); left in place it would outrank, and with a small keep evict,
    # the checkpoint just written.
    for r, path in dirs:
        if r > current:
            log.warning("removing checkpoint of round %d at %s: newer than the round just saved (%d)", r, path, current)
            shutil.rmtree(path, ignore_errors=True)
    for _round, path in [d for d in dirs if d[0] <= current][keep:]:
        shutil.rmtree(path, ignore_errors=True)


def _req(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        shown = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise CheckpointError(f"manifest key {key!r} is missing or not a {shown}")
    return value


def load(path: str | os.PathLike[str]) -> Checkpoint:
    """Load and verify one checkpoint directory; CheckpointError says what is wrong with it."""
    ck_dir = Path(path)
    try:
        with open(ck_dir / MANIFEST, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{ck_dir} has no {MANIFEST}; it is not a complete fedkube checkpoint") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{ck_dir / MANIFEST} cannot be read: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{ck_dir / MANIFEST} is not a fedkube checkpoint manifest")
    if doc.get("version") != VERSION:
        raise CheckpointError(
            f"{ck_dir} has checkpoint format version {doc.get('version')!r}; this fedkube reads {VERSION}"
        )
    strategy = _req(doc, "strategy", dict)
    model: Model = {}
    state_tensors: dict[str, np.ndarray] = {}
    for i, entry in enumerate(_req(doc, "tensors", list)):
        if not isinstance(entry, dict):
            raise CheckpointError(f"{ck_dir}: tensors[{i}] is not an object")
        name = _req(entry, "name", str)
        file = _req(entry, "file", str)
        if "/" in file.replace("tensors/", "", 1) or ".." in file:
            raise CheckpointError(f"{ck_dir}: tensor {name!r} names a file outside the checkpoint: {file!r}")
        dtype = numpy_dtype(_req(entry, "dtype", str))
        shape = tuple(int(d) for d in _req(entry, "shape", list))
        nbytes = _req(entry, "nbytes", int)
        if math.prod(shape) * dtype.itemsize != nbytes:
            raise CheckpointError(f"{ck_dir}: tensor {name!r} has shape {shape} but nbytes {nbytes}")
        try:
            size = os.path.getsize(ck_dir / file)
        except OSError:
            raise CheckpointError(f"{ck_dir}: the file of tensor {name!r} ({file}) is missing") from None
        if size != nbytes:
            raise CheckpointError(f"{ck_dir}: tensor {name!r} file {file} has {size} bytes, expected {nbytes}")
        array = np.fromfile(ck_dir / file, dtype=dtype, count=math.prod(shape)).reshape(shape)
        expected = _req(entry, "checksum", str)
        parsed = parse_checksum(expected)
        if parsed is None:
            raise CheckpointError(f"{ck_dir}: tensor {name!r} has a malformed checksum {expected!r}")
        if checksum_of(as_bytes(array), parsed[0]) != expected:
            raise CheckpointError(f"{ck_dir}: tensor {name!r} fails its checksum; the file is corrupt")
        group = _req(entry, "group", str)
        if group == "model":
            model[name] = array
        elif group == "strategy":
            state_tensors[name] = array
        else:
            raise CheckpointError(f"{ck_dir}: tensor {name!r} has unknown group {group!r}")
    if not model:
        raise CheckpointError(f"{ck_dir}: the checkpoint holds no model tensors")
    metrics = doc.get("metrics") or {}
    return Checkpoint(
        job=_req(doc, "job", str),
        round=_req(doc, "round", int),
        model=model,
        strategy_state=StrategyState(_req(strategy, "name", str), dict(strategy.get("meta") or {}), state_tensors),
        metrics={str(k): float(v) for k, v in metrics.items()},
        evaluation=_evaluation(ck_dir, doc.get("evaluation")),
        created=float(doc.get("created", 0.0)),
        path=ck_dir,
    )


_CURVE: TypeAdapter[list[EvaluationPoint]] | None = None


def _evaluation(ck_dir: Path, value: Any) -> list[EvaluationPoint]:
    """The manifest's evaluation curve; absent (a checkpoint older than the key) or unreadable: none."""
    global _CURVE
    if value is None:
        return []
    if _CURVE is None:
        _CURVE = TypeAdapter(list[EvaluationPoint])
    try:
        # From JSON, as the status documents are read: strict types (no "2" for 2) without requiring instances.
        points = _CURVE.validate_json(json.dumps(value), strict=True)
    except ValidationError as exc:
        log.warning("%s: the evaluation curve in its manifest is unreadable and is left out (the model and the "
                    "strategy state load as usual; the status's evaluation curve starts afresh): %s", ck_dir,
                    exc.errors(include_url=False)[:1])
        return []
    return points[-ROUND_HISTORY:]


def load_latest(directory: str | os.PathLike[str], job: str | None) -> Checkpoint | None:
    """The newest valid checkpoint of ``job`` under ``directory``, or None when there is none.

    A corrupt or partial checkpoint is skipped with a warning and the previous
    one is used. With ``job=None`` (a model path given by the user),
    ``directory`` may be a checkpoint itself, a job's directory of round
    checkpoints, or a checkpoint root holding exactly one job.
    """
    root = Path(directory)
    if job is not None:
        job_dir = _job_dir(root, job)
    elif (root / MANIFEST).exists():
        return load(root)
    elif _round_dirs(root):
        job_dir = root
    else:
        jobs = [p for p in root.iterdir() if p.is_dir() and _round_dirs(p)] if root.is_dir() else []
        if len(jobs) != 1:
            return None
        job_dir = jobs[0]
    return _newest_valid(job_dir, job)[0]


def is_checkpoint_dir(directory: str | os.PathLike[str]) -> bool:
    """Whether ``load_latest(directory, None)`` applies: a checkpoint, a job's rounds or a root of job directories.

    An empty directory counts, so that it is reported as holding no usable checkpoint; a directory of
    safetensors files does not (fedkube.formats reads it).
    """
    root = Path(directory)
    if (root / MANIFEST).exists() or _round_dirs(root):
        return True
    entries = list(root.iterdir()) if root.is_dir() else []
    return not entries or any(p.is_dir() and _round_dirs(p) for p in entries)


def _newest_valid(job_dir: Path, job: str | None) -> tuple[Checkpoint | None, list[Rejected]]:
    """The newest checkpoint under ``job_dir`` that loads, and those newer than it that did not (warned)."""
    rejected: list[Rejected] = []
    for round, path in _round_dirs(job_dir):
        try:
            ck = load(path)
        except (CheckpointError, FedkubeError, OSError, ValueError) as exc:
            log.warning("job %s: skipping checkpoint of round %d at %s: %s", job or job_dir.name, round, path, exc)
            why = str(exc)
            rejected.append(Rejected(round, path, why.removeprefix(f"{path}: ")))
            continue
        if job is not None and ck.job != job:
            log.warning("job %s: skipping checkpoint at %s: it belongs to job %r", job, path, ck.job)
            rejected.append(Rejected(round, path, f"it belongs to job {ck.job!r}"))
            continue
        return ck, rejected
    return None, rejected


def resume_point(directory: str | os.PathLike[str], job: str, *, start_fresh: bool = False) -> Checkpoint | None:
    """The checkpoint a (re)started server of ``job`` resumes from; None when the job has none yet.

    The newest valid one, as :func:`load_latest`. When there are checkpoints
    and none is valid: raises :class:`NoUsableCheckpoint` and leaves them as
    they are, or with ``start_fresh`` moves each aside (see the module doc)
    and returns None.
    """
    job_dir = _job_dir(Path(directory), job)
    found, rejected = _newest_valid(job_dir, job)
    if found is not None or not rejected:
        return found
    if not start_fresh:
        raise NoUsableCheckpoint(job, job_dir, rejected)
    for r in rejected:
        aside = job_dir / f"unusable-{r.path.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(r.path, aside)
        except OSError as exc:
            raise CheckpointError(
                f"job {job}: cannot move the unusable checkpoint {r.path} aside to {aside}: {exc}; "
                "fix: make the checkpoint directory writable, or move it away by hand"
            ) from exc
        log.warning("job %s: %s=%s: starting from round 1; the unusable checkpoint of round %d (%s) is kept at %s",
                    job, "spec.server.checkpoint.onUnusable", START_FRESH, r.round, r.why, aside)
    return None


def check_resume_rounds(job: str, completed: int, rounds: int) -> None:
    """Refuse to resume from a checkpoint that has more rounds behind it than the job asks for.

    Reporting success would hand over a model trained ``completed`` rounds as
    the result of a ``rounds``-round job (issue 11 §2.7); usually the spec's
    rounds were lowered or the checkpoint belongs to an earlier run.
    """
    if completed > rounds:
        raise ConfigError(
            f"job {job}: the checkpoint holds {completed} completed round(s) but spec.rounds is {rounds}, so "
            f"there is nothing to run and the model is not a {rounds}-round model. Fix: set spec.rounds to "
            f"{completed} or more to resume from it, or start with an empty checkpoint directory "
            f"(`fedkube run`: a new run directory) to train {rounds} round(s) from the start"
        )


def completion_message(rounds: int, first_round: int) -> str:
    """How a successful job's end reads when this server started at ``first_round``.

    A server that started after the last round's checkpoint trained nothing but still ended the job
    (fedkube.server.resumed_end): the message says so, so no one looks for its rounds in its log.
    """
    if first_round > rounds:
        return (f"completed {rounds} round(s); this server resumed after the checkpoint of round "
                f"{first_round - 1}, the last, and finished the job from it")
    return f"completed {rounds} round(s)"
