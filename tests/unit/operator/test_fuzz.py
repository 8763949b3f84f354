"""Hypothesis-generated FLJobs: either the spec error names what is wrong, or every built object is valid Kubernetes.

Nothing in between: no crash, no manifest the API server would reject.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
from typing import Any

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from fedkube.operator import builders
from fedkube.runtime.local import new_tls
from fedkube.spec import SpecError, parse_job
from fedkube.spec.model import ALLOWED_PROJECTIONS, ALLOWED_VOLUME_KINDS
from tests.unit.operator.certmanager import assert_valid_certificate
from tests.unit.operator.kvalidate import assert_valid
from tests.unit.spec.manifests import example_manifest, full_manifest

VERSIONS = ("1.29.0", "1.37.0")
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
OWNER = {"apiVersion": "fedkube.dev/v1alpha1", "kind": "FLJob", "metadata": {"name": "j", "uid": "u-1"}}
FUZZ = settings(
    max_examples=int(os.environ.get("FEDKUBE_FUZZ_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Mostly valid values, with the invalid ones users actually write mixed in.
names = st.sampled_from(["site-a", "site-b", "hospital-1", "x", "a" * 63, "Site_A", "-bad", "", "a" * 64])
job_names = st.sampled_from(["job", "mnist-fl", "j" * 56, "j" * 57, "9lives", "Job", "a-"])
quantities = st.one_of(
    st.sampled_from(["500m", "1", "2Gi", "0.5", "1e3", "128Mi", "half", "-1", "", "1.5Gi", "1 Gi"]),
    st.integers(-2, 8),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
)
resource_names = st.sampled_from(["cpu", "memory", "nvidia.com/gpu", "ephemeral-storage"])
resources = st.fixed_dictionaries(
    {},
    optional={
        "requests": st.dictionaries(resource_names, quantities, max_size=3),
        "limits": st.dictionaries(resource_names, quantities, max_size=3),
    },
)
env_names = st.sampled_from(["A", "EPOCHS", "_X", "my.var", "FEDKUBE_SITE", "1BAD", "", "HOME"])
env_var = st.one_of(
    st.fixed_dictionaries({"name": env_names, "value": st.text(max_size=20)}),
    st.fixed_dictionaries({"name": env_names, "valueFrom": st.just({"fieldRef": {"fieldPath": "metadata.name"}})}),
    st.fixed_dictionaries({"name": env_names}),
)
label_text = st.sampled_from(["gpu", "a100", "pool", "example.com/zone", "has space", "", "x" * 64])
node_selector = st.dictionaries(label_text, label_text, max_size=2)
tolerations = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "key": st.sampled_from(["nvidia.com/gpu", "dedicated", ""]),
            "operator": st.sampled_from(["Exists", "Equal", "Maybe"]),
            "value": st.sampled_from(["fl", ""]),
            "effect": st.sampled_from(["NoSchedule", "NoExecute", "PreferNoSchedule"]),
            "tolerationSeconds": st.integers(0, 600),
        },
    ),
    max_size=2,
)
volume = st.sampled_from(
    [
        {"name": "data", "emptyDir": {}},
        {"name": "data", "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": "cfg", "configMap": {"name": "my-config"}},
        {"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
        {"name": "creds", "secret": {"secretName": "s3-creds", "defaultMode": 0o400}},
        {"name": "mix", "projected": {"sources": [{"configMap": {"name": "c"}}, {"downwardAPI": {"items": []}}]}},
        {"name": "fedkube-work", "emptyDir": {}},
        {"name": "nosource"},
        # An FLJob author must not get, through the operator, what they may not mount themselves (issue 13).
        {"name": "root", "hostPath": {"path": "/"}},
        {"name": "sa", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}},
        {"name": "driver", "csi": {"driver": "secrets-store.csi.k8s.io"}},
        {"name": "both", "emptyDir": {}, "secret": {"secretName": "s"}},
    ]
)
_ATTACKS = {"nosource", "root", "sa", "driver", "both"}
mount = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["data", "cfg", "models", "ghost"]),
        "mountPath": st.sampled_from(["/data", "/cfg", "/models", "relative", "/tmp", "/var/lib/fedkube/work"]),
    },
    optional={"readOnly": st.booleans()},
)
seconds = st.sampled_from([1, 5, 30, 60, 120, 600, 3600, 0, -5])
site = st.fixed_dictionaries(
    {"name": names},
    optional={
        "env": st.lists(env_var, max_size=2),
        "resources": resources,
        "nodeSelector": node_selector,
        "tolerations": tolerations,
    },
)
template_common: dict[str, Any] = {
    "args": st.lists(st.text(max_size=10), max_size=2),
    "env": st.lists(env_var, max_size=3),
    "resources": resources,
    "volumes": st.lists(volume, max_size=2),
    "volumeMounts": st.lists(mount, max_size=2),
    "nodeSelector": node_selector,
    "tolerations": tolerations,
}
trainer = st.fixed_dictionaries(
    {
        "image": st.sampled_from(["python:3.12", "registry.example/t:1", "img with space", ""]),
        "command": st.sampled_from([["python", "train.py"], ["torchrun", "train.py"], [], [""]]),
    },
    optional={**template_common, "workingDir": st.sampled_from(["/app", "/workspace", "app"])},
)
server = st.fixed_dictionaries(
    {},
    optional={
        **template_common,
        "image": st.sampled_from(["ghcr.io/fedkube/fedkube:dev", "registry.example/s:2"]),
        "checkpoint": st.fixed_dictionaries(
            {"enabled": st.booleans()},
            optional={"storageSize": quantities, "storageClassName": st.sampled_from(["fast", "standard"])},
        ),
    },
)
manifests = st.fixed_dictionaries(
    {
        "apiVersion": st.just("fedkube.dev/v1alpha1"),
        "kind": st.just("FLJob"),
        "metadata": st.fixed_dictionaries(
            {"name": job_names}, optional={"namespace": st.sampled_from(["default", "ml", "Bad_NS"])}
        ),
        "spec": st.fixed_dictionaries(
            {"rounds": st.integers(-1, 5), "clients": st.lists(site, max_size=4), "trainer": trainer},
            optional={
                "minClients": st.integers(0, 5),
                "strategy": st.sampled_from(
                    [
                        {"name": "fedavg"},
                        {"name": "fedadam"},
                        {"name": "fedadam", "beta1": 0.5, "serverLr": 1.0},
                        {"name": "fedavg", "tau": 0.1},
                        {"name": "fedsgd"},
                        {"name": "fedadam", "beta2": 1.5},
                    ]
                ),
                "model": st.sampled_from(
                    [
                        {"source": "firstClient"},
                        {"source": "file", "path": "/m.npz"},
                        {"source": "file"},
                        {"source": "s3"},
                    ]
                ),
                "server": server,
                "sidecar": st.fixed_dictionaries({}, optional={"image": st.just("sidecar:1"), "resources": resources}),
                "transfer": st.fixed_dictionaries(
                    {},
                    optional={
                        "chunkTimeoutSeconds": seconds,
                        "idleTimeoutSeconds": seconds,
                        "maxAttempts": st.integers(0, 10),
                        "chunkBytes": st.sampled_from([1 << 20, 100, 1 << 24, (1 << 24) + 1]),
                    },
                ),
                "timeouts": st.fixed_dictionaries(
                    {},
                    optional=dict.fromkeys(
                        ("roundSeconds", "heartbeatSeconds", "registrationSeconds", "deploySeconds", "pendingSeconds"),
                        seconds,
                    ),
                ),
                "suspend": st.booleans(),
                "ttlSecondsAfterFinished": st.integers(-1, 100),
            },
        ),
    }
)


@st.composite
def valid_manifests(draw: st.DrawFn) -> dict[str, Any]:
    """Specs built only from valid pieces, consistent across fields: these must all build."""
    v_names = st.from_regex(r"\A[a-z]([-a-z0-9]{0,10}[a-z0-9])?\Z")
    v_cpu = st.sampled_from(["100m", "500m", "1", "2", 1, 0.25])
    v_mem = st.sampled_from(["64Mi", "1Gi", "2G", 1048576])
    v_resources = st.fixed_dictionaries(
        {},
        optional={
            "requests": st.fixed_dictionaries({}, optional={"cpu": v_cpu, "memory": v_mem}),
            "limits": st.fixed_dictionaries({}, optional={"nvidia.com/gpu": st.integers(0, 8)}),
        },
    )
    v_env = st.lists(
        st.fixed_dictionaries({"name": st.from_regex(r"\A[A-Z_][A-Z0-9_]{0,8}\Z"), "value": st.text(max_size=12)}),
        max_size=3,
        unique_by=lambda e: e["name"],
    ).filter(lambda env: not any(e["name"].startswith("FEDKUBE_") for e in env))
    v_labels = st.dictionaries(
        st.sampled_from(["gpu", "pool", "example.com/zone", "kubernetes.io/arch"]),
        st.from_regex(r"\A([A-Za-z0-9]([-A-Za-z0-9_.]{0,10}[A-Za-z0-9])?)?\Z"),
        max_size=2,
    )
    v_tolerations = st.lists(
        st.sampled_from(
            [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                {"key": "dedicated", "operator": "Equal", "value": "fl"},
                {"operator": "Exists"},
                {"key": "spot", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30},
            ]
        ),
        max_size=2,
    )
    sites = draw(st.lists(v_names, min_size=1, max_size=4, unique=True))
    chunk = draw(st.sampled_from([1, 10, 30]))
    idle = chunk * draw(st.integers(1, 4))
    vols = draw(
        st.lists(
            volume.filter(lambda v: v["name"] not in _ATTACKS and not v["name"].startswith("fedkube-")),
            max_size=2,
            unique_by=lambda v: v["name"],
        )
    )
    mounts = [{"name": v["name"], "mountPath": f"/mnt/{v['name']}"} for v in vols if draw(st.booleans())]
    clients = [
        {
            "name": name,
            **draw(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "env": v_env,
                        "resources": v_resources,
                        "nodeSelector": v_labels,
                        "tolerations": v_tolerations,
                    },
                )
            ),
        }
        for name in sites
    ]
    spec: dict[str, Any] = {
        "rounds": draw(st.integers(1, 50)),
        "minClients": draw(st.integers(1, len(sites))),
        "clients": clients,
        "trainer": {
            "image": draw(st.sampled_from(["python:3.12", "registry.example:5000/team/t@sha256:" + "a" * 64])),
            "command": draw(st.lists(st.text(min_size=1, max_size=8).filter(str.strip), min_size=1, max_size=3)),
            "args": draw(st.lists(st.text(max_size=8), max_size=2)),
            "env": draw(v_env),
            "resources": draw(v_resources),
            "volumes": vols,
            "volumeMounts": mounts,
            "nodeSelector": draw(v_labels),
            "tolerations": draw(v_tolerations),
        },
        "server": {
            "env": draw(v_env),
            "resources": draw(v_resources),
            "checkpoint": {
                "enabled": draw(st.booleans()),
                "storageSize": draw(st.sampled_from(["1Gi", "500M", 10**9])),
            },
        },
        "strategy": draw(st.sampled_from([{"name": "fedavg"}, {"name": "fedadam", "serverLr": 0.1, "tau": 0.01}])),
        "transfer": {"chunkTimeoutSeconds": chunk, "idleTimeoutSeconds": idle},
        "timeouts": {"roundSeconds": idle * draw(st.integers(1, 100))},
        "suspend": draw(st.booleans()),
        "security": draw(st.sampled_from([
            {}, {"tls": "disabled"}, {"issuerRef": {"name": "job-issuer"}},
            {"issuerRef": {"name": "org-ca", "kind": "ClusterIssuer"}}])),
    }
    namespace = draw(st.sampled_from([None, "default", "team-a"]))
    meta: dict[str, Any] = {"name": draw(st.from_regex(r"\A[a-z]([-a-z0-9]{0,20}[a-z0-9])?\Z"))}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "fedkube.dev/v1alpha1", "kind": "FLJob", "metadata": meta, "spec": spec}


def _check(data: dict[str, Any], *, must_build: bool = False) -> None:
    """The property: a SpecError with located, actionable problems, or strictly valid objects."""
    try:
        job = parse_job(data)
    except SpecError as exc:
        assert not must_build, f"a valid spec was rejected: {exc}"
        event("rejected")
        assert exc.problems
        for p in exc.problems:
            assert p.path and p.message and p.fix, p
        return
    event("built")
    tokens = {c.name: "t0ken" for c in job.spec.clients}
    # The operator leaves cert-manager's jobs without material of its own (Certificates are rendered instead).
    tls = None if job.spec.security.issuer_ref is not None else new_tls(job, NOW)
    objs = builders.build_all(job, tokens=tokens, tls=tls, owner=OWNER)
    assert sum(o["kind"] == "Pod" for o in objs) == len(job.spec.clients) + 1
    for obj in objs:
        assert len(obj["metadata"]["name"]) <= 253
        for value in obj["metadata"]["labels"].values():
            assert len(value) <= 63, value
        if obj["kind"] == "Certificate":
            assert_valid_certificate(obj)
            continue
        for version in VERSIONS:
            assert_valid(obj, version)
    for pod in (o for o in objs if o["kind"] == "Pod"):
        for vol in pod["spec"]["volumes"]:
            kinds = set(vol) - {"name"}
            assert len(kinds) == 1 and kinds <= set(ALLOWED_VOLUME_KINDS), vol
            for source in vol.get("projected", {}).get("sources", []):
                assert set(source) <= set(ALLOWED_PROJECTIONS), vol


@FUZZ
@example(full_manifest())
@example(example_manifest())
@given(valid_manifests())
def test_valid_specs_always_build_valid_objects(data: dict[str, Any]) -> None:
    _check(data, must_build=True)


@FUZZ
@given(manifests)
def test_generated_specs_build_valid_objects_or_raise_spec_error(data: dict[str, Any]) -> None:
    _check(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False, width=16) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(_paths(v, (*prefix, i)))
    return out


# Volumes are typed like the rest of the spec (issue 13), so their fields are mutated too.
_FULL_PATHS = _paths(full_manifest())


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(_FULL_PATHS), json_values), min_size=1, max_size=3))
def test_mutated_specs_build_valid_objects_or_raise_spec_error(edits: list[tuple[tuple[Any, ...], Any]]) -> None:
    data = copy.deepcopy(full_manifest())
    for path, value in edits:
        node: Any = data
        try:
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit replaced the parent; the remaining edits still apply
    _check(data)
