"""Pure builders of the site operator: an FLSite and its join bundle in, the site's Secret and client pod out.

The client pod is the one :func:`fedkube.operator.builders.build_client_pod` makes for an in-cluster site (the
job-cell sidecar as a native sidecar, the trainer, the same security context and pod-template fields), built from
the FLSite's own trainer, then pointed at the remote server: the bundle's address and server name, the job and
site names of the bundle, and the FLSite's ``<flsite>-tls`` Secret (the enrolled certificate, the key made here,
the site's bearer token). Nothing of the server's FLJob reaches this pod but what its tasks carry.

The site's own part of the sidecar: its policy over the job's terms (``FEDKUBE_SITE_POLICY``, from
``spec.policy``, checked when it registers), its view of the site's place served on the ``site-status`` port for
the site operator (round, serverView; ``POST /leave`` when the FLSite is deleted) and written as its termination
message (the final word, e.g. a refusal, once the pod ended).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from typing import Any

from fedkube import envvars
from fedkube.operator import builders, certificates, naming
from fedkube.operator.podspec import PodDefaults
from fedkube.security.enroll import JoinBundle
from fedkube.security.material import CA_CERT_FILE, CERT_FILE, KEY_FILE, MOUNT_PATH, SECRET_TYPE
from fedkube.spec.model import ClientSite, FLJob, FLJobSpec, ObjectMeta
from fedkube.spec.site import FLSite
from fedkube.terms import TermsPolicy

#: The key of the ``<flsite>-tls`` Secret holding the site's bearer token (returned by enrollment).
TOKEN_KEY = "token"
LABEL_FLSITE = f"{naming.GROUP}/flsite"
#: The sidecar container port serving the site's view (fedkube.siteview) to the site operator.
SITE_STATUS_PORT_NAME = "site-status"
TERMINATION_PATH = "/dev/termination-log"
#: On the client pod: :func:`policy_digest` of the policy its sidecar runs with (fedkube.operator.site.rejoin).
ANNOTATION_SITE_POLICY = f"{naming.GROUP}/site-policy"


def site_policy(site: FLSite) -> str:
    """``FEDKUBE_SITE_POLICY`` of the site's sidecar: the part of ``spec.policy`` checked against the job's terms."""
    return TermsPolicy.of(site.spec.policy.allowed_strategies, site.spec.policy.max_rounds,
                          f"FLSite {site.namespace}/{site.name} spec.policy").to_json()


def policy_digest(value: str) -> str:
    """The value of :data:`ANNOTATION_SITE_POLICY` for a sidecar's ``FEDKUBE_SITE_POLICY`` ``value``."""
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()


def tls_secret_name(site: FLSite) -> str:
    return f"{site.name}-tls"


def client_pod_name(site: FLSite) -> str:
    return f"{site.name}-client"


def _owner(owner: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    return builders.owner_references(owner)


def build_tls_secret(site: FLSite, bundle: JoinBundle, *, key_pem: bytes, cert_pem: bytes, ca_pem: bytes,
                     token: str, owner: Mapping[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Secret ``<flsite>-tls`` (kubernetes.io/tls): the site's key, its enrolled certificate, the CA, its token."""
    data = {CA_CERT_FILE: ca_pem, CERT_FILE: cert_pem, KEY_FILE: key_pem, TOKEN_KEY: token.encode()}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": SECRET_TYPE,
        "metadata": {
            "name": tls_secret_name(site),
            "namespace": site.namespace,
            "labels": {LABEL_FLSITE: site.name, naming.LABEL_SITE: bundle.site},
            "ownerReferences": _owner(owner),
        },
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }


def _as_job(site: FLSite, bundle: JoinBundle) -> FLJob:
    """A one-site job shaped from the FLSite alone, so the in-cluster client pod builder can be reused."""
    spec = FLJobSpec.model_validate({
        "rounds": 1, "clients": [ClientSite(name=bundle.site)], "trainer": site.spec.trainer,
        "sidecar": site.spec.sidecar,
    })  # fmt: skip
    return FLJob(metadata=ObjectMeta(name=site.name, namespace=site.namespace), spec=spec)


def _set_env(env: list[dict[str, Any]], values: Mapping[str, str]) -> list[dict[str, Any]]:
    out = [e for e in env if e.get("name") not in values]
    return [*({"name": k, "value": v} for k, v in values.items()), *out]


def build_site_pod(site: FLSite, bundle: JoinBundle, *, owner: Mapping[str, Any] | None = None,
                   log_format: str = "text", defaults: PodDefaults | None = None) -> dict[str, Any]:  # fmt: skip
    """Pod ``<flsite>-client``: the sidecar dialling the remote server with the enrolled certificate, and the
    site's own trainer."""
    pod = builders.build_client_pod(_as_job(site, bundle), bundle.site, log_format=log_format, defaults=defaults)
    spec = pod["spec"]
    sidecar = spec["initContainers"][0]
    host = bundle.host
    sidecar["env"] = _set_env(sidecar["env"], {
        envvars.JOB: bundle.job, envvars.NAMESPACE: bundle.namespace, envvars.SITE: bundle.site,
        envvars.SERVER_ADDRESS: f"{host}:{bundle.grpc_port}",
        envvars.SERVER_BULK_ADDRESS: f"{host}:{bundle.bulk_port}" if bundle.bulk_port else "",
        envvars.TOKEN_FILE: f"{MOUNT_PATH}/{TOKEN_KEY}", envvars.TLS: certificates.TLS_ENABLED,
        envvars.TLS_DIR: MOUNT_PATH, envvars.TLS_SERVER_NAME: bundle.server_name,
        envvars.SITE_POLICY: site_policy(site),
        envvars.STATUS_PORT: str(envvars.DEFAULT_SITE_STATUS_PORT), envvars.TERMINATION_LOG: TERMINATION_PATH,
    })  # fmt: skip
    sidecar["ports"] = [*sidecar.get("ports", []), {"name": SITE_STATUS_PORT_NAME, "protocol": "TCP",
                                                    "containerPort": envvars.DEFAULT_SITE_STATUS_PORT}]
    sidecar["terminationMessagePath"] = TERMINATION_PATH
    sidecar["terminationMessagePolicy"] = "File"
    # The token travels in the TLS Secret: one Secret of the site's, made by enrollment.
    sidecar["volumeMounts"] = [m for m in sidecar["volumeMounts"] if m["name"] != builders.VOLUME_TOKEN]
    if not any(m["name"] == certificates.VOLUME_TLS for m in sidecar["volumeMounts"]):
        sidecar["volumeMounts"].append({"name": certificates.VOLUME_TLS, "mountPath": MOUNT_PATH, "readOnly": True})
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] not in (builders.VOLUME_TOKEN, certificates.VOLUME_TLS)]
    spec["volumes"].append({"name": certificates.VOLUME_TLS, "secret": {
        "secretName": tls_secret_name(site), "defaultMode": certificates.FILE_MODE_TLS}})
    trainer = spec["containers"][0]
    trainer["env"] = _set_env(trainer["env"], {envvars.JOB: bundle.job, envvars.NAMESPACE: bundle.namespace,
                                               envvars.SITE: bundle.site})
    meta = pod["metadata"]
    meta["name"] = client_pod_name(site)
    meta["labels"] = {**meta.get("labels", {}), LABEL_FLSITE: site.name}
    meta["annotations"].pop(naming.ANNOTATION_SPEC_HASH, None)
    # What the sidecar will check the job's terms against: a refused pod is replaced when the FLSite's changes.
    meta["annotations"][ANNOTATION_SITE_POLICY] = policy_digest(site_policy(site))
    meta["ownerReferences"] = _owner(owner)
    return pod
