"""deploy/k8s/check.sh: the real manifests pass, and broken copies fail naming the problem.

check.sh installs its pinned tools (kustomize, kubernetes-validate with the Kubernetes schemas,
hadolint) into .tools/k8s/ on first use; the session fixture does that once, so these tests
never skip. After that nothing here uses the network.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
CHECK = K8S / "check.sh"

# The first run builds kustomize from the Go module proxy: allow it more than the default.
pytestmark = [pytest.mark.timeout(900), pytest.mark.usefixtures("k8s_tools")]


def run_check(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CHECK), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="session")
def k8s_tools() -> None:
    """Install the pinned tools (a no-op when .tools/k8s is current)."""
    proc = run_check("--install-only", timeout=840)
    assert proc.returncode == 0, f"installing the k8s tools failed:\n{proc.stdout}{proc.stderr}"


@pytest.fixture
def k8s_copy(tmp_path: Path) -> Path:
    """A scratch copy of deploy/k8s to break."""
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def replace(path: Path, old: str, new: str) -> None:
    """Replace one occurrence of ``old``; fail if the manifests no longer contain it."""
    text = path.read_text()
    assert old in text, f"{path} no longer contains {old!r}: update this test"
    path.write_text(text.replace(old, new, 1))


def test_real_manifests_pass() -> None:
    proc = run_check()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok overlays/local:" in proc.stdout
    assert "ok overlays/production:" in proc.stdout
    # production takes its credentials from the Secrets the README tells the operator to create
    for secret in (
        "field-alerts-kafka",
        "field-alerts-schema-registry",
        "field-alerts-slack",
        "field-alerts-bigquery",
    ):
        assert secret in proc.stdout
        assert secret in (K8S / "README.md").read_text()
    assert "ok deploy/docker/Dockerfile: hadolint" in proc.stdout


def test_unmodified_copy_passes(k8s_copy: Path) -> None:
    """The breakage tests below fail for their own reason, not because of the copy."""
    proc = run_check(k8s_copy)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# (file under deploy/k8s, text to find, replacement, what the failure must say)
BREAKAGES = {
    "render-missing-file": (
        "overlays/local/kustomization.yaml",
        "  - ../../base\n",
        "  - ../../base\n  - does-not-exist.yaml\n",
        ["FAIL overlays/local: kustomize build failed", "does-not-exist.yaml"],
    ),
    "schema-replicas-not-integer": (
        "base/producer.yaml",
        "spec:\n  replicas: 1\n",
        'spec:\n  replicas: "two"\n',
        ["Deployment/producer (base/producer.yaml): schema", "spec.replicas: 'two' is not of type"],
    ),
    "schema-unknown-container-field": (
        "base/enricher.yaml",
        "          imagePullPolicy: IfNotPresent\n",
        "          imagePullPolicy: IfNotPresent\n          restartPolicyy: Always\n",
        ["Deployment/enricher (base/enricher.yaml): schema", "'restartPolicyy' was unexpected"],
    ),
    "policy-no-resource-limits": (
        "base/notifier.yaml",
        "            limits:\n              cpu: 500m\n              memory: 512Mi\n"
        "              ephemeral-storage: 2Gi\n",
        "",
        [
            "Deployment/notifier (base/notifier.yaml): container notifier: "
            "resources.limits.memory is not set"
        ],
    ),
    "policy-writable-root": (
        "base/enricher.yaml",
        "            readOnlyRootFilesystem: true\n",
        "            readOnlyRootFilesystem: false\n",
        ["container enricher: securityContext.readOnlyRootFilesystem is not true"],
    ),
    "policy-no-readiness-probe": (
        "base/producer.yaml",
        "          readinessProbe:\n            httpGet:\n              path: /readyz\n"
        "              port: metrics\n            periodSeconds: 10\n"
        "            timeoutSeconds: 3\n            failureThreshold: 3\n",
        "",
        ["Deployment/producer (base/producer.yaml): container producer: no readinessProbe"],
    ),
    "policy-state-dir-on-read-only-root": (
        "base/enricher.env",
        "ENRICHER_STATE_DIR=/var/lib/enricher",
        "ENRICHER_STATE_DIR=/opt/enricher",
        ["ENRICHER_STATE_DIR=/opt/enricher is not on a writable volume"],
    ),
    "policy-producer-rolling-update": (
        "base/producer.yaml",
        "    type: Recreate\n",
        "    type: RollingUpdate\n",
        ["Deployment/producer (base/producer.yaml): a single writer"],
    ),
    "policy-enricher-without-pdb": (
        "base/enricher.yaml",
        "      app.kubernetes.io/name: enricher\n      app.kubernetes.io/part-of: field-alerts\n"
        "---\napiVersion: v1\nkind: Service",
        "      app.kubernetes.io/name: enricherr\n      app.kubernetes.io/part-of: field-alerts\n"
        "---\napiVersion: v1\nkind: Service",
        ["Deployment/enricher (base/enricher.yaml): no PodDisruptionBudget selects its pods"],
    ),
    "policy-metrics-port-mismatch": (
        "overlays/local/kustomization.yaml",
        "      - METRICS_PORT=9402\n",
        "      - METRICS_PORT=9000\n",
        ["overlays/local: Deployment/enricher", "METRICS_PORT=9000"],
    ),
    "policy-credential-in-configmap": (
        "overlays/production/production.env",
        "KAFKA_SASL_MECHANISM=PLAIN\n",
        "KAFKA_SASL_MECHANISM=PLAIN\nKAFKA_SASL_PASSWORD=not-a-real-password\n",
        [
            "overlays/production: ConfigMap/field-alerts-common",
            "KAFKA_SASL_PASSWORD looks like a credential",
        ],
    ),
    "policy-required-setting-missing": (
        "overlays/production/production.env",
        "SCHEMA_REGISTRY_URL=",
        "# SCHEMA_REGISTRY_URL=",
        [
            "overlays/production: Deployment/notifier",
            "required setting SCHEMA_REGISTRY_URL is not set",
        ],
    ),
}


@pytest.mark.parametrize("case", BREAKAGES, ids=list(BREAKAGES))
def test_broken_manifests_fail_naming_the_problem(k8s_copy: Path, case: str) -> None:
    relpath, old, new, expected = BREAKAGES[case]
    replace(k8s_copy / relpath, old, new)

    proc = run_check(k8s_copy)

    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"check.sh passed a broken tree ({case}):\n{output}"
    for text in expected:
        assert text in output, f"{text!r} not in the output of check.sh:\n{output}"
