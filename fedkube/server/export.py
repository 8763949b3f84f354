"""``fedkube export``: a fedkube checkpoint's model as safetensors, npz or a torch state dict.

    fedkube export runs/mnist/pods/mnist-server/volumes/fedkube-checkpoint --format safetensors -o model.safetensors
    fedkube export /ckpt/mnist --round 3 --format torch -o round3.pt

The checkpoint directory may be one round's checkpoint, a job's directory of
rounds or a checkpoint root holding one job (as ``spec.model.path`` takes
it). The newest valid round is exported unless ``--round`` names one. Only the
model is exported (the strategy's state stays in the checkpoint); safetensors
files carry job, round, strategy and metrics in their header.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fedkube import formats
from fedkube.errors import FedkubeError
from fedkube.server import checkpoint
from fedkube.server.output import metadata_for

EXIT_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedkube export", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("checkpoint", type=Path, help="a fedkube checkpoint directory")
    parser.add_argument("--format", choices=formats.FORMATS, default="safetensors", help="output format")
    parser.add_argument("--round", type=int, default=None, metavar="N", help="export round N (default: the newest)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="PATH", help="file to write")
    return parser


def find(directory: Path, round_: int | None) -> checkpoint.Checkpoint:
    """The checkpoint to export: the newest valid one, or round ``round_``'s (which must load)."""
    if round_ is None:
        ck = checkpoint.load_latest(directory, None)
        if ck is None:
            raise FedkubeError(f"{directory} holds no usable fedkube checkpoint; fix: give the server's checkpoint "
                               "directory (spec.server.checkpoint) or a job's directory inside it")
        return ck
    candidates = [directory / checkpoint.round_dir_name(round_)]
    if directory.is_dir():
        candidates += [p / checkpoint.round_dir_name(round_) for p in directory.iterdir() if p.is_dir()]
    found = [c for c in candidates if (c / checkpoint.MANIFEST).exists()]
    if (directory / checkpoint.MANIFEST).exists():
        found.append(directory)
    for path in found:
        ck = checkpoint.load(path)
        if ck.round == round_:
            return ck
    raise FedkubeError(f"{directory} has no checkpoint of round {round_}; fix: pick a round that is kept "
                       "(spec.server.checkpoint keeps the newest few) or leave --round out")


def export_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedkube export``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        ck = find(args.checkpoint, args.round)
        meta = metadata_for(ck.job, ck.round, ck.strategy_state.name, ck.metrics)
        formats.save(ck.model, args.output, args.format, metadata=meta)
    except (FedkubeError, OSError) as exc:
        print(f"fedkube export: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"fedkube export: job {ck.job} round {ck.round} ({len(ck.model)} tensors) -> {args.output} ({args.format})")
    return 0
