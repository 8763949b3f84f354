#!/usr/bin/env bash
# Install the development dependencies and run the whole test suite (lint,
# types, generated-code drift, unit, integration, e2e). Run it inside a
# virtualenv: python3 -m venv .venv && . .venv/bin/activate && scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# torch==2.13.0 is the CPU build; an unpinned torch pulls a multi-GB CUDA build.
python -m pip install -q torch==2.13.0 -e '.[dev]'
scripts/get-k8s-tools.sh  # pinned helm/kubectl into .tools/bin for the chart and kubectl tests (no-op when present)
# Two or more workers: most tests wait on real processes, sockets and timeouts rather than the CPU, so two
# workers on two cores roughly halve the wall time. Capped at 4: the end-to-end tests each start several
# processes, and more workers than that only trade wall time for timing noise. `scripts/test.sh -n 0` runs serially;
# loadgroup keeps tests marked xdist_group (the real-pod tests) on one worker.
exec python -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4 --dist loadgroup --durations=15 "$@"
