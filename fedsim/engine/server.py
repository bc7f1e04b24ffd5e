"""The ServerApp: drives a Flower strategy round by round, records and checkpoints.

The loop is the one of Flower's ``Strategy.start`` (configure_train -> send ->
aggregate_train -> configure_evaluate -> send -> aggregate_evaluate), run by fedsim so
that a run can start at any round (resume), every round is checkpointed, and a failed,
late or non-finite client reply is dropped from the aggregate instead of poisoning it.
Any ``flwr.serverapp.strategy.Strategy`` works unchanged.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedsim.arrays import all_finite, numpy_to_record, record_to_numpy
from fedsim.config import Scenario
from fedsim.data.loading import load_dataset, num_clients
from fedsim.engine.checkpoint import (
    Checkpoint,
    CheckpointDamaged,
    array_differences,
    fingerprint_differences,
    intact_checkpoints,
    load_strategy_state,
    save_checkpoint,
    scenario_fingerprint,
    strategy_state,
)
from fedsim.engine.grid import PartitionGrid, Traffic
from fedsim.engine.hooks import HOOKS_KEY
from fedsim.models import build_model
from fedsim.results import RunFolder
from fedsim.schema import ScenarioError


class RunFailure(RuntimeError):
    """The run cannot go on (divergence, too many failed clients); earlier rounds are kept."""


class ResumeRefused(ScenarioError):
    """The run folder cannot be resumed as it is (one line: which file, what differs)."""


def initial_arrays(scenario: Scenario) -> dict[str, np.ndarray]:
    ds = load_dataset(scenario.data)
    m = scenario.model
    model = build_model(m.name, ds.num_classes, ds.channels, ds.image_size, m.normalization, m.args, seed=scenario.seed)
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def seed_round(seed: int, rnd: int, phase: str, attempt: int = 0) -> None:
    """Seed Python's and numpy's global RNGs from (seed, round, phase): Flower's samplers use
    ``random.sample``, so client selection is reproducible and independent of history
    (a resumed run samples exactly what the uninterrupted one did)."""
    random.seed(f"{seed}/{rnd}/{phase}/{attempt}")
    np.random.seed(np.random.SeedSequence([seed, rnd, attempt, len(phase)]).generate_state(1)[0])


def _signature(msg: Message) -> tuple:
    arrays = next(iter(msg.content.array_records.values()), None)
    if arrays is None:
        return ()
    return tuple((k, tuple(v.shape)) for k, v in arrays.items())


def screen_replies(
    targets: list[int], replies: list[Message], check_shapes: bool = True
) -> tuple[list[Message], list[dict[str, Any]]]:
    """Keep well-formed replies; every other targeted client becomes a logged failure.
    Replies whose array names/shapes differ from the majority are malformed unless the
    strategy sets ``validate_shapes = False`` (payloads whose shapes vary by client)."""
    failures: list[dict[str, Any]] = []
    answered = {r.metadata.src_node_id for r in replies}
    for cid in targets:
        if cid not in answered:
            failures.append({"client": int(cid), "reason": "no reply (timeout)"})
    candidates = []
    for r in replies:
        cid = int(r.metadata.src_node_id)
        if r.has_error():
            failures.append({"client": cid, "reason": f"error: {r.error.reason}"})
            continue
        arrays = next(iter(r.content.array_records.values()), None)
        if arrays is not None and not all_finite(record_to_numpy(arrays)):
            failures.append({"client": cid, "reason": "non-finite values (NaN/Inf) in update"})
            continue
        candidates.append(r)
    if candidates and check_shapes:
        common = Counter(_signature(r) for r in candidates).most_common(1)[0][0]
        good = []
        for r in candidates:
            if _signature(r) == common:
                good.append(r)
            else:
                failures.append(
                    {"client": int(r.metadata.src_node_id), "reason": "arrays of unexpected names or shapes"}
                )
        candidates = good
    failures.sort(key=lambda f: f["client"])
    return candidates, failures


@dataclass
class Totals:
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_down_eval: int = 0
    pending: Traffic = field(default_factory=Traffic)
    pending_failures: list[dict[str, Any]] = field(default_factory=list)
    pending_wall_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "bytes_down_eval": self.bytes_down_eval,
            "pending": vars(self.pending),
            "pending_failures": self.pending_failures,
            "pending_wall_s": self.pending_wall_s,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Totals:
        """ValueError (naming the key) unless ``d`` is what :meth:`to_json` wrote."""
        try:
            totals = cls(
                int(d["bytes_up"]),
                int(d["bytes_down"]),
                int(d["bytes_down_eval"]),
                Traffic(**d["pending"]),
                list(d["pending_failures"]),
                float(d["pending_wall_s"]),
            )
        except KeyError as exc:
            raise ValueError(f"totals: key {exc} missing") from None
        except TypeError as exc:
            raise ValueError(f"totals: {exc}") from None
        return totals


class FederatedRun:
    """One experiment's server side, for a validated scenario. ``make_strategy`` builds the
    scenario's strategy (:func:`fedsim.scenario.build_strategy`; called for the run and to
    check a resumed checkpoint's strategy state); ``on_round`` is called with each metrics
    record."""

    def __init__(
        self,
        scenario: Scenario,
        run: RunFolder,
        make_strategy: Callable[[], Strategy],
        resume: bool = False,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.scenario = scenario
        self.run = run
        self.make_strategy = make_strategy
        self.resume = resume
        self.on_round = on_round
        self.num_clients = num_clients(scenario.data)
        self.records: list[dict[str, Any]] = []
        self.hello_config: dict[str, str] = {}  # sent with the discovery query
        self.grid: PartitionGrid | None = None  # the clients, once discovered
        self.warnings: list[str] = []  # one line each: damaged checkpoints skipped on resume
        self.checkpoint: Checkpoint | None = self._resume_point() if resume else None

    def _resume_point(self) -> Checkpoint | None:
        """The checkpoint a resume continues from, checked before anything is written.

        The newest intact checkpoint whose strategy state loads; damaged ones are skipped
        (a warning each). ResumeRefused if checkpoints exist but none is intact, if the
        scenario differs from the one the checkpoint was made with, or if metrics.jsonl
        has a line that is not a record. None: no checkpoint yet, start at round 1.
        """
        sc = self.scenario
        self.run.read_metrics()  # MetricsError (a ScenarioError) names a damaged line
        damaged: list[str] = []
        current = scenario_fingerprint(sc)
        model = initial_arrays(sc)
        for item in intact_checkpoints(self.run.checkpoints):
            if isinstance(item, CheckpointDamaged):
                damaged.append(str(item))
                continue
            where = f"{self.run.checkpoints}/round_{item.round:05d}"
            saved = item.meta.get("scenario")
            if not isinstance(saved, dict):
                damaged.append(f"{where}/meta.json: no scenario fingerprint (written before fedsim kept one)")
                continue
            diffs = fingerprint_differences(saved, current)
            if diffs:
                more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
                raise ResumeRefused(
                    f"{self.run.scenario_file}: differs from the scenario of checkpoint round {item.round}: {'; '.join(diffs[:3])}{more}; resume refused (restore it, or start a new run)"
                )
            diffs = array_differences(item.arrays, model)
            if diffs:
                raise ResumeRefused(
                    f"{where}/global.safetensors: arrays do not fit the scenario's model: {'; '.join(diffs[:3])}; resume refused"
                )
            try:
                Totals.from_json(item.meta["totals"])
                load_strategy_state(self.make_strategy(), item.strategy_arrays, item.meta["strategy"])
            except (ValueError, TypeError, KeyError) as exc:
                damaged.append(f"{where}: strategy state or totals unusable ({exc})")
                continue
            self.warnings = [f"skipped damaged checkpoint: {d}" for d in damaged]
            return item
        if damaged:
            raise ResumeRefused(
                f"no intact checkpoint to resume from: {damaged[0]}"
                + (f" (and {len(damaged) - 1} more damaged)" if len(damaged) > 1 else "")
            )
        return None

    def server_app(self) -> ServerApp:
        app = ServerApp()

        @app.main()
        def main(grid: Grid, context: Context) -> None:
            self.drive(grid)

        return app

    # ------------------------------------------------------------------------------
    def drive(self, grid: Grid) -> None:
        sc = self.scenario
        pgrid = PartitionGrid(grid, timeout_s=sc.faults.client_timeout_s)
        pgrid.discover(self.num_clients, config=self.hello_config)
        self.grid = pgrid
        strategy = self.make_strategy()
        start, arrays, totals = 1, numpy_to_record(initial_arrays(sc)), Totals()
        if self.resume:
            ckpt = self.checkpoint  # verified against the scenario when this run was made
            if ckpt is not None:
                start = ckpt.round + 1
                arrays = numpy_to_record(ckpt.arrays)
                totals = Totals.from_json(ckpt.meta["totals"])
                load_strategy_state(strategy, ckpt.strategy_arrays, ckpt.meta["strategy"])
                self.run.truncate_metrics(ckpt.round)
            else:
                self.run.truncate_metrics(0)
        self.records = self.run.read_metrics()
        client_cfg: dict[str, Any] = {HOOKS_KEY: getattr(strategy, "client_hooks", ""), "fedsim.seed": sc.seed}
        if sc.client.agc_lambda is not None:
            client_cfg["fedsim.agc.lambda"] = sc.client.agc_lambda
        client_cfg.update(getattr(strategy, "client_config", {}) or {})
        last_good = start - 1
        fingerprint = scenario_fingerprint(sc)
        for rnd in range(start, sc.rounds + 1):
            t0 = time.perf_counter()
            arrays, train_metrics, failures = self._train_round(strategy, pgrid, rnd, arrays, client_cfg)
            traffic = pgrid.take_traffic()
            totals.pending.add(traffic)
            totals.pending_failures.extend({"round": rnd, **f} for f in failures)
            evaluate = rnd % sc.evaluation.every == 0 or rnd == sc.rounds
            eval_metrics: dict[str, Any] = {}
            if evaluate:
                eval_metrics = self._evaluate_round(strategy, pgrid, rnd, arrays, client_cfg)
                totals.bytes_down_eval += pgrid.take_traffic().down
                if eval_metrics.get("loss") is not None and not math.isfinite(eval_metrics["loss"]):
                    raise RunFailure(
                        f"round {rnd}: test loss is {eval_metrics['loss']} (diverged); last good checkpoint: round {last_good} in {self.run.checkpoints}"
                    )
            totals.pending_wall_s += time.perf_counter() - t0
            if evaluate:
                self._record(rnd, totals, train_metrics, eval_metrics)
            state_arrays, state_scalars = strategy_state(strategy)
            meta = {"totals": totals.to_json(), "strategy": state_scalars, "scenario": fingerprint}
            save_checkpoint(self.run.checkpoints, Checkpoint(rnd, record_to_numpy(arrays), state_arrays, meta))
            last_good = rnd

    def _train_round(
        self, strategy: Strategy, grid: PartitionGrid, rnd: int, arrays: ArrayRecord, client_cfg: dict[str, Any]
    ) -> tuple[ArrayRecord, dict[str, Any], list[dict[str, Any]]]:
        sc = self.scenario
        all_failures: list[dict[str, Any]] = []
        for attempt in range(sc.faults.max_round_retries + 1):
            seed_round(sc.seed, rnd, "train", attempt)
            config = ConfigRecord({**client_cfg, "fedsim.attempt": attempt})
            sent = list(strategy.configure_train(rnd, arrays, config, grid))
            if not sent:
                return arrays, {}, all_failures
            targets = [m.metadata.dst_node_id for m in sent]
            replies = list(grid.send_and_receive(sent))
            good, failures = screen_replies(targets, replies, getattr(strategy, "validate_shapes", True))
            all_failures.extend({"attempt": attempt, **f} for f in failures)
            needed = math.ceil(sc.faults.min_success_fraction * len(sent))
            if len(good) >= needed:
                break
        else:
            if failures and all(f["reason"].startswith("non-finite") for f in failures):
                raise RunFailure(
                    f"round {rnd}: every client update is NaN/Inf (training diverged; try a lower client.lr); last good checkpoint: round {rnd - 1} in {self.run.checkpoints}"
                )
            raise RunFailure(
                f"round {rnd}: only {len(good)} of {len(sent)} clients succeeded after {sc.faults.max_round_retries + 1} attempts (faults.min_success_fraction={sc.faults.min_success_fraction}); run stopped, earlier rounds are kept in {self.run.path}"
            )
        new_arrays, metrics = strategy.aggregate_train(rnd, good)
        if new_arrays is not None:
            if not all_finite(record_to_numpy(new_arrays)):
                raise RunFailure(
                    f"round {rnd}: aggregated model has NaN/Inf (diverged); last good checkpoint: round {rnd - 1} in {self.run.checkpoints}"
                )
            arrays = new_arrays
        train_metrics = dict(metrics) if metrics is not None else {}
        train_metrics["num_sampled"] = len(sent)
        train_metrics["num_succeeded"] = len(good)
        train_loss = [float(r.content["metrics"]["train_loss"]) for r in good if "train_loss" in r.content["metrics"]]
        if train_loss:
            w = [float(r.content["metrics"]["num-examples"]) for r in good if "train_loss" in r.content["metrics"]]
            train_metrics["train_loss"] = float(np.average(train_loss, weights=w))
            if not math.isfinite(train_metrics["train_loss"]):
                raise RunFailure(
                    f"round {rnd}: training loss is NaN (diverged); last good checkpoint: round {rnd - 1} in {self.run.checkpoints}"
                )
        return arrays, train_metrics, all_failures

    def _evaluate_round(
        self, strategy: Strategy, grid: PartitionGrid, rnd: int, arrays: ArrayRecord, client_cfg: dict[str, Any]
    ) -> dict[str, Any]:
        seed_round(self.scenario.seed, rnd, "evaluate")
        sent = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(dict(client_cfg)), grid))
        replies = list(grid.send_and_receive(sent))
        good = [r for r in replies if not r.has_error()]
        strategy.aggregate_evaluate(rnd, good)
        per_client: dict[str, float] = {}
        domain_acc: dict[str, list[float]] = {}
        losses, weights = [], []
        for r in good:
            m = r.content["metrics"]
            cid = str(int(r.metadata.src_node_id))
            per_client[cid] = float(m["accuracy"])
            losses.append(float(m["loss"]))
            weights.append(float(m["num-examples"]))
            for key, total in m.items():
                if key.startswith("domain_total.") and total:
                    d = key[len("domain_total.") :]
                    domain_acc.setdefault(d, []).append(float(m[f"domain_correct.{d}"]) / float(total))
        order = list(load_dataset(self.scenario.data).domains)
        per_domain = {d: float(np.mean(domain_acc[d])) for d in order if d in domain_acc}
        return {
            "accuracy": float(np.mean(list(per_domain.values())))
            if per_domain
            else (float(np.mean(list(per_client.values()))) if per_client else None),
            "per_domain": per_domain,
            "per_client": dict(sorted(per_client.items(), key=lambda kv: int(kv[0]))),
            "client_accuracy_mean": float(np.mean(list(per_client.values()))) if per_client else None,
            "loss": float(np.average(losses, weights=weights)) if losses else None,
            "eval_failures": [
                {"client": int(r.metadata.src_node_id), "reason": r.error.reason} for r in replies if r.has_error()
            ],
        }

    def _record(self, rnd: int, totals: Totals, train_metrics: dict[str, Any], eval_metrics: dict[str, Any]) -> None:
        p = totals.pending
        totals.bytes_up += p.up
        totals.bytes_down += p.down
        record = {
            "round": rnd,
            **eval_metrics,
            "train_loss": train_metrics.pop("train_loss", None),
            "bytes_up": p.up,
            "bytes_down": p.down,
            "bytes_up_wire": p.up_wire,
            "bytes_down_wire": p.down_wire,
            "bytes_up_total": totals.bytes_up,
            "bytes_down_total": totals.bytes_down,
            "bytes_down_eval_total": totals.bytes_down_eval,
            "wall_s": totals.pending_wall_s,
            "failures": totals.pending_failures,
            "strategy_metrics": {k: v for k, v in train_metrics.items() if isinstance(v, (int, float))},
        }
        totals.pending, totals.pending_failures, totals.pending_wall_s = Traffic(), [], 0.0
        self.run.append_metrics(record)
        self.records.append(record)
        if self.on_round:
            self.on_round(record)
