"""`fedkube run` with a poisoning site: clipNorm and maxExamplesPerSite keep the model at the honest average.

Before spec.strategy bounded influence, one trainer that scaled its update
(or claimed 10⁶ examples) replaced the global model and the job Succeeded.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from tests.integration.runtime.test_run_cli import fedkube_run, write_job

pytestmark = pytest.mark.timeout(120)

POISON = textwrap.dedent("""
    import numpy as np
    import fedkube.trainer_sdk as fk

    fk.init()
    poisoner = fk.site() == "site-c"
    while fk.is_running():
        model = fk.receive()
        if model.params is None:
            params = {"w": np.zeros(4, dtype=np.float32)}
        else:
            print("round", model.round, "global w0", float(model.params["w"][0]))
            params = {"w": model.params["w"] + (1e6 if poisoner else 1.0)}
        fk.send(fk.FLModel(params=params, num_examples=10**6 if poisoner else 10))
""")


def test_a_poisoning_site_is_clipped_and_capped_and_the_model_stays_at_the_honest_average(tmp_path: Path) -> None:
    job = write_job(tmp_path, POISON, name="poison", sites=("site-a", "site-b", "site-c"), rounds=2)
    job.write_text(job.read_text() + "  strategy:\n    name: fedavg\n    maxExamplesPerSite: 10\n    clipNorm: 4\n")
    proc = fedkube_run(str(job), "--json", "--no-progress", "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Round 1's update of site-c (+1e6 on 4 weights, norm 2e6) counts clipped to norm 4 (+2 each) and with
    # weight 10, not 1e6: the mean of +1, +1, +2 is 4/3. Unbounded it would be ~1e6.
    seen = {float(x) for x in re.findall(r"\[site-a trainer\] round 2 global w0 (\S+)", proc.stderr)}
    assert len(seen) == 1 and abs(seen.pop() - 4 / 3) < 1e-5, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)["summary"]
    clients = {c["name"]: c for c in summary["clients"]}
    assert summary["phase"] == "Succeeded"
    assert clients["site-c"]["weight"] == 10
    assert "capped to 10" in clients["site-c"]["bounded"] and "clipped to 4" in clients["site-c"]["bounded"]
    assert clients["site-a"]["updateNorm"] == pytest.approx(2.0) and "bounded" not in clients["site-a"]
