"""deploy/k8s, offline: every object validates against the Kubernetes JSON schemas (bundled by
kubernetes-validate), and a policy scan (checkov) finds nothing that deploy/README.md does not
justify. Plus what neither tool knows: grace periods cover the drain, probes and limits are set."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
# Plain manifests (kubectl apply -f) and overlays (kubectl apply -k, rendered by tests/kustomize.py).
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
OVERLAYS = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))
# The newest schemas kubernetes-validate ships, and an older release still widely run.
VERSIONS = ["1.30"]


def objects() -> list[tuple[str, dict]]:
    from kustomize import render

    return [(f"{p.relative_to(K8S)}#{i}", doc) for p in MANIFESTS
            for i, doc in enumerate(yaml.safe_load_all(p.read_text())) if doc] + \
        [(f"{o.relative_to(K8S)}/{doc['kind']}/{doc['metadata']['name']}", doc) for o in OVERLAYS
         for doc in render(o)]


def validate(doc: dict, version: str) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, version, strict=True)


def versions() -> list[str]:
    from kubernetes_validate.utils import latest_version

    return [latest_version(), *VERSIONS]


def workloads() -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in objects() if doc["kind"] in ("Deployment", "StatefulSet")]


def test_every_manifest_validates_against_the_kubernetes_schemas():
    import kubernetes_validate

    assert len(objects()) >= 12
    for version in versions():
        for name, doc in objects():
            try:
                validate(doc, version)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name} (Kubernetes {version}): {e}")


def test_a_typo_in_a_manifest_fails_validation():
    import kubernetes_validate

    _, doc = next(w for w in workloads() if w[1]["kind"] == "StatefulSet")
    bad = copy.deepcopy(doc)
    bad["spec"]["replicsa"] = bad["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError, match="replicsa"):
        validate(bad, versions()[0])


def skipped_checks() -> list[str]:
    return yaml.safe_load((ROOT / "deploy" / "checkov.yaml").read_text())["skip-check"]


def test_the_policy_scan_finds_nothing_the_readme_does_not_justify(tmp_path):
    from kustomize import render

    # One folder with the manifests and the overlays rendered (checkov's own kustomize support
    # needs the kustomize binary).
    scan = tmp_path / "scan"
    scan.mkdir()
    for p in MANIFESTS:
        (scan / str(p.relative_to(K8S)).replace("/", "--")).write_text(p.read_text())
    for o in OVERLAYS:
        (scan / f"overlay-{o.name}.yaml").write_text(yaml.safe_dump_all(render(o)))
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_NO_OUTPUT_PROGRESS": "1", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "checkov.main", "--directory", str(scan), "--framework",
                          "kubernetes", "--config-file", str(ROOT / "deploy" / "checkov.yaml"),
                          "--skip-download", "--compact", "--quiet", "--output", "json"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert out.stdout, out.stderr[-3000:]
    report = json.loads(out.stdout)
    report = report[0] if isinstance(report, list) else report
    failed = [(f["check_id"], f["resource"]) for f in report["results"]["failed_checks"]]
    assert failed == [], f"checkov: {failed}"
    assert report["summary"]["passed"] > 50
    readme = (ROOT / "deploy" / "README.md").read_text()
    for check in skipped_checks():
        assert re.search(rf"`{check}`[^\n]*\w+", readme), f"{check} is skipped without a reason in the README"


def test_grace_periods_cover_the_drain_and_every_container_is_bounded():
    for name, doc in workloads():
        pod = doc["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, name
        for c in pod["containers"]:
            argv = " ".join(c.get("command", []) + c.get("args", []))
            drain = float(re.search(r"--drain-seconds[ =](\d+)", argv).group(1))
            pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
            assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 5, name
            assert "livenessProbe" in c and "readinessProbe" in c, name
            assert c["imagePullPolicy"] in ("IfNotPresent", "Always"), name
            for kind in ("requests", "limits"):
                assert set(c["resources"][kind]) >= {"cpu", "memory", "ephemeral-storage"}, (name, kind)
        # A claim that all replicas mount must be ReadOnlyMany and mounted read-only: one
        # ReadWriteOnce claim across pods on several nodes fails with Multi-Attach.
        claims = {v["name"]: v["persistentVolumeClaim"] for v in pod.get("volumes", [])
                  if "persistentVolumeClaim" in v}
        for claim in claims.values():
            assert claim.get("readOnly") is True, name
            pvc = next(d for _, d in objects() if d["kind"] == "PersistentVolumeClaim"
                       and d["metadata"]["name"] == claim["claimName"])
            assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"], name
        for c in pod.get("initContainers", []) + pod["containers"]:
            for mount in c.get("volumeMounts", []):
                assert mount["name"] not in claims or mount.get("readOnly") is True, (name, mount)
