"""FedAvg vs FedBN on the built-in five-domain digits (scenarios/digits5-{fedavg,fedbn}-40r.yaml).

    python -m benchmarks.fedbn_vs_fedavg [--seeds 0 1 2] [--out docs/results-core.md]

Runs both scenarios for each seed in-process (inline runtime) and writes a markdown table
of final per-domain and mean accuracy (mean ± std over seeds), bytes and wall time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from fedsim.cli import main as fedsim
from fedsim.results import cpu_model

SCENARIOS = {"FedAvg": "scenarios/digits5-fedavg-40r.yaml", "FedBN": "scenarios/digits5-fedbn-40r.yaml"}


EXTRA: list[str] = []  # overrides for every run (--set key=value)


def run_once(scenario: str, seed: int, out: Path) -> tuple[dict, float]:
    t0 = time.perf_counter()
    code = fedsim(["run", scenario, f"seed={seed}", *EXTRA, "--out", str(out)])
    if code != 0:
        raise SystemExit(f"{scenario} seed {seed} failed with exit code {code}")
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    return last, time.perf_counter() - t0


def mean_std(values: list[float]) -> str:
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="docs/results-core.md")
    ap.add_argument("--set", nargs="*", default=[], help="scenario overrides for every run, e.g. rounds=10")
    args = ap.parse_args()
    EXTRA.extend(args.set)
    results: dict[str, list[tuple[dict, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, scenario in SCENARIOS.items():
            results[label] = [run_once(scenario, s, Path(tmp) / f"{label}-{s}") for s in args.seeds]
    domains = list(results["FedAvg"][0][0]["per_domain"])
    head = ["strategy", *domains, "mean", "MB up / run", "wall s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, runs in results.items():
        recs = [r for r, _ in runs]
        cells = [
            label,
            *[mean_std([r["per_domain"][d] for r in recs]) for d in domains],
            mean_std([r["accuracy"] for r in recs]),
            f"{np.mean([r['bytes_up_total'] for r in recs]) / 1e6:.2f}",
            f"{np.mean([t for _, t in runs]):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    gain = {
        d: np.mean([r["per_domain"][d] for r, _ in results["FedBN"]])
        - np.mean([r["per_domain"][d] for r, _ in results["FedAvg"]])
        for d in domains
    }
    text = "\n".join(
        [
            "# FedAvg vs FedBN on the built-in digits5 data",
            "",
            f"Command: `python -m benchmarks.fedbn_vs_fedavg --seeds {' '.join(map(str, args.seeds))}{' --set ' + ' '.join(args.set) if args.set else ''}` (scenarios {', '.join(SCENARIOS.values())}); final-round test accuracy (%) on each domain's global test set, "
            f"each client evaluated with its deployed model (FedBN: global weights + its own BN), mean ± std over {len(args.seeds)} seeds.",
            f"Hardware: {cpu_model()}, {__import__('os').cpu_count()} CPU cores, no GPU; {time.strftime('%Y-%m-%d')}.",
            "",
            *lines,
            "",
            "FedBN minus FedAvg (points): " + ", ".join(f"{d} {100 * g:+.1f}" for d, g in gain.items()),
            "",
        ]
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
