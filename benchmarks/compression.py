"""Compressed-communication benchmark: FedAvg vs naive Top-K vs EF21 vs EControl on digits5.

Runs ``scenarios/compressed-{fedavg,topk,ef21,econtrol}.yaml`` for N seeds (inline runtime),
plus EF21 and EControl with ``init=zero`` (no uncompressed first round),
then writes a markdown table (final accuracy mean +- std, total bytes up, bytes up to reach a
target accuracy) and a plot of accuracy vs cumulative uplink bytes into docs/compression.md
(between the BENCHMARK markers) and docs/compression.png.

    python benchmarks/compression.py                 # 3 seeds x 6 runs, about 7 minutes on 2 CPU cores
    python benchmarks/compression.py --seeds 1 --rounds 6   # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from fedsim.scenario import new_run

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsim.engine.runtimes import run_inline  # noqa: E402
from fedsim.results import RunFolder  # noqa: E402
from fedsim.scenario import load_scenario  # noqa: E402

# (run name, scenario file suffix, overrides)
RUNS = {
    "fedavg": ("fedavg", []),
    "topk": ("topk", []),
    "ef21": ("ef21", []),
    "econtrol": ("econtrol", []),
    "ef21-zero": ("ef21", ["strategy.args.init=zero"]),
    "econtrol-zero": ("econtrol", ["strategy.args.init=zero"]),
}
NAMES = list(RUNS)
LABELS = {
    "fedavg": "FedAvg (dense)",
    "topk": "Top-K 1%, no error feedback",
    "ef21": "EF21, Top-K 1% (uncompressed round 1)",
    "econtrol": "EControl eta=0.1, Top-K 1% (uncompressed round 1)",
    "ef21-zero": "EF21, Top-K 1% (init zero)",
    "econtrol-zero": "EControl eta=0.1, Top-K 1% (init zero)",
}
BEGIN, END = "<!-- BENCHMARK:BEGIN -->", "<!-- BENCHMARK:END -->"


def run_one(name: str, seed: int, rounds: int | None, out: Path) -> list[dict]:
    scenario, extra = RUNS[name]
    overrides = [f"seed={seed}", *extra]
    if scenario != "fedavg":
        overrides.append(f"strategy.args.seed={seed}")
    if rounds:
        overrides.append(f"rounds={rounds}")
    sc = load_scenario(ROOT / "scenarios" / f"compressed-{scenario}.yaml", overrides)
    folder = RunFolder.create(out / name / f"seed{seed}", sc, overwrite=True)
    run_inline(new_run(sc, folder))
    return folder.read_metrics()


def mb(x: float) -> str:
    return f"{x / 1e6:.2f}"


def first_reach(records: list[dict], target: float) -> float | None:
    for r in records:
        if r["accuracy"] is not None and r["accuracy"] >= target:
            return float(r["bytes_up_total"])
    return None


def table(results: dict[str, list[list[dict]]], target: float) -> str:
    dense = np.mean([rs[-1]["bytes_up_total"] for rs in results["fedavg"]]) if "fedavg" in results else None
    lines = [
        f"| strategy | final accuracy (mean ± std) | total bytes up (MB) | vs FedAvg | bytes up to reach {target:.2f} accuracy (MB) | total bytes down (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        acc = np.array([rs[-1]["accuracy"] for rs in runs])
        up = np.mean([rs[-1]["bytes_up_total"] for rs in runs])
        down = np.mean([rs[-1]["bytes_down_total"] for rs in runs])
        reach = [first_reach(rs, target) for rs in runs]
        hit = [r for r in reach if r is not None]
        reach_s = f"{mb(np.mean(hit))} ({len(hit)}/{len(runs)} seeds)" if hit else f"not reached (0/{len(runs)})"
        ratio = f"{up / dense:.3f}" if dense else "-"
        lines.append(
            f"| {LABELS.get(name, name)} | {acc.mean():.4f} ± {acc.std():.4f} | {mb(up)} | {ratio} | {reach_s} | {mb(down)} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, list[list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, runs in results.items():
        xs = np.mean([[r["bytes_up_total"] for r in rs] for rs in runs], axis=0) / 1e6
        ys = np.array([[r["accuracy"] for r in rs] for rs in runs])
        ax.plot(xs, ys.mean(0), marker="o", ms=3, label=LABELS.get(name, name))
        if len(runs) > 1:
            ax.fill_between(xs, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes sent up (MB, log scale)")
    ax.set_ylabel("mean per-domain test accuracy")
    ax.set_title("digits5, 10 clients, 50% per round")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=7.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def hardware() -> str:
    from fedsim.results import cpu_model

    cpu = cpu_model()
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{n} CPU cores ({cpu}), shared with other jobs; torch {__import__('torch').__version__}, 1 torch thread"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=None, help="override the scenarios' rounds")
    ap.add_argument("--target", type=float, default=0.55, help="accuracy for the bytes-to-target column")
    ap.add_argument("--out", default=str(ROOT / "runs" / "compression-bench"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "compression.md"))
    ap.add_argument("--png", default=str(ROOT / "docs" / "compression.png"))
    ap.add_argument("--only", nargs="*", default=NAMES, choices=NAMES)
    args = ap.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    out = Path(args.out)
    t0 = time.perf_counter()
    results: dict[str, list[list[dict]]] = {}
    for name in args.only:
        for seed in range(args.seeds):
            t1 = time.perf_counter()
            recs = run_one(name, seed, args.rounds, out)
            results.setdefault(name, []).append(recs)
            print(
                f"{name} seed {seed}: accuracy {recs[-1]['accuracy']:.4f}, bytes up {recs[-1]['bytes_up_total']}, {time.perf_counter() - t1:.0f}s",
                flush=True,
            )
    wall = time.perf_counter() - t0
    (out / "results.json").write_text(
        json.dumps(
            {
                k: [
                    [{kk: r[kk] for kk in ("round", "accuracy", "bytes_up_total", "bytes_down_total")} for r in rs]
                    for rs in v
                ]
                for k, v in results.items()
            },
            indent=1,
        )
    )
    plot(results, Path(args.png))
    cmd = (
        "python benchmarks/compression.py"
        + (f" --seeds {args.seeds}" if args.seeds != 3 else "")
        + (f" --rounds {args.rounds}" if args.rounds else "")
        + (f" --target {args.target}" if args.target != 0.55 else "")
        + (f" --only {' '.join(args.only)}" if args.only != NAMES else "")
    )
    section = "\n".join(
        [
            BEGIN,
            f"Command: `{cmd}` ({args.seeds} seed{'s' if args.seeds != 1 else ''}: 0..{args.seeds - 1}; scenario seed and compressor seed both set).",
            f"Hardware: {hardware()}. Wall time of the whole benchmark: {wall / 60:.1f} min.",
            "",
            table(results, args.target),
            "",
            f"![accuracy vs cumulative uplink bytes]({Path(args.png).name})",
            END,
        ]
    )
    doc = Path(args.doc)
    text = doc.read_text() if doc.exists() else f"# Compressed communication\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    doc.write_text(text)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
