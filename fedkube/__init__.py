"""fedkube: federated learning that runs natively on Kubernetes."""

__version__ = "0.1.0.dev0"
