"""FedTiny's client side (also the magnitude-pruning baseline's): sparse payloads, masked
steps, top-k gradients of inactive weights, the round-1 candidate passes. See
:mod:`fedsim.strategies.fedtiny`."""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import MetricRecord, RecordDict
from torch import nn

from fedsim.arrays import numpy_to_record
from fedsim.engine.hooks import ClientHooks
from fedsim.strategies.fedtiny.sparsity import (
    decode,
    encode,
    index_dtype,
)

log = logging.getLogger(__name__)

GROW_KEY = "fedtiny.grow"  # train config: JSON {layer: k} of top-k inactive gradients to keep
UPLINK_IDX_KEY = "fedtiny.uplink_indices"
SEL_SAMPLES_KEY = "fedtiny.selection_samples"
GVAL, GIDX = "::gv", "::gi"
BN_STATS = ("running_mean", "running_var")


def candidate_prefix(j: int) -> str:
    return f"c{j}/"


def split_candidates(payload: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[int, dict[str, np.ndarray]]]:
    shared: dict[str, np.ndarray] = {}
    per: dict[int, dict[str, np.ndarray]] = {}
    for k, v in payload.items():
        if k.startswith("c") and "/" in k and k[1 : k.index("/")].isdigit():
            j = int(k[1 : k.index("/")])
            per.setdefault(j, {})[k[k.index("/") + 1 :]] = v
        else:
            shared[k] = v
    return shared, per


# -- client ------------------------------------------------------------------------------


class SparseClient(ClientHooks):
    """Client side of FedTiny and of the magnitude-pruning baseline.

    ``load`` decodes the sparse payload (values + indices -> dense weights and masks);
    ``before_step`` records the top-k gradients of inactive weights (when the config asks
    for them) and zeroes pruned weights' gradients; ``after_step`` re-applies the masks;
    ``reply`` encodes active values (+ indices) and the kept gradients. ``run_task`` runs
    FedTiny's forward-only selection jobs and a one-sample profile (output sizes for FLOPs).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.masks: dict[str, torch.Tensor] = {}
        self.np_masks: dict[str, np.ndarray] = {}
        self.grow_k: dict[str, int] = {
            str(k): int(v) for k, v in json.loads(str(config.get(GROW_KEY, "") or "{}")).items()
        }
        self.uplink_indices = bool(config.get(UPLINK_IDX_KEY, True))
        self._grad_buf: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._params: dict[str, nn.Parameter] = {}

    # training -----------------------------------------------------------------------
    def load(self, model: nn.Module, received, state) -> None:
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        dense, masks = decode(received, shapes)
        self.np_masks = masks
        super().load(model, dense, state)
        params = dict(model.named_parameters())
        self._params = {k: params[k] for k in masks if k in params}
        self.masks = {k: torch.from_numpy(m).to(self._params[k].device) for k, m in masks.items() if k in self._params}

    def before_step(self, model: nn.Module) -> None:
        super().before_step(model)
        with torch.no_grad():
            for k, p in self._params.items():
                if p.grad is None:
                    continue
                m = self.masks[k]
                if self.grow_k.get(k, 0) > 0:
                    self._keep_topk_grad(k, p.grad, m)
                p.grad.mul_(m)

    def _keep_topk_grad(self, key: str, grad: torch.Tensor, mask: torch.Tensor) -> None:
        """Running sum of this layer's inactive-weight gradients, of which only the top-k
        (by magnitude) entries are kept between steps: O(k) memory."""
        g = torch.where(mask, torch.zeros((), dtype=grad.dtype, device=grad.device), grad).flatten().clone()
        if key in self._grad_buf:
            idx, val = self._grad_buf[key]
            g.index_add_(0, idx, val)
        inactive = int((~mask).sum())
        k = min(self.grow_k[key], inactive)
        if k <= 0:
            return
        score = g.abs()
        score[mask.flatten()] = -1.0  # never keep an active weight
        idx = torch.topk(score, k, sorted=False).indices.sort().values
        self._grad_buf[key] = (idx, g[idx].clone())

    def after_step(self, model: nn.Module) -> None:
        super().after_step(model)
        with torch.no_grad():
            for k, p in self._params.items():
                p.mul_(self.masks[k])

    def reply(self, model: nn.Module, received, state) -> dict[str, np.ndarray]:
        arrays = super().reply(model, received, state)
        out = encode(arrays, self.np_masks, indices=self.uplink_indices)
        for key, k in self.grow_k.items():
            if k <= 0 or key not in self.masks:
                continue
            size = int(self.masks[key].numel())
            k = min(k, int((~self.masks[key]).sum()))
            if key in self._grad_buf:
                idx, val = self._grad_buf[key]
                idx_np, val_np = idx.cpu().numpy(), val.float().cpu().numpy()
            else:  # no step touched this layer: zeros, same shapes as every other client
                idx_np, val_np = np.flatnonzero(~self.np_masks[key].ravel())[:k], np.zeros(k, np.float32)
            out[key + GIDX] = idx_np.astype(index_dtype(size))
            out[key + GVAL] = val_np.astype(np.float32)
        return out

    # forward-only tasks ---------------------------------------------------------------
    def run_task(self, task: str, runtime: Any, client_id: int, received, state) -> RecordDict:
        if task == "fedtiny.profile":
            return self._profile(runtime, client_id)
        if task in ("fedtiny.bnstats", "fedtiny.loss"):
            return self._selection(task, runtime, client_id, received)
        return super().run_task(task, runtime, client_id, received, state)

    def _load_candidate(self, model: nn.Module, shared: dict[str, np.ndarray], part: dict[str, np.ndarray]) -> None:
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        dense, _ = decode({**shared, **part}, shapes)
        sd = model.state_dict()
        with torch.no_grad():
            for k, v in dense.items():
                if k in sd:
                    sd[k].copy_(torch.from_numpy(np.asarray(v)).reshape(sd[k].shape))

    def _selection(self, task: str, runtime: Any, client_id: int, received) -> RecordDict:
        model: nn.Module = runtime.model
        data = runtime.data.client(client_id)
        x, y = data.x_train, data.y_train
        cap = int(self.config.get(SEL_SAMPLES_KEY, 0) or 0)
        if cap and cap < len(y):
            x, y = x[:cap], y[:cap]
        shared, per = split_candidates(received)
        bns = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        batch = 256
        arrays: dict[str, np.ndarray] = {}
        metrics: dict[str, Any] = {"num-examples": int(len(y))}
        saved_momentum = [m.momentum for _, m in bns]
        try:
            for j in sorted(per):
                self._load_candidate(model, shared, per[j])
                if task == "fedtiny.bnstats":
                    for _, m in bns:
                        m.reset_running_stats()
                        m.momentum = None  # cumulative average over the forward passes
                    model.train()
                    with torch.no_grad():
                        for i in range(0, len(y), batch):
                            xb = x[i : i + batch]
                            if len(xb) < 2 and bns:
                                continue
                            model(xb.to(runtime.device))
                    for name, m in bns:
                        prefix = f"{name}." if name else ""
                        for s in BN_STATS:
                            arrays[f"{candidate_prefix(j)}{prefix}{s}"] = getattr(m, s).detach().cpu().numpy().copy()
                else:
                    model.eval()
                    loss = 0.0
                    with torch.no_grad():
                        for i in range(0, len(y), batch):
                            logits = model(x[i : i + batch].to(runtime.device))
                            loss += float(F.cross_entropy(logits, y[i : i + batch].to(runtime.device), reduction="sum"))
                    metrics[f"loss.{j}"] = loss / max(len(y), 1)
        finally:
            for (_, m), mom in zip(bns, saved_momentum):
                m.momentum = mom
        return RecordDict({"arrays": numpy_to_record(arrays), "metrics": MetricRecord(metrics)})

    def _profile(self, runtime: Any, client_id: int) -> RecordDict:
        """Output positions per conv / linear weight for one sample (for FLOPs)."""
        model: nn.Module = runtime.model
        x = runtime.data.client(client_id).x_train[:1].to(runtime.device)
        positions: dict[str, int] = {}
        handles = []
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                key = f"{name}.weight" if name else "weight"

                def hook(mod, inp, out, key=key):
                    if isinstance(mod, nn.Conv2d):
                        positions[key] = int(out.shape[-1] * out.shape[-2])
                    else:
                        positions[key] = int(out[0].numel() // mod.out_features)

                handles.append(m.register_forward_hook(hook))
        model.eval()
        try:
            with torch.no_grad():
                model(x)
        finally:
            for h in handles:
                h.remove()
        metrics = {"num-examples": 1, **{f"pos.{k}": v for k, v in positions.items()}}
        return RecordDict({"arrays": numpy_to_record({}), "metrics": MetricRecord(metrics)})
