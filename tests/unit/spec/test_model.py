"""The FLJob spec model: defaults, round-trips, and every bad input named by its field path."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedkube.errors import ConfigError
from fedkube.spec import (
    FLJob,
    Problem,
    SpecError,
    lint,
    load_job,
    parse_job,
    validate_job,
)
from fedkube.spec.model import DEFAULT_MAX_BYTES, ModelSource, model_max_bytes
from fedkube.spec.problems import format_path
from fedkube.spec.quantity import parse_quantity
from fedkube.spec.status import FLJobStatus
from tests.unit.spec.manifests import EXAMPLE, example_manifest, full_manifest


def test_example_loads_with_defaults() -> None:
    job = load_job(EXAMPLE)
    assert job.name == "quickstart-numpy" and job.namespace == "default"
    assert [c.name for c in job.spec.clients] == ["site-a", "site-b"]
    assert job.spec.rounds == 3 and job.spec.quorum == 2
    assert job.spec.trainer.command == ["python", "train.py"]
    # No image in the spec: the operator fills in its own default (chart jobDefaults.image, else DEFAULT_IMAGE).
    assert job.spec.server.image is None and job.spec.sidecar.image is None
    assert job.spec.server.command == ["fedkube", "server"]
    assert job.spec.strategy.name == "fedavg" and job.spec.strategy.server_lr is None
    assert job.spec.model.source == "firstClient"


@pytest.mark.parametrize("make", [example_manifest, full_manifest], ids=["example", "full"])
def test_manifest_round_trips(make: Callable[[], dict[str, Any]]) -> None:
    job = parse_job(make())
    manifest = job.to_manifest()
    again = parse_job(json.loads(json.dumps(manifest)))
    assert again == job
    assert again.to_manifest() == manifest
    assert parse_job(yaml.safe_load(yaml.safe_dump(manifest))) == job


def test_min_clients_defaults_to_all_clients() -> None:
    data = example_manifest()
    del data["spec"]["minClients"]
    job = parse_job(data)
    assert job.spec.min_clients is None and job.spec.quorum == 2


def test_fedadam_parameters_get_defaults() -> None:
    job = parse_job(full_manifest())
    s = job.spec.strategy
    assert (s.name, s.server_lr, s.beta1, s.beta2, s.tau) == ("fedadam", 0.05, 0.9, 0.99, 1e-3)


def test_quantities_are_normalized_to_strings() -> None:
    job = parse_job(full_manifest())
    assert job.spec.clients[1].resources.limits == {"nvidia.com/gpu": "2"}
    assert job.spec.server.resources.requests == {"cpu": "1", "memory": "2Gi"}


def test_status_written_by_the_api_server_is_accepted_and_not_re_emitted() -> None:
    data = example_manifest()
    data["status"] = {"phase": "Running"}
    data["metadata"].update(uid="abc", resourceVersion="7", creationTimestamp="2026-01-01T00:00:00Z")
    job = parse_job(data)
    assert job.metadata.uid == "abc"
    assert "status" not in job.to_manifest()


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        *head, last = path.split(".")
        node: Any = doc
        for key in head:
            node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
        if value is _DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return apply


_DELETE = object()

# (id, mutation of the full manifest, expected problem path, words the message or fix must contain)
BAD = [
    ("unknown-field", _set("spec.clients.0.gpus", 1), "spec.clients[0].gpus", "unknown field"),
    ("typo-rounds", _set("spec.round", 3), "spec.round", "rounds"),
    ("rounds-zero", _set("spec.rounds", 0), "spec.rounds", "greater than or equal to 1"),
    ("rounds-missing", _set("spec.rounds", _DELETE), "spec.rounds", "required"),
    ("no-clients", _set("spec.clients", []), "spec.clients", "at least 1"),
    ("duplicate-site", _set("spec.clients.2.name", "site-a"), "spec.clients[2].name", "listed twice"),
    ("bad-site-name", _set("spec.clients.0.name", "Site_A"), "spec.clients[0].name", "lower-case"),
    ("quorum-too-big", _set("spec.minClients", 4), "spec.minClients", "at most 3"),
    ("no-trainer-command", _set("spec.trainer.command", _DELETE), "spec.trainer.command", "required"),
    ("empty-trainer-command", _set("spec.trainer.command", []), "spec.trainer.command", "at least 1"),
    ("no-trainer-image", _set("spec.trainer.image", _DELETE), "spec.trainer.image", "required"),
    ("no-trainer", _set("spec.trainer", _DELETE), "spec.trainer", "required"),
    ("image-space", _set("spec.trainer.image", "repo/img :1"), "spec.trainer.image", "whitespace"),
    ("unknown-strategy", _set("spec.strategy.name", "fedprox"), "spec.strategy.name", "'krum' or 'scaffold'"),
    ("fedavg-with-lr", _set("spec.strategy", {"name": "fedavg", "serverLr": 0.1}), "spec.strategy.serverLr", "fedadam"),
    ("file-without-path", _set("spec.model.path", _DELETE), "spec.model.path", "no path"),
    ("path-without-file", _set("spec.model", {"source": "firstClient", "path": "/x"}), "spec.model.path", "ignores"),
    ("max-bytes-zero", _set("spec.model.maxBytes", 0), "spec.model.maxBytes", "greater than or equal to 1"),
    ("max-bytes-string", _set("spec.model.maxBytes", "1Gi"), "spec.model.maxBytes", "integer"),
    (
        "bad-quantity",
        _set("spec.trainer.resources.limits", {"nvidia.com/gpu": "half"}),
        "spec.trainer.resources.limits['nvidia.com/gpu']",
        "not a Kubernetes quantity",
    ),
    (
        "gpu-request-only",
        _set("spec.clients.1.resources", {"requests": {"nvidia.com/gpu": 1}}),
        "spec.clients[1].resources.requests['nvidia.com/gpu']",
        "limits",
    ),
    (
        "fractional-gpu",
        _set("spec.clients.1.resources", {"limits": {"nvidia.com/gpu": "0.5"}}),
        "spec.clients[1].resources.limits['nvidia.com/gpu']",
        "whole number",
    ),
    (
        "request-over-limit",
        _set("spec.server.resources.requests.memory", "8Gi"),
        "spec.server.resources.requests['memory']",
        "larger than its limit",
    ),
    (
        "reserved-env",
        _set("spec.trainer.env", [{"name": "FEDKUBE_SIDECAR_ADDRESS", "value": "x"}]),
        "spec.trainer.env[0].name",
        "set by fedkube",
    ),
    (
        "duplicate-env",
        _set("spec.clients.1.env", [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]),
        "spec.clients[1].env[1].name",
        "twice",
    ),
    (
        "value-and-valuefrom",
        _set("spec.trainer.env.0.valueFrom", {"fieldRef": {"fieldPath": "x"}}),
        "spec.trainer.env[0]",
        "both value and valueFrom",
    ),
    (
        "mount-undeclared",
        _set("spec.trainer.volumeMounts", [{"name": "nope", "mountPath": "/x"}]),
        "spec.trainer.volumeMounts[0].name",
        "not declared",
    ),
    (
        "mount-reserved-path",
        _set("spec.server.volumeMounts.0.mountPath", "/var/lib/fedkube/checkpoint/x"),
        "spec.server.volumeMounts[0].mountPath",
        "fedkube mounts",
    ),
    (
        "reserved-volume",
        _set("spec.trainer.volumes.0.name", "fedkube-work"),
        "spec.trainer.volumes[0].name",
        "reserved",
    ),
    (
        "sourceless-volume",
        _set("spec.trainer.volumes", [{"name": "data"}]),
        "spec.trainer.volumes[0]",
        "exactly one source",
    ),
    ("relative-workdir", _set("spec.trainer.workingDir", "app"), "spec.trainer.workingDir", "absolute"),
    (
        "exists-with-value",
        _set("spec.trainer.tolerations.0.operator", "Exists"),
        "spec.trainer.tolerations[0].value",
        "Exists takes no value",
    ),
    (
        "bad-effect",
        _set("spec.trainer.tolerations.0.effect", "Sometimes"),
        "spec.trainer.tolerations[0].effect",
        "NoSchedule",
    ),
    (
        "bad-node-selector",
        _set("spec.trainer.nodeSelector", {"pool": "has space"}),
        "spec.trainer.nodeSelector['pool']",
        "label value",
    ),
    (
        "idle-below-chunk",
        _set("spec.transfer.idleTimeoutSeconds", 10),
        "spec.transfer.idleTimeoutSeconds",
        "chunkTimeoutSeconds",
    ),
    ("round-below-idle", _set("spec.timeouts.roundSeconds", 30), "spec.timeouts.roundSeconds", "idleTimeoutSeconds"),
    (
        "negative-timeout",
        _set("spec.timeouts.heartbeatSeconds", -1),
        "spec.timeouts.heartbeatSeconds",
        "greater than or equal to 0.001",
    ),
    ("zero-round-timeout", _set("spec.timeouts.roundSeconds", 0), "spec.timeouts.roundSeconds", "0.001"),
    # Strings where the CRD's schema wants a number or a boolean are refused, as the API server would.
    ("rounds-string", _set("spec.rounds", "5"), "spec.rounds", "write 5 without quotes"),
    ("rounds-fraction", _set("spec.rounds", 2.5), "spec.rounds", "takes an integer"),
    ("timeout-string", _set("spec.timeouts.roundSeconds", "900"), "spec.timeouts.roundSeconds", "without quotes"),
    ("suspend-string", _set("spec.suspend", "false"), "spec.suspend", "true or false"),
    ("suspend-number", _set("spec.suspend", 0), "spec.suspend", "true or false"),
    (
        "read-only-string",
        _set("spec.server.volumeMounts.0.readOnly", "yes"),
        "spec.server.volumeMounts[0].readOnly",
        "true or false",
    ),
    ("arg-number", _set("spec.trainer.args.1", 0.1), "spec.trainer.args[1]", "takes a string"),
    ("chunk-too-small", _set("spec.transfer.chunkBytes", 10), "spec.transfer.chunkBytes", "4096"),
    ("chunk-too-big", _set("spec.transfer.chunkBytes", 32 << 20), "spec.transfer.chunkBytes", "16777216"),
    ("long-name", _set("metadata.name", "j" * 60), "metadata.name", "at most 56"),
    ("upper-name", _set("metadata.name", "MNIST"), "metadata.name", "lower-case"),
    ("no-name", _set("metadata.name", _DELETE), "metadata.name", "required"),
    ("bad-storage", _set("spec.server.checkpoint.storageSize", "0"), "spec.server.checkpoint.storageSize", "positive"),
]


@pytest.mark.parametrize(("mutate", "path", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_names_the_field_and_the_fix(mutate: Callable[[dict[str, Any]], None], path: str, words: str) -> None:
    data = full_manifest()
    assert lint(data)[1] == []  # the baseline is valid, so the problem below comes from the mutation
    mutate(data)
    with pytest.raises(SpecError) as info:
        parse_job(data)
    problems = info.value.problems
    hit = [p for p in problems if p.path == path]
    assert hit, f"no problem at {path}; got {[str(p) for p in problems]}"
    assert any(words.lower() in f"{p.message} {p.fix}".lower() for p in hit), [str(p) for p in hit]
    assert all(p.fix for p in problems)
    assert isinstance(info.value, ConfigError) and path in str(info.value)


def test_all_problems_are_reported_at_once() -> None:
    data = full_manifest()
    data["spec"]["clients"][2]["name"] = "site-a"
    data["spec"]["minClients"] = 9
    data["spec"]["transfer"]["idleTimeoutSeconds"] = 5
    _, errors, _ = lint(data)
    assert {p.path for p in errors} >= {"spec.clients[2].name", "spec.minClients", "spec.transfer.idleTimeoutSeconds"}


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        ({"pendingSeconds": 700, "deploySeconds": 600}, "spec.timeouts.pendingSeconds"),
        ({"heartbeatSeconds": 900, "roundSeconds": 900}, "spec.timeouts.heartbeatSeconds"),
        ({"roundSeconds": 70}, "spec.transfer.maxAttempts"),
    ],
    ids=["pending-unreachable", "heartbeat-vs-round", "retries-exceed-round"],
)
def test_suspicious_timeouts_are_warnings_not_errors(changes: dict[str, float], path: str) -> None:
    data = full_manifest()
    data["spec"]["timeouts"].update(changes)
    job, errors, warnings = lint(data)
    assert errors == [] and job is not None
    assert [w.path for w in warnings] == [path]
    assert validate_job(job) == warnings


def test_suspending_without_a_checkpoint_claim_warns() -> None:
    data = example_manifest()
    data["spec"]["suspend"] = True
    _, errors, warnings = lint(data)
    assert errors == [] and [w.path for w in warnings] == ["spec.server.checkpoint.enabled"]
    data["spec"]["server"] = {"checkpoint": {"enabled": True}}
    assert lint(data)[1:] == ([], [])


def test_defaults_give_no_warnings() -> None:
    assert lint(example_manifest())[1:] == ([], [])
    assert lint(full_manifest())[1:] == ([], [])


def test_validate_job_rejects_a_job_built_in_code() -> None:
    job = parse_job(example_manifest())
    job.spec.clients[1].name = "site-a"  # models are mutable; builders re-check before building
    with pytest.raises(SpecError, match=r"spec\.clients\[1\]\.name"):
        validate_job(job)


# --- loading -------------------------------------------------------------------------


def test_load_job_reads_text_json_and_files(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    assert load_job(text) == load_job(EXAMPLE) == load_job(str(EXAMPLE))
    as_json = json.dumps(example_manifest())
    assert load_job(as_json) == load_job(EXAMPLE)
    path = tmp_path / "job.json"
    path.write_text(as_json)
    assert load_job(path) == load_job(EXAMPLE)


@pytest.mark.parametrize(
    ("text", "path", "words"),
    [
        ("kind: Deployment\napiVersion: apps/v1\nmetadata: {name: x}\n", "kind", "is this an FLJob"),
        ("apiVersion: fedkube.dev/v1\nkind: FLJob\nmetadata: {name: x}\n", "apiVersion", "fedkube.dev/v1alpha1"),
        ("- a\n- b\n", "<document>", "expected a mapping"),
        ("spec: [unclosed\n", "<document>", "at line 2"),
        ("a: 1\n---\nb: 2\n", "<document>", "found 2"),
        ("\n", "<document>", "found 0"),
    ],
    ids=["wrong-kind", "wrong-api-version", "not-a-mapping", "bad-yaml", "two-docs", "empty"],
)
def test_load_job_rejects_what_is_not_an_fljob(text: str, path: str, words: str) -> None:
    with pytest.raises(SpecError) as info:
        load_job(text)
    assert info.value.problems[0].path == path
    assert words in str(info.value)


DUPLICATES = """\
apiVersion: fedkube.dev/v1alpha1
kind: FLJob
metadata: {name: dup}
spec:
  rounds: 3
  clients: [{name: site-a, name: site-b}]
  trainer: {image: example/trainer:1, command: [python, train.py]}
  rounds: 30
"""


def test_duplicate_keys_are_refused_naming_the_key_and_the_lines(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(DUPLICATES)
    for source in (DUPLICATES, path):
        with pytest.raises(SpecError) as info:
            load_job(source)
        found = {p.path: p.message for p in info.value.problems}
        assert found.keys() == {"spec.rounds", "spec.clients[0].name"}
        assert "'rounds' is given twice at lines 5 and 8" in found["spec.rounds"]
        assert "'name' is given twice on line 6" in found["spec.clients[0].name"]
    as_json = '{"apiVersion": "fedkube.dev/v1alpha1", "kind": "FLJob",\n "kind": "FLJob"}'
    with pytest.raises(SpecError, match="'kind' is given twice at lines 1 and 2"):
        load_job(as_json)


def test_merge_keys_may_override_without_being_duplicates() -> None:
    text = DUPLICATES.replace("  rounds: 3\n", "  <<: {rounds: 3}\n").replace("name: site-a, name: site-b", "name: a")
    assert load_job(text).spec.rounds == 30


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"does not exist.*fix: check the path"):
        load_job(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="cannot read"):
        load_job(tmp_path)


# --- small pieces --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("500m", Decimal("0.5")),
        ("2Gi", Decimal(2 << 30)),
        ("1e3", Decimal(1000)),
        ("4", Decimal(4)),
        ("1.5k", Decimal(1500)),
        (".5", Decimal("0.5")),
    ],
)
def test_parse_quantity(text: str, value: Decimal) -> None:
    assert parse_quantity(text) == value


def test_parse_quantity_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity("2 GB")


def test_format_path() -> None:
    assert format_path(("spec", "clients", 1, "name")) == "spec.clients[1].name"
    assert format_path(("spec", "limits", "nvidia.com/gpu")) == "spec.limits['nvidia.com/gpu']"
    assert str(Problem("a.b", "is wrong", "set it")) == "a.b: is wrong; fix: set it"
    path, message, fix = Problem("a.b", "is wrong", "set it")
    assert (path, message, fix) == ("a.b", "is wrong", "set it")


def test_status_model_reads_what_the_operator_writes() -> None:
    status = FLJobStatus.model_validate(
        {
            "phase": "Running",
            "round": 2,
            "rounds": 3,
            "roundDisplay": "2/3",
            "clients": {"site-a": {"state": "Training"}, "site-b": {"state": "Failed", "reason": "PendingTimeout"}},
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            "kopf": {"progress": {}},
        }
    )
    assert status.clients["site-b"].reason == "PendingTimeout"
    assert status.conditions[0].last_transition_time == "2026-01-01T00:00:00Z"


def test_fljob_type_is_exported() -> None:
    assert FLJob.model_fields["spec"].is_required()


def test_chunk_bounds_match_the_transfer_layer() -> None:
    from fedkube.spec.model import Transfer
    from fedkube.transfer import wire

    field = Transfer.model_fields["chunk_bytes"]
    assert field.default == wire.DEFAULT_CHUNK_BYTES
    assert {"le": wire.MAX_CHUNK_BYTES} in [{"le": getattr(m, "le", None)} for m in field.metadata]


@pytest.mark.parametrize(
    ("max_bytes", "memory_limit", "bound"),
    [
        (None, None, DEFAULT_MAX_BYTES),
        (None, "10Gi", 4 * 2**30),  # 40%: the ~2.2x S a round holds stays under the limit
        (None, "1000", 400),
        (None, "1m", 1),  # never 0: a bound of 0 would refuse every model
        (12345, "10Gi", 12345),  # the explicit value wins over the derivation
        (12345, None, 12345),
    ],
)
def test_model_max_bytes_default_is_derived_from_the_server_memory_limit(
    max_bytes: int | None, memory_limit: str | None, bound: int
) -> None:
    assert model_max_bytes(ModelSource(max_bytes=max_bytes), memory_limit) == bound
