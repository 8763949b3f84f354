"""The emulator's patch algorithms (RFC 6902, RFC 7386, strategic merge)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support import patching


def test_merge_patch_merges_dicts_deletes_nulls_and_replaces_lists() -> None:
    target = {"a": {"b": 1, "c": 2}, "l": [1, 2], "keep": True}
    assert patching.merge_patch(target, {"a": {"b": None, "d": 3}, "l": [3]}) == {
        "a": {"c": 2, "d": 3}, "l": [3], "keep": True}
    assert target == {"a": {"b": 1, "c": 2}, "l": [1, 2], "keep": True}, "the target must not be mutated"


def test_strategic_merge_patch_uses_merge_keys_and_directives() -> None:
    target: dict[str, Any] = {"spec": {"containers": [{"name": "a", "image": "x", "env": [{"name": "E", "value": "1"}]},
                                                      {"name": "b", "image": "y"}],
                                       "args": ["p", "q"]}}
    patch = {"spec": {"containers": [{"name": "a", "env": [{"name": "F", "value": "2"}]},
                                     {"name": "b", "$patch": "delete"},
                                     {"name": "c", "image": "z"}],
                      "$setElementOrder/containers": [{"name": "a"}, {"name": "c"}],
                      "$deleteFromPrimitiveList/args": ["q"]}}
    out = patching.strategic_merge_patch(target, patch)
    assert out == {"spec": {"containers": [{"name": "a", "image": "x", "env": [{"name": "E", "value": "1"},
                                                                              {"name": "F", "value": "2"}]},
                                           {"name": "c", "image": "z"}],
                            "args": ["p"]}}
    replaced = patching.strategic_merge_patch({"m": {"x": 1, "y": 2}}, {"m": {"$patch": "replace", "z": 3}})
    assert replaced == {"m": {"z": 3}}


def test_strategic_merge_patch_rejects_items_without_their_merge_key() -> None:
    with pytest.raises(patching.PatchError, match="merge key 'name'"):
        patching.strategic_merge_patch({"containers": [{"name": "a"}]}, {"containers": [{"image": "x"}]})


def test_json_patch_operations() -> None:
    doc = {"metadata": {"finalizers": ["a"]}, "a/b": {"~c": 1}}
    ops = [
        {"op": "add", "path": "/metadata/finalizers/-", "value": "b"},
        {"op": "replace", "path": "/metadata/finalizers/0", "value": "z"},
        {"op": "copy", "from": "/metadata/finalizers", "path": "/copied"},
        {"op": "move", "from": "/a~1b/~0c", "path": "/moved"},
        {"op": "remove", "path": "/metadata/finalizers/1"},
        {"op": "test", "path": "/moved", "value": 1},
    ]
    assert patching.json_patch(doc, ops) == {"metadata": {"finalizers": ["z"]}, "a/b": {}, "copied": ["z", "b"],
                                             "moved": 1}


@pytest.mark.parametrize(("ops", "error"), [
    ([{"op": "test", "path": "/x", "value": 2}], patching.PatchTestFailed),
    ([{"op": "replace", "path": "/missing", "value": 1}], patching.PatchError),
    ([{"op": "remove", "path": "/l/5"}], patching.PatchError),
    ([{"op": "frobnicate", "path": "/x"}], patching.PatchError),
    ({"op": "add"}, patching.PatchError),
])
def test_json_patch_errors(ops: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        patching.json_patch({"x": 1, "l": []}, ops)


def test_service_ports_merge_by_port_and_container_ports_by_container_port() -> None:
    service = {"spec": {"ports": [{"name": "grpc", "port": 7070}, {"name": "status", "port": 8080}]}}
    out = patching.strategic_merge_patch(service, {"spec": {"ports": [{"port": 8080, "name": "http"}]}})
    assert out["spec"]["ports"] == [{"name": "grpc", "port": 7070}, {"name": "http", "port": 8080}]
    pod = {"spec": {"containers": [{"name": "c", "ports": [{"containerPort": 1, "name": "a"}]}]}}
    patch = {"spec": {"containers": [{"name": "c", "ports": [{"containerPort": 1, "name": "b"}]}]}}
    assert patching.strategic_merge_patch(pod, patch)["spec"]["containers"][0]["ports"] == [
        {"containerPort": 1, "name": "b"}
    ]
