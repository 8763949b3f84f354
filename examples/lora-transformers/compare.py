"""The README's table: held-out perplexity per round of the federated adapter, local-only and centralized training.

    python compare.py                  # runs the job with `fedkube run` first (8 rounds, 3 sites)
    python compare.py --run-dir DIR    # or evaluates a finished run's per-round adapters (runs/<job>/model/)

* federated: the global adapter of each round, as the server delivered it
  (``spec.output.everyRound``), evaluated on every site's held-out text;
* local-only: each site trains its own adapter on its own text only, with the
  same steps and seeds as in the federated job, evaluated on its own held-out
  text and on the other sites';
* centralized: one adapter trained on all sites' text pooled, 3 x
  STEPS_PER_ROUND steps per round (the steps all sites take in one round).

Each cell is the mean of the per-site perplexities. Round 0 is the base model
(every adapter starts with lora_B = 0).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean
from typing import Any

import data
import torch

HERE = Path(__file__).resolve().parent
JOB = "lora-transformers"


def run_job(run_dir: Path) -> None:
    """The federated job, exactly as the README runs it."""
    cmd = [sys.executable, "-m", "fedkube.cli", "run", str(HERE / "fljob.yaml"), "--json", "--no-progress"]
    proc = subprocess.run([*cmd, "--run-dir", str(run_dir)], stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0 or json.loads(proc.stdout or "{}").get("outcome") != "Succeeded":
        raise SystemExit(f"the federated job failed (exit {proc.returncode}); its logs are in {run_dir}/logs")


def round_files(run_dir: Path) -> list[Path]:
    files = sorted((run_dir / "model").glob(f"{JOB}-round-*.safetensors"))
    if not files:
        raise SystemExit(
            f"no per-round adapters under {run_dir}/model; fix: pass the --run-dir of a finished "
            "`fedkube run` of this fljob.yaml (it sets spec.output.everyRound)"
        )
    return files


def load_adapter(net: Any, path: Path) -> None:
    """Write the adapter in ``path`` into ``net``; every tensor must be one of its adapter's."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    expected = set(data.adapter(net))
    if set(tensors) != expected:
        raise SystemExit(f"{path} holds {sorted(set(tensors) ^ expected)} unlike this example's adapter")
    net.load_state_dict(tensors, strict=False)


def site_perplexities(net: Any, tests: dict[str, Any]) -> dict[str, float]:
    return {site: data.perplexity(net, tokens) for site, tokens in tests.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="a finished `fedkube run` of fljob.yaml (default: run it now)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run_dir = args.run_dir
    if run_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix=f"{JOB}-")) / "run"
        print(f"running the federated job (fedkube run fljob.yaml --run-dir {run_dir}) ...", file=sys.stderr)
        run_job(run_dir)
    files = round_files(run_dir)
    rounds = len(files)
    tokens = {site: data.site_tokens(site) for site in data.SITES}
    tests = {site: test for site, (_, test) in tokens.items()}

    federated, base = data.make_model(), site_perplexities(data.make_model(), tests)
    local = {site: data.make_model() for site in data.SITES}
    central = data.make_model()
    pooled = torch.cat([train for train, _ in tokens.values()])
    rows = [(0, mean(base.values()), mean(base.values()), mean(base.values()), mean(base.values()))]
    final: dict[str, dict[str, float]] = {}
    for r, path in enumerate(files, start=1):
        load_adapter(federated, path)
        fed = site_perplexities(federated, tests)
        own, other = {}, []
        for i, site in enumerate(data.SITES):
            data.train_steps(local[site], tokens[site][0], steps=data.STEPS_PER_ROUND, seed=1000 * r + i)
            ppl = site_perplexities(local[site], tests)
            own[site] = ppl[site]
            other += [v for s, v in ppl.items() if s != site]
        data.train_steps(central, pooled, steps=len(data.SITES) * data.STEPS_PER_ROUND, seed=1000 * r)
        cen = site_perplexities(central, tests)
        rows.append((r, mean(fed.values()), mean(own.values()), mean(other), mean(cen.values())))
        print(f"round {r}/{rounds} evaluated", file=sys.stderr)
        final = {"federated": fed, "local-only": own, "centralized": cen}

    print("| round | federated (global adapter) | local-only, own site | local-only, other sites | centralized |")
    print("|---:|---:|---:|---:|---:|")
    for r, fed_ppl, own_ppl, other_ppl, cen_ppl in rows:
        print(f"| {r} | {fed_ppl:.2f} | {own_ppl:.2f} | {other_ppl:.2f} | {cen_ppl:.2f} |")
    print(f"\nAfter round {rounds}, per site (held-out perplexity of the site's own text):\n")
    print("| site | federated | local-only | centralized |")
    print("|---|---:|---:|---:|")
    for site in data.SITES:
        cells = " | ".join(f"{final[k][site]:.2f}" for k in ("federated", "local-only", "centralized"))
        print(f"| {site} | {cells} |")


if __name__ == "__main__":
    main()
