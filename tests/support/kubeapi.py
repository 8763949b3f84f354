"""An emulated Kubernetes API server for tests: kmock's HTTP layer plus API-server semantics.

kmock 0.8 serves requests on a localhost port and lets a test inject reactions
(``api.handler['post /api/v1/namespaces/default/pods'] << 500``), but its
built-in ``KubernetesEmulator`` is too loose for kopf, the official client and
kubectl: no uid/resourceVersion on create, 200 instead of 201, no PUT, no 409s,
no 422 on a failed JSON-patch ``test``, no status subresource, no selectors, no
watch resumption, no garbage collection, no CRD registration. This module keeps
kmock's server and reaction DSL (user reactions still win) and answers
everything else like an API server would:

* objects get uid, resourceVersion (one global counter), creationTimestamp,
  generation and namespace; create answers 201, an existing name 409
  AlreadyExists, a stale resourceVersion on PUT/PATCH 409 Conflict;
* merge, strategic-merge (approximate) and JSON patches; a failed ``test`` is
  422; the status subresource is separate from the main resource where the
  type declares one; an update that changes nothing is a no-op;
* list/watch with labelSelector and fieldSelector; watch resumes from a
  resourceVersion (410 Expired when too old), honours timeoutSeconds and
  sendInitialEvents, and turns selector transitions into ADDED/DELETED;
* finalizers and deletionTimestamp; ownerReference garbage collection in the
  background style (dependents go when their last owner goes); deleting a
  namespace or a CRD deletes what it holds;
* discovery for built-in types and for every CRD POSTed, with Established and
  NamesAccepted conditions on the CRD.

Admission is a test's hook (``KubeAPI.admission``). Not emulated: schema validation, CEL rules,
defaulting, server-side apply, Table output, graceful pod deletion (pods go at once; a test kubelet sees DELETED), RBAC.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import re
import secrets
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import aiohttp.web
import attrs
import kmock
from kmock._internal import parsing as kmock_parsing

from tests.support import patching

logger = logging.getLogger(__name__)

SERVER_VERSION = {"major": "1", "minor": "35", "gitVersion": "v1.35.0-fedkube-emulated", "platform": "linux/amd64"}
ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_LABEL_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclasses.dataclass(frozen=True)
class ResourceType:
    """One API resource as discovery describes it."""

    group: str
    versions: tuple[str, ...]
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    status_subresource: bool = False
    # "name" for most types; Services use the stricter DNS label rule.
    name_rule: str = "subdomain"

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    def api_version(self, version: str | None = None) -> str:
        v = version or self.versions[0]
        return f"{self.group}/{v}" if self.group else v

    @property
    def qualified(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


BUILTIN_TYPES: tuple[ResourceType, ...] = (
    ResourceType("", ("v1",), "namespaces", "Namespace", False, "namespace", ("ns",), (), True),
    ResourceType("", ("v1",), "pods", "Pod", True, "pod", ("po",), ("all",), True),
    ResourceType("", ("v1",), "services", "Service", True, "service", ("svc",), ("all",), True, "label"),
    ResourceType("", ("v1",), "secrets", "Secret", True, "secret"),
    ResourceType("", ("v1",), "configmaps", "ConfigMap", True, "configmap", ("cm",)),
    ResourceType("", ("v1",), "persistentvolumeclaims", "PersistentVolumeClaim", True, "persistentvolumeclaim",
                 ("pvc",), (), True),
    ResourceType("", ("v1",), "events", "Event", True, "event", ("ev",)),
    ResourceType("", ("v1",), "serviceaccounts", "ServiceAccount", True, "serviceaccount", ("sa",)),
    ResourceType("networking.k8s.io", ("v1",), "networkpolicies", "NetworkPolicy", True, "networkpolicy",
                 ("netpol",)),
    ResourceType("policy", ("v1",), "poddisruptionbudgets", "PodDisruptionBudget", True, "poddisruptionbudget",
                 ("pdb",), (), True),
    ResourceType("apps", ("v1",), "deployments", "Deployment", True, "deployment", ("deploy",), ("all",), True),
    ResourceType("rbac.authorization.k8s.io", ("v1",), "roles", "Role", True, "role"),
    ResourceType("rbac.authorization.k8s.io", ("v1",), "rolebindings", "RoleBinding", True, "rolebinding"),
    ResourceType("rbac.authorization.k8s.io", ("v1",), "clusterroles", "ClusterRole", False, "clusterrole"),
    ResourceType("rbac.authorization.k8s.io", ("v1",), "clusterrolebindings", "ClusterRoleBinding", False,
                 "clusterrolebinding"),
    ResourceType("apiextensions.k8s.io", ("v1",), "customresourcedefinitions", "CustomResourceDefinition", False,
                 "customresourcedefinition", ("crd", "crds"), ("api-extensions",), True),
)
CRD_KEY = ("apiextensions.k8s.io", "customresourcedefinitions")
NAMESPACE_KEY = ("", "namespaces")


class ApiError(Exception):
    """An API error answered as a ``Status`` object."""

    def __init__(self, code: int, reason: str, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, dict(details or {})

    def status(self) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message,
                "reason": self.reason, "details": self.details, "code": self.code}


def _not_found(t: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{t.qualified} "{name}" not found',
                    {"name": name, "group": t.group, "kind": t.plural})


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# kmock 0.8's URL parser raises on a path ending in "/namespaces" (e.g. listing namespaces), before any
# handler runs, so such requests would always get a 500. Its result is only used for kmock's own
# reaction filters (this module routes by the raw path), so fall back to a parse without a namespace.
_kmock_parse_path = kmock_parsing.parse_path


def _parse_path_safely(path: str) -> Any:
    try:
        return _kmock_parse_path(path)
    except ValueError:
        parts = path.strip("/").split("/")
        group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
        return kmock_parsing.ParsedPath(group=group, version=version, plural=parts[-1])


if getattr(kmock_parsing.parse_path, "__name__", "") != "_parse_path_safely":
    kmock_parsing.parse_path = _parse_path_safely


# --- selectors ------------------------------------------------------------------

_REQ_RE = re.compile(
    r"^\s*(!?)\s*([A-Za-z0-9./_-]+)\s*(?:(==|=|!=)\s*([A-Za-z0-9._-]*)|\s+(in|notin)\s*\(([^)]*)\))?\s*$")


def parse_label_selector(text: str) -> Callable[[Mapping[str, str]], bool]:
    """Compile a label selector (``a=b,c!=d,e in (f,g),!h``) into a predicate on labels."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    # (key, operator, allowed values); operators: exists, absent, in, notin
    reqs: list[tuple[str, str, frozenset[str]]] = []
    for part in (p for p in parts if p.strip()):
        m = _REQ_RE.match(part)
        if m is None:
            raise ApiError(400, "BadRequest",
                           f"unable to parse requirement {part.strip()!r} in labelSelector {text!r}")
        neg, key, op, value, set_op, values = m.groups()
        if neg and (op or set_op):
            raise ApiError(400, "BadRequest", f"'!' cannot combine with an operator in {part.strip()!r}")
        if neg:
            reqs.append((key, "absent", frozenset()))
        elif op:
            reqs.append((key, "notin" if op == "!=" else "in", frozenset([value])))
        elif set_op:
            reqs.append((key, set_op, frozenset(v.strip() for v in values.split(",") if v.strip())))
        else:
            reqs.append((key, "exists", frozenset()))

    def match(labels: Mapping[str, str]) -> bool:
        for key, op, allowed in reqs:
            ok = {"absent": key not in labels, "exists": key in labels,
                  "in": labels.get(key) in allowed, "notin": labels.get(key) not in allowed}[op]
            if not ok:
                return False
        return True
    return match


def parse_field_selector(text: str) -> Callable[[Mapping[str, Any]], bool]:
    """Compile a field selector (``metadata.name=x,status.phase!=Running``) into a predicate on objects."""
    reqs: list[tuple[list[str], bool, str]] = []  # (path, equal?, value)
    for part in (p.strip() for p in text.split(",") if p.strip()):
        m = re.match(r"^([A-Za-z0-9._/-]+)\s*(==|=|!=)\s*(.*)$", part)
        if m is None:
            raise ApiError(400, "BadRequest", f"invalid field selector requirement {part!r} in {text!r}")
        path, op, value = m.groups()
        reqs.append((path.split("."), op != "!=", value))

    def field(obj: Mapping[str, Any], path: list[str]) -> str:
        node: Any = obj
        for token in path:
            node = node.get(token) if isinstance(node, Mapping) else None
        return "" if node is None else str(node)

    return lambda obj: all((field(obj, path) == value) == equal for path, equal, value in reqs)


# --- the API server ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Change:
    rv: int
    type_key: tuple[str, str]
    event: str  # ADDED | MODIFIED | DELETED
    obj: dict[str, Any]
    prev: dict[str, Any] | None


@dataclasses.dataclass(frozen=True)
class _Target:
    type: ResourceType
    version: str
    namespace: str | None
    name: str | None
    subresource: str | None


@attrs.define(kw_only=True)
class _Handler(kmock.RawHandler):
    """kmock's handler: reactions a test declared come first, then the emulated API."""

    backend: Any = None

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        content_type = raw_request.headers.get("Content-Type", "")
        if "protobuf" in content_type or "cbor" in content_type:
            # Typed client-go clients (kubectl create, helm's release storage) send protobuf bodies;
            # kmock cannot even parse them as text. Refuse them the way an API server refuses a
            # media type it does not serve, rather than failing inside kmock.
            error = ApiError(415, "UnsupportedMediaType",
                             f"the emulated API server only accepts JSON bodies, not {content_type!r}: use "
                             "kubectl apply (not kubectl create/replace) or a JSON client")
            return aiohttp.web.json_response(error.status(), status=415)
        return await super().__call__(raw_request)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if self._payloads:
            with contextlib.suppress(NotImplementedError):  # no declared reaction matched
                return await super()._handle(request)
        try:
            return cast(aiohttp.web.StreamResponse, await self.backend.serve(request))
        except ApiError as e:
            return aiohttp.web.json_response(e.status(), status=e.code)

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        # Only bugs of the emulator (or of a declared reaction) get here; they stay in self.errors.
        body = ApiError(500, "InternalError", f"emulated API server bug: {exc!r}",
                        {"traceback": traceback.format_exception(exc)}).status()
        return aiohttp.web.json_response(body, status=500)


class KubeAPI:
    """The emulated API server's state and request handling (runs on one event loop)."""

    def __init__(self, *, history: int = 20000) -> None:
        self.handler = _Handler(backend=self)
        self._types: dict[tuple[str, str], ResourceType] = {t.key: t for t in BUILTIN_TYPES}
        self._builtin = set(self._types)
        self._objects: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        # The change log watches replay from; entry i has resourceVersion _history[0].rv + i.
        self._history: list[_Change] = []
        self._history_limit = history
        self._rv = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._ips = 0
        self._node_ports = 0
        # Admission, as quota, PodSecurity or a webhook: called with (kind, object) before a create is stored; it
        # refuses by raising ApiError (the Status body a real API server would answer). Set it through call().
        self.admission: Callable[[str, dict[str, Any]], None] | None = None
        for ns in ("default", "kube-system", "kube-public"):
            self._create(self._types[NAMESPACE_KEY], None, {"metadata": {"name": ns}}, "v1")

    # -- introspection for tests (call on the API's loop) -------------------------------------------
    def objects(self, plural: str, group: str = "", namespace: str | None = None) -> list[dict[str, Any]]:
        """Deep copies of the stored objects of one type (optionally one namespace)."""
        return [copy.deepcopy(o) for (g, p, ns, _), o in sorted(self._objects.items())
                if (g, p) == (group, plural) and (namespace is None or ns == namespace)]

    def close(self) -> None:
        """End every watch stream (used at shutdown)."""
        self._closing = True
        self._wake()

    # -- change log ---------------------------------------------------------------------------------
    def _wake(self) -> None:
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    def _commit(self, t: ResourceType, event: str, obj: dict[str, Any], prev: dict[str, Any] | None) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        key = self._key(t, obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if event == "DELETED":
            self._objects.pop(key, None)
        else:
            self._objects[key] = obj
        self._history.append(_Change(self._rv, t.key, event, copy.deepcopy(obj), prev))
        if len(self._history) > 2 * self._history_limit:  # compact in batches, like etcd
            del self._history[:len(self._history) - self._history_limit]
        self._wake()

    def _changes_after(self, rv: int) -> list[_Change]:
        if not self._history:
            return []
        return self._history[max(0, rv + 1 - self._history[0].rv):]

    def compact(self, keep: int) -> None:
        """Forget all but the last ``keep`` changes (watches from before them get 410 Expired)."""
        del self._history[:max(0, len(self._history) - keep)]

    @staticmethod
    def _key(t: ResourceType, namespace: str | None, name: str) -> tuple[str, str, str, str]:
        return (t.group, t.plural, namespace or "", name)

    # -- routing ------------------------------------------------------------------------------------
    async def serve(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        path = request.url.path.rstrip("/") or "/"
        method = str(request.method.value).upper()
        params = dict(request.params)
        if method == "GET":
            static = self._static(path)
            if static is not None:
                return static
        target = self._route(path)
        if target is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({method} {path})")
        return await self._dispatch(request, method, params, target)

    def _static(self, path: str) -> aiohttp.web.StreamResponse | None:
        if path in ("/healthz", "/livez", "/readyz"):
            return aiohttp.web.Response(text="ok")
        if path == "/version":
            return aiohttp.web.json_response(SERVER_VERSION)
        if path == "/api":
            return aiohttp.web.json_response({"kind": "APIVersions", "versions": ["v1"],
                                              "serverAddressByClientCIDRs": []})
        if path == "/apis":
            return aiohttp.web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": self._groups()})
        parts = path.strip("/").split("/")
        if parts == ["api", "v1"]:
            return aiohttp.web.json_response(self._resource_list("", "v1"))
        if parts[0] == "apis" and len(parts) == 2:
            group = next((g for g in self._groups() if g["name"] == parts[1]), None)
            if group is None:
                raise ApiError(404, "NotFound", f"the server could not find the requested resource (group {parts[1]})")
            return aiohttp.web.json_response({"kind": "APIGroup", "apiVersion": "v1", **group})
        if parts[0] == "apis" and len(parts) == 3:
            listing = self._resource_list(parts[1], parts[2])
            if not listing["resources"]:
                raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
            return aiohttp.web.json_response(listing)
        if parts[0] == "openapi":
            raise ApiError(404, "NotFound", "OpenAPI is not emulated; run kubectl with --validate=false")
        return None

    def _groups(self) -> list[dict[str, Any]]:
        versions: dict[str, list[str]] = {}
        for t in self._types.values():
            if t.group:
                versions.setdefault(t.group, [])
                versions[t.group] += [v for v in t.versions if v not in versions[t.group]]
        return [{"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                 "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}}
                for g, vs in sorted(versions.items())]

    def _resource_list(self, group: str, version: str) -> dict[str, Any]:
        resources: list[dict[str, Any]] = []
        for t in sorted(self._types.values(), key=lambda t: t.plural):
            if t.group != group or version not in t.versions:
                continue
            resources.append({"name": t.plural, "singularName": t.singular or t.kind.lower(),
                              "namespaced": t.namespaced,
                              "kind": t.kind, "verbs": ALL_VERBS, "shortNames": list(t.short_names),
                              "categories": list(t.categories)})
            if t.status_subresource:
                resources.append({"name": f"{t.plural}/status", "singularName": "", "namespaced": t.namespaced,
                                  "kind": t.kind, "verbs": ["get", "patch", "update"]})
        group_version = f"{group}/{version}" if group else version
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}

    def _route(self, path: str) -> _Target | None:
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 3:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        namespace = None
        # /namespaces/{ns}/{plural}/... addresses a namespaced object, unless {plural} is no resource
        # (then it is the namespace itself, e.g. /api/v1/namespaces/{ns}/status).
        if rest[0] == "namespaces" and len(rest) >= 3 and (group, rest[2]) in self._types:
            namespace, rest = rest[1], rest[2:]
        t = self._types.get((group, rest[0]))
        if t is None or version not in t.versions or len(rest) > 3:
            return None
        name = rest[1] if len(rest) >= 2 else None
        sub = rest[2] if len(rest) == 3 else None
        if sub is not None and not (sub == "status" and t.status_subresource):
            return None
        if not t.namespaced and namespace is not None:
            return None
        return _Target(t, version, namespace, name, sub)

    async def _dispatch(self, request: kmock.Request, method: str, params: dict[str, str],
                        target: _Target) -> aiohttp.web.StreamResponse:
        t, ns, name = target.type, target.namespace, target.name
        dry_run = "dryRun" in params
        if method == "GET" and params.get("watch", "").lower() in ("true", "1"):
            return await self._watch(request, target, params)
        if method == "GET" and name is None:
            return self._json(self._list(target, params))
        if method == "GET" and name is not None:
            return self._json(self._out(self._get(t, ns, name), target.version))
        if method == "POST" and name is None:
            if t.namespaced and ns is None:
                raise ApiError(405, "MethodNotAllowed", f"create {t.plural} needs a namespace in the URL")
            return self._json(self._out(self._create(t, ns, request.data, target.version, dry_run=dry_run),
                                        target.version), status=201)
        if method == "PUT" and name is not None:
            obj = self._replace(target, request.data, dry_run=dry_run)
            return self._json(self._out(obj, target.version))
        if method == "PATCH" and name is not None:
            headers = {k.lower(): v for k, v in request.headers.items()}
            content_type = headers.get("content-type", "").split(";")[0].strip()
            obj = self._patch(target, content_type, request.data, request.text, dry_run=dry_run)
            return self._json(self._out(obj, target.version))
        if method == "DELETE" and name is not None:
            options = request.data if isinstance(request.data, dict) else {}
            options = {**options, **{k: v for k, v in params.items() if k == "propagationPolicy"}}
            return self._json(self._out(self._delete(t, ns, name, options, dry_run=dry_run), target.version))
        if method == "DELETE" and name is None:
            options = request.data if isinstance(request.data, dict) else {}
            for obj in self._select(target, params):
                self._delete(t, obj["metadata"].get("namespace"), obj["metadata"]["name"], options, dry_run=dry_run)
            return self._json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"})
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {request.url.path}")

    @staticmethod
    def _json(body: Any, status: int = 200) -> aiohttp.web.StreamResponse:
        return aiohttp.web.json_response(body, status=status)

    @staticmethod
    def _out(obj: dict[str, Any], version: str) -> dict[str, Any]:
        group = obj.get("apiVersion", "").rpartition("/")[0]
        return {**obj, "apiVersion": f"{group}/{version}" if group else version}

    # -- reads --------------------------------------------------------------------------------------
    def _get(self, t: ResourceType, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self._objects.get(self._key(t, namespace, name))
        if obj is None:
            raise _not_found(t, name)
        return obj

    def _matcher(self, target: _Target, params: Mapping[str, str]) -> Callable[[Mapping[str, Any]], bool]:
        labels = parse_label_selector(params.get("labelSelector", ""))
        fields = parse_field_selector(params.get("fieldSelector", ""))

        def match(obj: Mapping[str, Any]) -> bool:
            meta = obj.get("metadata", {})
            return ((target.namespace is None or meta.get("namespace") == target.namespace)
                    and (target.name is None or meta.get("name") == target.name)
                    and labels(meta.get("labels") or {}) and fields(obj))
        return match

    def _select(self, target: _Target, params: Mapping[str, str]) -> list[dict[str, Any]]:
        match = self._matcher(target, params)
        return [o for (g, p, _, _), o in sorted(self._objects.items()) if (g, p) == target.type.key and match(o)]

    def _list(self, target: _Target, params: Mapping[str, str]) -> dict[str, Any]:
        t = target.type
        return {"kind": f"{t.kind}List", "apiVersion": t.api_version(target.version),
                "metadata": {"resourceVersion": str(self._rv)},
                "items": [self._out(o, target.version) for o in self._select(target, params)]}

    async def _watch(self, request: kmock.Request, target: _Target,
                     params: Mapping[str, str]) -> aiohttp.web.StreamResponse:
        match = self._matcher(target, params)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        since = params.get("resourceVersion", "")
        initial = params.get("sendInitialEvents") == "true"
        if since not in ("", "0") and not since.isdigit():
            raise ApiError(400, "BadRequest", f"invalid resourceVersion {since!r}: it must be a number")
        raw = request._raw_request
        if raw is None:
            raise ApiError(500, "InternalError", "a watch needs the HTTP request to stream on")
        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(raw)

        async def send(event: str, obj: Mapping[str, Any]) -> None:
            await response.write(json.dumps({"type": event, "object": obj}).encode() + b"\n")

        try:
            if since in ("", "0") or initial:
                cursor = self._rv
                for obj in self._select(target, params):
                    await send("ADDED", self._out(obj, target.version))
                if initial:
                    await send("BOOKMARK", {"kind": target.type.kind,
                                            "apiVersion": target.type.api_version(target.version),
                                            "metadata": {"resourceVersion": str(cursor),
                                                         "annotations": {"k8s.io/initial-events-end": "true"}}})
            else:
                cursor = int(since)
                oldest = self._history[0].rv if self._history else self._rv + 1
                if cursor < oldest - 1 and cursor < self._rv:
                    await send("ERROR", ApiError(410, "Expired", f"too old resource version: {cursor} ({oldest - 1})")
                               .status())
                    await response.write_eof()
                    return response
            while not self._closing:
                wakeup = self._wakeup
                for change in self._changes_after(cursor):
                    cursor = change.rv
                    if change.type_key != target.type.key:
                        continue
                    now = change.event != "DELETED" and match(change.obj)
                    before = change.prev is not None and match(change.prev)
                    if change.event == "DELETED" and match(change.obj):
                        await send("DELETED", self._out(change.obj, target.version))
                    elif now and before:
                        await send("MODIFIED", self._out(change.obj, target.version))
                    elif now:
                        await send("ADDED", self._out(change.obj, target.version))
                    elif before:  # left the selection: a real API server reports it as deleted
                        await send("DELETED", self._out(change.obj, target.version))
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    break
                transport = raw.transport
                if transport is None or transport.is_closing():
                    break  # the client went away; nothing else ends an idle stream
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), timeout=min(1.0, remaining if remaining is not None else 1.0))
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            logger.debug("watch client of %s went away", target.type.qualified)
        return response

    # -- writes -------------------------------------------------------------------------------------
    def _create(self, t: ResourceType, namespace: str | None, body: Any, version: str, *,
                dry_run: bool = False) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", f"the body of a create of {t.qualified} must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        if t.namespaced:
            if meta.get("namespace") and namespace and meta["namespace"] != namespace:
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the namespace "
                                                  f"sent on the request ({meta['namespace']!r} vs {namespace!r})")
            namespace = namespace or meta.get("namespace")
            if self._objects.get(self._key(self._types[NAMESPACE_KEY], None, namespace or "")) is None:
                raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                               {"name": namespace, "kind": "namespaces"})
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise self._invalid(t, "", "metadata.name", "name or generateName is required")
            meta["name"] = meta["generateName"] + "".join(secrets.choice("bcdfghjklmnpqrstvwxz2456789")
                                                          for _ in range(5))
        self._validate_name(t, meta["name"])
        if self._key(t, namespace, meta["name"]) in self._objects:
            raise ApiError(409, "AlreadyExists", f'{t.qualified} "{meta["name"]}" already exists',
                           {"name": meta["name"], "group": t.group, "kind": t.plural})
        obj["apiVersion"], obj["kind"] = t.api_version(version), t.kind
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion"):
            meta.pop(field, None)
        # Status is the controllers' to write, never the creator's. A PVC is Bound at once, as with
        # an immediate-binding provisioner.
        if t.status_subresource:
            obj["status"] = {"Pod": {"phase": "Pending"}, "Namespace": {"phase": "Active"},
                             "PersistentVolumeClaim": {"phase": "Bound"}}.get(t.kind, {})
        self._type_hooks(t, obj, None)
        if self.admission is not None:
            self.admission(t.kind, obj)
        if dry_run:
            return obj
        self._commit(t, "ADDED", obj, None)
        owners = [ref.get("uid") for ref in meta.get("ownerReferences") or []]
        if owners and not any(self._by_uid(uid) for uid in owners):
            # The garbage collector removes dependents whose owners are all gone.
            self._remove(t, obj, "Background")
        return obj

    def _invalid(self, t: ResourceType, name: str, field: str, why: str) -> ApiError:
        return ApiError(422, "Invalid", f'{t.kind} "{name}" is invalid: {field}: {why}',
                        {"name": name, "group": t.group, "kind": t.kind,
                         "causes": [{"reason": "FieldValueInvalid", "message": why, "field": field}]})

    def _validate_name(self, t: ResourceType, name: str) -> None:
        rule, limit = (_LABEL_NAME_RE, 63) if t.name_rule == "label" or t.kind == "Namespace" else (_NAME_RE, 253)
        if not isinstance(name, str) or len(name) > limit or not rule.match(name):
            raise self._invalid(t, str(name), "metadata.name",
                                f"Invalid value {name!r}: a lowercase RFC 1123 name must consist of lower case "
                                f"alphanumeric characters, '-' or '.', start and end with one, at most {limit} long")

    def _type_hooks(self, t: ResourceType, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        """What a real API server (or its built-in controllers) derives on write."""
        if t.kind == "Secret" and isinstance(obj.get("stringData"), dict):
            data = obj.setdefault("data", {})
            for k, v in obj.pop("stringData").items():
                data[k] = base64.b64encode(str(v).encode()).decode()
        if t.kind == "Service":
            spec = obj.setdefault("spec", {})
            if old is not None and old.get("spec", {}).get("clusterIP"):
                spec.setdefault("clusterIP", old["spec"]["clusterIP"])
            if not spec.get("clusterIP"):
                self._ips += 1
                spec["clusterIP"] = f"10.96.{self._ips // 250}.{self._ips % 250 + 1}"
            if spec.get("type") in ("NodePort", "LoadBalancer"):
                self._assign_node_ports(spec, old)
        if t.key == CRD_KEY:
            self._register_crd(obj)

    def _assign_node_ports(self, spec: dict[str, Any], old: dict[str, Any] | None) -> None:
        """A nodePort (30000-32767) for each port without one; an update keeps the ports' earlier ones, by name."""
        kept = {p.get("name"): p.get("nodePort") for p in ((old or {}).get("spec") or {}).get("ports") or []}
        for port in spec.get("ports") or []:
            if port.get("nodePort"):
                continue
            number = kept.get(port.get("name"))
            if not number:
                self._node_ports += 1
                number = 30000 + self._node_ports % 2768
            port["nodePort"] = number

    def _register_crd(self, crd: dict[str, Any]) -> None:
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        name = crd["metadata"]["name"]
        group, plural, kind = str(spec.get("group") or ""), str(names.get("plural") or ""), str(names.get("kind") or "")
        versions = [v for v in spec.get("versions") or [] if v.get("served", True)]
        crd_t = self._types[CRD_KEY]
        for field, value in (("spec.group", group), ("spec.names.plural", plural), ("spec.names.kind", kind),
                             ("spec.versions", versions)):
            if not value:
                raise self._invalid(crd_t, name, field, "Required value")
        if name != f"{plural}.{group}":
            raise self._invalid(crd_t, name, "metadata.name",
                                f"must be spec.names.plural+'.'+spec.group: {plural}.{group}")
        if (group, plural) in self._builtin:
            raise self._invalid(crd_t, name, "spec.group", f"{plural}.{group} is a built-in resource")
        t = ResourceType(
            group=group, plural=plural, kind=kind, versions=tuple(v["name"] for v in versions),
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            singular=str(names.get("singular") or kind.lower()),
            short_names=tuple(names.get("shortNames") or ()), categories=tuple(names.get("categories") or ()),
            status_subresource=any("status" in (v.get("subresources") or {}) for v in versions))
        self._types[t.key] = t
        now = _now()
        crd["status"] = {
            "acceptedNames": dict(names),
            "storedVersions": [v["name"] for v in versions if v.get("storage")] or [versions[0]["name"]],
            "conditions": [{"type": c, "status": "True", "reason": r, "message": m, "lastTransitionTime": now}
                           for c, r, m in (("NamesAccepted", "NoConflicts", "no conflicts found"),
                                           ("Established", "InitialNamesAccepted",
                                            "the initial names have been accepted"))],
        }

    def _replace(self, target: _Target, body: Any, *, dry_run: bool) -> dict[str, Any]:
        t, name = target.type, cast(str, target.name)
        old = self._get(t, target.namespace, name)
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of an update must be a JSON object")
        return self._update(target, old, copy.deepcopy(body), dry_run=dry_run)

    def _patch(self, target: _Target, content_type: str, data: Any, text: str, *, dry_run: bool) -> dict[str, Any]:
        t, name = target.type, cast(str, target.name)
        old = self._get(t, target.namespace, name)
        try:
            if content_type == "application/json-patch+json":
                new = patching.json_patch(old, data)
            elif content_type == "application/merge-patch+json":
                new = patching.merge_patch(old, self._object_body(data))
            elif content_type == "application/strategic-merge-patch+json":
                if t.group not in ("", "apps", "batch", "apiextensions.k8s.io"):
                    raise ApiError(415, "UnsupportedMediaType",
                                   "strategic merge patch is not supported for custom resources; use a merge patch")
                new = patching.strategic_merge_patch(old, self._object_body(data))
            elif content_type == "application/apply-patch+yaml":
                raise ApiError(415, "UnsupportedMediaType",
                               "server-side apply is not emulated; use client-side apply (kubectl apply without "
                               "--server-side) or a merge patch")
            else:
                raise ApiError(415, "UnsupportedMediaType", f"the patch content type {content_type!r} is not supported")
        except patching.PatchTestFailed as e:
            raise ApiError(422, "Invalid",
                           f"the server rejected our request due to an error in our request: {e}") from e
        except patching.PatchError as e:
            raise ApiError(422, "Invalid", f"the patch cannot be applied to {t.qualified} {name!r}: {e}") from e
        if not isinstance(new, dict):
            raise ApiError(422, "Invalid", f"the patch turned {t.qualified} {name!r} into a non-object")
        return self._update(target, old, new, dry_run=dry_run)

    @staticmethod
    def _object_body(data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise ApiError(400, "BadRequest", "the patch body must be a JSON object")
        return data

    def _update(self, target: _Target, old: dict[str, Any], new: dict[str, Any], *, dry_run: bool) -> dict[str, Any]:
        t, name = target.type, cast(str, target.name)
        new = copy.deepcopy(new)  # patch results share unpatched branches with the stored object
        new_meta = new.setdefault("metadata", {})
        if not isinstance(new_meta, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        if new_meta.get("name", name) != name:
            raise ApiError(400, "BadRequest", f"the name of the object ({new_meta.get('name')}) does not match "
                                              f"the name on the URL ({name})")
        sent_rv = new_meta.get("resourceVersion")
        if sent_rv not in (None, "") and str(sent_rv) != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {t.qualified} "{name}": the object has '
                                            "been modified; please apply your changes to the latest version and try "
                                            "again", {"name": name, "group": t.group, "kind": t.plural})
        if target.subresource == "status":
            result = copy.deepcopy(old)
            result["status"] = copy.deepcopy(new.get("status") or {})
        else:
            result = new
            meta = result["metadata"]
            for field in ("uid", "creationTimestamp", "namespace", "name", "deletionTimestamp",
                          "deletionGracePeriodSeconds", "generation"):
                if field in old["metadata"]:
                    meta[field] = old["metadata"][field]
                else:
                    meta.pop(field, None)
            result["apiVersion"], result["kind"] = old["apiVersion"], old["kind"]
            if t.status_subresource:
                if "status" in old:
                    result["status"] = copy.deepcopy(old["status"])
                else:
                    result.pop("status", None)
            spec_keys = (set(old) | set(result)) - {"metadata", "status", "apiVersion", "kind"}
            if any(old.get(k) != result.get(k) for k in spec_keys):
                meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
            self._type_hooks(t, result, old)
        result["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if result == old or dry_run:
            return result if dry_run else old  # a real API server does not bump anything for a no-op
        if result["metadata"].get("deletionTimestamp") and not result["metadata"].get("finalizers"):
            self._commit(t, "MODIFIED", result, copy.deepcopy(old))
            self._remove(t, result, "Background")
            return result
        self._commit(t, "MODIFIED", result, copy.deepcopy(old))
        return result

    def _delete(self, t: ResourceType, namespace: str | None, name: str, options: Mapping[str, Any], *,
                dry_run: bool = False) -> dict[str, Any]:
        obj = self._get(t, namespace, name)
        pre = options.get("preconditions") or {}
        for field in ("uid", "resourceVersion"):
            if pre.get(field) and pre[field] != obj["metadata"].get(field):
                raise ApiError(409, "Conflict", f'Precondition failed on {t.qualified} "{name}": {field} in '
                                                f'precondition: {pre[field]}, {field} in object meta: '
                                                f'{obj["metadata"].get(field)}')
        if dry_run:
            return obj
        policy = options.get("propagationPolicy") or ("Orphan" if options.get("orphanDependents") else "Background")
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                prev = copy.deepcopy(obj)
                updated = copy.deepcopy(obj)
                updated["metadata"].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
                self._commit(t, "MODIFIED", updated, prev)
                return updated
            return obj
        self._remove(t, obj, policy)
        return obj

    def _by_uid(self, uid: str | None) -> dict[str, Any] | None:
        return next((o for o in self._objects.values() if o["metadata"].get("uid") == uid), None)

    def _remove(self, t: ResourceType, obj: dict[str, Any], policy: str) -> None:
        """Delete for good, then do what the garbage collector and namespace/CRD controllers would."""
        self._commit(t, "DELETED", obj, None)
        meta = obj["metadata"]
        if t.key == CRD_KEY:
            spec = obj.get("spec") or {}
            gone = (str(spec.get("group")), str((spec.get("names") or {}).get("plural")))
            if gone in self._types and gone not in self._builtin:
                crt = self._types.pop(gone)
                for key in [k for k in self._objects if k[:2] == crt.key]:
                    self._commit(crt, "DELETED", self._objects[key], None)
        if t.key == NAMESPACE_KEY:
            for key in [k for k in self._objects if k[2] == meta["name"]]:
                if key in self._objects:
                    child = self._objects[key]
                    self._remove(self._types[(key[0], key[1])], child, "Background")
        uid = meta.get("uid")
        for key, child in list(self._objects.items()):
            refs = child["metadata"].get("ownerReferences") or []
            if key not in self._objects or not any(r.get("uid") == uid for r in refs):
                continue
            child_t = self._types[(key[0], key[1])]
            others = [r for r in refs if r.get("uid") != uid and self._by_uid(r.get("uid")) is not None]
            if policy == "Orphan" or others:
                updated = copy.deepcopy(child)
                updated["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != uid]
                self._commit(child_t, "MODIFIED", updated, copy.deepcopy(child))
            else:
                self._delete(child_t, key[2] or None, key[3], {"propagationPolicy": "Background"})


# --- running it --------------------------------------------------------------------------------------

class EmulatedCluster:
    """The emulated API server on a free localhost port, served from its own thread and event loop.

    Use as a context manager. ``url`` is the server address; ``api_client()``
    gives an official ``kubernetes`` client; ``kubeconfig(path)`` writes a
    kubeconfig for kubectl and helm; ``call(fn)`` runs ``fn(api)`` on the
    server's loop (for direct inspection of ``KubeAPI``); ``handler`` is the
    kmock handler, for fault injection with kmock's DSL.
    """

    def __init__(self, *, start_timeout: float = 10.0, history: int = 20000) -> None:
        self._start_timeout = start_timeout
        self._history = history
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self.api: KubeAPI | None = None
        self.url = ""

    def __enter__(self) -> EmulatedCluster:
        self._thread = threading.Thread(target=self._run, name="emulated-kube-api", daemon=True)
        self._thread.start()
        if not self._ready.wait(self._start_timeout):
            raise RuntimeError(f"the emulated Kubernetes API did not start within {self._start_timeout} s")
        if self._failure is not None:
            raise RuntimeError("the emulated Kubernetes API failed to start") from self._failure
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def handler(self) -> kmock.RawHandler:
        assert self.api is not None, "the cluster is not running"
        return self.api.handler

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:  # reported to the thread that waits in __enter__
            self._failure = e
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self.api = KubeAPI(history=self._history)
        async with self.api.handler, kmock.Server(self.api.handler) as server:
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()
            self.api.close()
            await asyncio.sleep(0.05)  # let open watch streams see the close and end cleanly

    def call(self, fn: Callable[[KubeAPI], Any], timeout: float = 10.0) -> Any:
        """Run ``fn(api)`` on the server's loop and return its result."""
        assert self._loop is not None and self.api is not None, "the cluster is not running"
        api = self.api

        async def run() -> Any:
            return fn(api)
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def errors(self) -> list[Exception]:
        """Exceptions the emulator raised while serving (its own bugs); empty when all is well."""
        return list(self.call(lambda api: api.handler.errors))

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"the emulated Kubernetes API did not stop within {timeout} s")

    def api_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` talking to this server."""
        import kubernetes

        config = kubernetes.client.Configuration()
        config.host = self.url
        return kubernetes.client.ApiClient(config)

    def kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """Write a kubeconfig for kubectl/helm pointing at this server; return its path."""
        import yaml

        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "emulated",
            "clusters": [{"name": "emulated", "cluster": {"server": self.url}}],
            "users": [{"name": "emulated", "user": {}}],
            "contexts": [{"name": "emulated",
                          "context": {"cluster": "emulated", "user": "emulated", "namespace": namespace}}],
        }
        path.write_text(yaml.safe_dump(config))
        return path


@contextlib.contextmanager
def emulated_cluster() -> Iterator[EmulatedCluster]:
    """Run an EmulatedCluster for the duration of the block."""
    with EmulatedCluster() as cluster:
        yield cluster
