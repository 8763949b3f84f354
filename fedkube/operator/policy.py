"""The cluster admin's policy on FLJobs, which the operator enforces before it creates anything.

Whoever may create an FLJob gets pods from the operator, so the operator must not
give them more than the platform team allows (issue 13). The policy comes from the
chart's ``policy:`` values, rendered into the operator's Deployment as JSON in
``FEDKUBE_ADMIN_POLICY``; :func:`parse_policy` reads it (bounded, every mistake
named), and :meth:`AdminPolicy.violations` lists what a job breaks as
:class:`~fedkube.spec.Problem` (field path, value, rule), which the handlers
report as the job's ``Invalid`` condition before any child exists.

An empty list means the safe default, never "anything":

* ``allowedImagePrefixes`` empty: any image. The image decides what runs, not
  with which rights: every fedkube pod runs as UID 65532 with no capabilities,
  no privilege escalation, seccomp RuntimeDefault and no API token, whatever
  the image (the Pod Security "restricted" profile).
* ``allowedVolumeKinds`` empty: the kinds the FLJob spec admits (emptyDir,
  configMap, secret, persistentVolumeClaim, projected); a list narrows them.
  hostPath and serviceAccountToken projections are never admitted, by the spec
  itself. csi and ephemeral are not in the spec yet, so the policy refuses them
  rather than promising what the spec would reject.
* ``allowedTolerations`` empty: no toleration. A toleration lets the job's pods
  onto nodes tainted to keep workloads away (GPU pools, control plane); one
  without a key (``operator: Exists``) tolerates every taint.

* ``allowedServiceAccounts`` empty: no ``serviceAccountName`` at all, so every
  pod runs as its namespace's ``default`` service account. A service account
  is an identity (workload identity for a dataset bucket, for instance), so a
  job may name only those listed. No API token is mounted either way.

Images a job leaves unset are the operator's default (the chart's
``jobDefaults.image``), the admin's own choice, and are not checked; every
image the job names is, init containers' and per-site images included.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedkube import envvars
from fedkube.errors import ConfigError
from fedkube.spec import FLJob, Problem, SpecError, Toleration
from fedkube.spec.model import ALLOWED_VOLUME_KINDS, Volume
from fedkube.spec.podtemplate import PodOverrides

#: Set by the chart's Deployment (JSON of the ``policy:`` values).
ENV_POLICY = "FEDKUBE_ADMIN_POLICY"

MAX_POLICY_BYTES = 64 * 1024
MAX_ENTRIES = 256
MAX_TEXT = 512

_KEYS = ("allowedImagePrefixes", "allowedVolumeKinds", "allowedTolerations", "allowedServiceAccounts")
_TOLERATION_KEYS = ("key", "operator", "value", "effect")
_NEVER = {
    "hostPath": "it exposes the node's files; the FLJob spec never admits it",
    "serviceAccountToken": "it hands pods a Kubernetes API credential; the FLJob spec never admits it",
}
_NOT_YET = ("csi", "ephemeral")
_FIX_ADMIN = "or ask the cluster admin to change the chart value policy.{key}"


class PolicyError(ConfigError):
    """The admin policy itself is malformed (the chart's ``policy:`` values or ``FEDKUBE_ADMIN_POLICY``)."""


@dataclass(frozen=True)
class TolerationRule:
    """An allowed toleration: each field given must equal the job's; a field left out matches any value."""

    key: str | None = None
    operator: str | None = None
    value: str | None = None
    effect: str | None = None

    def allows(self, tol: Toleration) -> bool:
        """True when ``tol`` matches this rule (Kubernetes defaults: no key is "", no operator is Equal)."""
        actual = {"key": tol.key or "", "operator": tol.operator or "Equal", "value": tol.value or "",
                  "effect": tol.effect or ""}
        return all(want is None or actual[name] == want for name, want in self.fields().items())

    def fields(self) -> dict[str, str | None]:
        """The rule as the chart writes it."""
        return {"key": self.key, "operator": self.operator, "value": self.value, "effect": self.effect}

    def __str__(self) -> str:
        given = {k: v for k, v in self.fields().items() if v is not None}
        return json.dumps(given, sort_keys=True)


@dataclass(frozen=True)
class AdminPolicy:
    """What FLJobs may ask for; the defaults are the safe ones (see the module docstring)."""

    image_prefixes: tuple[str, ...] = ()
    volume_kinds: tuple[str, ...] = ()
    tolerations: tuple[TolerationRule, ...] = ()
    service_accounts: tuple[str, ...] = ()

    @property
    def effective_volume_kinds(self) -> tuple[str, ...]:
        """The volume kinds a job may use: the policy's, or every kind the spec admits when it names none."""
        return self.volume_kinds or ALLOWED_VOLUME_KINDS

    def allows_image(self, image: str) -> bool:
        """True when ``image`` lies under one of the prefixes (whole path components; any image without any)."""
        return not self.image_prefixes or any(_under(image, p) for p in self.image_prefixes)

    def violations(self, job: FLJob) -> list[Problem]:
        """Every way ``job`` breaks this policy, each with its field path, the value and the rule."""
        spec = job.spec
        problems: list[Problem] = []
        templates: list[tuple[str, PodOverrides]] = [
            ("spec.server", spec.server), ("spec.trainer", spec.trainer),
            *((f"spec.clients[{i}]", site) for i, site in enumerate(spec.clients))]
        images = [("spec.server.image", spec.server.image), ("spec.sidecar.image", spec.sidecar.image),
                  ("spec.trainer.image", spec.trainer.image),
                  *((f"spec.clients[{i}].image", site.image) for i, site in enumerate(spec.clients)),
                  *((f"{path}.initContainers[{j}].image", init.image) for path, t in templates
                    for j, init in enumerate(t.init_containers or []))]
        for path, image in images:
            if image is not None and not self.allows_image(image):
                problems.append(Problem(
                    path, f"image {image!r} is outside the admin policy's allowedImagePrefixes "
                    f"{list(self.image_prefixes)}",
                    "use an image under one of those prefixes " + _FIX_ADMIN.format(key="allowedImagePrefixes")))
        for path, volumes in (("spec.server.volumes", spec.server.volumes),
                              ("spec.trainer.volumes", spec.trainer.volumes),
                              *((f"spec.clients[{i}].volumes", s.volumes) for i, s in enumerate(spec.clients))):
            for i, volume in enumerate(volumes):
                problems.extend(self._volume_problems(f"{path}[{i}]", volume))
        tolerations: list[tuple[str, Sequence[Toleration]]] = [
            ("spec.server.tolerations", spec.server.tolerations),
            ("spec.trainer.tolerations", spec.trainer.tolerations),
            *((f"spec.clients[{i}].tolerations", site.tolerations or []) for i, site in enumerate(spec.clients)),
        ]
        for path, tols in tolerations:
            for i, tol in enumerate(tols):
                if not any(rule.allows(tol) for rule in self.tolerations):
                    shown = json.dumps(tol.model_dump(by_alias=True, exclude_none=True), sort_keys=True)
                    rules = ", ".join(str(r) for r in self.tolerations) or "none"
                    problems.append(Problem(
                        f"{path}[{i}]", f"toleration {shown} is outside the admin policy's allowedTolerations "
                        f"({rules})",
                        "remove it " + _FIX_ADMIN.format(key="allowedTolerations")))
        for path, template in templates:
            account = template.service_account_name
            if account is not None and account not in self.service_accounts:
                problems.append(Problem(
                    f"{path}.serviceAccountName", f"service account {account!r} is outside the admin policy's "
                    f"allowedServiceAccounts {list(self.service_accounts)}",
                    "remove it (pods then run as the namespace's default account) "
                    + _FIX_ADMIN.format(key="allowedServiceAccounts")))
        return problems

    def _volume_problems(self, path: str, volume: Volume) -> list[Problem]:
        allowed = self.effective_volume_kinds
        source = volume.manifest()
        kinds = [k for k in source if k != "name"]
        problems = []
        for kind in kinds:
            if kind not in allowed:
                problems.append(Problem(
                    path, f"volume {volume.name!r} of kind {kind!r} is outside the admin policy's "
                    f"allowedVolumeKinds {list(allowed)}",
                    "use one of those kinds " + _FIX_ADMIN.format(key="allowedVolumeKinds")))
        # A projected volume carries ConfigMaps and Secrets too: it must not let in a kind the policy keeps out.
        for j, projection in enumerate((source.get("projected") or {}).get("sources") or []):
            for kind in projection:
                if kind in ("configMap", "secret") and kind not in allowed:
                    problems.append(Problem(
                        f"{path}.projected.sources[{j}]", f"volume {volume.name!r} projects a {kind!r}, a kind "
                        f"outside the admin policy's allowedVolumeKinds {list(allowed)}",
                        "remove that source " + _FIX_ADMIN.format(key="allowedVolumeKinds")))
        return problems

    def check(self, job: FLJob) -> None:
        """Raise :class:`SpecError` naming every violation; return quietly for a job within the policy."""
        problems = self.violations(job)
        if problems:
            raise SpecError(problems, source=f"FLJob {job.namespace}/{job.name} (admin policy)")


def _under(image: str, prefix: str) -> bool:
    # Whole components only: "registry.example.com/team" must not admit "registry.example.com/team-evil/x",
    # nor a bare host "registry.example.com" admit "registry.example.com.evil.io/x" or another port of it
    # ("registry.example.com:5000/x"); a one-word prefix ("python") still admits its tags ("python:3.12").
    if prefix.endswith(("/", ":", "@")):
        return image.startswith(prefix)
    if not image.startswith(prefix):
        return False
    rest = image[len(prefix):]
    if not rest or rest[0] == "/":
        return True
    return rest[0] in ":@" and ("/" in prefix or "/" not in rest)


# --- parsing ---------------------------------------------------------------------------------


def _strings(data: Mapping[str, Any], key: str) -> list[str]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise PolicyError(f"policy.{key} must be a list, got {type(value).__name__}; fix: write [] or a list")
    if len(value) > MAX_ENTRIES:
        raise PolicyError(f"policy.{key} has {len(value)} entries, more than {MAX_ENTRIES}; fix: shorten it")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item or len(item) > MAX_TEXT:
            raise PolicyError(f"policy.{key}[{i}] must be a non-empty string of at most {MAX_TEXT} characters, "
                              f"got {item!r}; fix: correct that entry")
        out.append(item)
    return out


def _volume_kinds(data: Mapping[str, Any]) -> tuple[str, ...]:
    kinds = _strings(data, "allowedVolumeKinds")
    for i, kind in enumerate(kinds):
        if kind in _NEVER:
            raise PolicyError(f"policy.allowedVolumeKinds[{i}] is {kind!r}, which fedkube never allows: "
                              f"{_NEVER[kind]}; fix: remove it")
        if kind in _NOT_YET:
            raise PolicyError(f"policy.allowedVolumeKinds[{i}] is {kind!r}, which the FLJob spec does not admit yet; "
                              "fix: remove it")
        if kind not in ALLOWED_VOLUME_KINDS:
            raise PolicyError(f"policy.allowedVolumeKinds[{i}] is {kind!r}, not a volume kind the FLJob spec knows; "
                              f"fix: use some of {list(ALLOWED_VOLUME_KINDS)}")
    return tuple(dict.fromkeys(kinds))


def _tolerations(data: Mapping[str, Any]) -> tuple[TolerationRule, ...]:
    value = data.get("allowedTolerations")
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_ENTRIES:
        raise PolicyError(f"policy.allowedTolerations must be a list of at most {MAX_ENTRIES} objects; "
                          "fix: write e.g. [{key: nvidia.com/gpu, effect: NoSchedule}]")
    rules = []
    for i, item in enumerate(value):
        where = f"policy.allowedTolerations[{i}]"
        if not isinstance(item, dict):
            raise PolicyError(f"{where} must be an object, got {item!r}; fix: write e.g. {{key: nvidia.com/gpu}}")
        unknown = sorted(set(item) - set(_TOLERATION_KEYS))
        if unknown:
            raise PolicyError(f"{where} has unknown fields {unknown}; fix: use only {list(_TOLERATION_KEYS)}")
        for name in _TOLERATION_KEYS:
            field = item.get(name)
            if field is not None and (not isinstance(field, str) or len(field) > MAX_TEXT):
                raise PolicyError(f"{where}.{name} must be a string, got {field!r}; fix: correct it or leave it out")
        if item.get("operator") not in (None, "Exists", "Equal"):
            raise PolicyError(f"{where}.operator must be Exists or Equal, got {item['operator']!r}")
        rules.append(TolerationRule(**{name: item.get(name) for name in _TOLERATION_KEYS}))
    return tuple(rules)


def parse_policy(data: Mapping[str, Any]) -> AdminPolicy:
    """The policy from the chart's ``policy:`` values; :class:`PolicyError` names the first malformed entry."""
    if not isinstance(data, Mapping):
        raise PolicyError(f"the admin policy must be an object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise PolicyError(f"unknown admin policy fields {unknown}; fix: use only {list(_KEYS)}")
    return AdminPolicy(
        image_prefixes=tuple(dict.fromkeys(_strings(data, "allowedImagePrefixes"))),
        volume_kinds=_volume_kinds(data),
        tolerations=_tolerations(data),
        service_accounts=tuple(dict.fromkeys(_strings(data, "allowedServiceAccounts"))),
    )


def policy_from_env(environ: Mapping[str, str]) -> AdminPolicy:
    """The policy in ``FEDKUBE_ADMIN_POLICY`` (JSON), or the safe default when it is unset or empty."""
    data = envvars.json_document(environ, ENV_POLICY, MAX_POLICY_BYTES, source="the values' policy:",
                                 error=PolicyError)
    return AdminPolicy() if data is None else parse_policy(data)
