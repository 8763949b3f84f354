"""Patch algorithms of the Kubernetes API, for the emulated API server.

JSON patch (RFC 6902), JSON merge patch (RFC 7386) and an approximation of
strategic merge patch: lists whose Kubernetes schema declares a merge key are
merged item by item on that key, every other list is replaced. The merge-key
table covers the fields that kubectl, kopf and fedkube's operator touch; it is
not the full schema.
"""

from __future__ import annotations

import copy
from typing import Any


class PatchError(ValueError):
    """A patch that cannot be applied (the API server answers 422)."""


class PatchTestFailed(PatchError):
    """A JSON-patch ``test`` operation did not match (422 in Kubernetes)."""


# field name -> the key that identifies an item of that list in strategic merge patch.
MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
    "conditions": "type",
    "containerStatuses": "name",
    "initContainerStatuses": "name",
    "ownerReferences": "uid",
    "tolerations": "key",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
}
# The same field name merges by another key under another parent: a ServiceSpec's
# ports merge by "port", a container's by "containerPort". Keyed (parent field, field).
PARENT_MERGE_KEYS: dict[tuple[str, str], str] = {
    ("spec", "ports"): "port",
}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: dicts merge recursively, ``null`` deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any, _parent: str = "") -> Any:
    """Strategic merge patch as kubectl sends it, with the directives it uses.

    ``$patch: replace|delete``, ``$retainKeys``, ``$setElementOrder/<field>`` and
    ``$deleteFromPrimitiveList/<field>`` are honoured; lists with a known merge
    key merge by that key; other lists replace.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if directive == "delete":
        return None
    result = dict(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key in ("$retainKeys", "$patch"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [v for v in result.get(field) or [] if v not in value]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and _merge_key(_parent, key) and isinstance(result.get(key), list):
            result[key] = _merge_list(result[key], value, _merge_key(_parent, key), key)
        else:
            merged = strategic_merge_patch(result.get(key), value, key)
            if merged is None and isinstance(value, dict) and value.get("$patch") == "delete":
                result.pop(key, None)
            else:
                result[key] = merged
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _merge_key(parent: str, field: str) -> str:
    return PARENT_MERGE_KEYS.get((parent, field)) or MERGE_KEYS.get(field, "")


def _merge_list(current: list[Any], patch: list[Any], key: str, field: str) -> list[Any]:
    out = [copy.deepcopy(item) for item in current]
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise PatchError(f"strategic merge patch: list item {item!r} lacks its merge key {key!r}")
        index = next((i for i, old in enumerate(out) if isinstance(old, dict) and old.get(key) == item[key]), None)
        if item.get("$patch") == "delete":
            if index is not None:
                del out[index]
        elif index is None:
            out.append(strategic_merge_patch({}, item, field))
        else:
            out[index] = strategic_merge_patch(out[index], item, field)
    return out


def json_patch(target: Any, ops: Any) -> Any:
    """RFC 6902 on a deep copy of ``target``; raises PatchError / PatchTestFailed."""
    if not isinstance(ops, list):
        raise PatchError("a JSON patch must be a list of operations")
    doc = copy.deepcopy(target)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"malformed JSON-patch operation {op!r}: 'op' and 'path' are required")
        kind, path = op["op"], op["path"]
        if kind == "test":
            found = _get(doc, path)
            if found != op.get("value"):
                raise PatchTestFailed(f"test at {path!r} failed: expected {op.get('value')!r}, found {found!r}")
        elif kind == "add":
            doc = _put(doc, path, copy.deepcopy(op.get("value")), insert=True)
        elif kind == "replace":
            _get(doc, path)  # must exist
            doc = _put(doc, path, copy.deepcopy(op.get("value")), insert=False)
        elif kind == "remove":
            doc = _remove(doc, path)
        elif kind in ("move", "copy"):
            value = copy.deepcopy(_get(doc, op.get("from", "")))
            if kind == "move":
                doc = _remove(doc, op["from"])
            doc = _put(doc, path, value, insert=True)
        else:
            raise PatchError(f"unknown JSON-patch operation {kind!r}")
    return doc


def _tokens(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"JSON pointer {path!r} must start with '/'")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def _pointer(tokens: list[str]) -> str:
    return "".join("/" + t.replace("~", "~0").replace("/", "~1") for t in tokens)


def _index(container: list[Any], token: str, *, for_insert: bool) -> int:
    if token == "-" and for_insert:
        return len(container)
    if not token.isdigit():
        raise PatchError(f"list index {token!r} is not a number")
    index = int(token)
    if index > len(container) or (index == len(container) and not for_insert):
        raise PatchError(f"list index {index} is out of range")
    return index


def _get(doc: Any, path: str) -> Any:
    node = doc
    for token in _tokens(path):
        if isinstance(node, dict):
            if token not in node:
                raise PatchError(f"path {path!r} does not exist")
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, for_insert=False)]
        else:
            raise PatchError(f"path {path!r} does not exist")
    return node


def _put(doc: Any, path: str, value: Any, *, insert: bool) -> Any:
    tokens = _tokens(path)
    if not tokens:
        return value
    parent = _get(doc, _pointer(tokens[:-1]))
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        index = _index(parent, last, for_insert=insert)
        if insert:
            parent.insert(index, value)
        else:
            parent[index] = value
    else:
        raise PatchError(f"cannot set {path!r}: its parent is not an object or a list")
    return doc


def _remove(doc: Any, path: str) -> Any:
    tokens = _tokens(path)
    if not tokens:
        raise PatchError("cannot remove the whole document")
    parent = _get(doc, _pointer(tokens[:-1]))
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"path {path!r} does not exist")
        del parent[last]
    elif isinstance(parent, list):
        del parent[_index(parent, last, for_insert=False)]
    else:
        raise PatchError(f"path {path!r} does not exist")
    return doc
