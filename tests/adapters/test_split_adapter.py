"""The split-adapter example of docs/extending.md, run as written: in one process (against a
hand re-computation) and through the edge protocol's two halves (equal to the in-process run)."""

from __future__ import annotations

import copy
import importlib
import io
import re
import sys
from pathlib import Path

import pytest
import torch
from bn_models import small_bn_cnn

from fedsim.adapters import build_adapter
from fedsim.adapters._norm import entropy, norm_affine_parameters
from fedsim.adapters.base import SplitAdapter
from fedsim.edge.protocol import cloud_take, play_edge
from fedsim.tta.runner import BatchRecord, run_stream
from fedsim.tta.streams import StreamBatch

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> type[SplitAdapter]:
    """docs/extending.md's split-adapter block, saved as the one file it says it is."""
    text = DOC.read_text()
    block = re.search(r"## A cloud-edge \(split\) adapter.*?```python\n(.*?)```", text, re.DOTALL)
    assert block is not None, "docs/extending.md lost its split-adapter example"
    folder = tmp_path_factory.mktemp("example")
    (folder / "my_split.py").write_text(block.group(1))
    sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module("my_split")
    finally:
        sys.path.remove(str(folder))
    return module.UploadAllTent


def _stream(n: int = 4) -> list[StreamBatch]:
    g = torch.Generator().manual_seed(7)
    return [
        StreamBatch(
            x=torch.rand(12, 3, 16, 16, generator=g),
            y=torch.randint(0, 10, (12,), generator=g),
            shift="s",
            index=i,
            segment=i // 2,
        )
        for i in range(n)
    ]


def test_example_in_process_equals_hand_computation(example: type[SplitAdapter]) -> None:
    adapter = build_adapter("my_split:UploadAllTent", small_bn_cnn(), lr=0.05)
    assert isinstance(adapter, example)
    reference = copy.deepcopy(small_bn_cnn()).eval()
    params = list(norm_affine_parameters(reference))
    opt = torch.optim.SGD(params, lr=0.05)
    for b in _stream():
        with torch.no_grad():
            expected = reference(b.x)
        assert torch.allclose(adapter.predict_and_adapt(b.x), expected, atol=1e-6)  # predicts before the batch counts
        x = torch.round(b.x * 255).to(torch.uint8).float() / 255  # what the edge uploaded
        loss = entropy(reference(x)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.allclose(a, b) for a, b in zip(norm_affine_parameters(adapter.model), params, strict=True))
    m = adapter.metrics()
    affine = sum(p.numel() for p in params)
    assert (
        m["upload_fraction"] == 1.0
        and m["bytes_up"] == 48 * 3 * 16 * 16
        and m["bytes_down"] == 4 * 4 * affine
        and m["cloud_steps"] == 4
    )


@pytest.mark.parametrize("reset", [False, True])
def test_example_through_the_edge_protocol_equals_in_process(example: type[SplitAdapter], reset: bool) -> None:
    """The halves driven as fedsim.edge.protocol drives them on SuperNodes (a fresh edge half
    per message restored from its saved state, a boundary before each reset) score what the
    in-process adapter scores, batch by batch, counters included."""
    batches = _stream()
    in_process = run_stream(
        build_adapter("my_split:UploadAllTent", small_bn_cnn(), lr=0.05), batches, reset, record_metrics=True
    )

    settings = {"lr": 0.05}
    cloud = example.make_cloud(small_bn_cnn(), settings)
    counters = {"samples": 0.0, "batches": 0.0, "adapt_seconds": 0.0, "samples_uploaded": 0.0, "bytes_up": 0.0}
    saved, update, reset_next, start, bytes_down, resets = None, None, False, 0, 0.0, 0
    rows: list[BatchRecord] = []
    while start < len(batches):
        edge = example.make_edge(small_bn_cnn(), settings)  # each message: a fresh process
        if saved is not None:
            edge.load_state(torch.load(io.BytesIO(saved), weights_only=True))
        if update is not None:
            edge.apply(update)
        if reset_next:
            edge.reset()
        played, uploads, start, boundary = play_edge(
            edge, batches, start, cloud.upload_budget(), reset, counters, torch.device("cpu"), reset_next
        )
        buf = io.BytesIO()
        torch.save(edge.state(), buf)
        saved = buf.getvalue()
        got = [BatchRecord(*row) for row in played]
        update, bytes_down = cloud_take(cloud, got, uploads, bytes_down)
        reset_next = boundary
        if boundary:
            resets += 1
            cloud.reset()
            update = None
        rows.extend(got)

    def scores(records: list[BatchRecord]) -> list[tuple]:
        return [
            (r.index, r.correct, {k: v for k, v in (r.metrics or {}).items() if "seconds" not in k}) for r in records
        ]

    assert scores(rows) == scores(in_process.batches)
    assert len(rows) == 4 and rows[-1].metrics["cloud_steps"] == 4
    assert resets == (1 if reset else 0)  # segments [0, 0, 1, 1]: one reset, before batch 2
