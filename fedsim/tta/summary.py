"""What an adaptation run reports: per adapter, online error overall, per edge and per
shift (mean over edges and seeds), timing, adapter metrics, communication; and the table
``fedsim adapt`` prints."""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.table import Table

from fedsim.tta.config import AdaptationConfig
from fedsim.tta.runner import StreamResult


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _std(values: list[float]) -> float:
    return float(np.std(values)) if len(values) > 1 else 0.0


def summarize_results(results: dict[str, dict[int, dict[int, StreamResult]]], cfg: AdaptationConfig) -> dict[str, Any]:
    """Per adapter label: overall, per edge and per shift (segment) mean online error over
    edges and seeds, timing and the mean of every adapter metric per stream."""
    out: dict[str, Any] = {}
    for label, by_edge in results.items():
        all_res = [r for by_seed in by_edge.values() for r in by_seed.values()]
        per_seed_err: dict[int, list[float]] = {}
        for by_seed in by_edge.values():
            for seed, r in by_seed.items():
                per_seed_err.setdefault(seed, []).append(1.0 - r.accuracy)
        seed_means = [_mean(v) for v in per_seed_err.values()]
        segments: dict[int, dict[str, Any]] = {}
        for r in all_res:
            for s in r.per_shift():
                e = segments.setdefault(s["segment"], {"segment": s["segment"], "shift": s["shift"], "errors": []})
                e["errors"].append(s["error"])
        metric_keys = sorted({k for r in all_res for k in r.metrics})
        metrics_mean = {k: _mean([r.metrics.get(k, 0.0) for r in all_res]) for k in metric_keys}
        entry: dict[str, Any] = {
            "error": _mean([1.0 - r.accuracy for r in all_res]),
            "error_std_over_seeds": _std(seed_means),
            "error_per_seed": {str(s): m for s, m in zip(per_seed_err, seed_means)},
            "mean_shift_error": _mean([r.summary()["mean_shift_error"] for r in all_res]),
            "seconds_per_batch": _mean([b.seconds for r in all_res for b in r.batches]),
            "samples_per_stream": _mean([r.samples for r in all_res]),
            "streams": len(all_res),
            "per_shift": [
                {"segment": e["segment"], "shift": e["shift"], "error": _mean(e["errors"]), "streams": len(e["errors"])}
                for e in sorted(segments.values(), key=lambda e: e["segment"])
            ],
            "per_edge": {
                str(edge): {
                    "error": _mean([1.0 - r.accuracy for r in by_seed.values()]),
                    "per_seed": {str(seed): r.summary() for seed, r in by_seed.items()},
                }
                for edge, by_seed in by_edge.items()
            },
            "metrics_mean_per_stream": metrics_mean,
        }
        if "upload_fraction" in metrics_mean:
            samples = sum(r.metrics.get("samples", 0.0) for r in all_res)
            uploaded = sum(r.metrics.get("samples_uploaded", 0.0) for r in all_res)
            entry["communication"] = {
                "upload_fraction": uploaded / samples if samples else 0.0,
                "bytes_up_total": float(sum(r.metrics.get("bytes_up", 0.0) for r in all_res)),
                "bytes_down_total": float(sum(r.metrics.get("bytes_down", 0.0) for r in all_res)),
                "bytes_up_per_stream": metrics_mean.get("bytes_up", 0.0),
                "bytes_down_per_stream": metrics_mean.get("bytes_down", 0.0),
            }
        out[label] = entry
    return out


def print_table(console: Any, summary: dict[str, Any], title: str | None = None) -> None:
    """A rich table: per adapter the online error per edge, the mean (+- sd over seeds),
    ms per batch, and CEMA's upload fraction and megabytes each way."""
    results = summary["results"]
    edges = [str(e) for e in summary["edges"]]
    comm = any("communication" in r for r in results.values())
    table = Table(title=title or f"{summary['name']}: online error (mean over {len(summary['seeds'])} seed(s))")
    table.add_column("adapter")
    for e in edges:
        table.add_column(f"edge {e} ({summary['deployed'][e]['domain']})", justify="right")
    table.add_column("mean", justify="right")
    table.add_column("sd seeds", justify="right")
    table.add_column("ms/batch", justify="right")
    if comm:
        for col in ("upload", "MB up", "MB down"):
            table.add_column(col, justify="right")
    for label, r in results.items():
        row = [
            label,
            *[f"{r['per_edge'][e]['error']:.4f}" for e in edges],
            f"[b]{r['error']:.4f}[/b]",
            f"{r['error_std_over_seeds']:.4f}",
            f"{r['seconds_per_batch'] * 1e3:.1f}",
        ]
        if comm:
            c = r.get("communication")
            row += (
                [
                    f"{c['upload_fraction']:.3f}",
                    f"{c['bytes_up_total'] / 1e6:.2f}",
                    f"{c['bytes_down_total'] / 1e6:.3f}",
                ]
                if c
                else ["-", "-", "-"]
            )
        table.add_row(*row)
    console.print(table)
