"""The clients' CPU optimizer (:mod:`fedsim.engine.optim`): torch.optim's SGD and Adam,
bit for bit, without torch._dynamo's import.

Each update is checked against ``torch.optim`` on a small model over several steps (the
same bits in parameters and optimizer state, a parameter without a gradient skipped), and a
fresh process that trains clients on CPU through ``fedsim run`` is checked not to import
``torch._dynamo`` (the 1.3 s per process this module exists to save)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import checkout_env, write_scenario
from torch import nn

from fedsim.config import ClientConfig
from fedsim.engine.optim import ClientOptimizer


class WithUnused(nn.Module):
    """A conv net with BatchNorm and a head it never calls (its parameters get no gradient)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def train(model: nn.Module, opt, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(6, 2, 6, 6, generator=g), torch.randint(0, 3, (6,), generator=g)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize(
    "optimizer,momentum,weight_decay",
    [
        ("sgd", 0.0, 0.0),
        ("sgd", 0.9, 0.0),
        ("sgd", 0.9, 5e-4),
        ("sgd", 0.0, 1e-3),
        ("adam", 0.0, 0.0),
        ("adam", 0.0, 1e-3),
    ],
)
def test_same_bits_as_torch_optim(optimizer, momentum, weight_decay):
    c = ClientConfig(
        optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 0.01, momentum=momentum, weight_decay=weight_decay
    )
    ours, theirs = WithUnused(), WithUnused()
    theirs.load_state_dict(ours.state_dict())
    opt = ClientOptimizer(c, list(ours.parameters()))
    ref = (
        torch.optim.Adam(theirs.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        if optimizer == "adam"
        else torch.optim.SGD(theirs.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    )
    before = copy.deepcopy(ours.state_dict())
    train(ours, opt, 7)
    train(theirs, ref, 7)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(ours.body[0].weight, before["body.0.weight"])  # it did train
    assert torch.equal(ours.unused.weight, before["unused.weight"])  # no gradient: untouched
    # the optimizer state too: the same tensors, none for the parameter without a gradient
    for p_ref, state in zip(theirs.parameters(), opt.state):
        ref_state = ref.state.get(p_ref, {})
        assert set(state) == set(ref_state)
        for key, value in ref_state.items():
            if isinstance(state[key], torch.Tensor):
                assert torch.equal(state[key], value), key
            else:
                assert state[key] == float(value), key


def test_zero_grad_without_set_to_none_zeroes_in_place():
    model = WithUnused()
    opt = ClientOptimizer(ClientConfig(), list(model.parameters()))
    F.cross_entropy(model(torch.randn(4, 2, 6, 6)), torch.tensor([0, 1, 2, 0])).backward()
    grad = model.body[0].weight.grad
    opt.zero_grad(set_to_none=False)
    assert model.body[0].weight.grad is grad and not grad.any()
    opt.zero_grad()
    assert model.body[0].weight.grad is None


def test_a_cpu_run_never_imports_torch_dynamo(tmp_path):
    """`fedsim run` on the inline runtime, clients trained with SGD and then with Adam, in a
    fresh process: torch._dynamo is never imported (torch.optim would import it)."""
    for optimizer in ("sgd", "adam"):
        path = write_scenario(tmp_path / f"{optimizer}.yaml", client={"optimizer": optimizer}, rounds=1)
        code = (
            "import sys\nfrom fedsim.cli import main\n"
            f"rc = main(['run', {str(path)!r}, '--out', {str(tmp_path / optimizer)!r}])\n"
            "assert rc == 0, rc\n"
            "print('dynamo' if 'torch._dynamo' in sys.modules else 'no dynamo')\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=checkout_env(), timeout=300
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == "no dynamo", optimizer
