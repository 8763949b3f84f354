"""A refused FLSite joins again once its admin changes the policy: the handler against an emulated Kubernetes API.

The reconcile pass runs as kopf would call it (its status merged back between looks); the client pod's sidecar is
played by the test, which writes the sidecar's termination message (its final view) into the pod's status.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from fedkube import envvars
from fedkube.operator.site import builders, handlers, rejoin
from fedkube.security import enroll, pki
from fedkube.security.enroll import JoinBundle
from fedkube.siteview import SiteView
from fedkube.spec.site import API_GROUP, API_VERSION_NAME, PLURAL
from fedkube.terms import TermsPolicy
from tests.support.kubeapi import EmulatedCluster
from tests.unit.operator.site.test_site import _bundle

SITE_CRD = Path(__file__).resolve().parents[4] / "crds" / "fedkube.dev_flsites.yaml"
NS, NAME, POD = "site-ns", "mnist-b", "mnist-b-client"
HOLD = "test.fedkube.dev/hold"  # a finalizer: the refused pod lingers after its delete, as a terminating one does


class Site:
    """The site's cluster with one FLSite; ``look()`` runs one reconcile pass and keeps what kopf would."""

    def __init__(self, client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.core = kubernetes.client.CoreV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.client = client
        self.status: dict[str, Any] = {}
        self.events: list[tuple[str, str]] = []
        monkeypatch.setattr(handlers, "_enroll", lambda *a: "2030-01-01T00:00:00Z")
        # The Events as the API would get them: kopf.event (Normal) and kopf.warn, the two the handlers post with.
        monkeypatch.setattr(handlers.kopf, "event", lambda body, type, reason, message: self.events.append(
            (reason, message)))
        monkeypatch.setattr(handlers.kopf, "warn", lambda body, reason, message: self.events.append((reason, message)))
        monkeypatch.setattr(handlers.kopf, "info", lambda *a, **k: pytest.fail("kopf.info is dropped at WARNING"))

    def flsite(self) -> dict[str, Any]:
        return dict(self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION_NAME, NS, PLURAL, NAME))

    def look(self) -> dict[str, Any]:
        """One pass; the status fields it patched (the whole status is in ``self.status``)."""
        body = self.flsite()
        patch: Any = type("Patch", (), {"status": {}})()
        handlers.reconcile(body=body, spec=body["spec"], status=dict(self.status), patch=patch,  # type: ignore[arg-type]
                           memo={handlers.Memo.API_CLIENT: self.client, handlers.SIDECAR_URL: lambda pod: None})  # type: ignore[arg-type]
        self.status.update(patch.status)
        return dict(patch.status)

    def pod(self) -> Any:
        try:
            return self.core.read_namespaced_pod(POD, NS)
        except kubernetes.client.exceptions.ApiException as exc:
            assert exc.status == 404, exc
            return None

    def sidecar_refuses(self, term: str) -> str:
        """The pod's sidecar refused the job's terms and ended: its final view is its termination message."""
        final = SiteView("Refused", 0, "PolicyRefused", "the job asks 3 rounds, the site's maxRounds is 2", term)
        self.core.patch_namespaced_pod_status(POD, NS, {"status": {"phase": "Failed", "initContainerStatuses": [
            {"name": "sidecar", "image": "s", "imageID": "", "ready": False, "restartCount": 0,
             "state": {"terminated": {"exitCode": 3, "message": final.to_json()}}}]}})  # fmt: skip
        self.core.patch_namespaced_pod(POD, NS, {"metadata": {"finalizers": [HOLD]}})
        return str(self.pod().metadata.uid)

    def set_max_rounds(self, rounds: int) -> None:
        self.custom.patch_namespaced_custom_object(API_GROUP, API_VERSION_NAME, NS, PLURAL, NAME,
                                                   {"spec": {"policy": {"maxRounds": rounds}}})

    def condition(self, kind: str) -> tuple[str, str]:
        cond = next(c for c in self.status["conditions"] if c["type"] == kind)
        return cond["status"], cond["reason"]


def _real_bundle() -> JoinBundle:
    """The test bundle with a real job CA (the handler parses it as the site operator does)."""
    now = dt.datetime.now(dt.timezone.utc)
    ca = pki.make_job_ca("ml", "mnist", pki.Validity(now - dt.timedelta(days=1), now + dt.timedelta(days=30)))
    return dataclasses.replace(_bundle(enroll.fingerprint(ca.cert)), ca_pem=ca.cert_pem().decode())


@pytest.fixture
def site(monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    bundle = _real_bundle()
    with EmulatedCluster() as cluster:
        client = cluster.api_client()
        kubernetes.client.ApiextensionsV1Api(client).create_custom_resource_definition(
            yaml.safe_load(SITE_CRD.read_text()))
        core = kubernetes.client.CoreV1Api(client)
        core.create_namespace({"metadata": {"name": NS}})
        core.create_namespaced_secret(NS, {"metadata": {"name": "mnist-join"},
                                           "stringData": {"bundle.json": bundle.to_json()}})
        kubernetes.client.CustomObjectsApi(client).create_namespaced_custom_object(
            API_GROUP, API_VERSION_NAME, NS, PLURAL, {
                "apiVersion": f"{API_GROUP}/{API_VERSION_NAME}", "kind": "FLSite",
                "metadata": {"name": NAME, "namespace": NS},
                "spec": {"joinBundleSecretRef": {"name": "mnist-join"},
                         "trainer": {"image": "hospital/train:1", "command": ["python", "train.py"]},
                         "policy": {"acceptedCaFingerprints": [bundle.ca_sha256], "maxRounds": 2}}})  # fmt: skip
        try:
            yield Site(client, monkeypatch)
        finally:
            client.close()


def _policy_env(pod: Any) -> TermsPolicy:
    sidecar = next(c for c in pod.spec.init_containers if c.name == "sidecar")
    value = next(e.value for e in sidecar.env if e.name == envvars.SITE_POLICY)
    return TermsPolicy.from_json(value, name=envvars.SITE_POLICY)


def test_a_refused_site_is_replaced_once_per_policy_change_and_never_for_the_same_policy(site: Site) -> None:
    site.look()
    first = site.pod()
    assert first is not None and site.status["phase"] == "Joined"
    assert first.metadata.annotations[builders.ANNOTATION_SITE_POLICY] == builders.policy_digest(
        _policy_env(first).to_json())
    uid = site.sidecar_refuses("RoundsNotAccepted")
    site.look()
    assert site.status["phase"] == "Refused" and site.condition("Refused") == ("True", "RoundsNotAccepted")
    assert "change spec.policy" in site.status["lastError"]
    # The same policy: the refusal stands, the pod stays, no Event, nothing patched (no re-create storm).
    site.events.clear()
    for _ in range(2):
        assert site.look() == {}
    assert site.pod().metadata.uid == uid and site.events == []

    site.set_max_rounds(5)
    site.look()
    assert site.status["phase"] == "Joined" and site.condition("Refused") == ("False", rejoin.POLICY_CHANGED)
    assert site.status["lastError"] is None and site.status["serverView"] is None
    assert [r for r, _ in site.events] == [rejoin.POLICY_CHANGED]
    lingering = site.pod()
    assert lingering.metadata.uid == uid and lingering.metadata.deletion_timestamp is not None
    # While the refused pod terminates: no second delete, no second Event, no new pod.
    assert site.look() == {} and [r for r, _ in site.events] == [rejoin.POLICY_CHANGED]
    site.core.patch_namespaced_pod(POD, NS, {"metadata": {"finalizers": None}})
    assert site.pod() is None

    site.look()
    new = site.pod()
    assert new is not None and new.metadata.uid != uid and _policy_env(new).max_rounds == 5
    assert [r for r, _ in site.events] == [rejoin.POLICY_CHANGED, "Joined"]
    assert site.flsite()["metadata"]["uid"] == new.metadata.owner_references[0].uid
    # Refused again under the new policy (another term): it stays refused until the policy changes again.
    uid = site.sidecar_refuses("StrategyNotAccepted")
    site.look()
    assert site.status["phase"] == "Refused" and site.condition("Refused") == ("True", "StrategyNotAccepted")
    site.look()
    assert site.pod().metadata.uid == uid and site.pod().metadata.deletion_timestamp is None


def test_the_policy_a_pod_runs_with_is_read_from_its_annotation_or_its_sidecar() -> None:
    from tests.unit.operator.site.test_site import _site

    pod = builders.build_site_pod(_site(maxRounds=2), _bundle())
    wanted = pod["metadata"]["annotations"][builders.ANNOTATION_SITE_POLICY]
    assert rejoin.decide(pod, wanted) is rejoin.Step.KEEP
    assert rejoin.decide(pod, builders.policy_digest(builders.site_policy(_site(maxRounds=3)))) is rejoin.Step.REPLACE
    # A pod made before the annotation existed: the digest of what its sidecar was given.
    del pod["metadata"]["annotations"][builders.ANNOTATION_SITE_POLICY]
    assert rejoin.pod_policy(pod) == wanted and rejoin.decide(pod, wanted) is rejoin.Step.KEEP
    # Nothing to compare with: kept (a guess could replace it forever).
    pod["spec"]["initContainers"][0]["env"] = []
    assert rejoin.decide(pod, "sha256:other") is rejoin.Step.KEEP
    pod["metadata"]["deletionTimestamp"] = "2030-01-01T00:00:00Z"
    assert rejoin.decide(pod, "sha256:other") is rejoin.Step.WAIT
