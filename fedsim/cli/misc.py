"""``fedsim list | report | data show | data partitions``: the registries, finished runs
compared, and what a dataset and its partition look like."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from rich.table import Table

from fedsim.adapters import ADAPTERS
from fedsim.cli.common import EXIT_BAD_INPUT, EXIT_OK, BadInput, console, error
from fedsim.data.base import DATASETS
from fedsim.data.config import DataConfig
from fedsim.data.loading import load_dataset, partitions
from fedsim.data.partition_stats import count_partitions, format_counts, save_heatmap
from fedsim.data.show import save_domain_grid
from fedsim.models import MODELS
from fedsim.outputs import check_file_target
from fedsim.report import accuracy_table, adaptation_table, build_report, report_paths, write_report
from fedsim.scenario import load_scenario
from fedsim.schema import ScenarioError
from fedsim.strategies import STRATEGIES


def cmd_list(args: argparse.Namespace) -> int:
    for title, reg in (("strategies", STRATEGIES), ("adapters", ADAPTERS), ("datasets", DATASETS), ("models", MODELS)):
        names = reg.names()
        print(f"{title}: {', '.join(names) if names else '(none yet)'}")
    print("any of these may also be an import path package.module:Name")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    runs = [Path(p) for p in args.runs]
    try:
        doc = build_report(runs)  # reads every run before anything is written
        plot, table_path, numbers = report_paths(runs, Path(args.out) if args.out else None, args.overwrite)
    except ScenarioError as exc:  # ReportError, MetricsError, UnsafeOutput: one line naming the file
        error(exc)
        return EXIT_BAD_INPUT
    out = console()
    tables = [(f"{doc['title']}: accuracy, mean ± std over seeds", accuracy_table(doc))]
    if (adapt := adaptation_table(doc)) is not None:
        tables.append((f"{doc['title']}: online error, mean ± std over seeds", adapt))
    for title, (head, rows) in tables:
        table = Table(title=title)
        for i, col in enumerate(head):
            table.add_column(col, justify="left" if i == 0 or col in ("strategy", "dataset", "seeds") else "right")
        for row in rows:
            table.add_row(*row)
        out.print(table)
    write_report(doc, plot, table_path, numbers)
    print(f"plot: {plot}\ntable: {table_path}\nnumbers: {numbers}")
    return EXIT_OK


def cmd_data_show(args: argparse.Namespace) -> int:
    try:
        check_file_target(Path(args.out), args.overwrite)  # UnsafeOutput is a ScenarioError
        cfg = load_scenario(args.scenario, args.overrides).data if args.scenario else DataConfig()
        dataset = load_dataset(cfg)
    except ScenarioError as exc:
        error(exc)
        return EXIT_BAD_INPUT
    path = save_domain_grid(dataset, args.out, split=args.split)
    print(
        f"{dataset.name}: {', '.join(f'{d} ({len(s.y_train)} train / {len(s.y_test)} test)' for d, s in dataset.domains.items())}"
    )
    print(f"grid: {path}")
    return EXIT_OK


def cmd_data_partitions(args: argparse.Namespace) -> int:
    try:
        out = Path(args.out) if args.out else None
        if out is not None and out.suffix.lower() != ".png":
            raise BadInput(f"--out {out}: must end in .png")
        if out is not None:
            check_file_target(out, args.overwrite)  # UnsafeOutput is a ScenarioError
        scenario = load_scenario(args.scenario, args.overrides)
        if out is None:
            out = Path(f"{scenario.name}-partitions.png")
            check_file_target(out, args.overwrite)
        dataset = load_dataset(scenario.data)
    except (ScenarioError, BadInput) as exc:
        error(exc)
        return EXIT_BAD_INPUT
    labels = {d: np.asarray(s.y_train) for d, s in dataset.domains.items()}
    counts = count_partitions(
        partitions(scenario.data, scenario.seed),
        labels,
        dataset.class_names or [str(c) for c in range(dataset.num_classes)],
    )
    data = scenario.data
    print(
        f"{scenario.name}: {dataset.name}, partition {data.partition}, {len(counts.main_domain)} clients, seed {scenario.seed}"
    )
    print(format_counts(counts))
    path = save_heatmap(
        counts, out, f"{scenario.name}: {dataset.name}, partition {data.partition}, seed {scenario.seed}"
    )
    print(f"heat map: {path}")
    return EXIT_OK
