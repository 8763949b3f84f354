"""The soak harness's fault accounting: a straggle order that could not show recovery is set aside, with why."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fedkube_bench_soak", ROOT / "bench" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _soak(soak: ModuleType, control: Path, rounds: int) -> object:
    args = argparse.Namespace(rounds=rounds)
    return soak.Soak(args=args, job=None, proxy=None, control=control, server_log=control / "none.log")


def test_stragglers_that_never_fired_or_hit_the_last_round_are_set_aside(soak: ModuleType, tmp_path: Path) -> None:
    s = _soak(soak, tmp_path, rounds=3)
    never = soak.Fault("straggler", 2, "site-2", 0.0)
    last = soak.Fault("straggler", 2, "site-1", 0.0)
    fine = soak.Fault("straggler", 1, "site-0", 0.0, survived=True)
    stall = soak.Fault("proxy_stall", 2, "site-2", 0.0)  # not a straggler: left for the verdict
    s.faults.extend([never, last, fine, stall])  # type: ignore[attr-defined]
    (tmp_path / "straggled-site-1-r3").write_text("21\n")
    (tmp_path / "straggled-site-0-r1").write_text("21\n")
    s.void_unshowable()  # type: ignore[attr-defined]
    assert s.faults == [fine, stall]  # type: ignore[attr-defined]
    voided = {v["target"]: v["why"] for v in s.voided}  # type: ignore[attr-defined]
    assert "never straggled" in voided["site-2"]
    assert "round 3, the last" in voided["site-1"]


def test_a_straggler_that_hit_a_middle_round_still_counts_against_the_run(soak: ModuleType, tmp_path: Path) -> None:
    s = _soak(soak, tmp_path, rounds=5)
    f = soak.Fault("straggler", 2, "site-2", 0.0)
    s.faults.append(f)  # type: ignore[attr-defined]
    (tmp_path / "straggled-site-2-r3").write_text("21\n")
    s.void_unshowable()  # type: ignore[attr-defined]
    assert s.faults == [f] and not s.voided  # type: ignore[attr-defined]
