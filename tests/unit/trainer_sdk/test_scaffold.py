"""SCAFFOLD's client side (fedkube.trainer_sdk.scaffold) with real torch on a tiny model, against a hand computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedkube.errors import ConfigError
from fedkube.server.scaffold import Scaffold as ServerScaffold
from fedkube.server.strategy_report import published
from fedkube.trainer_sdk.model import FLModel
from fedkube.trainer_sdk.scaffold import STATE_FILE, Scaffold

LR, STEPS = 0.1, 3


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    net[0].bias.requires_grad_(False)  # frozen: no variate of its own, a zero delta
    return net


def _task(net: torch.nn.Module, c: dict[str, np.ndarray]) -> FLModel:
    """A train task as the SDK hands it over: the model and the server's c, both numpy."""
    model = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    sent = published(_server_with(c, model), model)
    return FLModel(params=dict(sent), round=1, total_rounds=2, config={})


def _server_with(c: dict[str, np.ndarray], model: dict[str, np.ndarray]) -> ServerScaffold:
    s = ServerScaffold(sites=2)
    s.c = {k: c.get(k, np.zeros(v.shape, np.float32)) for k, v in model.items() if v.dtype.kind == "f"}
    return s


def _train(net: torch.nn.Module, scaffold: Scaffold, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, np.ndarray]]:
    """STEPS of plain SGD with the correction; returns each step's raw gradients (before it)."""
    raw = []
    for _ in range(STEPS):
        net.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        raw.append({n: p.grad.detach().numpy().copy() for n, p in net.named_parameters() if p.grad is not None})
        scaffold.correct()
        with torch.no_grad():
            for p in net.parameters():
                if p.grad is not None:
                    p -= LR * p.grad
    return raw


def test_correction_and_variate_update_match_the_hand_computation(tmp_path: Path) -> None:
    net = _net()
    rng = np.random.default_rng(0)
    c = {"0.weight": rng.standard_normal((2, 2)).astype(np.float32), "1.weight": np.full(2, 0.5, np.float32)}
    c_i = {"0.weight": rng.standard_normal((2, 2)).astype(np.float32), "1.weight": np.zeros(2, np.float32),
           "1.bias": np.full(2, -0.25, np.float32)}  # fmt: skip
    from fedkube import formats

    (tmp_path / STATE_FILE).parent.mkdir(parents=True)
    formats.save(c_i, tmp_path / STATE_FILE, "safetensors")
    task = _task(net, c)
    x0 = {k: v.copy() for k, v in task.params.items() if not k.startswith("scaffold/")}
    scaffold = Scaffold.from_task(net, task, lr=LR, workdir=tmp_path)
    assert not any(k.startswith("scaffold/") for k in task.params)  # load_state_dict sees only the model
    net.load_state_dict(task.params_torch())
    x, y = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]]), torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    before = {n: p.detach().numpy().copy() for n, p in net.named_parameters()}
    raw = _train(net, scaffold, x, y)
    # Each step took g - c_i + c, so a trainable parameter moved by lr * sum(g_k - c_i + c).
    for name in ("0.weight", "1.weight", "1.bias"):
        c_n = c.get(name, np.zeros_like(c_i[name]))
        want = before[name] - sum(LR * (g[name] - c_i[name] + c_n) for g in raw)
        np.testing.assert_allclose(dict(net.named_parameters())[name].detach().numpy(), want, rtol=1e-5, atol=1e-6)
    assert net[0].bias.grad is None
    out = scaffold.result(FLModel(params=net.state_dict(), num_examples=3))
    for name in ("0.weight", "1.weight", "1.bias"):
        y_i = dict(net.named_parameters())[name].detach().numpy()
        c_n = c.get(name, np.zeros_like(c_i[name]))
        c_plus = c_i[name] - c_n + (x0[name] - y_i) / (STEPS * LR)
        np.testing.assert_allclose(np.asarray(out.params["scaffold/" + name]), c_plus - c_i[name], rtol=1e-5,
                                   atol=1e-5)  # fmt: skip
    for frozen in ("0.bias", "1.running_mean", "1.running_var"):  # no gradient: a zero delta of its dtype and shape
        delta = out.params["scaffold/" + frozen]
        assert delta.dtype == torch.float32 and delta.shape == net.state_dict()[frozen].shape and not delta.any()
    assert "scaffold/1.num_batches_tracked" not in out.params  # integer tensors have no variate
    scaffold.save()
    kept = formats.load(tmp_path / STATE_FILE)
    np.testing.assert_allclose(kept["0.weight"], np.asarray(out.params["scaffold/0.weight"]) + c_i["0.weight"],
                               rtol=1e-6, atol=1e-6)  # fmt: skip


def test_a_missing_client_variate_starts_at_zero_and_nothing_is_kept_before_save(tmp_path: Path) -> None:
    net = _net()
    c = {"0.weight": np.ones((2, 2), np.float32)}
    scaffold = Scaffold.from_task(net, _task(net, c), lr=LR, workdir=tmp_path)
    assert all(not t.any() for t in scaffold.c_i.values())
    x, y = torch.ones(3, 2), torch.zeros(3, 2)
    raw = _train(net, scaffold, x, y)
    assert len(raw) == STEPS and scaffold.steps == STEPS
    scaffold.result(FLModel(params=net.state_dict(), num_examples=3))
    assert not (tmp_path / STATE_FILE).exists()  # a result the server sets aside changes nothing
    scaffold.save()
    assert (tmp_path / STATE_FILE).exists()


def test_misuse_is_refused_with_the_fix() -> None:
    net = _net()
    with pytest.raises(ConfigError, match="carries no SCAFFOLD control variate"):
        Scaffold.from_task(net, FLModel(params={k: v.numpy() for k, v in net.state_dict().items()}), lr=LR)
    scaffold = Scaffold.from_task(net, _task(net, {}), lr=LR, persist=False)
    with pytest.raises(ConfigError, match="correct\\(\\) was never called"):
        scaffold.result(FLModel(params=net.state_dict(), num_examples=1))
    with pytest.raises(ValueError, match="lr > 0"):
        Scaffold.from_task(net, _task(net, {}), lr=0.0, persist=False)
