"""The run folder: resolved scenario, metrics, summary, checkpoints and plots.

``runs/<name>/``: ``scenario.yaml`` (resolved), ``metrics.jsonl`` (one JSON object per
evaluated round), ``summary.json``, ``checkpoints/``, ``clients/`` (client state),
``accuracy.png``, ``.fedsim`` (the marker saying fedsim created it) and ``.lock`` (held while
a process writes the folder, :mod:`fedsim.runlock`). An existing folder is never overwritten
unless asked, never while another process writes it, and then only when it is provably a
fedsim run folder (:mod:`fedsim.outputs`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

from fedsim import __version__
from fedsim.arrays import atomic_write_bytes
from fedsim.config import Scenario
from fedsim.engine.checkpoint import complete_rounds
from fedsim.outputs import create_folder, ownership_problem, remove_owned
from fedsim.runlock import LOCK_FILE, FolderLocked, lock_folder, unlock_folder
from fedsim.schema import ScenarioError

ADAPTATION_SUMMARY = "adaptation_summary.json"  # written by fedsim.tta.experiment; read by reports and sweeps


def describe(scenario: Scenario) -> str:
    """What a title names: the scenario, its strategy, rounds and seed."""
    return f"{scenario.name} ({scenario.strategy.name}, {scenario.rounds} rounds, seed {scenario.seed})"


class MetricsError(ScenarioError):
    """A metrics.jsonl line that is not a record (one line naming file and line)."""


class RunFolder:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._locked = False

    scenario_file = property(lambda self: self.path / "scenario.yaml")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    summary_file = property(lambda self: self.path / "summary.json")
    checkpoints = property(lambda self: self.path / "checkpoints")
    plot_file = property(lambda self: self.path / "accuracy.png")

    @classmethod
    def create(cls, path: str | Path, scenario: Scenario, overwrite: bool = False) -> RunFolder:
        """A fresh run folder; with ``overwrite`` an existing fedsim run folder is replaced
        (anything else raises :class:`~fedsim.outputs.UnsafeOutput`)."""
        run = cls(path)
        # A fedsim run folder is locked before it is replaced (one another process writes is
        # refused); a folder that is not fedsim's is never written into, so it is not locked.
        held = run.path.is_dir() and ownership_problem(run.path, "run") is None
        if held:
            run.lock()
        try:
            create_folder(
                run.path,
                "run",
                overwrite,
                f"{run.path}: run folder exists; pass --overwrite to replace it, --resume {run.path} to continue it, or --out to choose another",
            )
            if held and not (run.path / LOCK_FILE).exists():  # replaced: the old hold went with the old folder
                run.unlock()
                held = False
            if not held:
                run.lock()
            atomic_write_bytes(run.scenario_file, scenario.to_yaml().encode())
        except BaseException:
            run.unlock()
            raise
        return run

    def resumable(self) -> bool:
        """Whether ``--resume`` can continue this folder from a checkpoint."""
        return self.scenario_file.is_file() and bool(complete_rounds(self.checkpoints))

    def discard(self) -> bool:
        """Remove this folder if it is a fedsim run folder with nothing resumable in it (a
        start that failed before its first checkpoint); returns whether it was removed."""
        if not self.path.is_dir() or self.resumable() or ownership_problem(self.path, "run"):
            return False
        remove_owned(self.path, "run")
        return True

    # lock ------------------------------------------------------------------------------
    def lock(self) -> None:
        """Hold the folder's OS lock while this process writes it (ScenarioError, one line,
        if another process does); released by :meth:`unlock` or when the process dies."""
        if self._locked:
            return
        try:
            lock_folder(self.path)
        except FolderLocked as exc:
            raise ScenarioError(str(exc)) from None
        self._locked = True

    def unlock(self) -> None:
        if self._locked:
            unlock_folder(self.path)
            self._locked = False

    # metrics ---------------------------------------------------------------------------
    def read_metrics(self) -> list[dict[str, Any]]:
        """The records, in order. A torn last line (a kill mid-append) is ignored; any other
        line that is not a record with a rising integer ``round`` raises MetricsError."""
        if not self.metrics_file.exists():
            return []
        out: list[dict[str, Any]] = []
        lines = self.metrics_file.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines):
                    break  # a torn last line from a kill: everything before it is good
                raise MetricsError(
                    f"{self.metrics_file}: line {i}: not valid JSON (damaged file; fix or remove the line)"
                ) from None
            rnd = record.get("round") if isinstance(record, dict) else None
            if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 1:
                raise MetricsError(
                    f"{self.metrics_file}: line {i}: not a metrics record (no positive integer 'round'); fix or remove the line"
                )
            if out and rnd <= out[-1]["round"]:
                raise MetricsError(
                    f"{self.metrics_file}: line {i}: round {rnd} after round {out[-1]['round']} (rounds must rise; fix or remove the line)"
                )
            out.append(record)
        return out

    def truncate_metrics(self, last_round: int) -> None:
        """Keep the records of rounds <= last_round (used when resuming)."""
        keep = [r for r in self.read_metrics() if r["round"] <= last_round]
        atomic_write_bytes(self.metrics_file, "".join(json.dumps(r) + "\n" for r in keep).encode())

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_file, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_bytes(self.summary_file, json.dumps(summary, indent=2).encode())


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info() -> dict[str, Any]:
    import flwr
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:  # the installed version, without importing Ray (0.4 s) into an inline run
        info["ray"] = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        pass
    info["fedsim"] = __version__
    return info


def summarize(records: list[dict[str, Any]], scenario: Scenario, wall_s: float) -> dict[str, Any]:
    evaluated = [r for r in records if r.get("accuracy") is not None]
    best = max(evaluated, key=lambda r: r["accuracy"]) if evaluated else None
    final = evaluated[-1] if evaluated else None
    return {
        "name": scenario.name,
        "seed": scenario.seed,
        "strategy": scenario.strategy.name,
        "rounds": scenario.rounds,
        "final_round": final["round"] if final else None,
        "final_accuracy": final["accuracy"] if final else None,
        "final_per_domain": final["per_domain"] if final else None,
        "best_accuracy": best["accuracy"] if best else None,
        "best_round": best["round"] if best else None,
        "bytes_up_total": records[-1]["bytes_up_total"] if records else 0,
        "bytes_down_total": records[-1]["bytes_down_total"] if records else 0,
        "train_wall_s_total": sum(r.get("wall_s", 0.0) for r in records),
        "process_wall_s": wall_s,
        "failures_total": sum(len(r.get("failures", [])) for r in records),
        "environment": environment_info(),
    }


def plot_accuracy(records: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Accuracy per domain per round (and the mean), as a PNG."""
    evaluated = [r for r in records if r.get("accuracy") is not None]
    if not evaluated:
        return None
    # a bare Figure renders with Agg: no pyplot import, no global backend or figure state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    rounds = [r["round"] for r in evaluated]
    for domain in evaluated[-1].get("per_domain", {}):
        ax.plot(rounds, [r["per_domain"].get(domain) for r in evaluated], label=domain, alpha=0.8)
    ax.plot(rounds, [r["accuracy"] for r in evaluated], "k-", lw=2.2, label="mean")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
