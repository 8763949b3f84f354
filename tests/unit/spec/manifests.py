"""FLJob manifests shared by the spec, builder and CLI tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "quickstart-numpy" / "fljob.yaml"

_FULL: dict[str, Any] = {
    "apiVersion": "fedkube.dev/v1alpha1",
    "kind": "FLJob",
    "metadata": {"name": "mnist", "namespace": "ml", "labels": {"team": "vision"}},
    "spec": {
        "rounds": 5,
        "minClients": 2,
        "strategy": {"name": "fedadam", "serverLr": 0.05},
        "model": {"source": "file", "path": "/models/init.npz"},
        "server": {
            "env": [{"name": "LOG_LEVEL", "value": "debug"}],
            "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
            "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "init-models"}}],
            "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
            "nodeSelector": {"pool": "cpu"},
            "checkpoint": {"enabled": True, "storageSize": "5Gi", "storageClassName": "fast"},
        },
        "clients": [
            {"name": "site-a"},
            {
                "name": "site-b",
                "env": [{"name": "EPOCHS", "value": "3"}, {"name": "EXTRA", "value": "1"}],
                "resources": {"limits": {"nvidia.com/gpu": 2}},
                "nodeSelector": {"gpu": "a100"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            },
            {"name": "site-c"},
        ],
        "trainer": {
            "image": "registry.example/mnist-trainer:1.2",
            "command": ["python", "train.py"],
            "args": ["--lr", "0.1"],
            "workingDir": "/app",
            "env": [
                {"name": "EPOCHS", "value": "1"},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            ],
            "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
            "volumes": [{"name": "data", "emptyDir": {"sizeLimit": "1Gi"}}],
            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            "nodeSelector": {"pool": "train"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "fl", "effect": "NoSchedule"}],
        },
        "sidecar": {"resources": {"limits": {"memory": "128Mi"}}},
        "transfer": {"chunkBytes": 2097152, "chunkTimeoutSeconds": 20, "idleTimeoutSeconds": 60, "maxAttempts": 4},
        "timeouts": {
            "roundSeconds": 900,
            "heartbeatSeconds": 20,
            "registrationSeconds": 300,
            "deploySeconds": 600,
            "pendingSeconds": 120,
        },
        "ttlSecondsAfterFinished": 3600,
    },
}


def example_manifest() -> dict[str, Any]:
    """The quickstart example, as a dict."""
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return data


def full_manifest() -> dict[str, Any]:
    """A manifest using every feature: GPUs, overrides, volumes, checkpoint PVC, fedadam."""
    return copy.deepcopy(_FULL)
