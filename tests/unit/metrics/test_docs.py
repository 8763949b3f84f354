"""docs/observability.md documents exactly the metrics the code exports, with their labels."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.metrics.observations import exercised

DOC = Path(__file__).resolve().parents[3] / "docs" / "observability.md"


def exported() -> dict[str, tuple[str, set[str]]]:
    """Documented name (counters with _total) -> (type, label names) for every fedkube_ family."""
    out: dict[str, tuple[str, set[str]]] = {}
    for registry in exercised().values():
        for fam in text_string_to_metric_families(generate_latest(registry).decode()):
            if not fam.name.startswith("fedkube_") or fam.name.endswith("_created"):
                continue
            name = fam.name + "_total" if fam.type == "counter" else fam.name
            labels = {k for s in fam.samples for k in s.labels} - {"le"}
            out[name] = (fam.type, labels)
    return out


def documented() -> dict[str, tuple[str, set[str]]]:
    rows = re.findall(r"^\| `(fedkube_\w+)` \| (\w+) \| ([\w, ]+) \|", DOC.read_text(), flags=re.M)
    return {name: (kind, {label.strip() for label in labels.split(",")}) for name, kind, labels in rows}


def test_every_exported_metric_is_documented_with_its_type_and_labels() -> None:
    code, doc = exported(), documented()
    assert set(code) == set(doc), f"only in code: {sorted(set(code) - set(doc))}; only in docs: " \
                                  f"{sorted(set(doc) - set(code))}"
    for name, (kind, labels) in code.items():
        assert doc[name] == (kind, labels), f"{name}: code says {kind} {sorted(labels)}, docs say {doc[name]}"


def test_every_metric_name_in_the_prose_exists() -> None:
    names = set(exported())
    sample_names = {s.name for r in exercised().values()
                    for f in text_string_to_metric_families(generate_latest(r).decode()) for s in f.samples}
    for mentioned in set(re.findall(r"\b(?:fedkube|process)_[a-z_]+\b", DOC.read_text())):
        assert mentioned in names or mentioned in sample_names, f"docs mention {mentioned}, which nothing exports"
