"""spec.output: the server pod mounts the output claim (created with a size, or an existing claimName)."""

from __future__ import annotations

from typing import Any

import pytest

from fedkube import envvars
from fedkube.operator import builders
from fedkube.spec import SpecError, parse_job
from fedkube.spec.output import OUTPUT_DIR, OUTPUT_VOLUME
from tests.unit.operator.kvalidate import K8S_VERSIONS, assert_valid
from tests.unit.spec.manifests import example_manifest


def _objects(output: dict[str, Any] | None) -> dict[tuple[str, str], dict[str, Any]]:
    manifest = example_manifest()
    manifest["spec"].setdefault("security", {})["tls"] = "disabled"  # TLS material is not what this tests
    if output is not None:
        manifest["spec"]["output"] = output
    job = parse_job(manifest)
    objs = builders.build_all(job, tokens={c.name: "t" for c in job.spec.clients}, tls=None)
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def _server(objs: dict[tuple[str, str], dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = next(o for (kind, name), o in objs.items() if kind == "Pod" and name.endswith("-server"))
    return pod, pod["spec"]["containers"][0]


@pytest.mark.parametrize(
    ("output", "claim", "created"),
    [
        ({"size": "2Gi", "storageClassName": "fast", "everyRound": True}, "mnist-output", True),
        ({"claimName": "models"}, "models", False),
    ],
)
def test_the_output_claim_is_mounted_in_the_server(output: dict[str, Any], claim: str, created: bool) -> None:
    objs = _objects(output)
    pod, container = _server(objs)
    job = pod["metadata"]["labels"]["fedkube.dev/job"]
    claim = claim.replace("mnist", job)
    assert {"name": envvars.OUTPUT_DIR, "value": OUTPUT_DIR} in container["env"]
    assert {"name": OUTPUT_VOLUME, "mountPath": OUTPUT_DIR} in container["volumeMounts"]
    assert {"name": OUTPUT_VOLUME, "persistentVolumeClaim": {"claimName": claim}} in pod["spec"]["volumes"]
    pvc = objs.get(("PersistentVolumeClaim", claim))
    assert (pvc is not None) == created
    if pvc is not None:
        assert pvc["spec"]["resources"]["requests"]["storage"] == "2Gi" and pvc["spec"]["storageClassName"] == "fast"
        assert_valid(pvc, K8S_VERSIONS[-1])
    assert_valid(pod, K8S_VERSIONS[-1])


def test_without_output_nothing_is_mounted() -> None:
    pod, container = _server(_objects(None))
    assert envvars.OUTPUT_DIR not in {e["name"] for e in container["env"]}
    assert OUTPUT_VOLUME not in {v["name"] for v in pod["spec"]["volumes"]}


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ({}, "exactly one of claimName"),
        ({"size": "1Gi", "claimName": "x"}, "exactly one of claimName"),
        ({"claimName": "x", "storageClassName": "fast"}, "applies only to a created claim"),
        ({"size": "0"}, "must be positive"),
    ],
)
def test_bad_output_specs_are_refused(output: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        _objects(output)
