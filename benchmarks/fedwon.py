"""FedWon vs FedAvg vs FedBN on the built-in ``digits5`` domains, several seeds.

Settings (scenarios/):
  silo-1   fedwon-digits5.yaml        5 clients, one domain each, batch 32
  silo-3   fedwon-digits5-multi.yaml  15 clients, 3 per domain, batch 32
  bs1      fedwon-digits5-bs1.yaml    100 clients (20 per domain), 10 per round; FedWon at
                                      batch 1, the BN baselines at batch 2 (BN cannot train at 1)

Writes a markdown section (per-domain and mean accuracy as mean +- std over seeds, bytes,
wall time, the command and the hardware) into docs/fedwon-fedtiny.md between
``<!-- fedwon:begin -->`` and ``<!-- fedwon:end -->``, and raw results to
benchmarks/results/fedwon.json.

    python benchmarks/fedwon.py                 # 3 seeds, all settings
    python benchmarks/fedwon.py --seeds 0 --settings silo-1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.scenario import new_run

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DOC = ROOT / "docs" / "fedwon-fedtiny.md"
RESULTS = ROOT / "benchmarks" / "results"

DOMAIN_ORDER = ("mnist", "usps", "mnistm", "svhn", "syn")
SETTINGS: dict[str, tuple[str, str]] = {
    "silo-1": ("scenarios/fedwon-digits5.yaml", "one domain per client (5 clients), batch 32"),
    "silo-3": ("scenarios/fedwon-digits5-multi.yaml", "3 clients per domain (15 clients), batch 32"),
    "bs1": (
        "scenarios/fedwon-digits5-bs1.yaml",
        "cross-device: 100 clients (20 per domain), 10 per round, 48 samples each, 15 rounds; FedWon batch 1, BN baselines batch 2",
    ),
}


def method_overrides(setting: str) -> dict[str, list[str]]:
    frac = ["strategy.args={fraction_train: 0.1, fraction_evaluate: 1.0}"] if setting == "bs1" else ["strategy.args={}"]
    bs = ["client.batch_size=2"] if setting == "bs1" else []
    return {
        "FedAvg (BN)": ["strategy.name=fedavg", "model.normalization=bn", *frac, *bs],
        "FedBN": ["strategy.name=fedbn", "model.normalization=bn", *frac, *bs],
        "FedWon": [],
    }


# -- shared helpers (also used by benchmarks/fedtiny.py) -------------------------------------


def hardware() -> str:
    from fedsim.results import cpu_model

    cpu = cpu_model()
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {os.cpu_count()} logical cores (shared; load average {load:.1f} at start), torch {torch.__version__}, Python {platform.python_version()}"


def run_scenario(path: str, overrides: list[str], out: Path) -> tuple[list[dict[str, Any]], float]:
    """One run, in this process, on the inline runtime; returns (metrics records, seconds)."""
    from fedsim.cli.common import quiet_libraries as _quiet_libraries
    from fedsim.engine.runtimes import run_inline
    from fedsim.results import RunFolder
    from fedsim.scenario import load_scenario

    scenario = load_scenario(ROOT / path, overrides)
    run = RunFolder.create(out, scenario, overwrite=True)
    _quiet_libraries()
    t0 = time.perf_counter()
    run_inline(new_run(scenario, run))
    return run.read_metrics(), time.perf_counter() - t0


def pm(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """mean ± sample std; values missing (NaN, e.g. a domain no evaluated client held)
    are left out and the count is shown."""
    a = np.asarray(values, dtype=float) * scale
    n_all = len(a)
    a = a[np.isfinite(a)]
    if len(a) == 0:
        return "-"
    note = f" (n={len(a)})" if len(a) < n_all else ""
    if len(a) == 1:
        return f"{a[0]:.{digits}f}{note}"
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1):.{digits}f}{note}"


def mb(x: float) -> str:
    return f"{x / 1e6:.2f}"


def write_section(name: str, text: str) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    doc = DOC.read_text() if DOC.exists() else ""
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end) :]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(doc)


# -- benchmark ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--out", default=None, help="run folders (default: a temp folder)")
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/fedwon-fedtiny.md")
    ap.add_argument(
        "--merge", action="store_true", help="keep the other settings' results from benchmarks/results/fedwon.json"
    )
    args = ap.parse_args(argv)
    command = "python benchmarks/fedwon.py " + " ".join(argv if argv is not None else sys.argv[1:])
    hw = hardware()
    t_all = time.perf_counter()
    out_root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fedwon-bench-"))
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for setting in args.settings:
        path, _ = SETTINGS[setting]
        results[setting] = {}
        for method, overrides in method_overrides(setting).items():
            rows = []
            for seed in args.seeds:
                tag = f"{setting}-{method.split()[0].lower()}-s{seed}"
                records, wall = run_scenario(path, [*overrides, f"seed={seed}"], out_root / tag)
                last = records[-1]
                rows.append(
                    {
                        "seed": seed,
                        "accuracy": last["accuracy"],
                        "per_domain": last["per_domain"],
                        "bytes_up": last["bytes_up_total"],
                        "bytes_down": last["bytes_down_total"],
                        "wall_s": wall,
                    }
                )
                print(f"{tag}: acc {last['accuracy']:.3f} ({wall:.0f}s)", flush=True)
            results[setting][method] = rows
    total = time.perf_counter() - t_all
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs = [
        {"command": command.strip(), "seeds": args.seeds, "settings": args.settings, "hardware": hw, "total_s": total}
    ]
    saved = RESULTS / "fedwon.json"
    if args.merge and saved.exists():
        old = json.loads(saved.read_text())
        runs = [r for r in old.get("runs", []) if set(r["settings"]) - set(args.settings)] + runs
        merged = {k: v for k, v in old["results"].items() if k not in results}
        merged.update(results)
        results = {k: merged[k] for k in SETTINGS if k in merged}
    saved.write_text(json.dumps({"runs": runs, "results": results}, indent=1))
    lines = ["### FedWon: measured", ""]
    for r in runs:
        lines.append(
            f"Command: `{r['command']}` (settings {', '.join(r['settings'])}; {len(r['seeds'])} seeds; {r['total_s'] / 60:.1f} min). Hardware: {r['hardware']}.  "
        )
    lines += [
        "Accuracy: the final global model (FedBN: each client's model with its own BN) on each domain's test set, "
        "in %, mean ± std over seeds; `mean` is the mean over domains. Bytes: payload of all training rounds, per run.",
        "",
    ]
    for setting, per_method in results.items():
        path, desc = SETTINGS[setting]
        seen = [d for rows in per_method.values() for r in rows for d in r["per_domain"]]
        domains = [d for d in DOMAIN_ORDER if d in seen] + sorted(set(seen) - set(DOMAIN_ORDER))
        lines += [f"**{setting}** — {desc} (`{path}`)", ""]
        lines.append("| method | " + " | ".join(domains) + " | mean | MB up | MB down | s/run |")
        lines.append("|---|" + "---|" * (len(domains) + 4))
        for method, rows in per_method.items():
            cells = [pm([r["per_domain"].get(d, float("nan")) for r in rows]) for d in domains]
            lines.append(
                f"| {method} | " + " | ".join(cells) + f" | **{pm([r['accuracy'] for r in rows])}** | "
                f"{mb(np.mean([r['bytes_up'] for r in rows]))} | {mb(np.mean([r['bytes_down'] for r in rows]))} | {np.mean([r['wall_s'] for r in rows]):.0f} |"
            )
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if not args.no_doc:
        write_section("fedwon", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
