"""An FLJob author gets pods from the operator, so the volumes they may add are typed and limited (issue 13).

Each case plays the attacker: a volume that would give the job's pods the node's files, an API credential or
storage nobody granted must be refused with the field path, the kind and the fix.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedkube.operator import builders
from fedkube.spec import SpecError, parse_job
from tests.unit.spec.manifests import full_manifest

ROOT = Path(__file__).resolve().parents[3]


def _with_volume(template: str, volume: dict[str, Any]) -> dict[str, Any]:
    data = full_manifest()
    data["spec"][template]["volumes"] = [volume]
    data["spec"][template]["volumeMounts"] = [{"name": volume["name"], "mountPath": "/host"}]
    return data


def _refusal(data: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as info:
        parse_job(data)
    return "\n".join(str(p) for p in info.value.problems)


ATTACKS = [
    ("trainer-hostpath-root", "trainer", {"name": "root", "hostPath": {"path": "/"}},
     "spec.trainer.volumes[0]", "'hostPath' is not allowed"),
    ("server-hostpath-containerd", "server", {"name": "rt", "hostPath": {"path": "/run/containerd"}},
     "spec.server.volumes[0]", "'hostPath' is not allowed"),
    ("projected-sa-token", "trainer",
     {"name": "tok", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}},
     "spec.trainer.volumes[0].projected.sources[0]", "'serviceAccountToken' is not allowed"),
    ("token-beside-a-configmap", "server",
     {"name": "tok", "projected": {"sources": [{"configMap": {"name": "c"}, "serviceAccountToken": {"path": "t"}}]}},
     "spec.server.volumes[0].projected.sources[0]", "'serviceAccountToken' is not allowed"),
    ("unknown-kind", "trainer", {"name": "n", "nfs": {"server": "10.0.0.1", "path": "/"}},
     "spec.trainer.volumes[0]", "'nfs' is not allowed"),
    ("csi-not-opted-in", "trainer", {"name": "c", "csi": {"driver": "secrets-store.csi.k8s.io"}},
     "spec.trainer.volumes[0]", "'csi' is not allowed"),
    ("two-sources", "trainer", {"name": "d", "emptyDir": {}, "secret": {"secretName": "s"}},
     "spec.trainer.volumes[0]", "exactly one source"),
    ("item-outside-the-volume", "trainer",
     {"name": "c", "configMap": {"name": "c", "items": [{"key": "k", "path": "../../etc/cron.d/x"}]}},
     "spec.trainer.volumes[0].configMap.items[0].path", "leaves the volume"),
    ("absolute-downward-file", "server",
     {"name": "d", "projected": {"sources": [{"downwardAPI": {"items": [
         {"path": "/etc/passwd", "fieldRef": {"fieldPath": "metadata.name"}}]}}]}},
     "spec.server.volumes[0].projected.sources[0].downwardAPI.items[0].path", "leaves the volume"),
    ("downward-file-without-a-field", "trainer",
     {"name": "d", "projected": {"sources": [{"downwardAPI": {"items": [{"path": "x"}]}}]}},
     "spec.trainer.volumes[0].projected.sources[0].downwardAPI.items[0]", "exactly one of fieldRef"),
    ("hostpath-in-source-fields", "trainer", {"name": "d", "emptyDir": {"path": "/"}},
     "spec.trainer.volumes[0].emptyDir.path", "unknown field"),
]  # fmt: skip


@pytest.mark.parametrize(("template", "volume", "path", "words"), [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_a_volume_outside_the_allowed_kinds_is_refused(
    template: str, volume: dict[str, Any], path: str, words: str
) -> None:
    data = _with_volume(template, volume)
    with pytest.raises(SpecError) as info:
        parse_job(data)
    hit = [p for p in info.value.problems if p.path == path]
    assert hit, [str(p) for p in info.value.problems]
    assert any(words in p.message for p in hit), [str(p) for p in hit]
    assert all(p.fix for p in hit)


def test_a_refusal_says_why_and_names_the_allowed_kinds() -> None:
    text = _refusal(_with_volume("trainer", {"name": "root", "hostPath": {"path": "/"}}))
    assert "node's files" in text and "emptyDir" in text and "persistentVolumeClaim" in text


def test_fedkube_validate_refuses_a_hostpath_job(tmp_path: Path) -> None:
    manifest = tmp_path / "attack.yaml"
    manifest.write_text(yaml.safe_dump(_with_volume("trainer", {"name": "root", "hostPath": {"path": "/"}})))
    proc = subprocess.run(
        [sys.executable, "-m", "fedkube.cli", "validate", str(manifest)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "spec.trainer.volumes[0]" in out and "hostPath" in out


ALLOWED = [
    {"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimit": "512Mi"}},
    {"name": "cfg", "configMap": {"name": "c", "items": [{"key": "k", "path": "k.txt", "mode": 0o644}],
                                  "defaultMode": 0o440, "optional": True}},
    {"name": "creds", "secret": {"secretName": "s", "defaultMode": 0o400, "optional": False}},
    {"name": "models", "persistentVolumeClaim": {"claimName": "m", "readOnly": True}},
    {"name": "mix", "projected": {"defaultMode": 0o444, "sources": [
        {"configMap": {"name": "c"}},
        {"secret": {"name": "s", "items": [{"key": "a", "path": "a"}]}},
        {"downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
    ]}},
]  # fmt: skip


@pytest.mark.parametrize("volume", ALLOWED, ids=[v["name"] for v in ALLOWED])
def test_an_allowed_volume_reaches_the_pods_unchanged(volume: dict[str, Any]) -> None:
    job = parse_job(_with_volume("trainer", volume))
    pod = builders.build_client_pod(job, job.spec.clients[0].name)
    assert volume in pod["spec"]["volumes"]
    job = parse_job(_with_volume("server", volume))
    assert volume in builders.build_server_pod(job)["spec"]["volumes"]


def test_a_volume_field_of_the_wrong_type_is_refused() -> None:
    text = _refusal(_with_volume("trainer", {"name": "s", "secret": {"secretName": "s", "defaultMode": "0400"}}))
    assert "spec.trainer.volumes[0].secret.defaultMode" in text
