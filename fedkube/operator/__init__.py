"""Kubernetes operator: kopf handlers, pure manifest builders, status logic."""
