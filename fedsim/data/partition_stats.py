"""What a partition gave each client: counts by label and by domain, as a plain-text table
and a heat map (``fedsim data partitions``).

The counts are of each client's whole share (its train and its own test split), which is
what the partitioner assigned; a client's train/test totals are separate columns. Samples
of a domain's train part that no client holds (left out by a partitioner, or beyond
``samples_per_client``) are reported per domain. The heat map follows flwr-datasets'
``plot_label_distributions(plot_type="heatmap")``: clients x labels, light-to-dark green,
a "Count" colour bar, counts written in the cells when there are few enough to read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsim.data.partition import ClientPartition
from fedsim.outputs import PNG_SOFTWARE


@dataclass(frozen=True)
class PartitionCounts:
    """``by_label``: [clients, classes]; ``by_domain``: [clients, domains]; ``train`` /
    ``test``: [clients]; ``unassigned``: domain -> train-part samples held by no client."""

    class_names: list[str]
    domains: list[str]
    main_domain: list[str]
    by_label: np.ndarray
    by_domain: np.ndarray
    train: np.ndarray
    test: np.ndarray
    unassigned: dict[str, int]


def count_partitions(
    parts: Sequence[ClientPartition], labels: dict[str, np.ndarray], class_names: Sequence[str]
) -> PartitionCounts:
    """Counts for ``parts`` (indices into the train parts whose labels are ``labels``)."""
    domains = list(labels)
    num_classes = len(class_names)
    by_label = np.zeros((len(parts), num_classes), dtype=np.int64)
    by_domain = np.zeros((len(parts), len(domains)), dtype=np.int64)
    held = {d: np.zeros(len(labels[d]), dtype=bool) for d in domains}
    for row, part in enumerate(parts):
        for d in domains:
            idx = np.concatenate(
                [part.train.get(d, np.empty(0, np.int64)), part.test.get(d, np.empty(0, np.int64))]
            ).astype(np.int64)
            by_label[row] += np.bincount(labels[d][idx], minlength=num_classes)[:num_classes]
            by_domain[row, domains.index(d)] = len(idx)
            held[d][idx] = True
    return PartitionCounts(
        class_names=list(class_names),
        domains=domains,
        main_domain=[p.domain for p in parts],
        by_label=by_label,
        by_domain=by_domain,
        train=np.array([p.num_train for p in parts], dtype=np.int64),
        test=np.array([p.num_test for p in parts], dtype=np.int64),
        unassigned={d: int((~held[d]).sum()) for d in domains},
    )


def _table(header: list[str], rows: list[list[str]], left: int) -> list[str]:
    """Columns as wide as their widest cell (nothing is cut); the first ``left`` columns
    left-aligned, the rest (numbers) right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), *(line(r) for r in rows)]


def format_counts(counts: PartitionCounts) -> str:
    """Two plain-text tables (by label, by domain) with a total row, then what no client holds."""
    n = len(counts.main_domain)
    head = ["client", "domain", "train", "test"]
    rows = [
        [str(c), counts.main_domain[c], str(counts.train[c]), str(counts.test[c]), *map(str, counts.by_label[c])]
        for c in range(n)
    ]
    rows.append(["total", "", str(counts.train.sum()), str(counts.test.sum()), *map(str, counts.by_label.sum(0))])
    out = ["samples per client by label (train + test):", *_table([*head, *counts.class_names], rows, 2), ""]
    rows = [[str(c), counts.main_domain[c], *map(str, counts.by_domain[c])] for c in range(n)]
    rows.append(["total", "", *map(str, counts.by_domain.sum(0))])
    out += ["samples per client by domain (train + test):", *_table(["client", "domain", *counts.domains], rows, 2), ""]
    left = ", ".join(f"{d} {k}" for d, k in counts.unassigned.items() if k)
    out.append(
        f"samples in no client: {left}" if left else "samples in no client: none (every train sample is in a client)"
    )
    return "\n".join(out)


ANNOTATE_MAX_CELLS = 600  # beyond this the numbers no longer fit in their cells


def save_heatmap(counts: PartitionCounts, path: str | Path, title: str) -> Path:
    """PNG heat map: clients (rows) x labels, and beside it clients x domains.

    matplotlib's Agg canvas directly (no pyplot): headless, no global figure state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n, c, d = counts.by_label.shape[0], counts.by_label.shape[1], counts.by_domain.shape[1]
    annotate = n * (c + d) <= ANNOTATE_MAX_CELLS
    cell_w = 0.5 if annotate else 0.2
    cell_h = 0.32 if annotate else min(0.2, 24 / max(n, 1))
    width = min(2.0 + cell_w * (c + d) + 1.6, 60.0)
    height = min(1.6 + cell_h * n, 40.0)
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(c, 1), max(d, 1)]}, squeeze=False)[0]
    for ax, data, names, xlabel in (
        (axes[0], counts.by_label, counts.class_names, "label"),
        (axes[1], counts.by_domain, counts.domains, "domain"),
    ):
        image = ax.imshow(data, cmap="Greens", aspect="auto", interpolation="nearest", vmin=0)
        ax.set_xlabel(xlabel)
        if len(names) <= 60:
            ax.set_xticks(range(len(names)), names, rotation=90 if max(map(len, names)) > 3 else 0, fontsize=8)
        if n <= 60:
            ax.set_yticks(range(n), [str(i) for i in range(n)], fontsize=8)
        if annotate:
            top = data.max() if data.size else 0
            for (row, col), value in np.ndenumerate(data):
                ax.text(
                    col,
                    row,
                    f"{value:,d}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if top and value > 0.6 * top else "black",
                )
        fig.colorbar(image, ax=ax, label="Count", pad=0.02)
    axes[0].set_ylabel("client")
    axes[0].set_title("per client label distribution", fontsize=10)
    axes[1].set_title("per client domain", fontsize=10)
    fig.suptitle(title, fontsize=11)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", metadata={"Software": PNG_SOFTWARE})  # lets --overwrite prove it is ours
    return out
