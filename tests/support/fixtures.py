"""pytest fixtures for tests that need Kubernetes: the emulated API and the helm/kubectl binaries.

Register them for the whole suite with ``pytest_plugins = ["tests.support.fixtures"]``
in ``tests/conftest.py``, or import them into one test module.
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.kubeapi import EmulatedCluster

ROOT = Path(__file__).resolve().parents[2]
TOOLS_BIN = ROOT / ".tools" / "bin"
FLJOB_CRD = ROOT / "crds" / "fedkube.dev_fljobs.yaml"  # the real, generated CRD


@dataclasses.dataclass(frozen=True)
class KubeTools:
    """Paths of the pinned helm and kubectl binaries."""

    helm: Path
    kubectl: Path


def ensure_k8s_tools() -> KubeTools:
    """Return the helm/kubectl binaries, running scripts/get-k8s-tools.sh once if they are missing.

    Raises RuntimeError with the script's own explanation when that fails: a
    missing tool is a broken environment, never a reason to skip.
    """
    tools = KubeTools(helm=TOOLS_BIN / "helm", kubectl=TOOLS_BIN / "kubectl")
    if tools.helm.exists() and tools.kubectl.exists():
        return tools
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "get-k8s-tools.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0 or not (tools.helm.exists() and tools.kubectl.exists()):
        raise RuntimeError(f"scripts/get-k8s-tools.sh could not install helm and kubectl into {TOOLS_BIN}:\n"
                           f"{proc.stdout}{proc.stderr}")
    return tools


@pytest.fixture(scope="session")
def k8s_tools() -> KubeTools:
    """The helm and kubectl binaries (installed on first use; the test fails if that is impossible)."""
    try:
        return ensure_k8s_tools()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)


@dataclasses.dataclass
class KubeHandle:
    """What the ``kube`` fixture yields."""

    cluster: EmulatedCluster
    url: str
    api_client: Any  # kubernetes.client.ApiClient

    def apply_crd(self, path: Path = FLJOB_CRD) -> dict[str, Any]:
        """Create a CRD from a YAML file (default: the FLJob CRD in crds/); returns it as stored."""
        import kubernetes

        crd = yaml.safe_load(path.read_text())
        ext = kubernetes.client.ApiextensionsV1Api(self.api_client)
        return ext.create_custom_resource_definition(crd).to_dict()


@pytest.fixture
def kube() -> Iterator[KubeHandle]:
    """An emulated Kubernetes API on a free localhost port, with a ready ``kubernetes`` ApiClient.

    Fails the test at teardown if the emulator itself raised while serving
    (a bug in the emulator must not pass as a 500 the code under test tolerated).
    """
    with EmulatedCluster() as cluster:
        client = cluster.api_client()
        try:
            yield KubeHandle(cluster=cluster, url=cluster.url, api_client=client)
        finally:
            client.close()
            errors = cluster.errors()
        if errors:
            pytest.fail(f"the emulated API server raised {len(errors)} internal error(s): {errors!r}")


@pytest.fixture
def kubeconfig(kube: KubeHandle, tmp_path: Path) -> Path:
    """A kubeconfig file pointing kubectl/helm at the ``kube`` emulated API (namespace default)."""
    return kube.cluster.kubeconfig(tmp_path / "kubeconfig")
