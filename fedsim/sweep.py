"""Parameter sweeps: a grid of scenario overrides times seeds, run point by point, aggregated.

A sweep is a scenario file, fixed overrides (``key=value``), grid axes (``key=v1,v2,...``)
and seeds. Every combination of axis values is a *point*; every point runs once per seed
into its own run folder, by the same code path as ``fedsim run`` (a ``runner`` taking a
``fedsim`` argument list, e.g. :func:`fedsim.cli.main`), so each run's numbers equal those
of a separate ``fedsim run SCENARIO overrides... seed=S``.

``<out>/`` (a marked fedsim ``sweep`` folder, :mod:`fedsim.outputs`):

- one run folder per point and seed, named from the varied keys (``client.lr=0.1_seed=0``);
- ``sweep.json``: the sweep's definition (scenario, overrides, axes, seeds, each run's
  scenario fingerprint) and, per point, each run's status and metrics and their mean and
  std over seeds;
- ``sweep.md``: one row per point: the varied keys, the number of seeds finished, final and
  best mean test accuracy, MB up/down, and each adapter's online error when the scenario
  adapts (mean +- std over seeds; std is the population std, ddof=0, as in
  :mod:`fedsim.tta.summary`);
- ``sweep.png``: final accuracy (and online error) against the first varied key, error bars
  over seeds, one line per value of the other varied keys.

Values are split at top-level commas only: commas inside ``[...]``, ``{...}`` or quotes
belong to one value (``data.domains=[mnist,svhn],[mnist,usps]`` is two values), and each
value is parsed as a YAML scalar like any override (:func:`fedsim.scenario_file.parse_override`).
``seed=0,1,2`` is the same as ``seeds=[0, 1, 2]`` (the scenario seed drives the partition,
the model's initialisation and the client sampling; an adaptation section's streams keep
their own ``adaptation.stream.seeds``).

Resuming: a run whose folder holds ``summary.json`` (and, when the scenario adapts,
``adaptation_summary.json``) is skipped, one with a checkpoint is continued with
``fedsim run --resume``, the others start anew. A sweep folder whose saved definition or
per-run scenario differs from the requested one is refused (one line naming what differs).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsim import __version__
from fedsim.arrays import atomic_write_bytes
from fedsim.outputs import (
    PNG_SOFTWARE,
    UnsafeOutput,
    check_location,
    check_out_folder,
    create_folder,
    marker_kind,
    ownership_problem,
)
from fedsim.report import pm, run_numbers, stats
from fedsim.results import ADAPTATION_SUMMARY, RunFolder
from fedsim.runlock import FolderLocked, lock_folder, unlock_folder
from fedsim.scenario import load_scenario
from fedsim.scenario_file import parse_override
from fedsim.schema import ScenarioError, short_repr

__all__ = [
    "Axis",
    "Runner",
    "SweepInterrupted",
    "SweepRun",
    "SweepSpec",
    "aggregate",
    "markdown_table",
    "parse_seeds",
    "parse_sweep_args",
    "plot_sweep",
    "prepare_sweep",
    "run_sweep",
    "split_values",
]

JSON_FILE, TABLE_FILE, PLOT_FILE = "sweep.json", "sweep.md", "sweep.png"
SEED = "seed"
MAX_COMPONENT = 120  # characters of a run folder's name before it is shortened with a hash


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep; ``folder`` is the sweep folder to continue."""

    def __init__(self, folder: Path) -> None:
        super().__init__(str(folder))
        self.folder = folder


Runner = Callable[[list[str]], int]
"""Runs one ``fedsim`` command line (``["run", ...]``) in this process; returns its exit code."""


@dataclass(frozen=True)
class Axis:
    """One varied key and its values as typed (each parsed as a YAML scalar when used)."""

    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep runs: ``scenario`` with ``overrides`` at every point of ``axes`` x ``seeds``
    (``seeds`` None: the scenario's own seed, not varied)."""

    scenario: str
    overrides: tuple[str, ...] = ()
    axes: tuple[Axis, ...] = ()
    seeds: tuple[int, ...] | None = None

    def definition(self) -> dict[str, Any]:
        """What must match for a saved sweep to be continued (not the scenario's path: the
        same command from another folder continues it; the scenario's content is compared
        through each run's fingerprint)."""
        return {
            "overrides": list(self.overrides),
            "axes": [[a.key, list(a.values)] for a in self.axes],
            "seeds": None if self.seeds is None else list(self.seeds),
        }

    def describe(self) -> str:
        parts = [f"{a.key}={','.join(a.values)}" for a in self.axes]
        parts += [*self.overrides] + ([f"seeds {','.join(map(str, self.seeds))}"] if self.seeds is not None else [])
        return " ".join(parts) or "(no varied key)"


@dataclass
class SweepRun:
    """One point of the grid at one seed: its overrides, folder and validated scenario's fingerprint."""

    point: int  # index of the grid point
    params: dict[str, str]  # varied key -> value as typed
    seed: int
    overrides: list[str]  # fixed overrides, then the point's, then the seed
    folder: Path
    fingerprint: str  # sha256 of the resolved scenario.yaml a run folder of this run holds
    adapts: bool
    status: str = "pending"  # pending | done | failed
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return " ".join([*(f"{k}={v}" for k, v in self.params.items()), f"seed={self.seed}"])


# -- parsing ---------------------------------------------------------------------------


def split_values(text: str) -> list[str]:
    """Split at commas outside brackets, braces and quoted scalars (a quote opens only at
    the start of a value, so ``it's`` stays a plain word)."""
    parts: list[str] = []
    depth, quote, start, i = 0, "", 0, 0
    while i < len(text):
        c = text[i]
        if quote:
            if quote == '"' and c == "\\":
                i += 1  # an escaped character inside "..."
            elif c == quote:
                quote = ""
        elif c in "\"'" and depth == 0 and not text[start:i].strip():
            quote = c
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth = max(0, depth - 1)
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def parse_seeds(text: str) -> tuple[int, ...]:
    """``0,1,2`` (or ``0-4``, a range) -> distinct seeds (ScenarioError, one line)."""
    seeds: list[int] = []
    for piece in text.split(","):
        piece = piece.strip()
        m = re.fullmatch(r"(\d+)-(\d+)", piece)
        if m and int(m[1]) <= int(m[2]) and int(m[2]) - int(m[1]) < 10_000:
            seeds.extend(range(int(m[1]), int(m[2]) + 1))
        elif piece.isdigit() and int(piece) <= 2**64 - 1:
            seeds.append(int(piece))
        else:
            raise ScenarioError(
                f"--seeds {short_repr(text)[1:-1]}: expected seeds like 0,1,2 or 0-4 (integers in 0..2**64-1), got '{short_repr(piece)[1:-1]}'"
            )
    if len(set(seeds)) != len(seeds):
        raise ScenarioError(f"--seeds {short_repr(text)[1:-1]}: seeds must be distinct")
    return tuple(seeds)


def parse_sweep_args(scenario: str | Path, args: list[str], seeds: tuple[int, ...] | None = None) -> SweepSpec:
    """``key=value`` -> a fixed override, ``key=v1,v2,...`` -> an axis (ScenarioError, one
    line, for a malformed argument, an empty value, a repeated key or value, or a seed set
    twice). ``seed=...`` with several values is the seeds."""
    fixed: list[str] = []
    axes: list[Axis] = []
    seen: set[str] = set()
    for text in args:
        key = text.partition("=")[0].strip()
        parse_override(text)  # the override's own checks: key=value, non-empty key, YAML bounds
        raw = text.partition("=")[2]
        values = split_values(raw)
        for v in values:
            if len(values) > 1 and not v.strip():
                raise ScenarioError(
                    f"sweep '{short_repr(text)[1:-1]}': empty value in the list (values are separated by commas)"
                )
            parse_override(f"{key}={v}")
        if key in seen:
            raise ScenarioError(f"sweep '{short_repr(text)[1:-1]}': {key} is given twice")
        seen.add(key)
        if key == SEED:
            if seeds is not None:
                raise ScenarioError(f"sweep '{short_repr(text)[1:-1]}': the seed is set by --seeds; give it once")
            if len(values) > 1:
                seeds = parse_seeds(",".join(v.strip() for v in values))
                continue
        if len(values) == 1:
            fixed.append(f"{key}={raw}")
            continue
        stripped = [v.strip() for v in values]
        dup = sorted({v for v in stripped if stripped.count(v) > 1})
        if dup:
            raise ScenarioError(f"sweep '{short_repr(text)[1:-1]}': repeated value {short_repr(dup[0])}")
        axes.append(Axis(key, tuple(stripped)))
    return SweepSpec(str(scenario), tuple(fixed), tuple(axes), seeds)


# -- the grid ------------------------------------------------------------------------------


def _component(text: str) -> str:
    """One safe path component: letters, digits and ``._=+-``; the rest becomes ``_``."""
    safe = re.sub(r"[^A-Za-z0-9._=+-]", "_", text)
    return "_" + safe if safe.startswith(".") else safe


def _folder_names(keys: list[tuple[tuple[str, str], ...]]) -> list[str]:
    """A distinct, safe folder name per run (varied key=value pairs, seed last); names that
    collide after sanitising, or are too long, get a hash of the exact pairs."""
    names = [_component("_".join(f"{k}={v}" for k, v in pairs)) for pairs in keys]
    digest = [hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:8] for pairs in keys]
    out = []
    for name, _pairs, h in zip(names, keys, digest):
        if len(name) > MAX_COMPONENT or names.count(name) > 1:
            name = f"{name[: MAX_COMPONENT - 9]}~{h}"
        out.append(name)
    return out


def grid(spec: SweepSpec) -> list[dict[str, str]]:
    """Every point: varied key -> value as typed, first axis slowest."""
    return [dict(zip([a.key for a in spec.axes], combo)) for combo in itertools.product(*(a.values for a in spec.axes))]


def prepare_sweep(spec: SweepSpec, out: Path | None = None) -> tuple[Path, list[SweepRun]]:
    """The sweep folder and every run, each run's scenario loaded and validated exactly as
    ``fedsim run`` would (nothing is written). ScenarioError (one line naming the file, the
    key and the run) for the first run that would not start."""
    points = grid(spec)
    loaded = []
    for index, params in enumerate(points):
        for seed in spec.seeds if spec.seeds is not None else (None,):
            overrides = [
                *spec.overrides,
                *(f"{k}={v}" for k, v in params.items()),
                *([f"{SEED}={seed}"] if seed is not None else []),
            ]
            try:
                scenario = load_scenario(spec.scenario, overrides)
            except ScenarioError as exc:
                where = " ".join(
                    [*(f"{k}={v}" for k, v in params.items()), *([f"seed={seed}"] if seed is not None else [])]
                )
                raise ScenarioError(f"{exc} (sweep run {where})" if where else str(exc)) from None
            loaded.append((index, params, scenario, overrides))
    if out is None:
        names = {s.name for _, _, s, _ in loaded}
        out = Path("runs") / f"{loaded[0][2].name if len(names) == 1 else Path(spec.scenario).stem}-sweep"
    check_out_folder(out)
    check_location(out, "sweep")
    keyed = [
        (*params.items(), *([(SEED, str(s.seed))] if spec.seeds is not None else [])) for _, params, s, _ in loaded
    ]
    names = _folder_names([k if k else ((SEED, str(s.seed)),) for k, (_, _, s, _) in zip(keyed, loaded)])
    runs = [
        SweepRun(
            index,
            dict(params),
            scenario.seed,
            overrides,
            out / name,
            hashlib.sha256(scenario.to_yaml().encode()).hexdigest(),
            scenario.adaptation is not None,
        )
        for (index, params, scenario, overrides), name in zip(loaded, names)
    ]
    return out, runs


# -- one run's state and numbers -------------------------------------------------------


def run_state(run: SweepRun) -> str:
    """``done`` (skip), ``resume`` (a checkpoint to continue from), ``new`` (no folder) or
    ``restart`` (a fedsim run folder with nothing to continue)."""
    folder = RunFolder(run.folder)
    if not run.folder.exists():
        return "new"
    if folder.summary_file.is_file() and (not run.adapts or (run.folder / ADAPTATION_SUMMARY).is_file()):
        return "done"
    return "resume" if folder.resumable() else "restart"


def check_run_folder(run: SweepRun) -> None:
    """A point's existing run folder must hold this run's scenario (UnsafeOutput otherwise)."""
    if not run.folder.exists():
        return
    if problem := ownership_problem(run.folder, "run"):
        raise UnsafeOutput(f"{run.folder}: not a fedsim run folder this sweep can use: {problem}")
    scenario_file = RunFolder(run.folder).scenario_file
    if scenario_file.is_file() and hashlib.sha256(scenario_file.read_bytes()).hexdigest() != run.fingerprint:
        raise UnsafeOutput(
            f"{scenario_file}: differs from the scenario of sweep run {run.label} (the scenario file changed since?); refused (pass --overwrite to start the sweep anew, or --out for a new one)"
        )


def run_metrics(run: SweepRun) -> dict[str, Any]:
    """A finished run's numbers (:func:`fedsim.report.run_numbers`: final and best mean test
    accuracy, final per-domain accuracy, MB up/down, each adapter's online error)."""
    return run_numbers(run.folder, adaptation=run.adapts)


# -- aggregation -------------------------------------------------------------------------


def aggregate(spec: SweepSpec, runs: list[SweepRun]) -> list[dict[str, Any]]:
    """Per point: its values, each run's status and numbers, and mean/std over the finished
    seeds (:func:`fedsim.report.stats`, as ``fedsim report`` aggregates a group)."""
    points = grid(spec)
    out = []
    for index, params in enumerate(points):
        mine = [r for r in runs if r.point == index]
        done = [r.metrics for r in mine if r.status == "done"]
        adapters = list(dict.fromkeys(label for m in done for label in m.get("online_error", {})))
        out.append(
            {
                "params": {k: parse_override(f"{k}={v}")[1] for k, v in params.items()},
                "labels": dict(params),
                "runs": [{"seed": r.seed, "folder": r.folder.name, "status": r.status, **r.metrics} for r in mine],
                "seeds_done": len(done),
                "final_accuracy": stats([m.get("final_accuracy") for m in done]),
                "best_accuracy": stats([m.get("best_accuracy") for m in done]),
                "mb_up": stats([m.get("mb_up") for m in done]),
                "mb_down": stats([m.get("mb_down") for m in done]),
                "online_error": {a: stats([m.get("online_error", {}).get(a) for m in done]) for a in adapters},
            }
        )
    return out


def markdown_table(spec: SweepSpec, points: list[dict[str, Any]], title: str) -> str:
    """One row per point: varied keys, seeds finished, accuracy and online error mean ± std."""
    keys = [a.key for a in spec.axes]
    adapters = list(dict.fromkeys(a for p in points for a in p["online_error"]))
    seeds = len(spec.seeds) if spec.seeds is not None else 1
    head = [*keys, "seeds", "final acc", "best acc", "MB up", "MB down", *(f"online err {a}" for a in adapters)]
    lines = [
        f"# {title}",
        "",
        (
            f"{len(points)} point(s) x {seeds} seed(s); mean ± std over seeds (population std); accuracy: mean test accuracy over domains; "
            "online err: each adapter's online error (mean over edges and stream seeds)."
        ),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for p in points:
        failed = sum(r["status"] == "failed" for r in p["runs"])
        cells = [
            *(p["labels"][k] for k in keys),
            f"{p['seeds_done']}/{len(p['runs'])}" + (f" ({failed} failed)" if failed else ""),
        ]
        cells += [pm(p["final_accuracy"]), pm(p["best_accuracy"]), pm(p["mb_up"], 2), pm(p["mb_down"], 2)]
        cells += [pm(p["online_error"].get(a, {"mean": None})) for a in adapters]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_sweep(spec: SweepSpec, points: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Final accuracy (and each adapter's online error) against the first varied key, error
    bars over seeds, one line per combination of the other varied keys."""
    from matplotlib.figure import (
        Figure,  # a bare Figure renders with Agg; matplotlib is slow to import
    )

    adapters = list(dict.fromkeys(a for p in points for a in p["online_error"]))
    panels = [("final test accuracy", lambda p: p["final_accuracy"], "")]
    panels += [
        (f"online error: {a}", lambda p, a=a: p["online_error"].get(a, {"mean": None, "std": None}), a)
        for a in adapters
    ]
    fig = Figure(figsize=(5.5 * min(len(panels), 3), 4 * math.ceil(len(panels) / 3)))
    axes = fig.subplots(math.ceil(len(panels) / 3), min(len(panels), 3), squeeze=False).ravel()
    keys = [a.key for a in spec.axes]
    x_key = keys[0] if keys else None
    xs_all = [p["params"][x_key] for p in points] if x_key else [0] * len(points)
    numeric = all(_is_number(x) for x in xs_all)
    categories = list(dict.fromkeys(p["labels"][x_key] for p in points)) if x_key and not numeric else []
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault(", ".join(f"{k}={p['labels'][k]}" for k in keys[1:]), []).append(p)
    for ax, (ylabel, get, _) in zip(axes, panels):
        for group, members in groups.items():
            xs, ys, es = [], [], []
            for p in members:
                stats = get(p)
                if stats["mean"] is None:
                    continue
                xs.append(
                    p["params"][x_key] if numeric and x_key else categories.index(p["labels"][x_key]) if x_key else 0
                )
                ys.append(stats["mean"])
                es.append(stats["std"])
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=group or None)
        if categories:
            ax.set_xticks(range(len(categories)), categories, rotation=20, fontsize=8)
        elif numeric and x_key:
            positive = [x for x in xs_all if x > 0]
            if len(positive) == len(xs_all) and max(positive) / min(positive) >= 100:
                ax.set_xscale("log")  # e.g. learning rates 0.001..0.1
        ax.set_xlabel(x_key or "(no varied key)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(groups) > 1:
            ax.legend(fontsize=8)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(f"{title} (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    atomic_png = path.with_name(f".{path.name}.tmp")
    fig.savefig(atomic_png, dpi=110, format="png", metadata={"Software": PNG_SOFTWARE})
    atomic_png.replace(path)
    return path


# -- the sweep folder --------------------------------------------------------------------


def _saved(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / JSON_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UnsafeOutput(
            f"{out / JSON_FILE}: unreadable ({exc}); refused (pass --overwrite to start the sweep anew)"
        ) from None


def spec_from_saved(out: Path) -> SweepSpec:
    """The sweep a folder was made for (``fedsim sweep --resume OUT``)."""
    if marker_kind(out) != "sweep":
        raise ScenarioError(f"{out}: not a fedsim sweep folder (no sweep marker)")
    saved = _saved(out)
    if saved is None:
        raise ScenarioError(f"{out / JSON_FILE}: missing; nothing to resume (start the sweep again with its command)")
    try:
        d = saved["definition"]
        return SweepSpec(
            saved["scenario"],
            tuple(d["overrides"]),
            tuple(Axis(k, tuple(v)) for k, v in d["axes"]),
            None if d["seeds"] is None else tuple(d["seeds"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ScenarioError(f"{out / JSON_FILE}: not a sweep definition ({type(exc).__name__}: {exc})") from None


def _difference(saved: dict[str, Any], spec: SweepSpec, runs: list[SweepRun]) -> str | None:
    """Why a saved sweep is not this one, in a few words; None when it is."""
    old = saved.get("definition", {})
    now = spec.definition()

    def shown(key: str, value: Any) -> str:
        if key == "axes" and isinstance(value, list):
            return " ".join(f"{k}={','.join(map(str, v))}" for k, v in value) or "(none)"
        return short_repr(value)

    for key, what in (("axes", "grid"), ("seeds", "seeds"), ("overrides", "fixed overrides")):
        if old.get(key) != now[key]:
            return f"its {what} differ{'s' if what == 'grid' else ''} from this sweep's (saved: {shown(key, old.get(key))}; now: {shown(key, now[key])})"
    prints = {r["folder"]: r.get("fingerprint") for r in saved.get("runs", [])}
    for run in runs:
        if prints.get(run.folder.name) != run.fingerprint:
            return f"the scenario of run {run.label} differs from the saved one (the scenario file changed since?)"
    return None


def _lock(out: Path) -> None:
    try:
        lock_folder(out)
    except FolderLocked:
        raise ScenarioError(
            f"{out}: sweep folder is being written by another fedsim process; wait for it to finish or stop it first"
        ) from None


def open_sweep(spec: SweepSpec, out: Path, runs: list[SweepRun], overwrite: bool = False) -> bool:
    """Create (or, for the same sweep, reopen) the sweep folder and hold its lock. Returns
    whether it continues a saved sweep. Refuses (UnsafeOutput, nothing changed) a folder of
    another sweep, a folder that is not fedsim's, and point folders of another scenario."""
    problem = ownership_problem(out, "sweep") if out.is_dir() and marker_kind(out) == "sweep" else "not a sweep folder"
    if problem and marker_kind(out) == "sweep":
        raise UnsafeOutput(
            f"{out}: a fedsim sweep folder, but {problem}; refused (move those away, or choose another --out)"
        )
    ours = problem is None
    if ours:
        _lock(out)  # before reading what another process may be writing
    try:
        saved = _saved(out) if ours and not overwrite else None
        if saved is not None:
            if reason := _difference(saved, spec, runs):
                raise UnsafeOutput(
                    f"{out}: {reason}; refused (pass --overwrite to start it anew, or --out for a new sweep)"
                )
            for run in runs:
                check_run_folder(run)
            return True
        if not ours or overwrite:
            create_folder(
                out, "sweep", overwrite, f"{out}: exists and is not a fedsim sweep folder; choose another --out"
            )
            if not ours or not (out / ".lock").exists():
                unlock_folder(out)  # a replaced folder took its old lock file with it
                _lock(out)
        for run in runs:
            check_run_folder(run)
        return False
    except BaseException:
        unlock_folder(out)
        raise


def write_outputs(spec: SweepSpec, out: Path, runs: list[SweepRun], title: str) -> list[dict[str, Any]]:
    """sweep.json (definition, runs, aggregates), sweep.md and, once a run finished, sweep.png."""
    points = aggregate(spec, runs)
    doc = {
        "fedsim": __version__,
        "scenario": spec.scenario,
        "definition": spec.definition(),
        "keys": [a.key for a in spec.axes],
        "std": "population standard deviation (ddof=0) over seeds",
        "runs": [
            {
                "folder": r.folder.name,
                "point": r.point,
                "seed": r.seed,
                "overrides": r.overrides,
                "fingerprint": r.fingerprint,
                "status": r.status,
            }
            for r in runs
        ],
        "points": points,
    }
    atomic_write_bytes(out / JSON_FILE, json.dumps(doc, indent=2, default=str).encode())
    atomic_write_bytes(out / TABLE_FILE, markdown_table(spec, points, title).encode())
    if any(r.status == "done" for r in runs):
        plot_sweep(spec, points, out / PLOT_FILE, title)
    return points


@contextmanager
def _interrupt_flag() -> Iterator[list[bool]]:
    """Notes a Ctrl-C even when the run that gets it catches it (``fedsim run`` turns it
    into exit code 1), so the sweep stops instead of going on to the next run."""
    flag = [False]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def on_sigint(signum: int, frame: Any) -> None:
        flag[0] = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def run_sweep(
    spec: SweepSpec,
    *,
    runner: Runner,
    out: Path | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[Path, list[dict[str, Any]]]:
    """Validate every run, open the sweep folder, run what is not finished (one after
    another, through ``runner``, e.g. :func:`fedsim.cli.main`) and write the outputs.

    Returns the sweep folder and the aggregated points (as in ``sweep.json``). Bad input
    raises ScenarioError before anything is created; a failed run is recorded (status
    ``failed``) and the others go on; Ctrl-C stops after writing what is finished
    (:class:`SweepInterrupted`)."""
    say = log or (lambda _msg: None)
    out, runs = prepare_sweep(spec, out)
    resumed = open_sweep(spec, out, runs, overwrite)
    title = f"{out.name}: {spec.describe()}"
    try:
        for run in runs:
            if run_state(run) == "done":
                run.status, run.metrics = "done", run_metrics(run)
        write_outputs(spec, out, runs, title)
        todo = [r for r in runs if r.status != "done"]
        say(
            f"{out}: {len(runs)} run(s), {len(runs) - len(todo)} finished before{' (continued)' if resumed else ''}, {len(todo)} to run"
        )
        with _interrupt_flag() as interrupted:
            for i, run in enumerate(todo, 1):
                state = run_state(run)
                say(
                    f"[{i}/{len(todo)}] {run.label} -> {run.folder} ({'continued from its checkpoint' if state == 'resume' else 'started'})"
                )
                if state == "resume":
                    argv = ["run", "--resume", str(run.folder)]
                else:
                    argv = [
                        "run",
                        spec.scenario,
                        *run.overrides,
                        "--out",
                        str(run.folder),
                        *(["--overwrite"] if state == "restart" else []),
                    ]
                code = runner(argv)
                if interrupted[0]:  # `fedsim run` turned the Ctrl-C into exit code 1
                    raise KeyboardInterrupt
                if code == 0 and run_state(run) == "done":
                    run.status, run.metrics = "done", run_metrics(run)
                else:
                    run.status = "failed"
                    say(f"run {run.label} failed (exit code {code}); the sweep goes on")
                write_outputs(spec, out, runs, title)
        return out, write_outputs(spec, out, runs, title)
    except KeyboardInterrupt:
        write_outputs(spec, out, runs, title)  # what finished stays in the table
        raise SweepInterrupted(out) from None
    finally:
        unlock_folder(out)
