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
from fedsim.outputs import UnsafeOutput, check_file_target
from fedsim.report import compare_runs, report_paths, write_table
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
        plot_path, md_path = report_paths(runs, Path(args.out) if args.out else None, args.overwrite)
        rows, domains, plot = compare_runs(runs, plot_path)
    except (FileNotFoundError, ValueError, UnsafeOutput) as exc:
        error(exc)
        return EXIT_BAD_INPUT
    table = Table(title="fedsim report (final evaluated round)")
    for col in ["run", "strategy", "round", *domains, "mean", "best", "MB up", "MB down"]:
        table.add_column(col, justify="left" if col in ("run", "strategy") else "right")
    for r in rows:
        table.add_row(r["run"], r["strategy"], str(r["round"]), *[f"{r['per_domain'].get(d, float('nan')):.4f}" for d in domains], f"{r['accuracy']:.4f}", f"{r['best']:.4f}", f"{r['bytes_up'] / 1e6:.2f}", f"{r['bytes_down'] / 1e6:.2f}")
    console().print(table)
    write_table(md_path, rows, domains)
    print(f"plot: {plot}\ntable: {md_path}")
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
    print(f"{dataset.name}: {', '.join(f'{d} ({len(s.y_train)} train / {len(s.y_test)} test)' for d, s in dataset.domains.items())}")
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
    counts = count_partitions(partitions(scenario.data, scenario.seed), labels, dataset.class_names or [str(c) for c in range(dataset.num_classes)])
    data = scenario.data
    print(f"{scenario.name}: {dataset.name}, partition {data.partition}, {len(counts.main_domain)} clients, seed {scenario.seed}")
    print(format_counts(counts))
    path = save_heatmap(counts, out, f"{scenario.name}: {dataset.name}, partition {data.partition}, seed {scenario.seed}")
    print(f"heat map: {path}")
    return EXIT_OK
