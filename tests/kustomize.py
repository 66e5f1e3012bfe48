"""Renders a kustomization the way `kubectl apply -k` does, for the subset deploy/k8s uses:
`resources` (files) and `patches` that are JSON 6902 patches (add/replace) on a kind and name.
No cluster and no kustomize binary needed, so the validation and container tests can check what
an overlay produces."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml


def _apply(doc: dict, op: dict) -> None:
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    node = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    value = copy.deepcopy(op["value"])
    if op["op"] == "add" and isinstance(node, list):
        node.insert(len(node) if last == "-" else int(last), value)
    elif op["op"] in ("add", "replace"):
        if isinstance(node, list):
            node[int(last)] = value
        else:
            if op["op"] == "replace" and last not in node:
                raise KeyError(f"replace {op['path']}: nothing there")
            node[last] = value
    else:
        raise ValueError(f"unsupported op {op['op']}")


def apply_patch_file(doc: dict, path: Path) -> None:
    for op in json.loads(path.read_text()):
        _apply(doc, op)


def render(folder: Path) -> list[dict]:
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs = [d for r in spec["resources"] for d in yaml.safe_load_all((folder / r).read_text()) if d]
    for patch in spec.get("patches", []):
        target = patch["target"]
        matches = [d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        assert len(matches) == 1, f"{target} matches {len(matches)} objects"
        apply_patch_file(matches[0], folder / patch["path"])
    return docs
