"""SCAFFOLD (Karimireddy et al. 2020) for torch training loops: the client control variate and its correction.

With ``spec.strategy.name: scaffold`` every train task carries the server's
control variate ``c`` next to the model (tensors named ``scaffold/<tensor>``),
and every result must carry this site's ``Δc_i``. This helper does both ends,
plus the gradient correction ``g ← g - c_i + c`` that keeps a site with very
different data from drifting away from the others::

    import fedkube.trainer_sdk as fk
    from fedkube.trainer_sdk.scaffold import Scaffold

    fk.init()
    while fk.is_running():
        task = fk.receive()
        scaffold = Scaffold.from_task(net, task, lr=0.05)   # takes c out of task.params, loads c_i
        net.load_state_dict(task.params_torch())
        for x, y in batches:
            opt.zero_grad()
            loss_fn(net(x), y).backward()
            scaffold.correct()                              # after backward, before the step
            opt.step()
        scaffold.send(fk.FLModel(params=net.state_dict(), num_examples=n))

After local training (K calls of :meth:`Scaffold.correct`, learning rate
``lr``) it computes the paper's option II, ``c_i⁺ = c_i - c + (x - y_i)/(K·lr)``
with ``x`` the received model and ``y_i`` the trained one, and sends
``Δc_i = c_i⁺ - c_i`` with the model. The formula assumes plain SGD steps of
``lr`` (no momentum, no weight decay, no schedule): with another optimizer
pass its effective step size, or expect a weaker correction.

``c_i`` lives in this site's working directory (``fk.workdir()``), in
``fedkube-state/scaffold-client-variate.safetensors``, saved only when the
server accepted the result (``send`` returned True): a result the server set
aside changed nothing on either side. When the file is missing (the first
round, or a site whose working directory was lost) ``c_i`` starts at zero,
which is the paper's initialisation. Only trainable parameters have a
variate; the model's other float tensors (batch-norm statistics) send a zero
``Δc_i``. torch is imported only when a helper is made: the SDK does not need it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedkube import formats
from fedkube.errors import ConfigError
from fedkube.protocol import SCAFFOLD_PREFIX
from fedkube.trainer_sdk.model import FLModel

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

STATE_FILE = Path("fedkube-state") / "scaffold-client-variate.safetensors"
"""Where ``c_i`` is kept, relative to the site's working directory."""


def state_path(workdir: str | Path | None = None) -> Path:
    """The client variate's file under ``workdir`` (default: ``fk.workdir()``)."""
    if workdir is None:
        from fedkube.trainer_sdk import workdir as current

        workdir = current()
    return Path(workdir) / STATE_FILE


def split_variates(params: dict[str, Any]) -> dict[str, np.ndarray]:
    """Remove the server's ``c`` (``scaffold/<tensor>``) from a task's params, in place; return it by tensor name."""
    names = [n for n in params if n.startswith(SCAFFOLD_PREFIX)]
    return {n[len(SCAFFOLD_PREFIX) :]: np.asarray(params.pop(n)) for n in names}


class Scaffold:
    """One round of SCAFFOLD on a torch module: correct each gradient, then make the result with ``Δc_i``."""

    def __init__(
        self, module: torch.nn.Module, c: dict[str, np.ndarray], x: dict[str, np.ndarray], *, lr: float,
        path: Path | None,
    ) -> None:  # fmt: skip
        """``c`` the server's variate and ``x`` the received model (numpy, by tensor name); prefer :meth:`from_task`."""
        import torch

        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"SCAFFOLD needs the local learning rate lr > 0, got {lr!r}")
        self.lr = float(lr)
        self.path = path
        self.steps = 0
        self._params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        unknown = [n for n in self._params if n not in c]
        if unknown:
            raise ConfigError(f"the task carries no SCAFFOLD variate for parameter(s) {unknown[:3]}; fix: run the job "
                              "with spec.strategy.name scaffold, and load the task's model into this module")
        self._c = {n: torch.from_numpy(np.asarray(a, np.float32).copy()) for n, a in c.items()}
        self._x = {n: torch.from_numpy(np.asarray(x[n]).astype(np.float32)) for n in self._params}
        self.c_i = self._load_client_variate()
        # c - c_i once per round, on each parameter's device and dtype: correct() is one add per parameter.
        self._shift = {n: (self._c[n] - self.c_i[n]).to(device=p.device, dtype=p.dtype)
                       for n, p in self._params.items()}  # fmt: skip
        self._staged: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_task(cls, module: torch.nn.Module, task: FLModel, *, lr: float, workdir: str | Path | None = None,
                  persist: bool = True) -> Scaffold:  # fmt: skip
        """The helper for the task just received: takes ``c`` out of ``task.params`` (so ``load_state_dict`` sees
        only the model) and anchors ``x`` at the received model; call it before loading the params.

        ``persist=False`` keeps ``c_i`` in memory only (tests, or a site that accepts restarting it at zero).
        """
        if task.params is None:
            raise ConfigError("SCAFFOLD needs a train task's model; an init task has none (answer it with your "
                              "initial weights, without this helper)")
        c = split_variates(task.params)
        if not c:
            raise ConfigError("the task carries no SCAFFOLD control variate (scaffold/<tensor>); fix: run the job "
                              "with spec.strategy.name scaffold, or drop this helper from the script")
        return cls(module, c, task.params, lr=lr, path=state_path(workdir) if persist else None)

    def _load_client_variate(self) -> dict[str, torch.Tensor]:
        import torch

        zeros = {n: torch.zeros(tuple(p.shape), dtype=torch.float32) for n, p in self._params.items()}
        if self.path is None or not self.path.exists():
            log.info("SCAFFOLD: no client variate at %s; c_i starts at zero (the paper's initialisation)", self.path)
            return zeros
        stored = formats.load(self.path)
        fits = stored.keys() == zeros.keys() and all(tuple(stored[n].shape) == z.shape for n, z in zeros.items())
        if not fits:
            log.warning("SCAFFOLD: the client variate at %s does not fit this model (another model?); c_i starts "
                        "at zero", self.path)
            return zeros
        return {n: torch.from_numpy(np.asarray(a, np.float32).copy()) for n, a in stored.items()}

    def correct(self) -> None:
        """``g ← g - c_i + c`` for every parameter with a gradient; call it after ``backward()``, before the step."""
        import torch

        with torch.no_grad():
            for n, p in self._params.items():
                if p.grad is not None:
                    p.grad.add_(self._shift[n])
        self.steps += 1

    def result(self, model: FLModel) -> FLModel:
        """``model`` with this site's ``Δc_i`` added to its params (the updated ``c_i`` waits for :meth:`save`)."""
        import torch

        if model.params is None:
            raise ConfigError("SCAFFOLD's result needs the trained model's params")
        if self.steps < 1:
            raise ConfigError("SCAFFOLD: correct() was never called, so K (the local steps) is 0; fix: call "
                              "scaffold.correct() after each backward()")
        scale = 1.0 / (self.steps * self.lr)
        params = dict(model.params)
        staged: dict[str, torch.Tensor] = {}
        for name, c in self._c.items():
            y = params.get(name)
            if y is None:
                raise ConfigError(f"SCAFFOLD: the result has no tensor {name!r}, which the task's model has")
            if name not in self._params:
                params[SCAFFOLD_PREFIX + name] = _like(torch.zeros(tuple(c.shape)), y)
                continue
            y32 = (y.detach().to(device="cpu", dtype=torch.float32) if isinstance(y, torch.Tensor)
                   else torch.from_numpy(np.asarray(y).astype(np.float32)))  # fmt: skip
            c_plus = self.c_i[name] - c + (self._x[name] - y32) * scale  # option II
            staged[name] = c_plus
            params[SCAFFOLD_PREFIX + name] = _like(c_plus - self.c_i[name], y)
        self._staged = staged
        return FLModel(params=params, num_examples=model.num_examples, metrics=dict(model.metrics),
                       round=model.round, total_rounds=model.total_rounds, config=dict(model.config))  # fmt: skip

    def save(self) -> None:
        """Keep the ``c_i⁺`` of the last :meth:`result` as this site's variate (after the server accepted it)."""
        if self._staged is None:
            raise ConfigError("SCAFFOLD: save() before result(); nothing was computed to keep")
        self.c_i, self._staged = self._staged, None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            formats.save({n: t.numpy() for n, t in self.c_i.items()}, self.path, "safetensors")

    def send(self, model: FLModel) -> bool:
        """``fk.send`` the result with ``Δc_i``; keeps ``c_i⁺`` only when the server used it (returns True)."""
        from fedkube.trainer_sdk import send

        accepted = send(self.result(model))
        if accepted:
            self.save()
        return accepted


def _like(value: torch.Tensor, like: Any) -> Any:
    """A float32 CPU tensor in the dtype (and kind: torch or numpy) of the result's tensor it goes with."""
    import torch

    if isinstance(like, torch.Tensor):
        return value.to(like.dtype)
    return value.numpy().astype(np.asarray(like).dtype)


__all__ = ["STATE_FILE", "Scaffold", "split_variates", "state_path"]
