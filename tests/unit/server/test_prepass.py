"""Clipping without refolding: a norm pre-pass sets each result's clip before its first fold.

The quadratic behaviour it replaced (a clip found after a result's last tensor
emptied every tensor it touched and pulled every contributor again) is caught
without timing: the round is driven through the server's real download code
with a counting fetcher, and each result must be pulled exactly twice per
float tensor (once for the norm, once to fold), once per integer tensor, and
folded exactly once per tensor, whatever N and however many sites are clipped.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from fedkube.server import accumulator as accumulator_module
from fedkube.server import checkpoint
from fedkube.server.aggregate import AggregationError, InvalidResultError
from fedkube.server.downloads import Download, Downloader
from fedkube.server.influence import Influence
from fedkube.server.prepass import HINTS_KEY, MeasuresFirst, norm_prepass
from fedkube.server.pulls import SitePulls
from fedkube.server.strategies import FedAvg, FedYogi
from fedkube.server.strategy_api import BoundsInfluence, RoundAggregator, StrategyState
from fedkube.transfer.fetch import FetchSettings
from fedkube.transfer.parallel import BufferBudget
from fedkube.transfer.refs import TensorRef, as_bytes

Model = dict[str, np.ndarray]
F32 = np.dtype(np.float32)


def _global(dtype: np.dtype = F32) -> Model:
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((40, 30)).astype(np.float32).astype(dtype),
        "b": rng.standard_normal(30).astype(np.float32).astype(dtype),
        "steps": np.array([7], np.int64),
    }


def _result(g: Model, seed: int, factor: float) -> Model:
    """An update of norm about ``factor`` (the noise has norm ~1 over the 1230 floats)."""
    rng = np.random.default_rng(seed)
    out = {k: (v.astype(np.float32) + factor / 35 * rng.standard_normal(v.shape)).astype(v.dtype)
           for k, v in g.items() if k != "steps"}  # fmt: skip
    out["steps"] = g["steps"] + seed
    return out


def _refs(site: str, x: Model) -> list[TensorRef]:
    return [TensorRef.for_array(a, source=site, transaction_id="t", ref_id=f"{site}.{n}", name=n,
                                checksum="xxh3_64:" + "0" * 16) for n, a in x.items()]  # fmt: skip


class _CountingFetcher:
    """Serves a site's result to the download code, counting each tensor's pulls.

    Pulls alternate between 1000- and 777-byte pieces (pieces end inside elements and the two passes sum the
    norm in different groups); ``second`` serves other bytes from the second pull of a tensor on.
    """

    def __init__(self, results: dict[str, Model], pulls: Counter[tuple[str, str]],
                 second: dict[str, Model] | None = None) -> None:  # fmt: skip
        self.results, self.pulls, self.second = results, pulls, second or {}
        self.bulk_bytes = self.pushed_bytes = 0
        self.answered_after_s: float | None = None

    def fetch_into(self, ref: TensorRef, out: Any = None, *, progress: Any = None, inspect: Any = None) -> memoryview:
        self.pulls[(ref.source, ref.name)] += 1
        again = self.pulls[(ref.source, ref.name)] > 1 and ref.source in self.second
        raw = as_bytes((self.second if again else self.results)[ref.source][ref.name])
        out = bytearray(len(raw)) if out is None else out
        buf = (out.reshape(-1).view(np.uint8).data if isinstance(out, np.ndarray) else memoryview(out)).cast("B")
        piece = 1000 if self.pulls[(ref.source, ref.name)] % 2 else 777
        for start in range(0, len(raw), piece):
            stop = min(start + piece, len(raw))
            buf[start:stop] = raw[start:stop]
            if inspect is not None:
                inspect.update(buf, start, stop)
        return buf


def _pull_round(agg: RoundAggregator, results: dict[str, Model], pulls: Counter[tuple[str, str]]) -> dict[str, Any]:
    """Each site's result through ``Downloader._download`` (the server's code), then bound and commit."""
    downloader = Downloader("job1", None, lambda *a: None, FetchSettings(), clock=lambda: 0.0)  # type: ignore[arg-type]
    fetcher = _CountingFetcher(results, pulls)
    downloader._fetcher = lambda dl: (fetcher, fetcher)  # type: ignore[method-assign, assignment, return-value]
    ended: list[tuple[bool, str, str]] = []
    bounded = {}
    for site, x in results.items():
        dl = Download(site=site, task_id="t", key=site, num_examples=2, metrics={})
        downloader._download(1, dl, _refs(site, x), agg, dict.fromkeys(results, 1),
                             lambda d, ok, reason, message: ended.append((ok, reason, message)))  # fmt: skip
        assert ended[-1] == (True, "", ""), ended[-1]
        assert isinstance(agg, BoundsInfluence)
        b = agg.bound(site)
        assert b.rebuild == {}, f"{site}'s clip asked to pull {b.rebuild} again"
        bounded[site] = b.influence
        agg.commit(site)
    assert agg.owed() == {}
    return bounded


@pytest.mark.parametrize("n", [2, 8, 16])
def test_each_result_is_pulled_twice_and_folded_once_whatever_n_and_however_many_are_clipped(
    n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = _global()
    results = {f"site-{i:02d}": _result(g, i + 1, 0.5 if i % 2 else 1e4) for i in range(n)}  # half are clipped
    folds: Counter[tuple[str, str]] = Counter()
    fold = accumulator_module.TensorAccumulator.fold

    def counting_fold(self: Any, client: str, *args: Any, **kw: Any) -> None:
        folds[(client, self.spec.name)] += 1
        fold(self, client, *args, **kw)

    monkeypatch.setattr(accumulator_module.TensorAccumulator, "fold", counting_fold)
    influence = Influence(clip_norm=1.0)
    pulls: Counter[tuple[str, str]] = Counter()
    agg = FedAvg(influence=influence).begin_round(g)
    bounded = _pull_round(agg, results, pulls)
    assert sum(b.clipped for b in bounded.values()) == (n + 1) // 2
    for site in results:
        assert {t: pulls[(site, t)] for t in g} == {"w": 2, "b": 2, "steps": 1}, site
    # A claimed tensor becomes the accumulator without a fold call: at most one fold per (site, tensor).
    assert max(folds.values()) == 1 and len(folds) >= n * len(g) - len(g)
    got = agg.finish()
    want = _float64_reference(g, results, influence)
    for k, v in want.items():
        np.testing.assert_allclose(got[k].astype(np.float64), v, atol=1e-5, rtol=0, err_msg=k)
    assert got["steps"].item() == g["steps"].item() + 1  # the integer tensor is the (tied) first site's


def _float64_reference(g: Model, results: dict[str, Model], influence: Influence) -> Model:
    out: Model = {}
    norms = {s: math.sqrt(sum(float(np.sum((x[k].astype(np.float64) - g[k].astype(np.float64)) ** 2))
                              for k in g if k != "steps")) for s, x in results.items()}  # fmt: skip
    for k, gv in g.items():
        if k != "steps":
            g64 = gv.astype(np.float64)
            out[k] = sum(g64 + influence.scale(norms[s]) * (x[k].astype(np.float64) - g64)
                         for s, x in results.items()) / len(results)  # fmt: skip
    return out


def _running_mean(g: Model, results: dict[str, Model], influence: Influence) -> Model:
    """The engine's arithmetic in numpy, in float32: clip (g + s·(x - g)), then W += w; acc += (w/W)·(x' - acc)."""
    out: Model = {}
    norms = {s: math.sqrt(sum(float(np.sum((x[k].astype(np.float32) - g[k].astype(np.float32)) ** 2,
                                           dtype=np.float64)) for k in g if k != "steps"))
             for s, x in results.items()}  # fmt: skip
    for k, gv in g.items():
        if k == "steps":
            continue
        acc, total = None, 0.0
        for s, x in results.items():
            c = x[k].astype(np.float32)
            scale = influence.scale(norms[s])
            if scale < 1.0:
                c -= gv
                c *= scale
                c += gv
            total += 2.0
            if acc is None:
                acc = c
            else:
                acc += (2.0 / total) * (c - acc)
        assert acc is not None
        out[k] = acc.astype(gv.dtype)
    return out


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16),
                                   np.dtype(np.float64)], ids=str)  # fmt: skip
def test_the_prepassed_fold_equals_the_staged_one_to_the_bit_and_the_reference(dtype: np.dtype) -> None:
    """Streaming with the pre-pass, the staged mode (clip applied at commit) and numpy's running mean agree."""
    g = _global(dtype)
    results = {"site-a": _result(g, 1, 0.3), "site-b": _result(g, 2, 50.0), "site-c": _result(g, 3, 0.9),
               "site-d": _result(g, 4, 7.0)}  # fmt: skip
    influence = Influence(clip_norm=1.0)
    streamed = FedAvg(influence=influence).begin_round(g)
    bounded = _pull_round(streamed, results, Counter())
    assert [s for s, b in bounded.items() if b.clipped] == ["site-b", "site-d"]
    staged = FedAvg(staged=True, influence=influence).begin_round(g)
    _pull_round(staged, results, Counter())
    got, again = streamed.finish(), staged.finish()
    for k in g:
        assert got[k].dtype == g[k].dtype and got[k].tobytes() == again[k].tobytes(), k
    if dtype == np.float32:  # the update norm is summed blockwise, so allow its last bits in the factor
        want = _running_mean(g, results, influence)
        for k, v in want.items():
            np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
    tol = 1e-9 if dtype == np.float64 else 1e-5 if dtype == np.float32 else 3e-2
    for k, v in _float64_reference(g, results, influence).items():
        np.testing.assert_allclose(got[k].astype(np.float64), v, atol=tol, rtol=0, err_msg=k)


def _prepass(fetcher: _CountingFetcher, key: str, refs: list[TensorRef], agg: Any) -> float:
    """The pre-pass one tensor at a time through ``fetcher`` (its own byte counts), room for one tensor."""
    pulls = SitePulls(lambda: (fetcher, fetcher), 1, name="test")  # type: ignore[arg-type,return-value]
    return norm_prepass(pulls, key, refs, agg, BufferBudget(0, max(r.nbytes for r in refs)))


def test_a_nan_found_by_the_prepass_refuses_the_result_before_anything_of_it_is_folded() -> None:
    g = _global()
    bad = _result(g, 1, 0.5)
    bad["b"][3] = np.nan
    agg = FedAvg(influence=Influence(clip_norm=1.0)).begin_round(g)
    assert isinstance(agg, MeasuresFirst) and agg.measures_first
    pulls: Counter[tuple[str, str]] = Counter()
    with pytest.raises(InvalidResultError, match="NaN or Inf"):
        _prepass(_CountingFetcher({"bad": bad}, pulls), "bad", _refs("bad", bad), agg)
    assert pulls == Counter({("bad", "w"): 1, ("bad", "b"): 1})  # the integer tensor is not part of the norm
    out = agg.discard("bad")
    assert out.rebuild == {} and out.exact  # nothing of it was folded, so nothing is rebuilt
    ok = _result(g, 2, 0.5)
    _pull_round(agg, {"ok": ok}, Counter())
    np.testing.assert_array_equal(agg.finish()["w"], ok["w"])


def test_without_clipping_nothing_is_prepassed_and_prescale_is_refused_after_a_fold() -> None:
    g = _global()
    plain = FedAvg().begin_round(g)
    assert isinstance(plain, MeasuresFirst) and not plain.measures_first
    pulls: Counter[tuple[str, str]] = Counter()
    _pull_round(plain, {"a": _result(g, 1, 0.5)}, pulls)
    assert set(pulls.values()) == {1}
    agg = FedAvg(influence=Influence(clip_norm=1.0)).begin_round(g)
    assert isinstance(agg, MeasuresFirst)
    x = _result(g, 1, 0.5)
    agg.add("a", "w", x["w"], 1.0)
    with pytest.raises(AggregationError, match="before the client's first add"):
        _prepass(_CountingFetcher({"a": x}, Counter()), "a", _refs("a", x), agg)
    with pytest.raises(InvalidResultError, match="not measured whole"):
        agg.prescale("b", {})


def test_a_retry_keeps_the_clipped_tensors_of_the_cut_attempt_and_a_rebuild_folds_them_clipped_again() -> None:
    """A re-sent attempt keeps what the first one folded (clipped); a third site's exclusion refolds it clipped."""
    g = _global()
    honest, poison, failing = _result(g, 1, 0.5), _result(g, 2, 1e4), _result(g, 3, 0.5)
    influence = Influence(clip_norm=1.0)
    agg = FedAvg(influence=influence).begin_round(g)
    assert isinstance(agg, MeasuresFirst) and isinstance(agg, BoundsInfluence)
    _pull_round(agg, {"a": honest}, Counter())
    assert _prepass(_CountingFetcher({"c": poison}, Counter()), "c#1", _refs("c", poison), agg) < 1e-3
    agg.add("c#1", "w", poison["w"], 2.0)  # then the sidecar restarted
    agg.discard("c#1", rebuild=False)
    assert agg.reopen("c#1", "c#2") == ("w",)
    _prepass(_CountingFetcher({"x": failing}, Counter()), "x", _refs("x", failing), agg)
    agg.add("x", "w", failing["w"], 2.0)
    out = agg.discard("x")  # its download failed: "w" is emptied and rebuilt from a and the kept c#2
    assert out.rebuild == {"w": ("a", "c#2")}
    stop = threading.Event()
    assert agg.refold("a", "w", honest["w"], abort=stop) and agg.refold("c#2", "w", poison["w"], abort=stop)
    assert _prepass(_CountingFetcher({"c": poison}, Counter()), "c#2", _refs("c", poison), agg) < 1e-3
    for name in ("b", "steps"):
        assert agg.add("c#2", name, poison[name], 2.0)
    assert agg.bound("c#2").rebuild == {}
    agg.commit("c#2")
    got = agg.finish()
    for k, v in _float64_reference(g, {"a": honest, "c": poison}, influence).items():
        np.testing.assert_allclose(got[k].astype(np.float64), v, atol=1e-5, rtol=0, err_msg=k)


def test_a_site_serving_a_larger_update_to_the_folding_pull_is_refused_before_it_is_folded() -> None:
    """The second pull is measured again: a site cannot pass the norm with one update and fold another."""
    g = _global()
    honest, small, large = _result(g, 1, 0.5), _result(g, 2, 0.5), _result(g, 2, 1e4)
    agg = FedAvg(influence=Influence(clip_norm=1.0)).begin_round(g)
    assert isinstance(agg, BoundsInfluence)
    _pull_round(agg, {"a": honest}, Counter())
    downloader = Downloader("job1", None, lambda *a: None, FetchSettings(), clock=lambda: 0.0)  # type: ignore[arg-type]
    fetcher = _CountingFetcher({"liar": small}, Counter(), second={"liar": large})
    downloader._fetcher = lambda dl: (fetcher, fetcher)  # type: ignore[method-assign, assignment, return-value]
    ended: list[tuple[bool, str, str]] = []
    dl = Download(site="liar", task_id="t", key="liar", num_examples=2, metrics={})
    downloader._download(1, dl, _refs("liar", small), agg, {"a": 1, "liar": 1},
                         lambda d, ok, reason, message: ended.append((ok, reason, message)))  # fmt: skip
    ok, reason, message = ended[0]
    assert not ok and reason == "InvalidResult" and "served different bytes" in message, ended
    engine = agg.engine  # type: ignore[attr-defined]
    assert "liar" not in engine.contributors("w") and "liar" not in engine.contributors("b")
    out = agg.discard("liar")
    for name, keys in out.rebuild.items():  # only what it had folded before the lie (here: nothing)
        for key in keys:
            assert agg.refold(key, name, honest[name])
    got = agg.finish()
    np.testing.assert_array_equal(got["w"], honest["w"])


def test_the_adaptive_bound_moves_with_the_norms_the_prepass_measured() -> None:
    g = _global()
    strategy = FedAvg(influence=Influence(clip_norm=1.0, clip_quantile=0.5))
    results = {f"s{i}": _result(g, i + 1, 1e3) for i in range(3)}  # every one above the bound: b = 0
    agg = strategy.begin_round(g)
    bounded = _pull_round(agg, results, Counter())
    assert all(b.clipped and b.norm is not None and b.norm > 100 for b in bounded.values())
    agg.finish()
    assert strategy.influence.clip_norm == pytest.approx(math.exp(0.2 * 0.5))


def _hinted_round(agg: RoundAggregator, results: dict[str, Model], pulls: Counter[tuple[str, str]]) -> dict[str, Any]:
    """As ``_pull_round``, but a clip found after an unclipped fold is rebuilt the server's way (pulled again)."""
    downloader = Downloader("job1", None, lambda *a: None, FetchSettings(), clock=lambda: 0.0)  # type: ignore[arg-type]
    fetcher = _CountingFetcher(results, pulls)
    downloader._fetcher = lambda dl: (fetcher, fetcher)  # type: ignore[method-assign, assignment, return-value]
    ended: list[tuple[bool, str, str]] = []

    def done(d: Download, ok: bool, reason: str, message: str) -> None:
        ended.append((ok, reason, message))

    bounded = {}
    for site, x in results.items():
        dl = Download(site=site, task_id="t", key=f"{site}#1", num_examples=2, metrics={})
        downloader._download(1, dl, _refs(site, x), agg, dict.fromkeys(results, 1), done)
        assert ended[-1] == (True, "", ""), ended[-1]
        assert isinstance(agg, BoundsInfluence)
        b = agg.bound(dl.key)
        for name, keys in b.rebuild.items():
            for key in keys:
                source = key.split("#")[0]
                again = Download(site=source, task_id="t", key=key, num_examples=2, metrics={})
                downloader._rebuild(1, again, [r for r in _refs(source, results[source]) if r.name == name], agg, done)
                assert ended[-1] == (True, "", ""), ended[-1]
        bounded[site] = b.influence
        agg.commit(dl.key)
    assert agg.owed() == {}
    return bounded


def _float_pulls(pulls: Counter[tuple[str, str]], site: str) -> int:
    """Pulls of ``site``'s float tensors per tensor (both are always pulled alike)."""
    assert pulls[(site, "w")] == pulls[(site, "b")], pulls
    return pulls[(site, "w")]


def test_a_site_far_below_the_bound_is_folded_in_one_pull_once_its_norm_is_known() -> None:
    """Steady state: 1 pull per result; a site near the bound or clipped last round is pre-passed (2 pulls)."""
    g = _global()
    influence = Influence(clip_norm=1.0)
    strategy = FedAvg(influence=influence)
    factors = {"far": 0.2, "near": 0.8, "clipped": 5.0}  # norms ~0.2, ~0.8 (above HEADROOM x 1.0), ~5
    for round_, expect in enumerate(({"far": 2, "near": 2, "clipped": 2}, {"far": 1, "near": 2, "clipped": 2},
                                     {"far": 1, "near": 2, "clipped": 1}), start=1):  # fmt: skip
        results = {s: _result(g, round_ * 10 + i, f) for i, (s, f) in enumerate(factors.items())}
        pulls: Counter[tuple[str, str]] = Counter()
        agg = strategy.begin_round(g)
        bounded = _hinted_round(agg, results, pulls)
        assert {s: _float_pulls(pulls, s) for s in results} == expect, round_
        assert all(pulls[(s, "steps")] == 1 for s in results)
        assert [s for s, b in bounded.items() if b.clipped] == (["clipped"] if round_ == 1 else [])
        # Bit for bit what the pre-pass gives (a fresh strategy pre-passes every result of its first round).
        reference = FedAvg(influence=influence).begin_round(g)
        _pull_round(reference, results, Counter())
        got, want = agg.finish(), reference.finish()
        for k in g:
            assert got[k].tobytes() == want[k].tobytes(), (round_, k)
        factors["clipped"] = 0.2  # it comes back small: still pre-passed once, having been clipped


def test_a_site_that_surprises_is_refolded_once_then_pre_passed_and_the_aggregate_is_the_pre_passed_one() -> None:
    g = _global()
    influence = Influence(clip_norm=1.0)
    strategy = FedAvg(influence=influence)
    factors = {"a": 0.2, "b": 0.2, "c": 0.2}
    history = []
    for round_ in range(1, 5):
        if round_ >= 2:
            factors["b"] = 50.0 if round_ == 2 else 0.2  # one big update, then small ones again
        results = {s: _result(g, round_ * 10 + i, f) for i, (s, f) in enumerate(factors.items())}
        pulls: Counter[tuple[str, str]] = Counter()
        agg = strategy.begin_round(g)
        bounded = _hinted_round(agg, results, pulls)
        history.append({s: _float_pulls(pulls, s) for s in results})
        assert bounded["b"].clipped == (round_ == 2)
        reference = FedAvg(influence=influence).begin_round(g)
        _pull_round(reference, results, Counter())
        got, want = agg.finish(), reference.finish()
        for k in g:
            assert got[k].tobytes() == want[k].tobytes(), (round_, k)
    # Round 2: b folded whole in one pull, then clipped: w and b emptied and every contributor pulled again
    # (a and c once more, b clipped); from round 3 on b is pre-passed, a and c stay at one pull.
    assert history == [{"a": 2, "b": 2, "c": 2}, {"a": 2, "b": 2, "c": 1}, {"a": 1, "b": 2, "c": 1},
                       {"a": 1, "b": 2, "c": 1}]  # fmt: skip


@pytest.mark.parametrize("cls", [FedAvg, FedYogi])
def test_the_hints_survive_a_checkpoint_so_a_resumed_server_pulls_as_an_uninterrupted_one(
    cls: type[FedAvg] | type[FedYogi], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Round 3 after a resume from round 2's checkpoint: far pulled once, near and the one that surprised twice."""
    g = _global()
    influence = Influence(clip_norm=1.0)
    plain = cls(influence=influence)
    factors = {"far": 0.2, "near": 0.8, "surprised": 0.2}
    for round_ in (1, 2):
        factors["surprised"] = 50.0 if round_ == 2 else 0.2  # folded whole in round 2, then clipped: surprised
        results = {s: _result(g, round_ * 10 + i, f) for i, (s, f) in enumerate(factors.items())}
        agg = plain.begin_round(g)
        _hinted_round(agg, results, Counter())
        agg.finish()
    checkpoint.save(tmp_path, "job1", 2, g, plain.state())
    saved = checkpoint.load_latest(tmp_path, "job1")
    assert saved is not None and HINTS_KEY in saved.strategy_state.meta
    resumed = cls(influence=influence)
    resumed.load_state(saved.strategy_state)
    factors["surprised"] = 0.2
    results = {s: _result(g, 30 + i, f) for i, (s, f) in enumerate(factors.items())}
    models = {}
    for name, strategy in (("uninterrupted", plain), ("resumed", resumed)):
        pulls: Counter[tuple[str, str]] = Counter()
        agg = strategy.begin_round(g)
        _hinted_round(agg, results, pulls)
        assert {s: _float_pulls(pulls, s) for s in results} == {"far": 1, "near": 2, "surprised": 2}, name
        models[name] = agg.finish()
    for k in g:
        assert models["resumed"][k].tobytes() == models["uninterrupted"][k].tobytes(), k

    # A checkpoint without hints (written before they were kept) or with unreadable ones still loads: every
    # result of the next round is pre-passed, as on a fresh start.
    older = dict(saved.strategy_state.meta)
    del older[HINTS_KEY]
    broken = {**older, HINTS_KEY: {"last": {"far": ["x", False]}, "surprised": []}}
    for meta in (older, broken):
        fresh = cls(influence=influence)
        fresh.load_state(StrategyState(saved.strategy_state.name, meta, dict(saved.strategy_state.tensors)))
        pulls = Counter()
        _hinted_round(fresh.begin_round(g), results, pulls)
        assert {s: _float_pulls(pulls, s) for s in results} == {"far": 2, "near": 2, "surprised": 2}
    assert "clip hints" in caplog.text and "unreadable" in caplog.text
