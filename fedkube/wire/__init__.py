"""The wire contract: code generated from proto/fedkube/v1 (by scripts/gen_proto.py).

This package imports nothing else of fedkube; conversion between these
messages and fedkube's own types lives in one place per layer (e.g.
fedkube.transfer.refs for tensor references).
"""
