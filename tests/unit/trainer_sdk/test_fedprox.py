"""FedProx: the proximal term with real torch on a tiny model, and mu's way from the spec to the trainer's task."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from fedkube.errors import ConfigError
from fedkube.protocol import PROXIMAL_MU_KEY, ResultTimeouts
from fedkube.server import outbox
from fedkube.server.strategies import build_strategy
from fedkube.server.strategy_report import task_config, task_settings
from fedkube.spec import SpecError, parse_job
from fedkube.trainer_sdk.fedprox import ProximalTerm, proximal_mu
from fedkube.trainer_sdk.model import FLModel
from tests.unit.spec.manifests import full_manifest


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    net[2].bias.requires_grad_(False)  # frozen parameters are not part of the term
    return net


def test_the_term_and_its_gradient_match_the_formula() -> None:
    net = _net()
    prox = ProximalTerm.from_task(net, FLModel(params={}, config={PROXIMAL_MU_KEY: "0.3"}))
    anchors = [p.detach().numpy().astype(np.float64).copy() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.linspace(-1, 1, p.numel()).reshape(p.shape))
    value = prox()
    value.backward()
    moved = [(p, a) for p, a in zip(net.parameters(), anchors, strict=True) if p.requires_grad]
    want = 0.15 * sum(float(((p.detach().numpy() - a) ** 2).sum()) for p, a in moved)
    assert float(value.detach()) == pytest.approx(want, rel=1e-6)
    for p, a in moved:
        np.testing.assert_allclose(p.grad.numpy(), 0.3 * (p.detach().numpy() - a), rtol=1e-5, atol=1e-7)
    assert net[2].bias.grad is None


def test_a_large_mu_keeps_local_training_near_the_global_model() -> None:
    def drift(mu: float) -> float:
        net = _net()
        start = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
        prox = ProximalTerm(net, mu)
        x, y = torch.ones(8, 4), torch.full((8, 1), 10.0)  # a site whose data pulls far away
        for _ in range(30):
            net.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x), y) + prox()
            loss.backward()
            with torch.no_grad():  # plain SGD
                for p in net.parameters():
                    if p.grad is not None:
                        p -= 0.05 * p.grad
        return float((torch.cat([p.detach().flatten() for p in net.parameters()]) - start).norm())

    assert drift(10.0) < 0.5 * drift(0.0)


def test_mu_from_the_task_config() -> None:
    assert proximal_mu({}) == 0.0 and proximal_mu({PROXIMAL_MU_KEY: "0.01"}) == 0.01
    for bad in ("-1", "nan", "x"):
        with pytest.raises(ConfigError, match="same image"):
            proximal_mu({PROXIMAL_MU_KEY: bad})
    assert float(ProximalTerm(_net(), 0.0)()) == 0.0


def test_the_server_sends_mu_in_every_task_and_only_strategies_that_average_take_it() -> None:
    for name in ("fedavg", "fedyogi"):
        strategy = build_strategy(name, {"proximalMu": 0.25})
        msg = outbox.task("t1", 1, "train", [], 3, task_settings(ResultTimeouts(1.0, 2.0, 3.0), strategy))
        assert proximal_mu(dict(msg.task.config)) == 0.25 and len(msg.task.config) == 4  # the timeouts stay
    assert task_config(build_strategy("fedavg")) == {}
    with pytest.raises(ConfigError, match="takes no privacy or proximalMu"):
        build_strategy("median", {"proximalMu": 0.25})
    data: dict[str, Any] = full_manifest()
    data["spec"]["strategy"] = {"name": "median", "proximalMu": 0.1}
    with pytest.raises(SpecError, match="proximalMu is a fedavg parameter"):
        parse_job(data)
