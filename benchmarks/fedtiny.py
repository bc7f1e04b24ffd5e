"""FedTiny vs the magnitude-pruning baseline (and dense FedAvg) on ``digits5`` with
Dirichlet label skew 0.5, at density 0.1 and 0.01, several seeds.

Scenarios: scenarios/fedtiny-digits5.yaml (density 0.1), fedtiny-digits5-d001.yaml (0.01);
the baseline is the same scenario with ``strategy.name=magprune``; the dense reference is
``strategy.name=fedavg``. Writes a markdown section (per-domain and mean accuracy as mean
+- std over seeds, density, FLOPs, memory, bytes against their dense equivalents, the
command and the hardware) into docs/fedwon-fedtiny.md between ``<!-- fedtiny:begin -->``
and ``<!-- fedtiny:end -->``, raw results to benchmarks/results/fedtiny.json.

    python benchmarks/fedtiny.py                    # 3 seeds
    python benchmarks/fedtiny.py --seeds 0 --no-dense
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.fedwon import (  # noqa: E402
    DOMAIN_ORDER,
    RESULTS,
    hardware,
    mb,
    pm,
    run_scenario,
    write_section,
)

FRAC = "{fraction_train: 0.5, fraction_evaluate: 0.5}"


def configs(dense: bool) -> dict[str, tuple[str, list[str]]]:
    out = {
        "FedTiny d=0.1": ("scenarios/fedtiny-digits5.yaml", []),
        "MagPrune d=0.1": (
            "scenarios/fedtiny-digits5.yaml",
            ["strategy.name=magprune", "strategy.args={density: 0.1, fraction_train: 0.5, fraction_evaluate: 0.5}"],
        ),
        "FedTiny d=0.01": ("scenarios/fedtiny-digits5-d001.yaml", []),
        "MagPrune d=0.01": (
            "scenarios/fedtiny-digits5-d001.yaml",
            ["strategy.name=magprune", "strategy.args={density: 0.01, fraction_train: 0.5, fraction_evaluate: 0.5}"],
        ),
    }
    if dense:
        out["FedAvg dense"] = ("scenarios/fedtiny-digits5.yaml", ["strategy.name=fedavg", f"strategy.args={FRAC}"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-dense", action="store_true", help="skip the dense FedAvg reference")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument(
        "--render", action="store_true", help="only re-render the table from benchmarks/results/fedtiny.json"
    )
    args = ap.parse_args(argv)
    command = "python benchmarks/fedtiny.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.render:
        text = render(json.loads((RESULTS / "fedtiny.json").read_text()))
        print(text)
        if not args.no_doc:
            write_section("fedtiny", text)
        return 0
    hw = hardware()
    t_all = time.perf_counter()
    out_root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fedtiny-bench-"))
    results: dict[str, list[dict[str, Any]]] = {}
    for name, (path, overrides) in configs(not args.no_dense).items():
        rows = []
        for seed in args.seeds:
            tag = name.replace(" ", "_").replace("=", "") + f"-s{seed}"
            # the candidate seed follows the scenario seed (fedsim also passes it by default)
            extra = [f"strategy.args.seed={seed}"] if name.startswith("FedTiny") else []
            records, wall = run_scenario(path, [*overrides, *extra, f"seed={seed}"], out_root / tag)
            last = records[-1]
            sm = last["strategy_metrics"]
            rows.append(
                {
                    "seed": seed,
                    "accuracy": last["accuracy"],
                    "per_domain": last["per_domain"],
                    "bytes_up": last["bytes_up_total"],
                    "bytes_down": last["bytes_down_total"],
                    "bytes_up_dense": sm.get("bytes_up_dense_equiv_total", last["bytes_up_total"]),
                    "bytes_down_dense": sm.get("bytes_down_dense_equiv_total", last["bytes_down_total"]),
                    "density": sm.get("density", 1.0),
                    "flops_dense": sm.get("flops_dense"),
                    "flops_sparse": sm.get("flops_sparse"),
                    "mem_dense": sm.get("mem_dense_bytes"),
                    "mem_sparse": sm.get("mem_sparse_bytes"),
                    "selected": sm.get("selected_candidate"),
                    "wall_s": wall,
                }
            )
            print(f"{tag}: acc {last['accuracy']:.3f} ({wall:.0f}s)", flush=True)
        results[name] = rows
    total = time.perf_counter() - t_all
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"command": command, "seeds": args.seeds, "hardware": hw, "total_s": total, "results": results}
    (RESULTS / "fedtiny.json").write_text(json.dumps(data, indent=1))
    text = render(data)
    print(text)
    if not args.no_doc:
        write_section("fedtiny", text)
    return 0


def render(data: dict[str, Any]) -> str:
    results, seeds, hw, total = data["results"], data["seeds"], data["hardware"], data["total_s"]
    seen = [d for rows in results.values() for r in rows for d in r["per_domain"]]
    domains = [d for d in DOMAIN_ORDER if d in seen] + sorted(set(seen) - set(DOMAIN_ORDER))
    ref = next((r for rows in results.values() for r in rows if r.get("flops_dense")), None)
    lines = [
        "### FedTiny: measured",
        "",
        f"Command: `{data['command']}` ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}; total {total / 60:.1f} min).  ",
        f"Hardware: {hw}.  ",
        "Data: `digits5`, Dirichlet label skew alpha 0.5 within each domain, 20 clients (4 per domain), 10 per round, "
        "12 rounds, cnn-small (width 16, BatchNorm). Accuracy of the final global model on each domain's test set, "
        "in %, mean ± std over seeds.",
        "",
        "| method | " + " | ".join(domains) + " | mean | density | candidate |",
        "|---|" + "---|" * (len(domains) + 3),
    ]
    for name, rows in results.items():
        cells = [pm([r["per_domain"].get(d, float("nan")) for r in rows]) for d in domains]
        sel = ", ".join(str(int(r["selected"])) for r in rows if r.get("selected") is not None) or "-"
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | **{pm([r['accuracy'] for r in rows])}** | {np.mean([r['density'] for r in rows]):.3f} | {sel} |"
        )
    lines += [
        "",
        "Cost per run (seed 0 / mean over seeds for bytes). FLOPs: one forward pass of one 28x28 sample through the conv "
        "and linear layers (2 x MACs). Memory: the model's tensors (sparse: float32 values + uint8/16 indices of active "
        "weights + dense biases/BN). Bytes: fedsim's payload counter over all training rounds (FedTiny's round-1 "
        "selection messages included) against the same rounds with dense float32 models.",
        "",
        "| method | FLOPs (dense → sparse) | FLOPs saved | memory KB (dense → sparse) | memory saved | MB up (dense-equiv.) | MB down (dense-equiv.) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        r0 = rows[0]
        fd = r0["flops_dense"] or (ref or {}).get("flops_dense")
        fs = r0["flops_sparse"] or fd
        md = r0["mem_dense"] or (ref or {}).get("mem_dense")
        ms = r0["mem_sparse"] or md
        up, upd = np.mean([r["bytes_up"] for r in rows]), np.mean([r["bytes_up_dense"] for r in rows])
        dn, dnd = np.mean([r["bytes_down"] for r in rows]), np.mean([r["bytes_down_dense"] for r in rows])
        lines.append(
            f"| {name} | {fd / 1e6:.2f}M → {fs / 1e6:.2f}M | {100 * (1 - fs / fd):.1f}% | {md / 1e3:.1f} → {ms / 1e3:.1f} | {100 * (1 - ms / md):.1f}% | "
            f"{mb(up)} ({mb(upd)}) | {mb(dn)} ({mb(dnd)}) |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
