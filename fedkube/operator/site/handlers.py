"""kopf handlers for FLSite: check the bundle against the site's policy, enroll, run one client pod, report.

Each pass: read the bundle Secret; refuse (phase Refused, never enrolling) a CA the policy does not accept; enroll
once (the key is made here and stored only in ``<flsite>-tls`` of this namespace); create the client pod (owned by
the FLSite, so deleting the FLSite deletes it); map the pod's phase onto the FLSite's, and its sidecar's view of
the site (:mod:`fedkube.operator.site.view`) onto ``round``, ``serverView`` and, when the site's policy refused the
job's terms, the phase Refused; a changed ``spec.policy`` then replaces the refused pod
(:mod:`fedkube.operator.site.rejoin`). Deleting the FLSite first asks the sidecar to leave the job (the server records
the site Withdrawn), then the pod goes with its owner. A handler never sleeps: waiting is ``kopf.TemporaryError``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kopf
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pydantic import ValidationError

from fedkube.errors import FedkubeError
from fedkube.operator.handlers import Memo, configure
from fedkube.operator.site import builders, policy, rejoin, view
from fedkube.operator.site.kube import SiteKube
from fedkube.operator.status import set_condition
from fedkube.security import enroll
from fedkube.security.enroll_wire import EnrollmentError, Issued, enroll_site, renew_site
from fedkube.security.material import CA_CERT_FILE, CERT_FILE, KEY_FILE, files_in
from fedkube.siteview import SiteView
from fedkube.spec.site import API_GROUP, API_VERSION_NAME, PLURAL, FLSite

log = logging.getLogger(__name__)

RESOURCE = (API_GROUP, API_VERSION_NAME, PLURAL)
# Refused is not final: the admin may add the fingerprint (or replace the bundle), and the next look enrolls.
TERMINAL = ("Succeeded", "Failed")
RETRY_S = 10.0
ENROLL_TIMEOUT_S = 10.0
#: Memo key: ``(bundle) -> (host, port)`` the operator dials to enroll (default the bundle's first address and
#: enrollment port). The seam the e2e test uses, where the operator runs outside the emulated pods' network.
ENROLL_ADDRESS = "enroll_address"
#: Memo key: ``(pod) -> base URL | None`` of the client pod's sidecar (default :func:`view.default_sidecar_url`).
SIDECAR_URL = "sidecar_url"


def _enroll_address(bundle: enroll.JoinBundle) -> tuple[str, int]:
    return bundle.host, bundle.enroll_port


def _normal(body: kopf.Body, reason: str, message: str) -> None:
    """A Normal Event. Not ``kopf.info``: that one is dropped below ``settings.posting.level``, which
    :func:`configure` raises to WARNING to keep kopf's own handler chatter out of the Events."""
    kopf.event(body, type="Normal", reason=reason, message=message)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def site_phase(pod: Mapping[str, Any] | None) -> str:
    """The FLSite's phase for its client pod's (Joined: enrolled, the pod not running yet)."""
    phase = ((pod or {}).get("status") or {}).get("phase")
    return {"Running": "Running", "Succeeded": "Succeeded", "Failed": "Failed"}.get(str(phase), "Joined")


def _status(patch: kopf.Patch, status: Mapping[str, Any], phase: str, cond: str, ok: bool, reason: str,
            message: str, **fields: Any) -> None:  # fmt: skip
    conditions = set_condition(status.get("conditions"), cond, "True" if ok else "False", reason, message, _now())
    # Typed status, patched only where it changed: the timer looks every few seconds.
    for key, value in {"phase": phase, "conditions": conditions, **fields}.items():
        if status.get(key) != value:
            patch.status[key] = value


def _bundle(kube: SiteKube, site: FLSite) -> enroll.JoinBundle:
    ref = site.spec.join_bundle_secret_ref
    data = kube.secret_data(site.namespace, ref.name)
    if data is None or ref.key not in data:
        raise kopf.TemporaryError(f"FLSite {site.namespace}/{site.name}: Secret {ref.name} with key {ref.key} not "
                                  "found; fix: create it from the job owner's join bundle", delay=RETRY_S)
    try:
        return enroll.JoinBundle.from_text(data[ref.key].decode())
    except (FedkubeError, UnicodeDecodeError) as exc:
        raise kopf.PermanentError(f"FLSite {site.namespace}/{site.name}: Secret {ref.name}: {exc}") from exc


def _stamp(cert: x509.Certificate) -> str:
    return cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def _enroll(kube: SiteKube, site: FLSite, bundle: enroll.JoinBundle, body: kopf.Body,
            address: tuple[str, int]) -> str:
    """Enroll, renew or reuse the certificate in ``<flsite>-tls``; its expiry.

    Reused while it belongs to the bundle's CA and has more than a third of its lifetime left; then renewed over
    mutual TLS with the current certificate (no token: it was spent), as ``fedkube join`` does."""
    name = builders.tls_secret_name(site)
    stored = kube.secret_data(site.namespace, name)
    key = enroll.new_site_key()
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    if stored and builders.TOKEN_KEY in stored:
        cert = x509.load_pem_x509_certificate(stored[CERT_FILE])
        ca = x509.load_pem_x509_certificate(stored[CA_CERT_FILE])
        if enroll.fingerprint(ca) == bundle.ca_sha256:
            now = dt.datetime.now(dt.timezone.utc)
            if not enroll.needs_renewal(cert, now):
                return _stamp(cert)
            try:
                issued = _renew(bundle, key, stored, address)
            except EnrollmentError as exc:
                if now < cert.not_valid_after_utc:  # still valid: keep it and try again on the next look
                    log.warning("FLSite %s/%s: renewal failed (%s), the certificate is valid until %s: %s",
                                site.namespace, site.name, exc.reason, _stamp(cert), exc)
                    return _stamp(cert)
                raise
            kube.patch_secret(builders.build_tls_secret(site, bundle, key_pem=key_pem, cert_pem=issued.certificate,
                                                        ca_pem=issued.ca, token=issued.site_token, owner=body))
            _normal(body, reason="Renewed", message=f"certificate renewed, valid until {issued.not_after}")
            return issued.not_after
    issued = enroll_site(bundle, key, address, timeout_s=ENROLL_TIMEOUT_S)
    kube.create(builders.build_tls_secret(site, bundle, key_pem=key_pem, cert_pem=issued.certificate, ca_pem=issued.ca,
                                          token=issued.site_token, owner=body))
    return issued.not_after


def _renew(bundle: enroll.JoinBundle, key: Any, stored: Mapping[str, bytes], address: tuple[str, int]) -> Issued:
    # renew_site reads the current certificate and key from files (the TLS library loads them from paths):
    # a private directory that exists only for the call.
    with tempfile.TemporaryDirectory(prefix="fedkube-renew-") as tmp:
        files = files_in(Path(tmp))
        for path, data in ((files.cert, stored[CERT_FILE]), (files.key, stored[KEY_FILE])):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        return renew_site(bundle, key, files.cert, files.key, address, timeout_s=ENROLL_TIMEOUT_S)


def reconcile(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo,
              **_: Any) -> None:  # fmt: skip
    """Every look (the first at once): move the FLSite one step on. Never concurrent with itself."""
    if status.get("phase") in TERMINAL:
        return
    try:
        site = FLSite.model_validate({"metadata": dict(body["metadata"]), "spec": dict(spec)})
    except ValidationError as exc:
        _status(patch, status, "Failed", "Invalid", True, "InvalidSpec", str(exc), lastError=str(exc))
        raise kopf.PermanentError(f"invalid FLSite: {exc}") from exc
    kube = SiteKube(memo[Memo.API_CLIENT])
    bundle = _bundle(kube, site)
    where = {"job": f"{bundle.namespace}/{bundle.job}", "site": bundle.site, "caSha256": bundle.ca_sha256,
             "server": f"{bundle.host}:{bundle.grpc_port}"}
    refusal = policy.check_bundle(site.spec.policy, bundle)
    if refusal is not None:
        _status(patch, status, "Refused", "Refused", True, refusal.reason, refusal.message, lastError=refusal.message,
                **where)
        if status.get("phase") != "Refused":  # one Event per refusal, not one per look
            kopf.warn(body, reason=refusal.reason, message=refusal.message)
        return
    if status.get("phase") == "Refused" and _refused_reason(status) == policy.CA_NOT_ACCEPTED:
        patch.status["conditions"] = set_condition(status.get("conditions"), "Refused", "False", "Accepted",
                                                   "the bundle's CA is accepted", _now())
        patch.status["lastError"] = None
    if not status.get("certNotAfter"):
        patch.status["phase"] = "Enrolling"
    address = memo.get(ENROLL_ADDRESS, _enroll_address)(bundle)
    try:
        not_after = _enroll(kube, site, bundle, body, address)
    except EnrollmentError as exc:
        message = f"enrollment with {address[0]}:{address[1]} failed ({exc.reason}): {exc}"
        if exc.reason == "unreachable":
            _status(patch, status, "Enrolling", "Enrolled", False, "Unreachable", message, lastError=message, **where)
            raise kopf.TemporaryError(message, delay=RETRY_S) from exc
        _status(patch, status, "Failed", "Enrolled", False, "EnrollmentRefused", message, lastError=message, **where)
        kopf.warn(body, reason="EnrollmentRefused", message=message)
        return
    pod_name = builders.client_pod_name(site)
    pod = kube.pod(site.namespace, pod_name)
    if pod is None:
        kube.create(builders.build_site_pod(site, bundle, owner=body, log_format=memo.get(Memo.LOG_FORMAT, "text"),
                                            defaults=memo.get(Memo.JOB_DEFAULTS)))
        _normal(body, reason="Joined", message=f"enrolled as site {bundle.site} of job {where['job']}; "
                  f"created pod {pod_name}")
    phase = site_phase(pod)
    seen = _sidecar_view(pod, memo, phase)
    fields: dict[str, Any] = {"certNotAfter": not_after, "pod": pod_name, **where}
    if seen is not None:
        fields.update(round=seen.round or None, serverView={"state": seen.state, "reason": seen.reason or None})
    if seen is not None and seen.state == "Refused" and pod is not None:
        step = rejoin.decide(pod, builders.policy_digest(builders.site_policy(site)))
        if step is not rejoin.Step.KEEP:
            message = rejoin.message(pod_name, where["job"])
            if step is rejoin.Step.REPLACE and kube.delete_pod(site.namespace, pod_name, pod["metadata"]["uid"]):
                _normal(body, reason=rejoin.POLICY_CHANGED, message=message)
            _status(patch, status, "Joined", "Refused", False, rejoin.POLICY_CHANGED, message,
                    **{**fields, "serverView": None, "lastError": None})
            return
        reason = seen.term or "PolicyRefused"
        message = (f"{seen.message}; the site left job {where['job']} before any task (PolicyRefused at the "
                   f"server); to join after all, change spec.policy: the site operator then replaces pod {pod_name}")
        _status(patch, status, "Refused", "Refused", True, reason, message, lastError=message, **fields)
        if status.get("phase") != "Refused":
            kopf.warn(body, reason=reason, message=message)
        return
    _status(patch, status, phase, "Enrolled", True, "Enrolled", f"certificate valid until {not_after}", **fields)
    if phase == "Failed":
        message = f"client pod {pod_name} failed; see `kubectl logs {pod_name} -c trainer` and `-c sidecar`"
        patch.status["lastError"] = message
        kopf.warn(body, reason="Failed", message=message)
    elif phase == "Succeeded":
        _normal(body, reason="Succeeded", message=f"job {where['job']} finished; pod {pod_name} succeeded")


def _refused_reason(status: Mapping[str, Any]) -> str | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Refused" and cond.get("status") == "True":
            return str(cond.get("reason"))
    return None


def _sidecar_view(pod: Mapping[str, Any] | None, memo: kopf.Memo, phase: str) -> SiteView | None:
    """The sidecar's view of the site: live while the pod runs, its termination message once it ended."""
    if pod is None:
        return None
    if phase in ("Succeeded", "Failed"):
        return view.final_view(pod)
    return view.final_view(pod) or view.live_view(memo.get(SIDECAR_URL, view.default_sidecar_url)(pod))


def withdrawn(body: kopf.Body, spec: kopf.Spec, memo: kopf.Memo, **_: Any) -> None:
    """Deletion: the sidecar leaves the job (Withdrawn at the server, at once), then the pod goes with its owner.

    Best effort and never blocking the deletion: a sidecar that cannot be reached (its pod already gone, the
    site's network down) leaves the server to notice the silence (Lost after heartbeatSeconds)."""
    name, namespace = body["metadata"]["name"], body["metadata"].get("namespace") or "default"
    left = False
    try:
        kube = SiteKube(memo[Memo.API_CLIENT])
        pod = kube.pod(namespace, f"{name}-client")
        secret = kube.secret_data(namespace, f"{name}-tls") or {}
        token = secret.get(builders.TOKEN_KEY, b"").decode()
        if pod is not None and token and site_phase(pod) not in ("Succeeded", "Failed"):
            left = view.ask_to_leave(memo.get(SIDECAR_URL, view.default_sidecar_url)(pod), token,
                                     f"FLSite {namespace}/{name} was deleted by the site's admin")
    except Exception as exc:  # never hold the deletion (the finalizer) on a failed courtesy
        log.warning("FLSite %s/%s: could not ask its sidecar to leave the job: %s", namespace, name, exc)
    _normal(body, reason="Withdrawn", message="FLSite deleted; " + (
        "its sidecar told the server the site leaves; " if left else "") +
        "its client pod and Secret are garbage-collected")


def register(registry: kopf.OperatorRegistry, *, interval: float = 5.0) -> kopf.OperatorRegistry:
    """Register the FLSite handlers on ``registry`` (``fedkube operator --mode site``)."""
    kopf.on.startup(registry=registry)(configure)
    # The timer only (it also runs at once for a new or resumed FLSite): kopf runs a timer and the create/resume
    # handlers concurrently, and two enrollments racing with one token leave one of them refused as a replay.
    kopf.timer(*RESOURCE, interval=interval, registry=registry, id="reconcile")(reconcile)
    # Not optional: the finalizer holds the FLSite (and so its pod) until the sidecar was asked to leave.
    kopf.on.delete(*RESOURCE, registry=registry, id="withdraw")(withdrawn)
    return registry
