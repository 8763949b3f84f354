"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks") for torch training loops.

FedProx keeps the server's FedAvg (or FedAdam, FedYogi, FedAdagrad) and adds, on each site, the proximal term
``mu/2 * ||w - w_global||^2`` to the training loss, so a site with very different data cannot drift far from the
global model within a round. The server sets ``mu`` (``spec.strategy.proximalMu``) and sends it in every task;
:meth:`ProximalTerm.from_task` reads it, so a script needs no setting of its own::

    import fedkube.trainer_sdk as fk
    from fedkube.trainer_sdk.fedprox import ProximalTerm

    fk.init()
    while fk.is_running():
        task = fk.receive()
        net.load_state_dict(task.params_torch())
        prox = ProximalTerm.from_task(net, task)   # anchors the global weights; mu 0 or unset: adds nothing
        for x, y in batches:
            loss = loss_fn(net(x), y) + prox()
            ...

torch is imported only when a term is made: the SDK itself does not need it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from fedkube.errors import ConfigError
from fedkube.protocol import PROXIMAL_MU_KEY
from fedkube.trainer_sdk.model import FLModel

if TYPE_CHECKING:
    import torch


def proximal_mu(config: Mapping[str, str]) -> float:
    """FedProx's mu from a task's config (0.0 when the job sets none); ConfigError for a value that is not one."""
    raw = config.get(PROXIMAL_MU_KEY)
    if raw is None or raw == "":
        return 0.0
    try:
        mu = float(raw)
    except ValueError:
        mu = math.nan
    if not (math.isfinite(mu) and mu >= 0):
        raise ConfigError(f"task config {PROXIMAL_MU_KEY}={raw!r} is not a number >= 0; fix: the server and the "
                          "trainer SDK come from different fedkube versions, use the same image for both")
    return mu


class ProximalTerm:
    """``mu/2 * ||w - w_global||^2`` over a module's trainable parameters, anchored at their values when made."""

    def __init__(self, module: torch.nn.Module, mu: float) -> None:
        if not (math.isfinite(mu) and mu >= 0):
            raise ValueError(f"FedProx's mu must be a finite number >= 0, got {mu!r}")
        self.mu = float(mu)
        # The anchors are copies: the optimizer changes the parameters in place, the global weights stay.
        self._pairs = [(p, p.detach().clone()) for p in module.parameters() if p.requires_grad] if mu else []

    @classmethod
    def from_task(cls, module: torch.nn.Module, task: FLModel) -> ProximalTerm:
        """The term for the task just received; call it after loading the task's weights into ``module``."""
        return cls(module, proximal_mu(task.config))

    def __call__(self) -> torch.Tensor:
        """The term's value now, differentiable in the parameters (a zero scalar when mu is 0)."""
        import torch

        if not self._pairs:
            return torch.zeros(())
        total = torch.stack([(p - anchor).pow(2).sum() for p, anchor in self._pairs]).sum()
        return total * (self.mu / 2.0)


__all__ = ["ProximalTerm", "proximal_mu"]
