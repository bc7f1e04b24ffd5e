"""Stream runner: scoring, resets, records, plot."""

from __future__ import annotations

import numpy as np
import torch
from bn_models import small_bn_cnn
from torch import nn

from fedsim.adapters import build_adapter
from fedsim.adapters.base import Adapter
from fedsim.tta.runner import _plot_on_axis, plot_stream, run_stream, running_accuracy
from fedsim.tta.streams import build_stream


class MeanPixel(Adapter):
    """Test adapter: class = floor(10 * mean pixel); records what it is given and resets."""

    name = "mean_pixel"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.calls: list[tuple] = []
        self.resets = 0

    def _predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((x,))  # record what the adapter is given
        return mean_pixel_logits(x)

    def reset(self) -> None:
        super().reset()
        self.resets += 1


def mean_pixel_logits(x: torch.Tensor) -> torch.Tensor:
    cls = (x.mean(dim=(1, 2, 3)) * 10).floor().clamp(0, 9).long()
    return torch.nn.functional.one_hot(cls, 10).float()


def _stream(protocol: str = "reset-each-shift"):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    images = (rng.random((60, 8, 8, 3)) * 255).astype(np.uint8)
    labels = rng.integers(0, 10, 60)
    labels[:30] = np.floor(images[:30].mean(axis=(1, 2, 3)) / 255 * 10)  # half predictable
    return build_stream(
        ["a", "b"],
        domains={"a": (images[:30], labels[:30]), "b": (images[30:], labels[30:])},
        protocol=protocol,
        batch_size=8,
        seed=0,
    )


def test_scores_per_batch_and_shift() -> None:
    stream = _stream()
    adapter = MeanPixel(nn.Identity())
    result = run_stream(adapter, stream, reset_on_new_shift=True)
    batches = list(stream)
    assert len(adapter.calls) == len(batches) and adapter.resets == 1
    for (x,), b, rec in zip(adapter.calls, batches, result.batches):
        assert torch.equal(x, b.x)
        assert rec.correct == int((mean_pixel_logits(b.x).argmax(1) == b.y).sum()) and rec.samples == len(b.y)
    shifts = result.per_shift()
    assert [s["shift"] for s in shifts] == ["a", "b"] and [s["samples"] for s in shifts] == [30, 30]
    correct = {s: sum(r.correct for r in result.batches if r.shift == s) for s in "ab"}
    assert shifts[0]["accuracy"] == correct["a"] / 30 and shifts[1]["error"] == 1 - correct["b"] / 30
    summary = result.summary()
    assert summary["error"] == 1 - (correct["a"] + correct["b"]) / 60
    assert summary["mean_shift_error"] == np.mean([shifts[0]["error"], shifts[1]["error"]])
    assert summary["stream"]["protocol"] == "reset-each-shift" and summary["samples"] == 60
    records = result.to_records()
    assert len(records) == len(batches) and records[-1]["cumulative_accuracy"] == result.accuracy
    assert MeanPixel(nn.Identity()).resets == 0
    no_reset = MeanPixel(nn.Identity())
    run_stream(no_reset, stream, reset_on_new_shift=False)
    assert no_reset.resets == 0


def test_cema_metrics_and_plot(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    images = (rng.random((64, 16, 16, 3)) * 255).astype(np.uint8)
    stream = build_stream(
        ["gaussian_noise@2", "fog@1"],
        images=images,
        labels=rng.integers(0, 10, 64),
        protocol="continual",
        batch_size=16,
        seed=0,
    )
    cema = build_adapter("cema", small_bn_cnn(), foundation=small_bn_cnn(seed=4, width=12), upload_all=True)
    result = run_stream(cema, stream, reset_on_new_shift=False)
    s = result.summary()  # bytes up: uint8 images + the BN statistics the edge's first batch set (float32, once)
    assert s["metrics"]["upload_fraction"] == 1.0 and s["metrics"]["bytes_up"] == 128 * 3 * 16 * 16 + 4 * 2 * (
        8 + 8 + 16
    )
    assert s["metrics"]["bytes_down"] > 0
    assert [p["metrics"]["samples_uploaded"] for p in s["per_shift"]] == [64.0, 64.0]
    tbn = run_stream(build_adapter("tbn", small_bn_cnn()), stream, reset_on_new_shift=False)
    path = plot_stream([result, tbn], tmp_path / "stream.png")
    assert path.exists() and path.read_bytes()[:4] == b"\x89PNG"


def test_plot_running_accuracy_from_the_start_and_distinguishable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from matplotlib.figure import Figure

    rng = np.random.default_rng(2)
    images = (rng.random((40, 16, 16, 3)) * 255).astype(np.uint8)
    stream = build_stream(
        ["gaussian_noise@2", "fog@1"],
        images=images,
        labels=rng.integers(0, 10, 40),
        protocol="continual",
        batch_size=1,
        seed=0,
    )
    a = run_stream(build_adapter("tbn", small_bn_cnn()), stream, reset_on_new_shift=False)
    b = run_stream(build_adapter("tbn", small_bn_cnn()), stream, reset_on_new_shift=False)
    a.adapter, b.adapter = "tbn", "tbn-copy"
    seen, acc = running_accuracy(a)
    correct = np.cumsum([bt.correct for bt in a.batches])
    assert seen.tolist() == list(range(1, 81))  # two shifts of 40 samples at batch size 1
    np.testing.assert_allclose(acc, correct / np.arange(1, 81))
    assert acc[-1] == a.accuracy
    ax = Figure().subplots()
    _plot_on_axis(ax, [a, b])
    main = [ln for ln in ax.lines if ln.get_label() in (f"tbn: {a.accuracy:.3f}", f"tbn-copy: {b.accuracy:.3f}")]
    assert len(main) == 2  # equal results: two curves, told apart by style
    assert len({(ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in main}) == 2
    assert all(len(ln.get_xdata()) == 80 and ln.get_xdata()[0] == 1 for ln in main)  # from the first sample
    assert [t.get_text().strip() for t in ax.texts] == ["gaussian_noise@2", "fog@1"]
    assert "online accuracy" == ax.get_ylabel() and "err" not in ax.get_legend().get_texts()[0].get_text()
