"""Rules of an FLJob that span fields: errors for what cannot work, warnings for what probably will not.

Each check yields a :class:`Problem` naming the exact field path and the fix,
so a user sees every mistake in one pass (lesson 18, lesson 22).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator, Sequence
from decimal import InvalidOperation

from fedkube.spec import layout
from fedkube.spec.evaluation import check_evaluation
from fedkube.spec.model import (
    DNS1123_LABEL,
    LABEL_KEY,
    LABEL_VALUE,
    EnvVar,
    FLJob,
    Resources,
    Toleration,
    Volume,
    VolumeMount,
)
from fedkube.spec.podtemplate import mount_problems, override_problems, queue_problems
from fedkube.spec.privacy import affordable_rounds
from fedkube.spec.problems import Problem
from fedkube.spec.quantity import parse_quantity
from fedkube.spec.remote import remote_problems, remote_warnings
from fedkube.spec.revocation import revocation_warnings
from fedkube.spec.strategy import min_results, parameter_owners

_DNS_LABEL_RE = re.compile(DNS1123_LABEL)
_LABEL_KEY_RE = re.compile(LABEL_KEY)
_LABEL_VALUE_RE = re.compile(LABEL_VALUE)
# Resources the kubelet manages natively; anything else with a domain prefix is an extended resource (GPUs).
_NATIVE_PREFIXES = ("hugepages-", "kubernetes.io/", "requests.", "limits.")


def check_job(job: FLJob) -> tuple[list[Problem], list[Problem]]:
    """Cross-field rules: ``(errors, warnings)``. Errors make the job unrunnable; warnings are suspicious settings."""
    errors = [
        *_names(job),
        *_clients(job),
        *_strategy_and_model(job),
        *_containers(job),
        *_pod_templates(job),
        *_timeout_errors(job),
        *remote_problems(job.spec),
        *check_evaluation(job.spec.evaluation, [c.name for c in job.spec.clients]),
    ]
    return errors, [*_warnings(job), *remote_warnings(job.spec), *revocation_warnings(job.spec)]


def _names(job: FLJob) -> Iterator[Problem]:
    if len(job.metadata.name) > layout.MAX_JOB_NAME:
        yield Problem(
            "metadata.name",
            f"{job.metadata.name!r} has {len(job.metadata.name)} characters; the server Service "
            f"'{job.metadata.name}{layout.SERVER_SUFFIX}' would exceed Kubernetes' 63-character limit",
            f"use a name of at most {layout.MAX_JOB_NAME} characters",
        )
    yield from _labels("metadata.labels", job.metadata.labels)


def _labels(path: str, labels: dict[str, str]) -> Iterator[Problem]:
    for key, value in labels.items():
        if not _LABEL_KEY_RE.match(key) or len(key.split("/")[-1]) > 63:
            yield Problem(
                f"{path}[{key!r}]",
                f"{key!r} is not a valid label key",
                "use [prefix/]name with name ≤ 63 characters of letters, digits, '-', '_', '.'",
            )
        if len(value) > 63 or not _LABEL_VALUE_RE.match(value):
            yield Problem(
                f"{path}[{key!r}]",
                f"{value!r} is not a valid label value",
                "use at most 63 letters, digits, '-', '_', '.', starting and ending with a letter or digit",
            )


def _clients(job: FLJob) -> Iterator[Problem]:
    spec = job.spec
    first_seen: dict[str, int] = {}
    for i, site in enumerate(spec.clients):
        if site.name in first_seen:
            yield Problem(
                f"spec.clients[{i}].name",
                f"site {site.name!r} is listed twice (also spec.clients[{first_seen[site.name]}])",
                "give every client site a unique name",
            )
        else:
            first_seen[site.name] = i
    if spec.min_clients is not None and spec.min_clients > len(spec.clients):
        yield Problem(
            "spec.minClients",
            f"minClients is {spec.min_clients} but only {len(spec.clients)} client site(s) are listed",
            f"set minClients to at most {len(spec.clients)}, or add client sites",
        )


def _strategy_and_model(job: FLJob) -> Iterator[Problem]:
    strategy, model = job.spec.strategy, job.spec.model
    for field, owners in parameter_owners().items():
        if getattr(strategy, field) is not None and strategy.name not in owners:
            alias = type(strategy).model_fields[field].alias or field
            also = f" (also of {', '.join(owners[1:])})" if owners[1:] else ""
            yield Problem(
                f"spec.strategy.{alias}",
                f"{alias} is a {owners[0]} parameter{also} but the strategy is {strategy.name}",
                f"remove it, or set spec.strategy.name to {' or '.join(owners)}",
            )
    yield from _robust_results(job)
    yield from _privacy_budget(job)
    if model.source == "file" and not model.path:
        yield Problem(
            "spec.model.path",
            "model source is 'file' but no path is given",
            "set spec.model.path to the weights file inside the server pod (mount it with server.volumes)",
        )
    if model.source == "firstClient" and model.path:
        yield Problem(
            "spec.model.path",
            "a path is given but the model source is 'firstClient', which ignores it",
            "remove spec.model.path, or set spec.model.source to file",
        )


def _robust_results(job: FLJob) -> Iterator[Problem]:
    # A robust strategy with too few results protects against nothing; the server fails such a round
    # (fedkube.server.robust), so a job whose clients can never deliver enough is an error.
    spec = job.spec
    need = min_results(spec.strategy)
    if len(spec.clients) < need:
        yield Problem(
            "spec.strategy.name",
            f"{spec.strategy.name} {_robust_terms(job)}needs at least {need} results per round, but only "
            f"{len(spec.clients)} client site(s) are listed; every round would fail",
            f"add client sites (at least {need}), or choose a strategy or parameters that need fewer",
        )


def _privacy_budget(job: FLJob) -> Iterator[Problem]:
    # A job whose budget runs out before its last round would stop with PrivacyBudgetExhausted (fedkube.server.dp).
    privacy, rounds = job.spec.strategy.privacy, job.spec.rounds
    k = affordable_rounds(privacy, rounds) if privacy is not None else None
    if privacy is not None and k is not None:
        yield Problem(
            "spec.strategy.privacy.noiseMultiplier",
            f"noiseMultiplier {privacy.noise_multiplier:g} spends targetEpsilon {privacy.target_epsilon:g} (delta "
            f"{privacy.target_delta:g}) in {k} of the {rounds} rounds; the job would stop with PrivacyBudgetExhausted",
            f"raise noiseMultiplier, remove it to derive it from the budget and spec.rounds, or set rounds to {k}",
        )


def _robust_terms(job: FLJob) -> str:
    s = job.spec.strategy
    if s.name == "trimmedmean":
        return f"with trimFraction={s.trim_fraction:g} "
    if s.name == "krum":
        return f"with byzantine={s.byzantine}, krumSelect={s.krum_select} "
    return ""


def _containers(job: FLJob) -> Iterator[Problem]:
    spec = job.spec
    server, trainer = spec.server, spec.trainer
    yield from _image("spec.server.image", server.image or "")
    yield from _image("spec.trainer.image", trainer.image)
    yield from _image("spec.sidecar.image", spec.sidecar.image or "")
    yield from _command("spec.server.command", server.command)
    yield from _command("spec.trainer.command", trainer.command)
    if trainer.working_dir is not None and not posixpath.isabs(trainer.working_dir):
        yield Problem(
            "spec.trainer.workingDir",
            f"{trainer.working_dir!r} is not an absolute path",
            "use an absolute path inside the trainer image, e.g. /app",
        )
    yield from _env("spec.server.env", server.env)
    yield from _env("spec.trainer.env", trainer.env)
    yield from _resources("spec.server.resources", server.resources)
    yield from _resources("spec.trainer.resources", trainer.resources)
    yield from _resources("spec.sidecar.resources", spec.sidecar.resources)
    yield from _labels("spec.server.nodeSelector", server.node_selector)
    yield from _labels("spec.trainer.nodeSelector", trainer.node_selector)
    yield from _tolerations("spec.server.tolerations", server.tolerations)
    yield from _tolerations("spec.trainer.tolerations", trainer.tolerations)
    yield from _volumes("spec.server", server.volumes, server.volume_mounts)
    yield from _volumes("spec.trainer", trainer.volumes, trainer.volume_mounts)
    if _cmp(server.checkpoint.storage_size, "0") <= 0:
        yield Problem(
            "spec.server.checkpoint.storageSize",
            f"{server.checkpoint.storage_size!r} is not a positive size",
            "use a size like 1Gi",
        )
    for i, site in enumerate(spec.clients):
        base = f"spec.clients[{i}]"
        yield from _env(f"{base}.env", site.env)
        yield from _resources(f"{base}.resources", merge_resources(trainer.resources, site.resources))
        yield from _labels(f"{base}.nodeSelector", site.node_selector)
        if site.tolerations is not None:
            yield from _tolerations(f"{base}.tolerations", site.tolerations)


def _pod_templates(job: FLJob) -> Iterator[Problem]:
    """The pod-template fields (fedkube.spec.podtemplate): init containers, per-site volumes, image and queue."""
    spec, roots = job.spec, layout.RESERVED_MOUNT_ROOTS
    trainer_volumes = {v.name for v in spec.trainer.volumes}
    yield from override_problems("spec.server", spec.server, {v.name for v in spec.server.volumes}, roots)
    yield from override_problems("spec.trainer", spec.trainer, trainer_volumes, roots)
    for i, site in enumerate(spec.clients):
        base = f"spec.clients[{i}]"
        volumes = trainer_volumes | {v.name for v in site.volumes}
        if site.image is not None:
            yield from _image(f"{base}.image", site.image)
        yield from _volumes(base, site.volumes, [])
        yield from mount_problems(base, site.volume_mounts, volumes, roots)
        yield from override_problems(base, site, volumes, roots)
    yield from queue_problems(job.metadata.labels, spec.queue_name)


def merge_resources(base: Resources, override: Resources) -> Resources:
    """A site's resources: the trainer template's, with the site's values replacing them per resource name."""
    return Resources(requests={**base.requests, **override.requests}, limits={**base.limits, **override.limits})


def merge_env(base: Sequence[EnvVar], override: Sequence[EnvVar]) -> list[EnvVar]:
    """A site's env: the template's variables in order, the site's replacing same-named ones, new ones appended."""
    by_name = {e.name: e for e in override}
    merged = [by_name.pop(e.name, e) for e in base]
    return merged + [e for e in override if e.name in by_name]


def _image(path: str, image: str) -> Iterator[Problem]:
    if image != image.strip() or any(c.isspace() for c in image):
        yield Problem(path, f"{image!r} contains whitespace", "write the image reference without spaces")


def _command(path: str, command: Sequence[str]) -> Iterator[Problem]:
    if not command or not command[0].strip():
        yield Problem(path, "the command is empty", "give the program to run first, e.g. [python, train.py]")


def _env(path: str, env: Sequence[EnvVar]) -> Iterator[Problem]:
    seen: set[str] = set()
    for i, var in enumerate(env):
        where = f"{path}[{i}]"
        if var.name in layout.RESERVED_ENV:
            yield Problem(
                f"{where}.name",
                f"{var.name} is set by fedkube itself",
                "remove it; fedkube wires this variable for every pod",
            )
        if var.name in seen:
            yield Problem(f"{where}.name", f"{var.name} is set twice", "keep one entry per variable")
        seen.add(var.name)
        if var.value is not None and var.value_from is not None:
            yield Problem(where, "both value and valueFrom are set", "keep one of value or valueFrom")
        if var.value_from is not None:
            sources = var.value_from.model_dump(by_alias=True, exclude_none=True)
            if len(sources) != 1:
                yield Problem(
                    f"{where}.valueFrom",
                    f"valueFrom sets {len(sources)} sources ({', '.join(sorted(sources)) or 'none'})",
                    "set exactly one of fieldRef, resourceFieldRef, configMapKeyRef, secretKeyRef",
                )


def _is_extended(resource: str) -> bool:
    return "/" in resource and not resource.startswith(_NATIVE_PREFIXES)


def _resources(path: str, res: Resources) -> Iterator[Problem]:
    for name, text in (*res.requests.items(), *res.limits.items()):
        try:
            value = parse_quantity(text)
        except (ValueError, InvalidOperation):
            continue  # the field validator already rejected it
        if value < 0:
            yield Problem(f"{path}[{name!r}]", f"{name} is negative ({text})", "use a positive quantity")
        elif _is_extended(name) and value != value.to_integral_value():
            yield Problem(
                f"{path}.limits[{name!r}]",
                f"{name} is {text}; extended resources such as GPUs are whole numbers",
                "request a whole number, e.g. 1",
            )
    for name, text in res.requests.items():
        limit = res.limits.get(name)
        if _is_extended(name):
            if limit is None:
                yield Problem(
                    f"{path}.requests[{name!r}]",
                    f"{name} is requested but has no limit; Kubernetes needs extended resources under limits",
                    f"set resources.limits[{name!r}] (requests may then be left out)",
                )
            elif _cmp(text, limit) != 0:
                yield Problem(
                    f"{path}.requests[{name!r}]",
                    f"{name} request {text} differs from its limit {limit}",
                    "use the same value, or only set the limit",
                )
        elif limit is not None and _cmp(text, limit) > 0:
            yield Problem(
                f"{path}.requests[{name!r}]",
                f"{name} request {text} is larger than its limit {limit}",
                "lower the request or raise the limit",
            )


def _cmp(a: str, b: str) -> int:
    try:
        x, y = parse_quantity(a), parse_quantity(b)
    except (ValueError, InvalidOperation):
        return 0
    return (x > y) - (x < y)


def _tolerations(path: str, tolerations: Sequence[Toleration]) -> Iterator[Problem]:
    for i, tol in enumerate(tolerations):
        where = f"{path}[{i}]"
        if tol.operator == "Exists" and tol.value:
            yield Problem(f"{where}.value", "operator Exists takes no value", "remove value, or use operator Equal")
        if not tol.key and tol.operator != "Exists":
            yield Problem(
                f"{where}.operator",
                "an empty key matches all taints only with operator Exists",
                "set a key, or set operator to Exists",
            )
        if tol.toleration_seconds is not None and tol.effect != "NoExecute":
            yield Problem(
                f"{where}.tolerationSeconds",
                "tolerationSeconds only applies to effect NoExecute",
                "set effect to NoExecute, or remove tolerationSeconds",
            )


def _volumes(path: str, volumes: Sequence[Volume], mounts: Sequence[VolumeMount]) -> Iterator[Problem]:
    names: set[str] = set()
    for i, vol in enumerate(volumes):
        name = vol.name
        where = f"{path}.volumes[{i}]"
        if not _DNS_LABEL_RE.match(name) or len(name) > 63:
            yield Problem(
                f"{where}.name",
                f"volume name {name!r} is missing or not a DNS label",
                "name the volume with lower-case letters, digits and '-'",
            )
            continue
        if name.startswith(layout.RESERVED_VOLUME_PREFIX):
            yield Problem(
                f"{where}.name",
                f"volume names starting with {layout.RESERVED_VOLUME_PREFIX!r} are reserved for fedkube",
                "rename the volume",
            )
        if name in names:
            yield Problem(f"{where}.name", f"volume {name!r} is declared twice", "give each volume a unique name")
        names.add(name)
    paths: set[str] = set()
    for i, mount in enumerate(mounts):
        where = f"{path}.volumeMounts[{i}]"
        name, mount_path = mount.name, mount.mount_path
        if name not in names:
            yield Problem(
                f"{where}.name",
                f"volumeMount refers to volume {name!r}, which is not declared",
                f"declare it in {path}.volumes, or fix the name",
            )
        if not posixpath.isabs(mount_path):
            yield Problem(
                f"{where}.mountPath",
                f"mountPath {mount_path!r} is missing or not absolute",
                "give an absolute path such as /data",
            )
            continue
        norm = posixpath.normpath(mount_path)
        if any(norm == root or norm.startswith(root + "/") for root in layout.RESERVED_MOUNT_ROOTS):
            yield Problem(
                f"{where}.mountPath",
                f"{mount_path} is where fedkube mounts its own files",
                "mount somewhere else, e.g. /data",
            )
        if norm in paths:
            yield Problem(f"{where}.mountPath", f"two volumes are mounted at {mount_path}", "use distinct paths")
        paths.add(norm)


def _timeout_errors(job: FLJob) -> Iterator[Problem]:
    t, x = job.spec.timeouts, job.spec.transfer
    if x.idle_timeout_seconds < x.chunk_timeout_seconds:
        yield Problem(
            "spec.transfer.idleTimeoutSeconds",
            f"idleTimeoutSeconds ({x.idle_timeout_seconds:g}) is shorter than chunkTimeoutSeconds "
            f"({x.chunk_timeout_seconds:g}): a transfer is declared stalled before one chunk request may time out",
            f"set idleTimeoutSeconds ≥ chunkTimeoutSeconds (e.g. {4 * x.chunk_timeout_seconds:g})",
        )
    if t.round_seconds < x.idle_timeout_seconds:
        yield Problem(
            "spec.timeouts.roundSeconds",
            f"roundSeconds ({t.round_seconds:g}) is shorter than transfer.idleTimeoutSeconds "
            f"({x.idle_timeout_seconds:g}): rounds end before a stalled transfer can even be detected",
            "raise roundSeconds (to several idle timeouts) or lower transfer.idleTimeoutSeconds",
        )


def _warnings(job: FLJob) -> Iterator[Problem]:
    t, x = job.spec.timeouts, job.spec.transfer
    if job.spec.security.tls == "disabled":
        yield Problem(
            "spec.security.tls",
            "TLS is disabled: every site's token, the global model and each site's private update travel in "
            "plaintext, and the server is not authenticated, so anyone on the network path can read or alter them",
            "remove spec.security.tls (mutual TLS is the default); disable it only on a trusted test cluster",
        )
    need = min_results(job.spec.strategy)
    if job.spec.quorum < need <= len(job.spec.clients):
        yield Problem(
            "spec.minClients",
            f"minClients is {job.spec.quorum} but {job.spec.strategy.name} {_robust_terms(job)}needs at least "
            f"{need} results per round; a round that closes with fewer fails with a ConfigError rather than "
            "aggregate them",
            f"set minClients to at least {need}",
        )
    if job.spec.suspend and not job.spec.server.checkpoint.enabled:
        yield Problem(
            "spec.server.checkpoint.enabled",
            "the job is suspended but checkpoints live in the server pod's emptyDir, which suspending deletes; "
            "resuming starts again from round 1",
            "set spec.server.checkpoint.enabled: true to keep progress across suspend/resume",
        )
    if t.deploy_seconds < t.pending_seconds:
        yield Problem(
            "spec.timeouts.pendingSeconds",
            f"pendingSeconds ({t.pending_seconds:g}) exceeds deploySeconds ({t.deploy_seconds:g}), so a pending pod "
            "always fails as DeployTimeout and PendingTimeout (with the scheduler's reason) never shows",
            "set pendingSeconds below deploySeconds",
        )
    if t.heartbeat_seconds >= t.round_seconds:
        yield Problem(
            "spec.timeouts.heartbeatSeconds",
            f"heartbeatSeconds ({t.heartbeat_seconds:g}) is not shorter than roundSeconds ({t.round_seconds:g}); "
            "a lost client is only noticed at the round deadline",
            "use a heartbeat timeout well below the round time",
        )
    budget = x.chunk_timeout_seconds * x.max_attempts
    if budget > t.round_seconds:
        yield Problem(
            "spec.transfer.maxAttempts",
            f"{x.max_attempts} attempts * chunkTimeoutSeconds {x.chunk_timeout_seconds:g} = {budget:g}s exceeds "
            f"roundSeconds ({t.round_seconds:g}); the last retries can never happen",
            "lower maxAttempts or chunkTimeoutSeconds, or raise roundSeconds",
        )
