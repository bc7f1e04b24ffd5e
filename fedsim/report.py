"""Compare finished runs: runs that differ only by seed form a group, reported as mean ± std.

``fedsim report RUN...`` reads each run folder's resolved ``scenario.yaml``, ``metrics.jsonl``
and, when there is one, ``adaptation_summary.json``. Runs whose resolved scenarios are equal
except ``seed`` and ``name`` are one *group*; every number of a group is the mean and the
population std (ddof=0, as in :mod:`fedsim.tta.summary`) over its runs. A group's label is
its scenario name plus the keys in which the groups differ (``toy strategy=fedbn``), never a
folder path.

Three files are written side by side (:func:`report_paths`): the plot (``report.png``:
accuracy against round, the mean line with a band of ± std over the group's runs, and
accuracy against cumulative MB up), the markdown tables (``report.md``: one row per group;
a second table of each adapter's online error when the runs adapted) and ``report.json``
(every run's and every group's numbers). An existing one is replaced only with
``--overwrite`` and only when fedsim wrote it (:mod:`fedsim.outputs`).

The aggregation pieces (:func:`stats`, :func:`pm`, :func:`run_numbers`) are shared with
:mod:`fedsim.sweep`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedsim import __version__, safe_yaml
from fedsim.arrays import atomic_write_bytes
from fedsim.outputs import (
    JSON_WRITER,
    MD_HEADER,
    PNG_SOFTWARE,
    UnsafeOutput,
    check_file_target,
    json_written_by_fedsim,
    md_written_by_fedsim,
)
from fedsim.results import ADAPTATION_SUMMARY, RunFolder
from fedsim.schema import ScenarioError

__all__ = [
    "Group",
    "ReportError",
    "Run",
    "build_report",
    "group_runs",
    "markdown",
    "pm",
    "read_run",
    "report_figure",
    "report_paths",
    "run_numbers",
    "stats",
    "write_report",
]

UNGROUPED = ("seed", "name")  # top-level scenario keys that may differ inside a group
STD_NOTE = "population standard deviation (ddof=0) over the group's runs"


class ReportError(ScenarioError):
    """A folder the report cannot read (one line naming the file)."""


# -- shared aggregation (fedsim.sweep uses these too) --------------------------------------


def stats(values: list[float | None]) -> dict[str, Any]:
    """Mean and population std (ddof=0) of the values that exist; n counts them."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)}


def pm(s: dict[str, Any], digits: int = 4) -> str:
    """``mean ± std`` (``-`` when there is no value)."""
    return "-" if s["mean"] is None else f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def run_numbers(folder: Path, adaptation: bool = True) -> dict[str, Any]:
    """A run's numbers from its metrics.jsonl (and, with ``adaptation``, its adaptation
    summary when there is one): final and best mean test accuracy, the final per-domain
    accuracy, MB up/down, each adapter's online error."""
    run = RunFolder(folder)
    records = run.read_metrics()
    evaluated = [r for r in records if r.get("accuracy") is not None]
    out: dict[str, Any] = {
        "final_round": evaluated[-1]["round"] if evaluated else None,
        "final_accuracy": evaluated[-1]["accuracy"] if evaluated else None,
        "final_per_domain": dict(evaluated[-1].get("per_domain") or {}) if evaluated else {},
        "best_accuracy": max(r["accuracy"] for r in evaluated) if evaluated else None,
        "mb_up": records[-1]["bytes_up_total"] / 1e6 if records else None,
        "mb_down": records[-1]["bytes_down_total"] / 1e6 if records else None,
    }
    summary = run.path / ADAPTATION_SUMMARY
    if adaptation and summary.is_file():
        try:
            results = json.loads(summary.read_text())["results"]
            out["online_error"] = {str(label): float(entry["error"]) for label, entry in results.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ReportError(f"{summary}: not an adaptation summary ({type(exc).__name__}: {exc})") from None
    return out


# -- runs and groups -------------------------------------------------------------------------


@dataclass
class Run:
    """One run folder: its resolved scenario (as read, not re-validated), numbers and curve."""

    path: Path
    scenario: dict[str, Any]
    numbers: dict[str, Any]
    curve: list[dict[str, Any]]  # per evaluated round: round, accuracy, mb_up
    finished: bool  # summary.json written: the run reached its last round

    @property
    def seed(self) -> Any:
        return self.scenario.get("seed")

    @property
    def key(self) -> str:
        """What must be equal for two runs to share a group: the scenario without seed and name."""
        return json.dumps({k: v for k, v in self.scenario.items() if k not in UNGROUPED}, sort_keys=True, default=str)


@dataclass
class Group:
    runs: list[Run]
    label: str = ""
    differs: dict[str, Any] = field(default_factory=dict)  # the keys that set it apart, with its values

    @property
    def scenario(self) -> dict[str, Any]:
        return self.runs[0].scenario

    @property
    def name(self) -> str:
        return "/".join(dict.fromkeys(str(r.scenario.get("name")) for r in self.runs))


def read_run(path: Path) -> Run:
    """A finished (or interrupted) run folder; ReportError (one line naming the file) when it
    is not a run folder or has no evaluated round yet."""
    run = RunFolder(path)
    if not run.scenario_file.is_file():
        raise ReportError(f"{run.scenario_file}: missing (not a fedsim run folder)")
    if not run.metrics_file.is_file():
        raise ReportError(f"{run.metrics_file}: missing (not a fedsim run folder, or no round finished)")
    try:
        scenario = safe_yaml.load(run.scenario_file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ReportError(
            f"{run.scenario_file}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if (
        not isinstance(scenario, dict)
        or not isinstance(scenario.get("strategy"), dict)
        or not isinstance(scenario.get("data"), dict)
    ):
        raise ReportError(f"{run.scenario_file}: not a resolved fedsim scenario (no strategy or data section)")
    records = run.read_metrics()  # MetricsError (a ScenarioError, one line) for a damaged file
    evaluated = [r for r in records if r.get("accuracy") is not None]
    if not evaluated:
        raise ReportError(f"{run.metrics_file}: no evaluated round yet")
    try:
        numbers = run_numbers(run.path)
        curve = [
            {"round": r["round"], "accuracy": float(r["accuracy"]), "mb_up": r["bytes_up_total"] / 1e6}
            for r in evaluated
        ]
    except (KeyError, TypeError) as exc:
        raise ReportError(f"{run.metrics_file}: a record lacks {exc} (not written by this fedsim?)") from None
    return Run(run.path, scenario, numbers, curve, run.summary_file.is_file())


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values (lists are leaves; an empty mapping has none, so
    ``args: {}`` against ``args: {mu: 0.1}`` shows as ``args.mu`` alone)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)


def _short_key(key: str) -> str:
    """``strategy.name`` -> ``strategy`` (a section named by its name), other keys as they are."""
    return key[: -len(".name")] if key.endswith(".name") and key.count(".") == 1 else key


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs whose scenarios are equal except seed and name, in the order first given; each
    group labelled with its name and the keys in which the groups differ."""
    by_key: dict[str, Group] = {}
    for run in runs:
        by_key.setdefault(run.key, Group([])).runs.append(run)
    groups = list(by_key.values())
    flat = [_flatten({k: v for k, v in g.scenario.items() if k not in UNGROUPED}) for g in groups]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    differing = [k for k in keys if len({_shown(f[k]) if k in f else "\0absent" for f in flat}) > 1]
    for g, f in zip(groups, flat):
        g.differs = {k: f[k] for k in differing if k in f}
        g.label = " ".join([g.name, *(f"{_short_key(k)}={_shown(v)}" for k, v in g.differs.items())])
    return groups


# -- the report ----------------------------------------------------------------------------


def _seeds(group: Group) -> list[Any]:
    return [r.seed for r in group.runs]


def _curve(group: Group) -> dict[str, list[Any]]:
    """Per round evaluated in any run: mean and std of accuracy and MB up over the runs that have it."""
    rounds = sorted({p["round"] for r in group.runs for p in r.curve})
    at = [{p["round"]: p for p in r.curve} for r in group.runs]
    acc = [stats([a[rnd]["accuracy"] for a in at if rnd in a]) for rnd in rounds]
    up = [stats([a[rnd]["mb_up"] for a in at if rnd in a]) for rnd in rounds]
    return {
        "round": rounds,
        "accuracy_mean": [s["mean"] for s in acc],
        "accuracy_std": [s["std"] for s in acc],
        "n": [s["n"] for s in acc],
        "mb_up_mean": [s["mean"] for s in up],
    }


def _group_doc(group: Group) -> dict[str, Any]:
    nums = [r.numbers for r in group.runs]
    domains = list(dict.fromkeys(d for n in nums for d in n["final_per_domain"]))
    adapters = list(dict.fromkeys(a for n in nums for a in n.get("online_error", {})))
    scenario = group.scenario
    return {
        "label": group.label,
        "name": group.name,
        "differs": group.differs,
        "strategy": scenario["strategy"].get("name"),
        "dataset": scenario["data"].get("dataset"),
        "rounds": scenario.get("rounds"),
        "seeds": _seeds(group),
        "unfinished": sum(not r.finished for r in group.runs),
        "runs": [{"folder": str(r.path), "seed": r.seed, "finished": r.finished, **r.numbers} for r in group.runs],
        "final_accuracy": stats([n["final_accuracy"] for n in nums]),
        "best_accuracy": stats([n["best_accuracy"] for n in nums]),
        "final_per_domain": {d: stats([n["final_per_domain"].get(d) for n in nums]) for d in domains},
        "mb_up": stats([n["mb_up"] for n in nums]),
        "mb_down": stats([n["mb_down"] for n in nums]),
        "online_error": {a: stats([n.get("online_error", {}).get(a) for n in nums]) for a in adapters},
        "curve": _curve(group),
    }


def _seed_list(seeds: list[Any]) -> str:
    return ", ".join(map(str, seeds))


def _title(groups: list[Group]) -> str:
    """What is compared: one group by its strategy, rounds and seeds; several by the keys
    in which they differ, plus what they share of strategy, rounds and seeds."""
    names = "/".join(dict.fromkeys(g.name for g in groups))
    strategies = {str(g.scenario["strategy"].get("name")) for g in groups}
    rounds = {str(g.scenario.get("rounds")) for g in groups}
    seeds = {_seed_list(_seeds(g)) for g in groups}
    common = [*(strategies if len(strategies) == 1 else ()), *(f"{r} rounds" for r in rounds if len(rounds) == 1)]
    common += [f"seed{'s' if len(_seeds(groups[0])) > 1 else ''} {s}" for s in seeds if len(seeds) == 1]
    shared = f" ({', '.join(common)})" if common else ""
    if len(groups) == 1:
        return f"{names}{shared}"
    keys = list(dict.fromkeys(_short_key(k) for g in groups for k in g.differs))
    return f"{names}: {', '.join(keys)} compared{shared}"


def build_report(paths: list[Path]) -> dict[str, Any]:
    """Read the runs (ReportError for one that cannot be read, or one given twice), group
    them and aggregate: the document ``report.json`` holds."""
    seen: dict[Path, Path] = {}
    for p in paths:
        if (resolved := Path(p).resolve()) in seen:
            raise ReportError(f"{p}: given twice (as {seen[resolved]})")
        seen[resolved] = Path(p)
    groups = group_runs([read_run(Path(p)) for p in paths])
    return {
        "written_by": JSON_WRITER,
        "fedsim": __version__,
        "title": _title(groups),
        "std": STD_NOTE,
        "groups": [_group_doc(g) for g in groups],
    }


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def accuracy_table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the accuracy table (markdown and the console print the same)."""
    domains = list(dict.fromkeys(d for g in doc["groups"] for d in g["final_per_domain"]))
    head = ["group", "strategy", "dataset", "rounds", "seeds", "final acc", "best acc", *domains, "MB up", "MB down"]
    rows = []
    for g in doc["groups"]:
        rounds = str(g["rounds"]) + (f" ({g['unfinished']} of {len(g['runs'])} unfinished)" if g["unfinished"] else "")
        per_domain = [
            f"{s['mean']:.4f}" if (s := g["final_per_domain"].get(d)) and s["mean"] is not None else "-"
            for d in domains
        ]
        rows.append(
            [
                g["label"],
                str(g["strategy"]),
                str(g["dataset"]),
                rounds,
                _seed_list(g["seeds"]),
                pm(g["final_accuracy"]),
                pm(g["best_accuracy"]),
                *per_domain,
                pm(g["mb_up"], 2),
                pm(g["mb_down"], 2),
            ]
        )
    return head, rows


def adaptation_table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Header and rows of each adapter's online error per group (None when no run adapted)."""
    adapters = list(dict.fromkeys(a for g in doc["groups"] for a in g["online_error"]))
    if not adapters:
        return None
    head = ["group", "seeds", *adapters]
    rows = []
    for g in doc["groups"]:
        if not g["online_error"]:
            continue
        cells = []
        for a in adapters:
            s = g["online_error"].get(a, {"mean": None, "std": None, "n": 0})
            cells.append(pm(s) + (f" (n={s['n']})" if s["mean"] is not None and s["n"] < len(g["runs"]) else ""))
        rows.append([g["label"], _seed_list(g["seeds"]), *cells])
    return head, rows


def _markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(map(_cell, head)) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(map(_cell, r)) + " |" for r in rows),
    ]


def markdown(doc: dict[str, Any]) -> str:
    """``report.md``: the accuracy table, the adaptation table when runs adapted, and which
    folders each group holds. Its first line lets a later report replace it."""
    lines = [
        MD_HEADER,
        f"# {doc['title']}",
        "",
        (
            "One row per group of runs whose resolved scenarios are equal except seed and name; "
            "mean ± std over the group's runs (population std, ddof=0). accuracy: mean test accuracy over domains at the final "
            "evaluated round (best: the best round); per-domain columns: the mean final accuracy."
        ),
        "",
        *_markdown_table(*accuracy_table(doc)),
    ]
    if (adapt := adaptation_table(doc)) is not None:
        lines += [
            "",
            "## Test-time adaptation",
            "",
            "Each adapter's online error (each run's mean over edges and stream seeds, adaptation_summary.json); mean ± std over the group's runs.",
            "",
            *_markdown_table(*adapt),
        ]
    lines += ["", "## Runs", ""]
    for g in doc["groups"]:
        lines.append(
            f"- {g['label']}: "
            + ", ".join(
                f"`{r['folder']}` (seed {r['seed']}{'' if r['finished'] else ', unfinished'})" for r in g["runs"]
            )
        )
    return "\n".join(lines) + "\n"


def report_figure(doc: dict[str, Any]) -> Any:
    """Accuracy against round (mean line, band of ± std over each group's runs) and against
    cumulative MB up; the legend names the groups by their labels."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg; matplotlib is slow to import

    fig = Figure(figsize=(11, 4.4))
    a1, a2 = fig.subplots(1, 2)
    for g in doc["groups"]:
        c = g["curve"]
        mean, std = np.asarray(c["accuracy_mean"]), np.asarray(c["accuracy_std"])
        (line,) = a1.plot(
            c["round"], mean, marker="o" if len(mean) < 3 else None, label=f"{g['label']} (n={len(g['runs'])})"
        )
        if len(g["runs"]) > 1:
            a1.fill_between(c["round"], mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
        a2.plot(c["mb_up_mean"], mean, color=line.get_color(), marker="o" if len(mean) < 3 else None)
    a1.xaxis.get_major_locator().set_params(integer=True)  # rounds are whole
    a1.set_xlabel("round")
    a1.set_ylabel("mean test accuracy")
    a2.set_xlabel("cumulative MB up")
    a2.set_ylabel("mean test accuracy")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    a1.legend(fontsize=8)
    fig.suptitle(f"{doc['title']}: mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    return fig


def report_paths(paths: list[Path], out: Path | None, overwrite: bool) -> tuple[Path, Path, Path]:
    """The plot, table and JSON paths (default ``report.png`` / ``.md`` / ``.json`` next to
    the first run), checked before anything is written: an existing file is replaced only
    with ``overwrite`` and only if fedsim wrote it (:class:`~fedsim.outputs.UnsafeOutput`)."""
    plot = out if out is not None else paths[0].parent / "report.png"
    if plot.suffix.lower() != ".png":
        raise UnsafeOutput(f"{plot}: --out must be a .png path (the table and numbers go next to it as .md and .json)")
    if not plot.parent.is_dir():
        raise UnsafeOutput(f"{plot}: its folder {plot.parent} does not exist")
    table, numbers = plot.with_suffix(".md"), plot.with_suffix(".json")
    check_file_target(plot, overwrite)
    check_file_target(table, overwrite, owned=md_written_by_fedsim(table))
    check_file_target(numbers, overwrite, owned=json_written_by_fedsim(numbers))
    return plot, table, numbers


def write_report(doc: dict[str, Any], plot: Path, table: Path, numbers: Path) -> None:
    """The three files, each written whole (a temporary file renamed into place)."""
    atomic_write_bytes(table, markdown(doc).encode())
    atomic_write_bytes(numbers, json.dumps(doc, indent=2, default=str).encode())
    tmp = plot.with_name(f".{plot.name}.tmp")
    report_figure(doc).savefig(tmp, dpi=110, format="png", metadata={"Software": PNG_SOFTWARE})
    tmp.replace(plot)
