"""The clients' local optimizer on CPU: ``torch.optim.SGD``'s and ``torch.optim.Adam``'s
single-tensor updates, in fedsim's own code.

Why: on CPU, torch.optim runs exactly these formulas (its foreach and fused kernels are for
accelerators: ``torch.optim.optimizer._default_to_fused_or_foreach``), but a process's first
``torch.optim`` optimizer imports ``torch._dynamo`` for its compile guards
(``torch._disable_dynamo`` on ``add_param_group``, ``graph_break`` in ``step``): 1.3 s here
(``python -m benchmarks.process_costs``; sympy, torch.distributed, ...) in every process
that trains a client. fedsim never
compiles the client step, so the inline runtime, each pool worker and each Flower client
actor paid it for nothing; on a 2-core machine it lands in the parallel runtime's first round
(issue #19). Each update below is torch's, operation for operation (the same bits:
``tests/engine/test_optim.py``); on other devices the client keeps ``torch.optim``.

:class:`ClientOptimizer` covers what :class:`fedsim.config.ClientConfig` sets: SGD (``lr``,
``momentum``, ``weight_decay``; no dampening or Nesterov) and Adam (``lr``,
``weight_decay``; torch's default betas and eps, no AMSGrad). A parameter without a gradient
is skipped, its state untouched, as torch.optim does; Adam counts steps per parameter.
"""

from __future__ import annotations

from typing import Any

import torch

from fedsim.config import ClientConfig

# torch.optim.Adam's defaults (ClientConfig does not set them)
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class ClientOptimizer:
    """SGD or Adam as ``torch.optim`` builds them from ``client`` (see the module docstring),
    over ``params`` (any shapes; :class:`fedsim.engine.vectorized.CohortOptimizer` passes
    tensors stacked along a leading client dimension, which the elementwise updates treat
    slice by slice)."""

    def __init__(self, client: ClientConfig, params: list[torch.Tensor]) -> None:
        self.c = client
        self.params = list(params)
        # per parameter, created at its first update as torch.optim does: "momentum_buffer"
        # (SGD with momentum), or "step", "exp_avg", "exp_avg_sq" (Adam)
        self.state: list[dict[str, Any]] = [{} for _ in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().requires_grad_(False)
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One update from the parameters' ``.grad``."""
        self.update([p.grad for p in self.params])

    @torch.no_grad()
    def update(self, grads: list[torch.Tensor | None]) -> None:
        """One update from ``grads`` (one per parameter, None: skipped)."""
        adam = self.c.optimizer == "adam"
        for param, grad, state in zip(self.params, grads, self.state):
            if grad is None:
                continue
            if adam:
                _adam_(param, grad, state, self.c.lr, self.c.weight_decay)
            else:
                _sgd_(param, grad, state, self.c.lr, self.c.momentum, self.c.weight_decay)

    def tensors(self, i: int) -> list[torch.Tensor]:
        """Parameter ``i`` and its state tensors (what one update changes)."""
        return [self.params[i], *(v for v in self.state[i].values() if isinstance(v, torch.Tensor))]


def _sgd_(
    param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], lr: float, momentum: float, weight_decay: float
) -> None:
    # torch.optim.sgd._single_tensor_sgd with dampening 0, nesterov and maximize off
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    if momentum != 0:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = grad.detach().clone()
        else:
            buf.mul_(momentum).add_(grad, alpha=1)
        grad = buf
    param.add_(grad, alpha=-lr)


def _adam_(param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], lr: float, weight_decay: float) -> None:
    # torch.optim.adam._single_tensor_adam, not capturable or differentiable, amsgrad,
    # maximize and decoupled weight decay off; torch keeps the step in a float32 tensor
    # and reads it back as a float, which is exact for any count reached here
    if not state:
        state["step"] = 0.0
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    beta1, beta2 = ADAM_BETAS
    state["step"] += 1.0
    step = state["step"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(ADAM_EPS)
    param.addcdiv_(exp_avg, denom, value=-step_size)


__all__ = ["ADAM_BETAS", "ADAM_EPS", "ClientOptimizer"]
