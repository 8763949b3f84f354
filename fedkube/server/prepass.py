"""Update-norm clipping without refolding: the norm pre-pass (``spec.strategy.clipNorm``).

Clipping counts a site's update ``Δ = result - global`` as ``Δ·min(1, C/‖Δ‖)``,
and ``‖Δ‖`` is known only once the result's last tensor arrived. Streaming
FedAvg folds each tensor into the shared running mean as it arrives, so a
result found to need clipping had already been folded unclipped: it was taken
out by emptying every tensor it touched and refolding all their contributors
(``WeightedMean.rescale``), each pulled again over the network. With half the
sites clipped that is O(N²) tensor pulls per round: 192 refolds at N = 8 and
896 at N = 16 in ``bench/strategies.py`` (S = 32 MiB in 4 tensors), 3.4x and
7.0x FedAvg's aggregation time on a quiet box, before any network.

With clipping on, the server pulls each result that may need clipping
(see "Hints" below) twice: first through a
:class:`~fedkube.server.accumulator.FiniteCheck` that sums ``‖x - g‖²`` and
checks NaN/Inf per received piece while it is hot, keeping nothing (the
download's receive buffers, reused by the fold; like the fold, it pulls
``FETCH_WIDTH`` tensors at once once the site answered on the bulk port,
fedkube.server.pulls); then, with the clip factor known, the
ordinary streaming download, whose folds apply ``g + s·(x - g)`` block by block
(``TensorAccumulator.fold(clip=...)``, or in place in a claimed accumulator
before it is published). The second pull is checked against the same
checksums as the first, so the bytes folded are the bytes measured. Every
result is pulled exactly twice and folded exactly once, whatever N and
however many are clipped; nothing of another site is touched. Integer tensors
have no norm and are not pre-pulled.

The second pull is not trusted to be the first one's bytes: the checksum
(xxh3_64) guards against corruption, not against a site that crafts a
collision to serve a small update for the norm and a large one for the fold.
So the folding pull measures each tensor's ``‖x - g‖²`` again (in the same
per-piece check that looks for NaN/Inf, while the piece is hot) and
:func:`drift` refuses a tensor, before it is folded, whose value exceeds the
pre-pass's by more than :data:`DRIFT` (the two sums may group the elements
differently, so they can differ in their last bits). The folded update's norm
is then at most ``C·√(1 + DRIFT)`` whatever the site serves; a refused result
is excluded exactly like any result that fails midway (its folded tensors
are rebuilt from the others). The norm is computed twice; the clip once.

Why this and not the alternatives (numbers in bench/README.md, "Clipping
without refolding"):

* *Stage each result until its norm is known* (in memory): + S per download
  in flight, i.e. ≥ 3xS with two concurrent downloads, over the 2.5xS bound;
  on disk: a write and a read of S per result on the checkpoint volume, which
  on a PVC is slower than the network pull it saves.
* *A second accumulator to correct a clipped site with its own tensors only*:
  correcting means subtracting the unclipped contribution, which is not exact
  in floating point, and a poisoned 1e6-scale update subtracted back wipes out
  the other sites' precision: the very case clipping exists for. A second
  accumulator is also + S.
* *The client reports its norm, the server verifies it while folding*: one
  pull per result, the only option that can meet issue 17's "within 10 % of
  FedAvg" on a network-bound round. The verification is :func:`drift` as
  it is (a claim checked per tensor before the fold; a liar is refused and
  excluded exactly, paying the rebuild itself). But the client must know
  ``‖x - g‖``, and a trainer that trains in place (the SDK's
  ``receive(into=...)``, bench/round.py's default) no longer holds ``g``
  when its result is ready: keeping a copy is + S on the trainer, over its
  1.2xS budget, and the sidecar never holds the model. It also needs a
  protocol field and SDK support. Not done here; bench/README.md has what it
  would save.

Costs: the network and the client serve S twice per result with clipping on
(the server's CPU pays the fetch, the checksum and the norm twice, and the
clip only for clipped results); memory stays streaming's (global +
accumulator + the receive buffers of a download's pulls in flight, bounded
by its ``BufferBudget``). Exact exclusion is easier
than before: a NaN/Inf found by the pre-pass refuses the result before
anything of it was folded.

Hints (:class:`ClipHints`): two pulls per result is about 2x a network-bound
round even when nobody is clipped. So the strategy remembers each site's last
update norm, and a result is pre-passed only when its site is new, was clipped
or surprised before, or its last norm was within :data:`HEADROOM` of the
current bound; any other result is folded in one pull, optimistically
unclipped, its norm measured while folding. One that turns out to need
clipping anyway takes the refolding path above for that result (exact, costs
refolds of its tensors' contributors), and its site is pre-passed for the
rest of the job. A result with a NaN/Inf found while folding (not by a
pre-pass) is excluded like any failed download: exactly, by a rebuild.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from fedkube.server.accumulator import BLOCK, AggregationError, FiniteCheck, InvalidResultError, non_finite
from fedkube.server.influence import Influence
from fedkube.server.pulls import Progress, SitePulls
from fedkube.transfer.parallel import BufferBudget
from fedkube.transfer.refs import TensorRef

if TYPE_CHECKING:
    from fedkube.server.aggregate import WeightedMean

log = logging.getLogger(__name__)


DRIFT = 1e-5
"""Relative slack between a tensor's ``‖x - g‖²`` in the pre-pass and in the folding pull (summation order)."""


HEADROOM = 0.5
"""A site whose last update norm exceeded ``HEADROOM x clipNorm`` is pre-passed; below it, folded in one pull.

The bound compared with is this round's (already adapted): its own motion,
at most ``exp(±clipLearningRate)`` per round, is in the comparison, not in
this margin. The margin is the growth of one site's update norm between two
of its rounds that an optimistic fold tolerates before it surprises: 2x. An
update norm shrinks as training converges; a doubling from one round to the
next is a learning-rate or data change, rare enough that its cost (one
round's refolds, then the site is pre-passed for good) is paid seldom.
"""


def drift(client: str, name: str, measured: float | None, again: float) -> None:
    """Refuse tensor ``name`` of a pre-passed result when its update grew since the pre-pass measured it."""
    if measured is None or not again <= measured * (1 + DRIFT):
        raise InvalidResultError(client, (
            f"tensor {name!r} pulled for folding has ||x - global||^2 = {again:.9g}, the pre-pass measured "
            f"{'nothing' if measured is None else f'{measured:.9g}'} for the same checksum: the site served "
            "different bytes; the result is refused (a trainer must not change its arrays after send())"))


@runtime_checkable
class MeasuresFirst(Protocol):
    """A RoundAggregator that wants each result's update norm before the result's first tensor is added."""

    @property
    def measures_first(self) -> bool:
        """True when clipping is on (a norm is needed); False: pull once as usual."""
        ...

    def norm_check(self, client: str, name: str, dtype: str, shape: tuple[int, ...], *,
                   scratch: tuple[np.ndarray, np.ndarray] | None = None) -> FiniteCheck | None:  # fmt: skip
        """A check that sums ``‖x - g‖²`` of tensor ``name`` as it is received, or None: not part of the norm."""
        ...

    def prepasses(self, client: str, site: str) -> bool:
        """Whether attempt ``client`` of ``site``'s result is pulled through the norm checks before its first add."""
        ...

    def prescale(self, client: str, checks: Mapping[str, FiniteCheck]) -> float:
        """The client's result went through ``checks`` (tensor -> its check): record its norm, return the factor."""
        ...


HINTS_KEY = "clipHints"
"""The strategy state's meta entry that keeps the :class:`ClipHints` in the checkpoint."""


class ClipHints:
    """What the strategy remembers of each site across rounds, to pre-pass only results that may need clipping.

    Kept in the strategy's checkpoint state (:meth:`meta`, :meth:`load`), so a
    resumed server pulls each site's next result as an uninterrupted one would:
    once when its site was far below the bound. A checkpoint without them (an
    older one) or with unreadable ones resumes with none: every result of the
    first round is pre-passed, which costs one pull more per site and never a
    wrong aggregate, so it is a warning rather than a refusal. A site that surprised (clipped
    without a pre-pass) is pre-passed for the rest of the job, not for a few
    rounds: a decaying mark would let a site force the refolds, O(N) pulls,
    again each time it decayed, while the permanent mark costs an honest site
    that once spiked one pull of S per round, only its own.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, bool]] = {}  # site -> (last update norm, clipped then)
        self._surprised: set[str] = set()

    def wants_prepass(self, site: str, clip_norm: float) -> bool:
        """Whether ``site``'s next result needs its norm before its first fold (under bound ``clip_norm``)."""
        with self._lock:
            last = self._last.get(site)
            return site in self._surprised or last is None or last[1] or last[0] > HEADROOM * clip_norm

    def record(self, site: str, norm: float, clipped: bool, surprised: bool) -> None:
        """``site``'s result of this round had update norm ``norm``; ``surprised``: clipped though folded whole."""
        with self._lock:
            self._last[site] = (norm, clipped)
            if surprised:
                self._surprised.add(site)
                log.warning("site %s: its update (norm %.6g) needed clipping though its last norm was far "
                            "below the bound; it was refolded; its results are pre-passed from now on",
                            site, norm)  # fmt: skip

    def begin_round(self) -> RoundHints:
        return RoundHints(self)

    def meta(self) -> dict[str, Any]:
        """The hints as the strategy state's JSON entry; nothing before any norm was measured (clipping off)."""
        with self._lock:
            if not self._last and not self._surprised:
                return {}
            last = {site: [norm, clipped] for site, (norm, clipped) in sorted(self._last.items())}
            return {HINTS_KEY: {"last": last, "surprised": sorted(self._surprised)}}

    def load(self, meta: Mapping[str, Any]) -> None:
        """Take the hints of a checkpoint's strategy state (see the class doc for a missing or unreadable entry)."""
        saved = meta.get(HINTS_KEY)
        if saved is None:
            return
        try:
            last = {str(site): (float(norm), clipped) for site, (norm, clipped) in saved["last"].items()}
            surprised = {str(site) for site in saved["surprised"]}
            if not all(math.isfinite(n) and n >= 0 and isinstance(c, bool) for n, c in last.values()):
                raise ValueError("a norm is not a finite number >= 0 or a clipped mark is not a boolean")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.warning("the checkpoint's clip hints %r are unreadable (%s); every result of the next round is "
                        "pre-passed", saved, exc)  # fmt: skip
            return
        with self._lock:
            self._last, self._surprised = last, surprised


class RoundHints:
    """One round's decisions: made once per site, so a re-sent attempt folds as its kept tensors were folded."""

    def __init__(self, hints: ClipHints) -> None:
        self._hints = hints
        self._lock = threading.Lock()
        self._decided: dict[str, bool] = {}  # site -> pre-passed this round
        self._sites: dict[str, str] = {}  # attempt key -> site

    def prepasses(self, client: str, site: str, clip_norm: float) -> bool:
        with self._lock:
            self._sites[client] = site
            if site not in self._decided:
                self._decided[site] = self._hints.wants_prepass(site, clip_norm)
            return self._decided[site]

    def settle(self, client: str, norm: float, clipped: bool, prescaled: bool) -> None:
        """Remember the norm of attempt ``client``'s finished result (bounded at its scale)."""
        with self._lock:
            site = self._sites.get(client)
        if site is not None:
            self._hints.record(site, norm, clipped, surprised=clipped and not prescaled)


class NormPrepass:
    """The :class:`MeasuresFirst` side of the mean aggregators (``fedkube.server.strategies``)."""

    engine: WeightedMean
    influence: Influence
    hints: RoundHints | None = None  # None: every result is pre-passed

    @property
    def measures_first(self) -> bool:
        return self.influence.measures_norm and self.engine.reference is not None

    def prepasses(self, client: str, site: str) -> bool:
        if not self.measures_first or self.influence.clip_norm is None:
            return False
        return self.hints is None or self.hints.prepasses(client, site, self.influence.clip_norm)

    def settle(self, client: str, norm: float | None, scale: float) -> None:
        """Let the hints know ``client``'s update norm, once its result is bounded."""
        if self.hints is not None and norm is not None:
            self.hints.settle(client, norm, scale < 1.0, self.engine.prescaled(client))

    def norm_check(self, client: str, name: str, dtype: str, shape: tuple[int, ...], *,
                   scratch: tuple[np.ndarray, np.ndarray] | None = None) -> FiniteCheck | None:  # fmt: skip
        spec, reference = self.engine.spec.get(name), self.engine.reference
        if spec is None or dtype != spec.dtype or tuple(shape) != spec.shape:
            raise InvalidResultError(client, f"tensor {name!r} ({dtype}, shape {tuple(shape)}) does not fit the "
                                     "global model")
        if not spec.is_float or reference is None:
            return None
        mask, widened = scratch if scratch is not None else (None, None)
        return FiniteCheck(spec.np_dtype, spec.nbytes, mask=mask, widened=widened, reference=reference[name])

    def prescale(self, client: str, checks: Mapping[str, FiniteCheck]) -> float:
        sq: dict[str, float] = {}
        for spec in self.engine.spec:
            if not spec.is_float:
                continue
            check = checks.get(spec.name)
            if check is None or not check.complete:
                raise InvalidResultError(client, f"tensor {spec.name!r} was not measured whole before folding; "
                                         "the result is incomplete")
            if not check.finite:
                raise non_finite(client, spec.name)
            sq[spec.name] = check.sq
        if not all(math.isfinite(v) for v in sq.values()):
            raise AggregationError(f"client {client!r}: the update norm is not finite")  # a bug: finite values
        return self.engine.prescale(client, sq, self.influence.scale)


def norm_prepass(
    pulls: SitePulls, key: str, refs: list[TensorRef], sink: MeasuresFirst, budget: BufferBudget,
    progress: Callable[[int], None] | None = None,
) -> float:  # fmt: skip
    """Pull ``refs`` once through ``sink``'s norm checks, keeping nothing; returns the result's clip factor.

    ``pulls`` runs the pulls, several at once once the site answered on the bulk port. ``budget`` bounds their
    receive buffers together and keeps them for the folding pass; ``progress(bytes)`` sees the bytes pulled so
    far (the status shows the pre-pass moving, then the fold's pull). Each tensor's ``‖x - g‖²`` is its own
    check's and :meth:`MeasuresFirst.prescale` sums them in the model's order, so the norm, and the clip, are the
    same bits however the pulls interleave.
    """
    scratch = _Scratch()
    counted = Progress(progress)
    checks: dict[str, FiniteCheck] = {}
    lock = threading.Lock()

    def measure(ref: TensorRef) -> None:
        pair = scratch.take()
        try:
            check = sink.norm_check(key, ref.name, ref.dtype, tuple(ref.shape), scratch=pair)
            if check is None:
                return
            out = budget.take(ref.nbytes)
            try:
                pulls.fetcher().fetch_into(ref, out, inspect=check, progress=counted.of(ref.name))
            finally:
                budget.put(out)
            with lock:
                checks[ref.name] = check
        finally:
            scratch.put(pair)

    pulls.run(refs, measure)
    return sink.prescale(key, checks)


class _Scratch:
    """The norm checks' ``BLOCK``-sized scratch, one pair per pull in flight, reused across a pass's tensors."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[tuple[np.ndarray, np.ndarray]] = []

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            if self._free:
                return self._free.pop()
        return np.empty(BLOCK, np.bool_), np.empty(BLOCK, np.float32)

    def put(self, pair: tuple[np.ndarray, np.ndarray]) -> None:
        with self._lock:
            self._free.append(pair)
