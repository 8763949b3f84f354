"""Fixtures of the fault-injection suite (helpers that need no fixture live in ``tests.faults.support``)."""
