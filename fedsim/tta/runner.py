"""Run an adapter over a test stream online and score it.

The runner hands the adapter only the images of each batch (``batch.x``); labels stay here
and are used for scoring after the prediction is returned.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.adapters.base import Adapter
from fedsim.tta.streams import StreamBatch


@dataclass
class BatchRecord:
    """Score of one batch: correct predictions out of ``samples``, wall seconds of the
    adapter's ``predict_and_adapt``."""

    index: int
    segment: int
    shift: str
    samples: int
    correct: int
    seconds: float
    metrics: dict[str, float] | None = None  # the adapter's metrics after this batch (record_metrics)

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples if self.samples else 0.0

    @property
    def error(self) -> float:
        return 1.0 - self.accuracy


@dataclass
class StreamResult:
    """Online scores of one adapter on one stream.

    ``segment_metrics[k]`` holds the change of each adapter metric over segment k (e.g.
    CEMA's bytes_up); ``metrics`` the adapter's metrics at the end of the stream.
    """

    adapter: str
    reset_on_new_shift: bool
    batches: list[BatchRecord] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    segment_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    stream: dict[str, Any] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(b.samples for b in self.batches)

    @property
    def accuracy(self) -> float:
        n = self.samples
        return sum(b.correct for b in self.batches) / n if n else 0.0

    def per_shift(self) -> list[dict[str, Any]]:
        """One entry per segment (contiguous run of one shift): samples, accuracy, error,
        adapter-metric changes."""
        out: dict[int, dict[str, Any]] = {}
        for b in self.batches:
            e = out.setdefault(
                b.segment, {"segment": b.segment, "shift": b.shift, "samples": 0, "correct": 0, "batches": 0}
            )
            e["samples"] += b.samples
            e["correct"] += b.correct
            e["batches"] += 1
        rows = []
        for seg, e in out.items():
            acc = e["correct"] / e["samples"] if e["samples"] else 0.0
            rows.append({**e, "accuracy": acc, "error": 1.0 - acc, "metrics": self.segment_metrics.get(seg, {})})
        return rows

    def to_records(self) -> list[dict[str, Any]]:
        """One dict per batch (adapter, index, segment, shift, samples, correct, accuracy,
        error, seconds, cumulative accuracy)."""
        rows, correct, seen = [], 0, 0
        for b in self.batches:
            correct += b.correct
            seen += b.samples
            rows.append(
                {
                    "adapter": self.adapter,
                    "index": b.index,
                    "segment": b.segment,
                    "shift": b.shift,
                    "samples": b.samples,
                    "correct": b.correct,
                    "accuracy": b.accuracy,
                    "error": b.error,
                    "seconds": b.seconds,
                    "cumulative_accuracy": correct / seen if seen else 0.0,
                    **({"metrics": dict(b.metrics)} if b.metrics is not None else {}),
                }
            )
        return rows

    def summary(self) -> dict[str, Any]:
        """Overall error (over samples), mean of per-shift errors, timing, adapter metrics
        (for CEMA: upload_fraction, bytes_up, bytes_down), reset policy and stream record."""
        shifts = self.per_shift()
        seconds = [b.seconds for b in self.batches]
        return {
            "adapter": self.adapter,
            "reset_on_new_shift": self.reset_on_new_shift,
            "samples": self.samples,
            "batches": len(self.batches),
            "accuracy": self.accuracy,
            "error": 1.0 - self.accuracy,
            "mean_shift_error": float(np.mean([s["error"] for s in shifts])) if shifts else 0.0,
            "per_shift": [
                {k: s[k] for k in ("segment", "shift", "samples", "accuracy", "error", "metrics")} for s in shifts
            ],
            "seconds_per_batch": float(np.mean(seconds)) if seconds else 0.0,
            "seconds_total": float(np.sum(seconds)),
            "metrics": dict(self.metrics),
            "stream": dict(self.stream),
        }


def _segment_of(batch: StreamBatch, previous: StreamBatch | None, current: int) -> int:
    seg = getattr(batch, "segment", None)
    if seg is not None:
        return int(seg)
    return current if previous is None or previous.shift == batch.shift else current + 1


def run_stream(
    adapter: Adapter, stream: Iterable[StreamBatch], reset_on_new_shift: bool, record_metrics: bool = False
) -> StreamResult:
    """Play ``stream`` through ``adapter`` online.

    For each batch the adapter gets ``batch.x`` only and returns logits made before it adapts
    on the batch; accuracy is scored against ``batch.y`` afterwards. With
    ``reset_on_new_shift`` the adapter is reset whenever a new segment (shift) starts (not
    before the first). Streams with a ``record()`` method (``TestStream``) are recorded in
    the result. ``record_metrics`` keeps the adapter's (cumulative) metrics after every
    batch in ``BatchRecord.metrics``.
    """
    result = StreamResult(
        adapter=getattr(adapter, "name", type(adapter).__name__), reset_on_new_shift=reset_on_new_shift
    )
    record = getattr(stream, "record", None)
    if callable(record):
        result.stream = record()
    previous: StreamBatch | None = None
    segment = 0
    seg_start = dict(adapter.metrics())

    def close_segment(seg: int) -> None:
        nonlocal seg_start
        now = adapter.metrics()
        result.segment_metrics[seg] = {k: now[k] - seg_start.get(k, 0.0) for k in now}
        seg_start = dict(now)

    for batch in stream:
        seg = _segment_of(batch, previous, segment)
        if previous is not None and seg != segment:
            close_segment(segment)
            if reset_on_new_shift:
                adapter.reset()
        segment = seg
        start = time.perf_counter()
        logits = adapter.predict_and_adapt(batch.x)
        seconds = time.perf_counter() - start
        pred = logits.argmax(dim=1).cpu()
        y = torch.as_tensor(batch.y).cpu()
        if pred.shape != y.shape:
            raise ValueError(f"adapter returned {tuple(logits.shape)} logits for {tuple(y.shape)} labels")
        result.batches.append(
            BatchRecord(
                batch.index,
                seg,
                batch.shift,
                int(y.numel()),
                int((pred == y).sum()),
                seconds,
                dict(adapter.metrics()) if record_metrics else None,
            )
        )
        previous = batch
    if previous is not None:
        close_segment(segment)
    result.metrics = dict(adapter.metrics())
    return result


_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def running_accuracy(result: StreamResult) -> tuple[np.ndarray, np.ndarray]:
    """(samples seen after each batch, online accuracy over every sample seen so far): the
    running mean from the start of the stream, the quantity the online-TTA papers report."""
    samples = np.array([b.samples for b in result.batches], dtype=np.int64)
    correct = np.array([b.correct for b in result.batches], dtype=np.int64)
    seen = np.cumsum(samples)
    return seen, np.cumsum(correct) / np.maximum(seen, 1)


def _shift_starts(result: StreamResult) -> list[int]:
    batches = result.batches
    return [0] + [i for i in range(1, len(batches)) if batches[i].segment != batches[i - 1].segment]


def _plot_on_axis(ax: Any, results: list[StreamResult], title: str | None = None) -> None:
    """Per adapter: the running online accuracy (bold) and each shift's accuracy (thin steps).
    Adapters differ in colour, dash pattern and marker, so equal curves stay visible."""
    for k, res in enumerate(results):
        if not res.batches:
            continue
        seen, acc = running_accuracy(res)
        style, marker = _STYLES[k % len(_STYLES)], _MARKERS[k % len(_MARKERS)]
        x = np.concatenate([[0], seen])
        (line,) = ax.plot(
            seen,
            acc,
            linestyle=style,
            linewidth=1.8,
            marker=marker,
            markersize=4,
            markevery=max(1, len(seen) // 8) if len(seen) > 1 else None,
            label=f"{res.adapter}: {res.accuracy:.3f}",
            zorder=3 + k,  # dashed curves on top of solid ones
        )
        for seg in res.per_shift():
            members = [i for i, b in enumerate(res.batches) if b.segment == seg["segment"]]
            x0, x1 = x[members[0]], x[members[-1] + 1]
            ax.hlines(seg["accuracy"], x0, x1, colors=line.get_color(), linestyles=style, linewidth=0.9, alpha=0.45)
    first = next((r for r in results if r.batches), None)
    if first is not None:
        x = np.concatenate([[0], np.cumsum([b.samples for b in first.batches])])
        for i in _shift_starts(first):
            ax.axvline(x[i], color="0.3", linestyle=(0, (2, 2)), linewidth=0.7)
            ax.text(
                x[i],
                0.98,
                f" {first.batches[i].shift}",
                fontsize=7,
                transform=ax.get_xaxis_transform(),
                ha="left",
                va="top",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 1},
            )
    ax.set_xlabel("samples seen")
    ax.set_ylabel("online accuracy")
    ax.set_ylim(0, 1.08)
    ax.grid(alpha=0.25)
    ax.legend(
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        fontsize=8,
        title="running accuracy (final)",
        title_fontsize=8,
        frameon=False,
    )
    if title:
        ax.set_title(title, fontsize=9, loc="left")


def plot_stream(result: StreamResult | list[StreamResult], path: str | Path) -> Path:
    """PNG of online accuracy over the stream for one or more results on the same stream:
    per adapter the running accuracy over every sample seen since the start (bold) and each
    shift's accuracy (thin steps), shift boundaries marked and named."""
    return plot_streams({"": result if isinstance(result, list) else [result]}, path)


def plot_streams(panels: dict[str, list[StreamResult]], path: str | Path, title: str | None = None) -> Path:
    """Like :func:`plot_stream`, one panel (row) per entry of ``panels`` (title -> results on
    one stream, e.g. one edge's stream with every adapter); ``title`` above them all."""
    from matplotlib.figure import Figure  # Agg, no pyplot state

    rows = max(1, len(panels))
    fig = Figure(figsize=(11, 4.2 if rows == 1 else 3.6 * rows))
    axes = fig.subplots(rows, 1, squeeze=False)
    for ax, (panel, results) in zip(axes[:, 0], panels.items()):
        _plot_on_axis(ax, results, panel or None)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
