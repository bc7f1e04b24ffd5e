"""Device profiles: from what an edge measured to what a profiled device would see.

Estimates (per edge and adapter, over its whole stream), for a profile ``p``:

- compute seconds = measured adapter seconds on this machine / ``p.compute``;
- transfer seconds = bytes_up * 8 / uplink + bytes_down * 8 / downlink (+ ``p.rtt_ms`` per
  exchange with the cloud: one per cloud round, CEMA only);
- latency per batch = (compute + transfer) / batches;
- energy (J) = ``p.compute_w`` * compute seconds + ``p.radio_nj_per_bit`` * 1e-9 * bits moved;
- memory = parameters and buffers + every layer output of one batch (an upper bound for
  forward-only inference), checked against ``p.memory_mb``.

These are first-order estimates (linear compute scaling, no contention, no protocol
overhead beyond the payload); they rank devices and methods, they do not replace a
measurement on the device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedsim.arrays import atomic_write_bytes
from fedsim.data.loading import load_dataset
from fedsim.edge.config import DeviceProfile, EdgeConfig
from fedsim.models import build_model

DEVICES = "devices.json"


def model_memory_bytes(model: nn.Module, batch: torch.Tensor) -> int:
    """Parameters + buffers + the sum of every leaf module's output for ``batch``."""
    static = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    acts = 0

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        nonlocal acts
        if isinstance(out, torch.Tensor):
            acts += out.numel() * out.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model.eval()
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return int(static + acts)


def estimate(
    profile: DeviceProfile,
    seconds: float,
    batches: int,
    bytes_up: float,
    bytes_down: float,
    exchanges: int,
    memory_bytes: int,
) -> dict[str, Any]:
    """Latency, energy and memory fit of one edge's stream on ``profile`` (module docstring)."""
    compute_s = seconds / profile.compute
    transfer_s = (
        bytes_up * 8 / (profile.uplink_mbps * 1e6)
        + bytes_down * 8 / (profile.downlink_mbps * 1e6)
        + exchanges * profile.rtt_ms / 1e3
    )
    energy = profile.compute_w * compute_s + profile.radio_nj_per_bit * 1e-9 * 8 * (bytes_up + bytes_down)
    return {
        "profile": profile.name,
        "compute_s": compute_s,
        "transfer_s": transfer_s,
        "latency_ms_per_batch": 1e3 * (compute_s + transfer_s) / max(batches, 1),
        "energy_j": energy,
        "memory_mb": memory_bytes / 2**20,
        "fits_memory": memory_bytes <= profile.memory_mb * 2**20,
    }


def _memory_of(scenario: Any) -> int:
    ds = load_dataset(scenario.data)
    m = scenario.model
    model = build_model(m.name, ds.num_classes, ds.channels, ds.image_size, m.normalization, m.args, seed=scenario.seed)
    batch = scenario.adaptation.stream.batch_size if scenario.adaptation is not None else scenario.client.batch_size
    return model_memory_bytes(model, torch.zeros(batch, ds.channels, ds.image_size, ds.image_size))


def device_report(scenario: Any, summary: dict[str, Any] | None) -> dict[str, Any]:
    """Per edge and adapter: online accuracy beside the profile's estimates."""
    edge_cfg: EdgeConfig = scenario.edge or EdgeConfig()
    memory = _memory_of(scenario)
    rows: list[dict[str, Any]] = []
    for label, result in ((summary or {}).get("results") or {}).items():
        for edge, entry in result["per_edge"].items():
            for seed, s in entry["per_seed"].items():
                m = s.get("metrics", {})
                est = estimate(
                    edge_cfg.profile_of(int(edge)),
                    float(s["seconds_total"]),
                    int(s["batches"]),
                    float(m.get("bytes_up", 0.0)),
                    float(m.get("bytes_down", 0.0)),
                    int(m.get("cloud_steps", 0)),
                    memory,
                )
                rows.append(
                    {
                        "edge": int(edge),
                        "adapter": label,
                        "seed": int(seed),
                        "accuracy": s["accuracy"],
                        "samples": s["samples"],
                        "bytes_up": m.get("bytes_up", 0.0),
                        "bytes_down": m.get("bytes_down", 0.0),
                        **est,
                    }
                )
    return {
        "profiles": {k: v.model_dump() for k, v in edge_cfg.profiles.items()},
        "devices": {str(k): v for k, v in edge_cfg.devices.items()},
        "rows": rows,
    }


def write_device_report(
    run_dir: Path, scenario: Any, records: list[dict[str, Any]], summary: dict[str, Any] | None
) -> Path:
    report = device_report(scenario, summary)
    if records:
        report["training"] = {
            "bytes_up_total": records[-1].get("bytes_up_total"),
            "bytes_down_total": records[-1].get("bytes_down_total"),
            "rounds": records[-1].get("round"),
        }
    out = Path(run_dir) / "edge" / DEVICES
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, json.dumps(report, indent=2).encode())
    return out
