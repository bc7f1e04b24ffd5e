"""What an edge client deploys after federated training, and CEMA's cloud foundation model.

- :class:`ModelRun`: a trained run (folder, scenario, newest complete checkpoint), opened by
  :func:`fedsim.scenario.open_model_run`.
- :func:`deploy_model`: the model of one client: the global model, or the global model with
  the client's own local state (FedBN's normalization layers), read from
  ``clients/<id>/local.r<round>.safetensors`` (the newest version not after the checkpoint's
  round, i.e. the state that matches the global model).
- :func:`foundation_model`: a stronger model trained centrally on the pooled train data of
  the run's clients, cached in the run folder (``foundation/<key>.safetensors``).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedsim.arrays import atomic_write_bytes, load_arrays, save_arrays
from fedsim.config import Scenario
from fedsim.data.loading import load_dataset, partitions, to_tensor
from fedsim.engine.checkpoint import Checkpoint
from fedsim.engine.client_state import ClientState
from fedsim.models import build_model
from fedsim.results import RunFolder
from fedsim.schema import ScenarioError
from fedsim.tta.config import FoundationConfig

LOCAL_ITEM = "local"  # the ClientState item strategies keep local keys in (fedsim.engine.hooks)


class ModelRunError(ScenarioError):
    """A model run folder that cannot be used (not a run, no checkpoint); one line."""


@dataclass
class ModelRun:
    """A trained run: folder, scenario, newest complete checkpoint."""

    run: RunFolder
    scenario: Scenario
    checkpoint: Checkpoint

    @property
    def path(self) -> Path:
        return self.run.path


def _build(scenario: Scenario) -> nn.Module:
    ds = load_dataset(scenario.data)
    m = scenario.model
    return build_model(m.name, ds.num_classes, ds.channels, ds.image_size, m.normalization, m.args, seed=scenario.seed)


def _load_into(model: nn.Module, arrays: dict[str, np.ndarray], what: str) -> None:
    sd = model.state_dict()
    missing = [k for k in sd if k not in arrays]
    unknown = [k for k in arrays if k not in sd]
    if missing or unknown:
        raise ModelRunError(
            f"{what}: arrays do not fit the scenario's model (missing {missing[:3]}, unknown {unknown[:3]})"
        )
    with torch.no_grad():
        for k, v in sd.items():
            src = torch.from_numpy(np.ascontiguousarray(arrays[k]))
            if src.numel() != v.numel() or (src.ndim and v.ndim and tuple(src.shape) != tuple(v.shape)):
                raise ModelRunError(f"{what}: '{k}' has shape {tuple(src.shape)}, the model {tuple(v.shape)}")
            v.copy_(src.reshape(v.shape).to(v.dtype))  # scalars may be stored as [1]


def local_state(model_run: ModelRun, client_id: int) -> tuple[dict[str, np.ndarray] | None, int | None]:
    """The client's newest local state not after the checkpoint's round, and its round."""
    state = ClientState(model_run.path, client_id, model_run.checkpoint.round, inclusive=True)
    arrays = state.get(LOCAL_ITEM)
    return arrays, state._read_round.get(LOCAL_ITEM)


def deploy_model(model_run: ModelRun, client_id: int, which: str = "auto") -> tuple[nn.Module, dict[str, Any]]:
    """The model client ``client_id`` deploys: ``global``, ``personalized`` or ``auto``.

    Returns the model (eval mode, CPU) and a record of what was deployed.
    """
    if which not in ("auto", "global", "personalized"):
        raise ValueError(f"unknown deployment '{which}'")
    ckpt = model_run.checkpoint
    local, rnd = (None, None) if which == "global" else local_state(model_run, client_id)
    return deploy_arrays(model_run.scenario, ckpt.arrays, local, rnd, client_id, which, ckpt.round, str(model_run.path))


def deploy_arrays(
    scenario: Scenario,
    global_arrays: dict[str, np.ndarray],
    local: dict[str, np.ndarray] | None,
    local_round: int | None,
    client_id: int,
    which: str,
    checkpoint_round: int,
    where: str,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the deployed model from the global arrays and the client's local state (if
    any and ``which`` is not ``global``); ``where`` names the source in errors. Shared by
    the simulation (:func:`deploy_model`) and a deployed edge, which has its own state."""
    model = _build(scenario)
    _load_into(model, global_arrays, f"{where}: checkpoint round {checkpoint_round}")
    info: dict[str, Any] = {"client": int(client_id), "checkpoint_round": checkpoint_round, "deployed": "global"}
    if which != "global":
        if local is None:
            if which == "personalized":
                raise ModelRunError(
                    f"adaptation.model: personalized, but client {client_id} of {where} has no local state "
                    f"(strategy {scenario.strategy.name} keeps none, or the client never trained); use global"
                )
        else:
            sd = model.state_dict()
            unknown = [k for k in local if k not in sd]
            if unknown:
                raise ModelRunError(f"{where}: client {client_id} local state has unknown keys {unknown[:3]}")
            with torch.no_grad():
                for k, v in local.items():
                    src = torch.from_numpy(np.ascontiguousarray(v))
                    if src.numel() != sd[k].numel():
                        raise ModelRunError(
                            f"{where}: client {client_id} local '{k}' has shape {tuple(src.shape)}, the model {tuple(sd[k].shape)}"
                        )
                    sd[k].copy_(src.reshape(sd[k].shape).to(sd[k].dtype))
            info.update(deployed="personalized", local_round=local_round, local_keys=len(local))
    model.eval()
    return model, info


# -- CEMA's foundation model -------------------------------------------------------------


def pooled_train_data(
    scenario: Scenario, train_data: str = "clients", train_per_domain: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The union of all clients' train data (float [N, C, H, W] in [0, 1], int64 [N]);
    ``train_data="domains"``: the whole train split of every domain a client trained on,
    built with ``train_per_domain`` images per domain when given (the dataset's
    ``train_per_domain`` option; a dataset without one is an error naming the setting)."""
    if train_data not in ("clients", "domains"):
        raise ValueError(f"train_data must be clients or domains (got {train_data!r})")
    if train_per_domain is not None and train_data != "domains":
        raise ValueError("train_per_domain needs train_data='domains'")
    ds = load_dataset(scenario.data)
    if train_per_domain is not None:
        bigger = scenario.data.model_copy(
            update={"options": {**scenario.data.options, "train_per_domain": int(train_per_domain)}}
        )
        try:
            ds = load_dataset(bigger)
        except ScenarioError as exc:
            raise ScenarioError(f"foundation.train_per_domain: {exc}") from None
    pooled: dict[str, list[np.ndarray]] = {}
    for part in partitions(scenario.data, scenario.seed):
        for d, idx in part.train.items():
            everything = np.arange(len(ds.domains[d].y_train))
            pooled.setdefault(d, []).append(everything if train_data == "domains" else np.asarray(idx))
    xs, ys = [], []
    for d, chunks in pooled.items():
        idx = np.unique(np.concatenate(chunks)) if chunks else np.empty(0, np.int64)
        if len(idx):
            xs.append(np.asarray(ds.domains[d].x_train[idx]))
            ys.append(np.asarray(ds.domains[d].y_train)[idx])
    return to_tensor(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys).astype(np.int64))


def augment_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Training augmentation of the foundation model (``FoundationConfig.augment``): per
    sample a random affine map (rotation +-10 degrees, scale 0.9-1.1, translation +-8% of
    the side, border pixels repeated) and a brightness offset +-0.1, clipped to [0, 1].
    Deliberately none of the test streams' corruptions (noise, blur, contrast, jpeg)."""
    n = x.shape[0]
    u = torch.rand(n, 5, generator=gen)
    angle = (u[:, 0] - 0.5) * (2 * np.pi * 10 / 360) * 2
    scale = 0.9 + 0.2 * u[:, 1]
    tx, ty = (u[:, 2] - 0.5) * 0.32, (u[:, 3] - 0.5) * 0.32  # grid units: 2 = the side
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid.to(x.device), padding_mode="border", align_corners=False)
    out = out + ((u[:, 4] - 0.5) * 0.2).view(n, 1, 1, 1).to(x.device, x.dtype)
    return out.clamp(0.0, 1.0)


def corrupted_copy(x: torch.Tensor, names: list[str], seed: int) -> torch.Tensor:
    """``x`` (float [N, C, H, W] in [0, 1]) with half its images, chosen at random, corrupted
    by one of ``names`` at a random severity 1-5 (``FoundationConfig.augment_corruptions``),
    rounded to 1/255 steps as the streams' images are; seeded."""
    from fedsim.tta.corruptions import corrupt  # the corruption stack (scipy, skimage) only when asked for

    rng = np.random.default_rng([int(seed), 7])
    out = x.clone()
    chosen = np.flatnonzero(rng.random(len(x)) < 0.5)
    kind = rng.integers(0, len(names) * 5, size=len(chosen))
    for k in np.unique(kind):
        idx = torch.from_numpy(chosen[kind == k])
        name, severity = names[int(k) // 5], int(k) % 5 + 1
        out[idx] = torch.round(corrupt(x[idx], name, severity, rng).clamp(0, 1) * 255) / 255
    return out


def foundation_key(scenario: Scenario, cfg: FoundationConfig) -> str:
    settings = cfg.model_dump()
    if settings.get("train_per_domain") is None:
        # unset = the run's split: foundations cached before the setting existed keep their key
        settings.pop("train_per_domain", None)
    blob = json.dumps(
        {"foundation": settings, "data": scenario.data.model_dump(), "seed": scenario.seed, "v": 1},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def foundation_model(
    model_run: ModelRun, cfg: FoundationConfig, device: torch.device | None = None, log: Any = None
) -> tuple[nn.Module, dict[str, Any]]:
    """CEMA's foundation model: ``cfg.model`` (default cnn-small, width 64: twice the
    default width) with BatchNorm, trained centrally on the pooled train data of the run's
    clients (``cfg.train_data="domains"``: the whole train split of their domains) for
    ``cfg.epochs`` epochs (SGD, seeded; ``cfg.augment``: :func:`augment_batch`;
    ``cfg.augment_corruptions``: :func:`corrupted_copy`). Cached as
    ``<run>/foundation/<cfg.model>-<key>.safetensors`` (+ ``.json`` record); a cached file
    with the same key (settings, data, seed) is loaded instead of training again."""
    sc = model_run.scenario
    ds = load_dataset(sc.data)
    seed = sc.seed if cfg.seed is None else cfg.seed
    key = foundation_key(sc, cfg)
    folder = model_run.path / "foundation"
    weights = folder / f"{cfg.model}-{key}.safetensors"
    record_file = weights.with_suffix(".json")
    model = build_model(cfg.model, ds.num_classes, ds.channels, ds.image_size, "bn", cfg.args, seed=seed)
    if weights.is_file() and record_file.is_file():
        try:
            _load_into(model, load_arrays(weights), str(weights))
            record = json.loads(record_file.read_text())
            record["cached"] = True
            model.eval()
            return model, record
        except (OSError, ValueError, ScenarioError):
            pass  # unreadable or stale: train again
    device = device or torch.device("cpu")
    x, y = pooled_train_data(sc, cfg.train_data, cfg.train_per_domain)
    if cfg.augment_corruptions:
        x = corrupted_copy(x, list(cfg.augment_corruptions), int(seed))
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(y) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(int(seed))
    t0 = time.perf_counter()
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for epoch in range(cfg.epochs):
            perm = torch.randperm(len(y), generator=gen)
            total, correct, loss_sum = 0, 0, 0.0
            for s in range(steps_per_epoch):
                idx = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
                xb, yb = x[idx].to(device), y[idx].to(device)
                if cfg.augment:
                    xb = augment_batch(xb, gen)
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += float(loss.detach()) * len(yb)
                correct += int((logits.argmax(1) == yb).sum())
                total += len(yb)
            losses.append({"epoch": epoch + 1, "loss": loss_sum / total, "train_accuracy": correct / total})
            if log is not None:
                log(
                    f"foundation {cfg.model}: epoch {epoch + 1}/{cfg.epochs} loss {loss_sum / total:.4f} acc {correct / total:.4f}"
                )
    model.eval().cpu()
    record = {
        "model": cfg.model,
        "args": cfg.args,
        "settings": cfg.model_dump(),
        "seed": int(seed),
        "key": key,
        "train_samples": int(len(y)),
        "domains": list(ds.domains),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "epochs": losses,
        "train_wall_s": time.perf_counter() - t0,
        "file": str(weights),
    }
    save_arrays(weights, {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
    atomic_write_bytes(record_file, json.dumps(record, indent=2).encode())
    record["cached"] = False
    return model, record
