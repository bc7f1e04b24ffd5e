"""FedTiny's server side: sparse start, adaptive BN selection, progressive prune-and-grow.
See :mod:`fedsim.strategies.fedtiny`."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedsim.arrays import numpy_to_record, record_nbytes, record_to_numpy
from fedsim.engine.hooks import TASK_KEY, hooks_path
from fedsim.strategies import STRATEGIES
from fedsim.strategies.fedavg import FedAvg
from fedsim.strategies.fedtiny.client import (
    GIDX,
    GROW_KEY,
    GVAL,
    SEL_SAMPLES_KEY,
    UPLINK_IDX_KEY,
    SparseClient,
    candidate_prefix,
)
from fedsim.strategies.fedtiny.sparsity import (
    apply_masks,
    cosine_fraction,
    decode,
    encode,
    erk_densities,
    forward_flops,
    jitter_densities,
    magnitude_masks,
    model_bytes,
    overall_density,
    prunable_shapes,
    topk_mask,
    uniform_densities,
)

log = logging.getLogger(__name__)


# -- server ------------------------------------------------------------------------------


@STRATEGIES.register("fedtiny")
class FedTiny(FedAvg):
    """FedTiny; see the module docstring.

    Parameters: ``density`` (target fraction of active prunable weights, 0.1),
    ``layer_densities`` (``erk`` | ``uniform``), ``bn_selection`` (True),
    ``num_candidates`` (K = 5), ``candidate_jitter`` (sigma of the log-normal density
    factors of candidates 1..K-1, 0.3, **unconfirmed**), ``selection_samples`` (cap on
    each client's samples in the selection passes, 0 = all), ``progressive`` (True),
    ``delta_t`` (10), ``t_end`` (300), ``alpha`` (0.2), ``uplink_indices`` (True),
    ``seed`` (candidate densities; fedsim passes the scenario seed unless set), and every
    :class:`FedAvg` argument.
    """

    client_hooks = hooks_path(SparseClient)

    def __init__(
        self,
        density: float = 0.1,
        layer_densities: str = "erk",
        bn_selection: bool = True,
        num_candidates: int = 5,
        candidate_jitter: float = 0.3,
        selection_samples: int = 0,
        progressive: bool = True,
        delta_t: int = 10,
        t_end: int = 300,
        alpha: float = 0.2,
        uplink_indices: bool = True,
        seed: int = 0,
        **kwargs,
    ) -> None:
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1] (got {density})")
        if layer_densities not in ("erk", "uniform"):
            raise ValueError(f"layer_densities must be 'erk' or 'uniform' (got {layer_densities!r})")
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1 (got {num_candidates})")
        if delta_t < 1 or t_end < 1:
            raise ValueError("delta_t and t_end must be >= 1")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1] (got {alpha})")
        super().__init__(**kwargs)
        self.density = float(density)
        self.layer_densities = layer_densities
        self.bn_selection = bool(bn_selection)
        self.num_candidates = int(num_candidates)
        self.candidate_jitter = float(candidate_jitter)
        self.selection_samples = int(selection_samples)
        self.progressive = bool(progressive)
        self.delta_t = int(delta_t)
        self.t_end = int(t_end)
        self.alpha = float(alpha)
        self.uplink_indices = bool(uplink_indices)
        self.seed = int(seed)
        self.client_config = {UPLINK_IDX_KEY: self.uplink_indices, SEL_SAMPLES_KEY: self.selection_samples}
        # server state (state_dict / load_state_dict)
        self.masks: dict[str, np.ndarray] = {}
        self.positions: dict[str, int] = {}
        self.selected: int = -1
        self.candidate_losses: list[float] = []
        self.selection_bytes = (0, 0)
        self.grad_acc: dict[str, np.ndarray] = {}  # averaged gradients of a pending grow step
        self.dense_equiv_totals = [0.0, 0.0]  # (down, up) over all rounds so far
        # per-round scratch
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self._grow: dict[str, int] = {}
        self._sent = 0

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {f"mask/{k}": m.astype(np.uint8) for k, m in self.masks.items()}
        arrays.update({f"grad/{k}": g for k, g in self.grad_acc.items()})
        scalars = {
            "selected": self.selected,
            "candidate_losses": list(self.candidate_losses),
            "positions": dict(self.positions),
            "selection_bytes": list(self.selection_bytes),
            "dense_equiv_totals": list(self.dense_equiv_totals),
        }
        return arrays, scalars

    def load_state_dict(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any]) -> None:
        self.masks = {k[len("mask/") :]: np.asarray(v).astype(bool) for k, v in arrays.items() if k.startswith("mask/")}
        self.grad_acc = {k[len("grad/") :]: np.asarray(v) for k, v in arrays.items() if k.startswith("grad/")}
        self.selected = int(scalars.get("selected", -1))
        self.candidate_losses = [float(v) for v in scalars.get("candidate_losses", [])]
        self.positions = {str(k): int(v) for k, v in dict(scalars.get("positions", {})).items()}
        self.selection_bytes = tuple(int(v) for v in scalars.get("selection_bytes", [0, 0]))  # type: ignore[assignment]
        self.dense_equiv_totals = [float(v) for v in scalars.get("dense_equiv_totals", [0.0, 0.0])]

    # -- helpers ------------------------------------------------------------------------
    def base_densities(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
        if self.layer_densities == "uniform":
            return uniform_densities(shapes, self.density)
        return erk_densities(shapes, self.density)

    def candidate_densities(self, shapes: dict[str, tuple[int, ...]]) -> list[dict[str, float]]:
        base = self.base_densities(shapes)
        out = [base]
        for j in range(1, self.num_candidates):
            rng = np.random.default_rng([self.seed, 0xF7, j])
            out.append(jitter_densities(shapes, base, self.density, self.candidate_jitter, rng))
        return out

    def grow_counts(self, server_round: int) -> dict[str, int]:
        """k per layer for a prune-and-grow step after ``server_round`` (empty if none)."""
        if not self.progressive or server_round % self.delta_t != 0 or server_round >= self.t_end:
            return {}
        frac = cosine_fraction(server_round, self.t_end, self.alpha)
        out = {}
        for key, m in self.masks.items():
            active = int(m.sum())
            k = min(int(math.floor(frac * active)), int(m.size - active))
            if k > 0:
                out[key] = k
        return out

    def _task_messages(
        self, node_ids: list[int], task: str, payload: dict[str, np.ndarray], config: ConfigRecord, server_round: int
    ) -> list[Message]:
        cfg = {k: v for k, v in dict(config).items()}
        cfg[TASK_KEY] = task
        cfg["server-round"] = server_round
        content = RecordDict({"arrays": numpy_to_record(payload), "config": ConfigRecord(cfg)})
        return [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n) for n in node_ids]

    @staticmethod
    def _good(replies) -> list[Message]:
        return [r for r in replies if not r.has_error() and r.has_content()]

    def _profile(self, grid, node_ids: list[int], config: ConfigRecord, server_round: int) -> None:
        for n in node_ids[:3]:  # one answer is enough; try a few in case one fails
            replies = self._good(
                grid.send_and_receive(self._task_messages([n], "fedtiny.profile", {}, config, server_round))
            )
            if replies:
                m = replies[0].content["metrics"]
                self.positions = {k[len("pos.") :]: int(v) for k, v in m.items() if k.startswith("pos.")}
                return
        log.warning("FedTiny: no client answered the profile task; FLOPs count 1 output position per weight")

    def select_candidate(
        self,
        grid,
        node_ids: list[int],
        arrays: dict[str, np.ndarray],
        cands: list[dict[str, np.ndarray]],
        config: ConfigRecord,
        server_round: int,
    ) -> tuple[int, dict[str, np.ndarray]]:
        """Adaptive BN selection over the candidate masks ``cands``; returns the winner's
        index and its averaged BN statistics."""
        prunable = set(cands[0])
        shared = {k: v for k, v in arrays.items() if k not in prunable}
        sparse_parts = []
        for j, masks in enumerate(cands):
            enc = encode({k: arrays[k] for k in prunable}, masks)
            sparse_parts.append({f"{candidate_prefix(j)}{k}": v for k, v in enc.items()})
        down = up = 0
        # (a) BN statistics of every candidate, forward passes only
        payload = dict(shared)
        for part in sparse_parts:
            payload.update(part)
        msgs = self._task_messages(node_ids, "fedtiny.bnstats", payload, config, server_round)
        down += len(msgs) * record_nbytes(numpy_to_record(payload))
        replies = self._good(grid.send_and_receive(msgs))
        stats: dict[str, np.ndarray] = {}
        if replies:
            w = np.array([float(r.content["metrics"]["num-examples"]) for r in replies])
            w = w / w.sum()
            recs = [record_to_numpy(r.content["arrays"]) for r in replies]
            up += sum(record_nbytes(r.content["arrays"]) for r in replies)
            for key in recs[0]:
                stats[key] = sum(wi * rec[key].astype(np.float64) for wi, rec in zip(w, recs)).astype(np.float32)
        # (b) every candidate's loss under the averaged statistics
        payload = dict(shared)
        for part in sparse_parts:
            payload.update(part)
        payload.update(stats)
        msgs = self._task_messages(node_ids, "fedtiny.loss", payload, config, server_round)
        down += len(msgs) * record_nbytes(numpy_to_record(payload))
        replies = self._good(grid.send_and_receive(msgs))
        self.selection_bytes = (down, up)
        if not replies:
            log.warning("FedTiny: no client answered the selection task; keeping candidate 0")
            self.candidate_losses = []
            return 0, {}
        w = np.array([float(r.content["metrics"]["num-examples"]) for r in replies])
        losses = [
            float(np.average([float(r.content["metrics"][f"loss.{j}"]) for r in replies], weights=w))
            for j in range(len(cands))
        ]
        self.candidate_losses = losses
        best = int(np.argmin(losses))
        prefix = candidate_prefix(best)
        return best, {k[len(prefix) :]: v for k, v in stats.items() if k.startswith(prefix)}

    def _initialize(
        self, arrays: dict[str, np.ndarray], grid, node_ids: list[int], config: ConfigRecord, server_round: int
    ) -> dict[str, np.ndarray]:
        shapes = prunable_shapes(arrays)
        dens = self.candidate_densities(shapes) if self.bn_selection else [self.base_densities(shapes)]
        cands = [magnitude_masks(arrays, d) for d in dens]
        self._profile(grid, node_ids, config, server_round)
        best, bn = 0, {}
        if self.bn_selection and len(cands) >= 1:
            best, bn = self.select_candidate(grid, node_ids, arrays, cands, config, server_round)
        self.selected = best
        self.masks = cands[best]
        arrays = apply_masks(arrays, self.masks)
        for k, v in bn.items():
            if k in arrays:
                arrays[k] = v.astype(arrays[k].dtype).reshape(arrays[k].shape)
        return arrays

    # -- Flower strategy API -----------------------------------------------------------------
    def configure_train(self, server_round, arrays, config, grid):
        msgs = list(super().configure_train(server_round, arrays, config, grid))  # samples the clients
        if not msgs:
            return msgs
        node_ids = [m.metadata.dst_node_id for m in msgs]
        dense = record_to_numpy(arrays)
        self._shapes = {k: tuple(v.shape) for k, v in dense.items()}
        self._dtypes = {k: v.dtype for k, v in dense.items()}
        if not self.masks:
            base_cfg = ConfigRecord({k: v for k, v in dict(config).items() if k != "server-round"})
            dense = self._initialize(dense, grid, node_ids, base_cfg, server_round)
        self._grow = self.grow_counts(server_round)
        config[GROW_KEY] = json.dumps(self._grow, sort_keys=True)
        record = numpy_to_record(encode(apply_masks(dense, self.masks), self.masks))
        self._sent = len(node_ids)
        return self._construct_messages(
            RecordDict({self.arrayrecord_key: record, self.configrecord_key: config}), node_ids, MessageType.TRAIN
        )

    def configure_evaluate(self, server_round, arrays, config, grid):
        if self.masks:
            arrays = numpy_to_record(encode(record_to_numpy(arrays), self.masks))
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        w = np.array([float(r.content["metrics"][self.weighted_by_key]) for r in valid], dtype=np.float64)
        w = w / w.sum()
        acc: dict[str, np.ndarray] = {}
        grads: dict[str, np.ndarray] = {}
        for wi, r in zip(w, valid):
            payload = record_to_numpy(r.content[self.arrayrecord_key])
            gparts = {k: v for k, v in payload.items() if k.endswith(GVAL) or k.endswith(GIDX)}
            dense, _ = decode(
                {k: v for k, v in payload.items() if k not in gparts}, self._shapes, masks=self.masks, dtype=np.float64
            )
            for k, v in dense.items():
                acc[k] = acc.get(k, 0.0) + wi * v.astype(np.float64)
            for k in gparts:
                if k.endswith(GVAL):
                    key = k[: -len(GVAL)]
                    g = grads.setdefault(key, np.zeros(int(np.prod(self._shapes[key])), np.float64))
                    np.add.at(g, payload[key + GIDX].astype(np.int64), wi * payload[k].astype(np.float64))
        new = {}
        for k, v in acc.items():
            dt = self._dtypes.get(k, np.dtype(np.float32))
            v = (np.rint(v) if np.issubdtype(dt, np.integer) else v).astype(dt)
            new[k] = v.reshape(self._shapes[k]) if k in self._shapes else v  # serialization may turn () into (1,)
        new = apply_masks(new, self.masks)
        changed = 0
        if self._grow and grads:
            self.grad_acc = {k: g.reshape(self._shapes[k]).astype(np.float32) for k, g in grads.items()}
            new, changed = self.prune_and_grow(new, self._grow)
            self.grad_acc = {}
        metrics = dict(self.train_metrics_aggr_fn([r.content for r in valid], self.weighted_by_key))
        metrics.update(self.cost_metrics(new, n_down=self._sent, n_up=len(valid)))
        metrics["mask_changed"] = float(changed)
        self.dense_equiv_totals[0] += metrics["bytes_down_dense_equiv"]
        self.dense_equiv_totals[1] += metrics["bytes_up_dense_equiv"]
        metrics["bytes_down_dense_equiv_total"], metrics["bytes_up_dense_equiv_total"] = self.dense_equiv_totals
        if self.bn_selection and self.selected >= 0:  # repeated every round: evaluation may skip round 1
            metrics["selected_candidate"] = float(self.selected)
            for j, loss in enumerate(self.candidate_losses):
                metrics[f"candidate_loss.{j}"] = loss
            metrics["selection_bytes_down"], metrics["selection_bytes_up"] = map(float, self.selection_bytes)
        return numpy_to_record(new), MetricRecord(metrics)

    def prune_and_grow(self, arrays: dict[str, np.ndarray], grow: dict[str, int]) -> tuple[dict[str, np.ndarray], int]:
        """Per layer: drop the k smallest-magnitude active weights, grow the k inactive ones
        with the largest |averaged gradient| (new weights start at 0). k is capped by the
        inactive weights that received a non-zero gradient, so density stays constant."""
        changed = 0
        out = dict(arrays)
        for key, k in grow.items():
            if key not in self.grad_acc:
                continue
            mask = self.masks[key].ravel()
            w = out[key].ravel().astype(np.float64)
            g = np.abs(self.grad_acc[key].ravel().astype(np.float64))
            g[mask] = 0.0
            k = min(k, int(np.count_nonzero(g)), int(mask.sum()))
            if k <= 0:
                continue
            grow_mask = topk_mask(g, k)
            drop_scores = np.where(mask, np.abs(w), np.inf)
            drop = np.argsort(drop_scores, kind="stable")[:k]
            new_mask = mask.copy()
            new_mask[drop] = False
            new_mask |= grow_mask
            new_w = out[key].ravel().copy()
            new_w[~new_mask] = 0
            new_w[grow_mask] = 0
            self.masks[key] = new_mask.reshape(self.masks[key].shape)
            out[key] = new_w.reshape(out[key].shape)
            changed += k
        return out, changed

    def cost_metrics(self, arrays: dict[str, np.ndarray], n_down: int, n_up: int) -> dict[str, float]:
        shapes = {k: self._shapes[k] for k in self.masks}
        active = {k: int(m.sum()) for k, m in self.masks.items()}
        n_all = sum(int(np.prod(s)) for s in self._shapes.values())
        n_dense_rest = n_all - sum(int(np.prod(s)) for s in shapes.values())
        dense_bytes = model_bytes(arrays)
        return {
            "density": overall_density(self.masks),
            "density_all": float((sum(active.values()) + n_dense_rest) / max(n_all, 1)),
            "flops_dense": float(forward_flops(shapes, self.positions)),
            "flops_sparse": float(forward_flops(shapes, self.positions, active)),
            "mem_dense_bytes": float(dense_bytes),
            "mem_sparse_bytes": float(model_bytes(arrays, self.masks)),
            "bytes_down_dense_equiv": float(n_down * dense_bytes),
            "bytes_up_dense_equiv": float(n_up * dense_bytes),
        }
