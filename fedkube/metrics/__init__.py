"""Prometheus metric definitions shared by fedkube's processes."""
