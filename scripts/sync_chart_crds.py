#!/usr/bin/env python3
"""Copy the generated CRDs from crds/ into the Helm chart's crds/ directory.

crds/ (written by scripts/gen_crd.py from fedkube/spec) is the one source; the
chart carries a byte-identical copy because Helm only installs CRDs from the
chart's own crds/ directory. ``--check`` changes nothing and exits 1 when the
copy has drifted (a file differs, is missing, or is left over), naming the fix.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def plan(src: Path, dest: Path) -> tuple[list[str], list[str]]:
    """(files to copy because they differ or are missing, stale files to remove) as names."""
    sources = {p.name: p for p in sorted(src.glob("*.yaml"))}
    if not sources:
        raise SystemExit(f"sync_chart_crds: no CRDs found in {src}; generate them first (python scripts/gen_crd.py)")
    targets = {p.name: p for p in sorted(dest.glob("*.yaml"))} if dest.is_dir() else {}
    changed = [n for n, p in sources.items() if n not in targets or targets[n].read_bytes() != p.read_bytes()]
    stale = [n for n in targets if n not in sources]
    return changed, stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report drift and exit 1 instead of fixing it")
    parser.add_argument("--src", type=Path, default=ROOT / "crds", help="generated CRDs (default: crds/)")
    parser.add_argument("--dest", type=Path, default=ROOT / "charts" / "fedkube" / "crds",
                        help="the chart's CRD directory (default: charts/fedkube/crds/)")
    args = parser.parse_args(argv)
    changed, stale = plan(args.src, args.dest)
    if args.check:
        if changed or stale:
            problems = [f"{args.dest / n} differs from {args.src / n}" for n in changed]
            problems += [f"{args.dest / n} has no source in {args.src}" for n in stale]
            print("The chart's CRDs are out of sync:\n  " + "\n  ".join(problems)
                  + "\nFix: python scripts/sync_chart_crds.py", file=sys.stderr)
            return 1
        return 0
    args.dest.mkdir(parents=True, exist_ok=True)
    for name in changed:
        (args.dest / name).write_bytes((args.src / name).read_bytes())
        print(f"updated {args.dest / name}")
    for name in stale:
        (args.dest / name).unlink()
        print(f"removed {args.dest / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
