"""The live terminal view of an edge demo: reads ``edge/progress.jsonl`` as the cloud writes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from fedsim.edge.config import EdgeConfig
from fedsim.edge.profiles import estimate


class ProgressReader:
    """Follows a progress file; :meth:`poll` returns the events written since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.state: dict[str, Any] = {
            "phase": "starting",
            "rounds": None,
            "round": 0,
            "accuracy": None,
            "edges": {},
            "log": [],
        }

    def poll(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with open(self.path) as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind("\n") + 1]  # a line still being written waits
        self.offset += len(complete.encode())
        events = [json.loads(line) for line in complete.splitlines() if line.strip()]
        for ev in events:
            self._apply(ev)
        return events

    def _apply(self, ev: dict[str, Any]) -> None:
        s = self.state
        kind = ev["event"]
        if kind == "start":
            s.update(phase="training", rounds=ev["rounds"])
        elif kind == "round":
            r = ev["record"]
            s.update(
                round=r["round"],
                accuracy=r.get("accuracy"),
                bytes_up=r.get("bytes_up_total"),
                bytes_down=r.get("bytes_down_total"),
            )
        elif kind == "adapt":
            s["phase"] = "adapting"
        elif kind == "edge":
            s["edges"][(ev["edge"], ev["adapter"], ev["seed"])] = ev
        elif kind == "log":
            s["log"] = (s["log"] + [ev["message"]])[-4:]
        elif kind in ("done", "failed"):
            s["phase"] = kind
            s["error"] = ev.get("error")

    @property
    def finished(self) -> bool:
        return self.state["phase"] in ("done", "failed")


def render(state: dict[str, Any], edge_cfg: EdgeConfig, title: str) -> Any:
    """A rich renderable: training progress, then one row per edge and adapter."""

    acc = state.get("accuracy")
    head = Text.assemble(
        (f"{title}  ", "bold"),
        f"phase: {state['phase']}   round {state['round']}/{state['rounds'] or '?'}",
        f"   global accuracy {acc:.4f}" if acc is not None else "",
        f"   training MB up/down {state.get('bytes_up', 0) / 1e6:.2f}/{state.get('bytes_down', 0) / 1e6:.2f}"
        if state.get("bytes_up")
        else "",
    )
    table = Table(expand=False)
    for col in (
        "edge",
        "device",
        "adapter",
        "seed",
        "batches",
        "online acc",
        "uploaded",
        "MB up",
        "MB down",
        "est. ms/batch",
        "est. J",
    ):
        table.add_column(col, justify="left" if col in ("device", "adapter") else "right")
    for (edge, adapter, seed), ev in sorted(state["edges"].items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
        profile = edge_cfg.profile_of(edge)
        est = estimate(
            profile,
            ev.get("seconds", 0.0),
            ev["batches"],
            ev.get("bytes_up", 0.0),
            ev.get("bytes_down", 0.0),
            int(ev.get("cloud_steps", 0)),
            0,
        )
        acc_e = ev["correct"] / ev["samples"] if ev["samples"] else 0.0
        table.add_row(
            str(edge),
            profile.name,
            adapter + ("" if ev.get("done") else " ..."),
            str(seed),
            str(ev["batches"]),
            f"{acc_e:.4f}",
            str(ev.get("uploaded", "-")) if not ev.get("on_device") else "-",
            f"{ev.get('bytes_up', 0) / 1e6:.3f}",
            f"{ev.get('bytes_down', 0) / 1e6:.3f}",
            f"{est['latency_ms_per_batch']:.1f}",
            f"{est['energy_j']:.2f}",
        )
    parts: list[Any] = [head]
    if state["edges"]:
        parts.append(table)
    if state.get("error"):
        parts.append(Text(f"failed: {state['error']}", style="red"))
    return Group(*parts)
