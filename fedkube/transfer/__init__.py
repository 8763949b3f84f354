"""Tensor references, the download service, resumable fetch and the relay."""
