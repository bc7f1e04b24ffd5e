"""Compare finished runs: a table of final per-domain accuracy and bytes, and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedsim.arrays import atomic_write_bytes
from fedsim.outputs import MD_HEADER, PNG_SOFTWARE, UnsafeOutput, check_file_target, md_written_by_fedsim
from fedsim.results import RunFolder


def report_paths(paths: list[Path], out: Path | None, overwrite: bool) -> tuple[Path, Path]:
    """The plot and table paths (default ``report.png`` / ``report.md`` next to the first run),
    checked before anything is written: an existing file is replaced only with ``overwrite``
    and only if fedsim wrote it (:class:`~fedsim.outputs.UnsafeOutput` otherwise)."""
    plot = out if out is not None else paths[0].parent / "report.png"
    if plot.suffix.lower() != ".png":
        raise UnsafeOutput(f"{plot}: --out must be a .png path (the table goes next to it as .md)")
    table = plot.with_suffix(".md")
    check_file_target(plot, overwrite)
    check_file_target(table, overwrite, owned=md_written_by_fedsim(table))
    return plot, table


def write_table(path: Path, rows: list[dict[str, Any]], domains: list[str]) -> None:
    """The markdown table, with the first-line comment that lets a later report replace it."""
    atomic_write_bytes(path, (MD_HEADER + "\n" + markdown_table(rows, domains)).encode())


def compare_runs(paths: list[Path], plot_path: Path) -> tuple[list[dict[str, Any]], list[str], Path | None]:
    rows, domains, curves = [], [], []
    for path in paths:
        run = RunFolder(path)
        if not run.metrics_file.exists():
            raise FileNotFoundError(f"{path}: no metrics.jsonl (not a fedsim run folder, or no round finished)")
        records = [r for r in run.read_metrics() if r.get("accuracy") is not None]
        if not records:
            raise ValueError(f"{path}: no evaluated round yet")
        last = records[-1]
        import yaml

        strategy = yaml.safe_load(run.scenario_file.read_text())["strategy"]["name"]
        for d in last.get("per_domain", {}):
            if d not in domains:
                domains.append(d)
        rows.append({
            "run": str(path), "strategy": strategy, "round": last["round"], "per_domain": last.get("per_domain", {}),
            "accuracy": last["accuracy"], "best": max(r["accuracy"] for r in records),
            "bytes_up": last["bytes_up_total"], "bytes_down": last["bytes_down_total"],
        })
        curves.append((str(path), [r["round"] for r in records], [r["accuracy"] for r in records], [r["bytes_up_total"] for r in records]))
    from matplotlib.figure import Figure  # Agg, no pyplot state

    fig = Figure(figsize=(11, 4))
    a1, a2 = fig.subplots(1, 2)
    for name, rounds, acc, up in curves:
        a1.plot(rounds, acc, label=name)
        a2.plot([u / 1e6 for u in up], acc, label=name)
    for ax, xlabel in ((a1, "round"), (a2, "cumulative MB up")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean accuracy")
        ax.grid(alpha=0.3)
    a1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plot_path, dpi=110, metadata={"Software": PNG_SOFTWARE})
    return rows, domains, plot_path


def markdown_table(rows: list[dict[str, Any]], domains: list[str]) -> str:
    head = ["run", "strategy", "round", *domains, "mean", "best", "MB up", "MB down"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], r["strategy"], str(r["round"]), *[f"{r['per_domain'].get(d, float('nan')):.4f}" for d in domains], f"{r['accuracy']:.4f}", f"{r['best']:.4f}", f"{r['bytes_up'] / 1e6:.2f}", f"{r['bytes_down'] / 1e6:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
