"""fedsim's performance benchmark: engine overhead, Ray vs plain Flower, population scale,
test-time-adaptation overhead, the default scenario end to end, GPU, torch.func clients.

    python -m benchmarks.perf [--quick] [--only 1,P,3,4] [--device cpu|cuda] [--reps N] [--out docs/performance.md]

Every measurement runs in its own Python process (``benchmarks._perf_jobs``), so no cache,
thread setting or Ray state leaks from one into the next. Ratios are taken between runs made
side by side and interleaved (A B A B ...; target P: A B C, C B A, ...); the table reports medians over repetitions and
the load average around each target, because the machine may be shared.

Targets (ratio or value, limit):
 1  fedsim inline / bare PyTorch loop, 10 clients x 5 rounds, cnn-small, digits5   <= 1.10
 2  fedsim ray / hand-written Flower app on run_simulation (Ray), same work         <= 1.10
    (and inline vs ray, reported)
 P  the parallel runtime (issue #19 target 1): `fedsim run` of the default scenario, 10 clients
    x 3 rounds, ray (pool engine) vs inline, idle and with a busy loop holding one core:
    round work <= 1/(0.8 k) of inline's on k idle cores, never above inline's when loaded;
    start-up it adds <= 3 s; end to end faster than inline (flower engine reported)
 3  100,000 clients (10 sampled) vs 10 clients, per-round time (FedBN, EF21)        <= 1.20
    peak RSS of the 100,000-client run <= its data + 1.5 GiB; start-up <= 30 s
 4  TTA per batch of 64 vs plain inference: alpha-BN <= 1.10, UnMix-TNS K=16 <= 1.5,
    CEMA edge side <= 1.10
 5  scenarios/multidomain.yaml end to end (`fedsim run` process)                     < 180 s
 6  GPU: client-training samples/s vs bare loop >= 0.9; Ray packing 4 clients/GPU
 S  issue #19 target 5, vectorized cohorts: 32 clients trained at once (runtime.vectorize)
    vs one after another, client-training samples/s: CPU reported, GPU >= 5x
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TAG = "PERF_RESULT "
GIB = 1024**3

# Target 1/2/6: the scenario: 10 clients (2 per digits5 domain), 5 rounds, cnn-small.
BASE = ["data.clients_per_domain=2"]
# Target 3 (issue #19's target 2): 100,000 clients = 25,000 per toy domain; 500,000 train
# images per domain give each client a pool of 20 (16 train + 4 test with samples_per_client
# 16); the 10-client comparison uses the same dataset and the same 16 train samples per
# client (2 steps of 8 per round). Toy images 8x8: 2 million of them are 0.4 GB.
POP_DATA = [
    "data.dataset=toy",
    "data.image_size=8",
    "data.options={train_per_domain: 500000, test_per_domain: 200}",
    "data.samples_per_client=16",
    "data.domain_test_samples=200",
    "client.batch_size=8",
]
POP_PER_DOMAIN = 25_000  # 4 toy domains x 25,000 = 100,000 clients, a pool of 20 images each


@dataclass
class Row:
    target: str
    measured: str
    limit: str
    status: str  # PASS / FAIL / REPORTED / SKIPPED
    notes: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        # a '|' in a cell would split the markdown row, and a later partial run could not
        # read the row back (keep_previous) and would drop it
        row = Row(*(cell.replace("|", "/") for cell in (row.target, row.measured, row.limit, row.status, row.notes)))
        self.rows.append(row)
        print(f"  -> {row.target}: {row.measured} (limit {row.limit}) {row.status}", flush=True)

    def detail(self, text: str) -> None:
        self.details.append(text)
        print("     " + text.replace("\n", "\n     "), flush=True)


def load() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.2f} {b:.2f} {c:.2f}"


def run_job(job: str, args: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """One measurement in a fresh process; returns its result plus ``process_s``."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks._perf_jobs", job, json.dumps(args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"job {job} {args} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    out = json.loads(lines[-1][len(TAG) :])
    out["process_s"] = wall
    return out


def run_cli(overrides: list[str], scenario: str = "scenarios/multidomain.yaml", timeout: float = 1800) -> float:
    """Wall time of a whole ``fedsim run`` process (interpreter start-up included)."""
    with tempfile.TemporaryDirectory(prefix="fedsim-perf-cli-") as tmp:
        cmd = [sys.executable, "-m", "fedsim.cli", "run", scenario, *overrides, "--out", str(Path(tmp) / "run")]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return wall


def med(values: list[float]) -> float:
    return statistics.median(values)


def fmt_list(values: list[float], digits: int = 3) -> str:
    return "[" + ", ".join(f"{v:.{digits}f}" for v in values) + "]"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def prepare_data(overrides_sets: list[list[str]]) -> None:
    """Build (or read) the digits5 caches every target uses, outside any timing."""
    from fedsim.data.loading import load_dataset
    from fedsim.scenario import load_scenario

    for ov in overrides_sets:
        load_dataset(load_scenario(str(ROOT / "scenarios/multidomain.yaml"), ov).data)


# ---------------------------------------------------------------------------------------------
def target1(rep: Report, reps: int, rounds: int) -> None:
    ov = [*BASE, f"rounds={rounds}", f"evaluation.every={rounds}"]
    print(f"[1] engine overhead (inline) vs bare loop, {reps} interleaved repetitions; load {load()}", flush=True)
    api, bare, cli, bare_proc = [], [], [], []
    for _ in range(reps):
        a = run_job("fedsim", {"overrides": ov})
        b = run_job("bare", {"overrides": ov})
        c = run_cli(ov)
        if a["steps"] != b["steps"]:
            raise RuntimeError(f"fedsim took {a['steps']} optimizer steps, the bare loop {b['steps']}")
        api.append(a)
        bare.append(b)
        cli.append(c)
        bare_proc.append(b["process_s"])
    r_api = [a["work_s"] / b["work_s"] for a, b in zip(api, bare)]
    r_cli = [c / b for c, b in zip(cli, bare_proc)]
    rep.add(
        Row(
            "1. inline engine overhead: fedsim (in-process API) / bare loop",
            f"{med(r_api):.3f}",
            "<= 1.10",
            verdict(med(r_api) <= 1.10),
            f"{api[0]['steps']} optimizer steps on both sides; load {load()}",
        )
    )
    rep.add(
        Row(
            "1b. same, whole processes: `fedsim run` / `python` bare loop (start-up + imports included on both)",
            f"{med(r_cli):.3f}",
            "<= 1.10",
            verdict(med(r_cli) <= 1.10),
            "fedsim's process also imports Flower and writes summary + plot",
        )
    )
    rep.detail(
        f"Target 1 ({len(api)} reps, {rounds} rounds): in-process seconds fedsim {fmt_list([a['work_s'] for a in api], 1)}, bare {fmt_list([b['work_s'] for b in bare], 1)}, "
        f"ratios {fmt_list(r_api)}; whole-process seconds `fedsim run` {fmt_list(cli, 1)}, bare {fmt_list(bare_proc, 1)}, ratios {fmt_list(r_cli)}; "
        f"final accuracy fedsim {api[0]['accuracy']:.4f}, bare {bare[0]['accuracy']:.4f}."
    )


def target2(rep: Report, reps: int, rounds: int) -> None:
    ov = [*BASE, f"rounds={rounds}", "evaluation.every=1"]
    print(
        f"[2] ray runtime vs plain Flower run_simulation, and inline; {reps} interleaved repetitions; load {load()}",
        flush=True,
    )
    ray, flw, inl = [], [], []
    for _ in range(reps):
        ray.append(run_job("fedsim", {"overrides": [*ov, "runtime=ray"]})["work_s"])
        flw.append(run_job("flower", {"overrides": [*ov, "runtime=ray"]})["work_s"])
        inl.append(run_job("fedsim", {"overrides": ov})["work_s"])
    r = [a / b for a, b in zip(ray, flw)]
    ri = [a / b for a, b in zip(ray, inl)]
    rep.add(
        Row(
            "2. fedsim `ray` / hand-written Flower app (run_simulation, FedAvg.start)",
            f"{med(r):.3f}",
            "<= 1.10",
            verdict(med(r) <= 1.10),
            f"Ray start-up included on both sides; load {load()}",
        )
    )
    rep.add(
        Row(
            "2b. fedsim `ray` / fedsim `inline` (2 cores)",
            f"{med(ri):.3f}",
            "reported",
            "REPORTED",
            "Ray: 2 client actors in parallel, plus Ray start-up",
        )
    )
    rep.detail(
        f"Target 2 ({len(ray)} reps, {rounds} rounds, evaluation every round on both): seconds fedsim ray {fmt_list(ray, 1)}, Flower {fmt_list(flw, 1)}, fedsim inline {fmt_list(inl, 1)}."
    )


# Target P: the default scenario with 10 clients (2 per digits5 domain), 3 rounds, evaluating
# every round, as a whole `fedsim run` process on each runtime.
PAR = ["data.clients_per_domain=2", "rounds=3"]
PAR_RUNTIMES = {
    "inline": ["runtime=inline"],
    "pool": ["runtime={name: ray, engine: pool}"],
    "flower": ["runtime={name: ray, engine: flower}"],
    # an A/A control: inline again, in its own process (never right after the first); inline2
    # / inline is the machine's noise between two identical runs, next to which the ratios
    # of the others are read
    "inline2": ["runtime=inline"],
    # the pool with one worker whatever the load (idle only): what its parallelism gives
    # when the automatic count finds no free core on a machine other users keep busy
    "pool1": ["runtime={name: ray, engine: pool, workers: 1}"],
}


def busy_cores(window_s: float = 0.5) -> float:
    """Cores the machine's processes keep busy over ``window_s`` (``/proc/stat``)."""
    from fedsim.engine.ray_start import CpuSample

    sample = CpuSample()
    return sample.ncpu - sample.free_cores(window_s)


def settle(baseline: float, timeout_s: float = 15.0) -> float:
    """Wait until the machine is back to ``baseline`` busy cores (+0.3): a Ray run's processes
    (its daemons, Flower's SuperLink) can outlive its driver by a few seconds, and would take
    CPU from the next process. Returns the seconds waited (``timeout_s`` at most)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s and busy_cores() > baseline + 0.3:
        pass
    return time.monotonic() - t0


def run_order(names: list[str], rep: int) -> list[str]:
    """The runtimes of repetition ``rep``: in order, then reversed (A B C, C B A, ...), so that
    no runtime always runs right after the same one (a Ray run's shutdown, the disk cache)."""
    return names if rep % 2 == 0 else names[::-1]


@contextmanager
def busy_core() -> Iterator[None]:
    """Another job holding one core: a busy-loop process, started and stopped here."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(2.0)
        yield
    finally:
        proc.kill()
        proc.wait()


def run_timed_cli(overrides: list[str]) -> dict[str, Any]:
    """One `fedsim run` process (benchmarks._perf_jobs cli): ``process_s`` end to end,
    ``startup_s`` from launching the process until round 1 starts, ``round_work_s``."""
    launched = time.time()
    out = run_job("cli", {"overrides": overrides})
    out["startup_s"] = out["first_round_at"] - launched
    return out


def target_parallel(rep: Report, reps: int) -> None:
    """Issue #19 target 1, measured side by side: inline, ray (pool), ray (flower) interleaved,
    first on the machine as it is, then with a busy loop holding one core."""
    k = os.cpu_count() or 1
    limit = 1 / (0.8 * k)
    for cond in ("idle", "loaded"):
        note = "no other job of ours" if cond == "idle" else "a busy-loop process holding one core"
        print(f"[P] parallel runtime, {cond} ({note}), {reps} interleaved repetitions; load {load()}", flush=True)
        res: dict[str, list[dict[str, Any]]] = {name: [] for name in PAR_RUNTIMES}
        with busy_core() if cond == "loaded" else nullcontext():
            before = load()
            baseline = busy_cores(1.0)
            waited = []
            names = [name for name in PAR_RUNTIMES if name != "pool1" or cond == "idle"]
            for r in range(reps):
                for name in run_order(names, r):
                    waited.append(settle(baseline))
                    res[name].append(run_timed_cli([*PAR, *PAR_RUNTIMES[name]]))
            after = load()
        inl, pool, flw = res["inline"], res["pool"], res["flower"]
        work = [p["round_work_s"] / i["round_work_s"] for p, i in zip(pool, inl)]
        work_f = [f["round_work_s"] / i["round_work_s"] for f, i in zip(flw, inl)]
        added = [p["startup_s"] - i["startup_s"] for p, i in zip(pool, inl)]
        added_f = [f["startup_s"] - i["startup_s"] for f, i in zip(flw, inl)]
        e2e = [p["process_s"] / i["process_s"] for p, i in zip(pool, inl)]
        e2e_f = [f["process_s"] / i["process_s"] for f, i in zip(flw, inl)]
        loads = f"load {before} -> {after}; each process started once the machine was back to {baseline:.1f} busy cores (+0.3; waited {min(waited):.1f}-{max(waited):.1f} s)"
        chosen = "; ".join(sorted({p["pool"].split(";")[0].replace("runtime ray (pool): ", "") for p in pool}))
        work_limit = (f"<= {limit:.3f}", med(work) <= limit) if cond == "idle" else ("<= 1.00", med(work) <= 1.0)
        rep.add(
            Row(
                f"P. {cond}: round work, ray (pool) / inline ({k} cores)",
                f"{med(work):.3f}",
                work_limit[0],
                verdict(work_limit[1]),
                f"{med([p['round_work_s'] for p in pool]):.1f} s vs {med([i['round_work_s'] for i in inl]):.1f} s; pool chose: {chosen}; {loads}",
            )
        )
        rep.add(
            Row(
                f"P. {cond}: start-up the ray (pool) runtime adds (launch to round 1, minus inline's)",
                f"{med(added):.1f} s",
                "<= 3 s",
                verdict(med(added) <= 3.0),
                f"launch to round 1: pool {med([p['startup_s'] for p in pool]):.1f} s, inline {med([i['startup_s'] for i in inl]):.1f} s",
            )
        )
        rep.add(
            Row(
                f"P. {cond}: end to end (`fedsim run` process), ray (pool) / inline",
                f"{med(e2e):.3f}",
                "< 1.00" if cond == "idle" else "<= 1.00",
                verdict(med(e2e) < 1.0 if cond == "idle" else med(e2e) <= 1.0),
                f"{med([p['process_s'] for p in pool]):.1f} s vs {med([i['process_s'] for i in inl]):.1f} s",
            )
        )
        later = [sum(p["round_s"][1:]) / sum(i["round_s"][1:]) for p, i in zip(pool, inl) if len(i["round_s"]) > 1]
        if later:
            rep.add(
                Row(
                    f"Pa. {cond}: round work from round 2 on (workers warm), ray (pool) / inline",
                    f"{med(later):.3f}",
                    "reported",
                    "REPORTED",
                    "what the pool gives once its workers are warm; round 1 shares the cores with Ray's start "
                    "(begun when the `fedsim run` process starts) and the workers' imports",
                )
            )
        rep.add(
            Row(
                f"Pb. {cond}: ray (flower engine) / inline: round work; end to end; start-up added",
                f"{med(work_f):.3f}; {med(e2e_f):.3f}; {med(added_f):.1f} s",
                "reported",
                "REPORTED",
                "Flower's run_simulation, 1 CPU per client actor",
            )
        )
        if res["pool1"]:
            one = res["pool1"]
            rep.add(
                Row(
                    f"Pc. {cond}: ray (pool, `workers: 1` forced) / inline: round work; end to end; start-up added",
                    f"{med([p['round_work_s'] / i['round_work_s'] for p, i in zip(one, inl)]):.3f}; "
                    f"{med([p['process_s'] / i['process_s'] for p, i in zip(one, inl)]):.3f}; "
                    f"{med([p['startup_s'] - i['startup_s'] for p, i in zip(one, inl)]):.1f} s",
                    "reported",
                    "REPORTED",
                    "the driver and one worker whatever the load; "
                    + " / ".join(r["pool"].replace("runtime ray (pool): ", "") for r in one),
                )
            )
        aa = res["inline2"]
        aa_work = [b["round_work_s"] / a["round_work_s"] for a, b in zip(inl, aa)]
        aa_e2e = [b["process_s"] / a["process_s"] for a, b in zip(inl, aa)]
        rep.add(
            Row(
                f"P0. {cond}: A/A control, inline / inline (two identical processes): round work; end to end",
                f"{med(aa_work):.3f}; {med(aa_e2e):.3f}",
                "reported",
                "REPORTED",
                f"the noise next to which the P rows read: per pair {min(aa_work):.3f}-{max(aa_work):.3f} round work, "
                f"{min(aa_e2e):.3f}-{max(aa_e2e):.3f} end to end; pool / inline per pair {min(work):.3f}-{max(work):.3f} "
                f"and {min(e2e):.3f}-{max(e2e):.3f}",
            )
        )
        accs = {name: sorted({round(r["accuracy"], 6) for r in runs}) for name, runs in res.items()}
        rep.detail(
            f"Target P {cond} ({note}; {reps} reps, {loads}): round work s inline {fmt_list([r['round_work_s'] for r in inl], 1)}, "
            f"pool {fmt_list([r['round_work_s'] for r in pool], 1)}, flower {fmt_list([r['round_work_s'] for r in flw], 1)}; "
            f"launch to round 1 s inline {fmt_list([r['startup_s'] for r in inl], 1)}, pool {fmt_list([r['startup_s'] for r in pool], 1)}, "
            f"flower {fmt_list([r['startup_s'] for r in flw], 1)}; process s inline {fmt_list([r['process_s'] for r in inl], 1)}, "
            f"pool {fmt_list([r['process_s'] for r in pool], 1)}, flower {fmt_list([r['process_s'] for r in flw], 1)}; "
            f"per-round s pool {[[round(x, 1) for x in r['round_s']] for r in pool]}, inline {[[round(x, 1) for x in r['round_s']] for r in inl]}; "
            f"final accuracy {accs}; pool: {' | '.join(r['pool'].replace('runtime ray (pool): ', '') for r in pool)}."
        )


def target3(rep: Report, reps: int, rounds: int) -> None:
    """Issue #19's population target: 100,000 clients, 10 sampled per round, vs 10 clients
    (all sampled) on the same data with the same 16 samples each."""
    print(f"[3] population scale: 100,000 clients (10 sampled) vs 10 clients; load {load()}", flush=True)
    common = [*POP_DATA, f"rounds={rounds}", f"evaluation.every={rounds}"]
    configs = {
        "fedbn": ("strategy.name=fedbn", "strategy.args={{fraction_train: {f}, fraction_evaluate: {f}}}"),
        "ef21": ("strategy.name=ef21", "strategy.args={{fraction_train: {f}, fraction_evaluate: {f}, init: zero}}"),
    }
    for name, (strat, args) in configs.items():
        big_r, small_r, runs = [], [], []
        for _ in range(reps):
            big = run_job(
                "fedsim",
                {
                    "overrides": [
                        *common,
                        f"data.clients_per_domain={POP_PER_DOMAIN}",
                        strat,
                        args.format(f=10 / (4 * POP_PER_DOMAIN)),
                    ]
                },
            )
            small = run_job("fedsim", {"overrides": [*common, "data.clients_per_domain=2", strat, args.format(f=1.0)]})
            # rounds 2..R-1: training rounds only (round 1 includes start-up, round R the evaluation)
            big_r.append(med(big["round_s"][1:-1]))
            small_r.append(med(small["round_s"][1:-1]))
            runs.append(big)
        ratio = med([a / b for a, b in zip(big_r, small_r)])
        peak = max(r["max_rss_bytes"] for r in runs)
        data = runs[0]["data_bytes"]
        startup = max(r["partition_s"] + r["discover_s"] for r in runs)
        m = runs[0]["rss"]
        rep.add(
            Row(
                f"3. {name}: time per round, 100,000 clients / 10 clients (10 sampled, 16 samples each)",
                f"{ratio:.3f}",
                "<= 1.20",
                verdict(ratio <= 1.20),
                f"{med(big_r):.2f} s vs {med(small_r):.2f} s per round; load {load()}",
            )
        )
        rep.add(
            Row(
                f"3. {name}: peak RSS, 100,000 clients",
                f"{peak / GIB:.2f} GiB",
                f"<= data {data / GIB:.2f} GiB + 1.5 GiB",
                verdict(peak <= data + 1.5 * GIB),
                f"clients with state files after {rounds} rounds: {runs[0]['clients_with_state']}",
            )
        )
        rep.add(
            Row(
                f"3. {name}: start-up, 100,000 clients (partitioning + node discovery)",
                f"{startup:.1f} s",
                "<= 30 s",
                verdict(startup <= 30),
                f"building the toy data itself: {runs[0]['scenario_s'] - runs[0]['partition_s']:.1f} s more; load {load()}",
            )
        )
        mib = lambda v: f"{v / 2**20:.0f}"  # noqa: E731
        rep.detail(
            f"Target 3 {name}: per-round seconds 100,000 clients {fmt_list(big_r, 2)}, 10 clients {fmt_list(small_r, 2)}; peak RSS {fmt_list([r['max_rss_bytes'] / GIB for r in runs], 2)} GiB; "
            f"sampled per round {runs[0]['num_sampled']}; partitioning {fmt_list([r['partition_s'] for r in runs], 2)} s, discovery {fmt_list([r['discover_s'] for r in runs], 2)} s. "
            f"Where the memory goes (RSS, MiB): after imports {mib(m['imports'])}; + data {mib(data)} and partitions {mib(runs[0]['partition_bytes'])} (flat arrays) = {mib(m['scenario'])} after validation; "
            f"{mib(m['nodes'])} once the runtime made its 100,000 node contexts (Flower `Context`s, fedsim/engine/runtimes.py); {mib(m['discovered'])} after discovery; {mib(m['end'])} at the end "
            f"(model, optimizer, client tensors of the sampled clients, torch's lazily imported modules); peak {mib(runs[0]['max_rss_bytes'])}."
        )


def target4(rep: Report, reps: int, device: str, processes: int) -> None:
    """Each process is timed separately: glibc's allocator settles per process into
    re-faulting freed activation memory on every batch or not, which moves plain
    inference by up to 40% and the ratios by several percent, so one process is one sample
    of that, and the table gives the median over every interleaved rep of every process."""
    print(f"[4] test-time adaptation overhead per batch of 64 ({processes} processes); load {load()}", flush=True)
    runs = [run_job("tta", {"reps": reps, "batches": 20, "device": device}) for _ in range(processes)]
    names = list(runs[0]["ratios_all"])
    pooled = {k: [r for run in runs for r in run["ratios_all"][k]] for k in names}
    ms = {k: med([run["per_batch_ms"][k] for run in runs]) for k in ["plain", *names]}
    limits = {"alpha_bn": 1.10, "unmix_tns": 1.5, "cema_edge": 1.10}
    labels = {
        "alpha_bn": "alpha-BN",
        "unmix_tns": "UnMix-TNS (K=16)",
        "cema_edge": "CEMA edge (official default `normalization: tbr`; forward + filtering, no cloud)",
    }
    for k, lim in limits.items():
        v = med(pooled[k])
        rep.add(
            Row(
                f"4. {labels[k]} / plain inference, per batch of 64",
                f"{v:.3f}",
                f"<= {lim:.2f}",
                verdict(v <= lim),
                f"{ms[k]:.2f} ms vs {ms['plain']:.2f} ms; load {load()}",
            )
        )
    reported = {
        "cema_edge_upload_all": (
            "4b. CEMA edge uploading every sample (`upload_all`)",
            "upper bound of what packing uploads as uint8 adds",
        ),
        "cema_edge_source_bn": (
            "4b. CEMA edge keeping the source BatchNorms (`normalization: source`)",
            "forward + filter, no statistics pass",
        ),
        "tbn": (
            "4b. TBN (test-batch statistics, no filter)",
            "the statistics pass CEMA's former variant (`normalization: batch`) included",
        ),
    }
    for k, (label, note) in reported.items():
        rep.add(
            Row(
                f"{label} / plain inference", f"{med(pooled[k]):.3f}", "reported", "REPORTED", f"{ms[k]:.2f} ms; {note}"
            )
        )
    per_process = "; ".join(f"{k} {fmt_list([med(run['ratios_all'][k]) for run in runs])}" for k in names)
    plain = fmt_list([run["per_batch_ms"]["plain"] for run in runs], 2)
    rep.detail(
        f"Target 4 ({device}, 1 torch thread, cnn-small, svhn test batches, {processes} processes x {reps} interleaved reps of 20 batches): "
        f"median ratio per process {per_process}; plain inference ms per batch per process {plain}; "
        f"CEMA uploaded {runs[0]['cema_upload_fraction']:.2f} of samples ({runs[0]['cema_all_upload_fraction']:.2f} with upload_all), cloud steps {runs[0]['cema_cloud_steps']}."
    )


def target5(rep: Report) -> None:
    print(f"[5] default scenario end to end; load {load()}", flush=True)
    wall = run_cli([])
    rep.add(
        Row(
            "5. `fedsim run scenarios/multidomain.yaml` (whole process, data cached)",
            f"{wall:.1f} s",
            "< 180 s",
            verdict(wall < 180),
            f"load {load()}",
        )
    )


def target6(rep: Report, device: str, rounds: int) -> None:
    import torch

    if device != "cuda" or not torch.cuda.is_available():
        note = "CUDA not available on this machine" if not torch.cuda.is_available() else "run with --device cuda"
        print(f"[6] GPU: skipped ({note})", flush=True)
        rep.add(
            Row(
                "6. GPU: client-training samples/s vs bare loop; Ray fractional GPUs",
                "-",
                ">= 0.9; no OOM",
                "SKIPPED",
                note,
            )
        )
        return
    print(f"[6] GPU; load {load()}", flush=True)
    ov = [*BASE, f"rounds={rounds}", f"evaluation.every={rounds}", "device=cuda"]
    a = run_job("fedsim", {"overrides": ov})
    b = run_job("bare", {"overrides": ov})
    samples = b["samples"]
    sps_f, sps_b = samples / a["work_s"], samples / b["work_s"]
    rep.add(
        Row(
            "6. GPU: fedsim samples/s / bare loop samples/s (whole run)",
            f"{sps_f / sps_b:.3f}",
            ">= 0.90",
            verdict(sps_f / sps_b >= 0.9),
            f"{sps_f:.0f} vs {sps_b:.0f} samples/s",
        )
    )
    try:
        r = run_job("fedsim", {"overrides": [*ov, "runtime={name: ray, gpus_per_client: 0.25, cpus_per_client: 1}"]})
        rep.add(
            Row(
                "6. GPU: Ray runtime, 4 clients per GPU (gpus_per_client 0.25)",
                f"completed in {r['work_s']:.1f} s",
                "no OOM",
                "PASS",
            )
        )
    except RuntimeError as exc:
        rep.add(
            Row(
                "6. GPU: Ray runtime, 4 clients per GPU (gpus_per_client 0.25)",
                "failed",
                "no OOM",
                "FAIL",
                str(exc).splitlines()[0][:200],
            )
        )


# Target S (issue #19 target 5): 32 clients (8 per toy domain), 64 samples each, batch 16:
# 4 full batches per client and round, so every client has the same step schedule.
COHORT = [
    "data.dataset=toy",
    "data.clients_per_domain=8",
    "data.samples_per_client=64",
    "data.options={train_per_domain: 1000, test_per_domain: 200}",
    "data.domain_test_samples=50",
    "client.batch_size=16",
    "client.momentum=0.9",
    "model.normalization=gn",
    "rounds=4",
    "evaluation.every=4",
]
COHORT_MODELS = {
    "cnn-small width 8, 16x16": ["data.image_size=16", "model.args={width: 8}"],
    "cnn-small (width 32), 28x28": ["data.image_size=28"],
}
COHORT_GPU_LIMIT = 5.0


def cohort_pair(overrides: list[str], reps: int) -> dict[str, Any]:
    """Sequential and vectorized runs of the same scenario, interleaved; client-training
    samples/s over rounds 2.. (round 1 warms up), and how far the final models differ."""
    import numpy as np

    seq, vec, diffs, cohorts = [], [], [], []
    for _ in range(reps):
        with tempfile.TemporaryDirectory(prefix="fedsim-perf-cohort-") as tmp:
            a = run_job("cohort", {"overrides": overrides, "save": f"{tmp}/seq.npz"})
            b = run_job("cohort", {"overrides": [*overrides, "runtime.vectorize=true"], "save": f"{tmp}/vec.npz"})
            with np.load(f"{tmp}/seq.npz") as x, np.load(f"{tmp}/vec.npz") as y:
                diffs.append(max(float(np.abs(x[k] - y[k]).max()) for k in x.files))
        for side, out in ((seq, a), (vec, b)):
            side.append(sum(out["steps"][1:]) * out["batch_size"] / sum(out["train_s"][1:]))
        cohorts.append((b["cohorts"], b["fallbacks"]))
    return {
        "seq": seq,
        "vec": vec,
        "ratio": med([v / s for s, v in zip(seq, vec)]),
        "diff": max(diffs),
        "cohorts": cohorts[0],
        "clients": a["clients"],
    }


def stretch(rep: Report, reps: int, device: str) -> None:
    """Issue #19 target 5: a round's cohort trained at once (``runtime.vectorize``) vs one
    client after another, through the engine (same messages, same replies)."""
    import torch

    print(f"[S] vectorized cohorts: 32 clients at once vs one after another; load {load()}", flush=True)
    for label, ov in COHORT_MODELS.items():
        res = cohort_pair([*COHORT, *ov, "device=cpu"], reps)
        sizes, fallbacks = res["cohorts"]
        rep.add(
            Row(
                f"S. vectorized cohorts (issue #19 target 5), CPU: {res['clients']} clients, {label}, GroupNorm, SGD: vectorized / sequential client-training samples/s",
                f"{res['ratio']:.2f}x",
                "reported",
                "REPORTED",
                f"{med(res['seq']):.0f} vs {med(res['vec']):.0f} samples/s; cohorts {sizes[:1]} per round, fallbacks {fallbacks or 'none'}; final models agree to {res['diff']:.1e}; load {load()}",
            )
        )
        rep.detail(
            f"Target S CPU {label}: samples/s sequential {fmt_list(res['seq'], 0)}, vectorized {fmt_list(res['vec'], 0)}, "
            f"{reps} interleaved process pairs, 1 torch thread, rounds 2-4 timed (client load + train + reply)."
        )
    label = "S. vectorized cohorts (issue #19 target 5), GPU: 32 clients, cnn-small (width 32), 28x28: vectorized / sequential samples/s"
    if device != "cuda" or not torch.cuda.is_available():
        note = "CUDA not available on this machine" if not torch.cuda.is_available() else "run with --device cuda"
        rep.add(
            Row(label, "-", f">= {COHORT_GPU_LIMIT:.0f}x", "SKIPPED", f"{note} (`--only S --device cuda` on a GPU)")
        )
        return
    res = cohort_pair([*COHORT, *COHORT_MODELS["cnn-small (width 32), 28x28"], "device=cuda"], reps)
    rep.add(
        Row(
            label,
            f"{res['ratio']:.2f}x",
            f">= {COHORT_GPU_LIMIT:.0f}x",
            verdict(res["ratio"] >= COHORT_GPU_LIMIT),
            f"{med(res['seq']):.0f} vs {med(res['vec']):.0f} samples/s; final models agree to {res['diff']:.1e}; {torch.cuda.get_device_name(0)}",
        )
    )


# ---------------------------------------------------------------------------------------------
def hardware() -> list[str]:
    import flwr
    import torch

    from fedsim.results import cpu_model  # after the sys.path setup above

    cpu = cpu_model()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores; GPU: {gpu}",
        f"- torch {torch.__version__}, flwr {flwr.__version__}, Python {platform.python_version()}, {platform.system()} {platform.release()}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
    ]


def markdown(rep: Report, args: argparse.Namespace, load_before: str, load_after: str, seconds: float) -> str:
    cmd = (
        "python -m benchmarks.perf"
        + (" --quick" if args.quick else "")
        + (f" --only {args.only}" if args.only else "")
        + (f" --reps {args.reps}" if args.reps else "")
        + (f" --device {args.device}" if args.device != "cpu" else "")
    )
    lines = [
        "| target | measured | limit | result | notes |",
        "|---|---|---|---|---|",
        *[f"| {r.target} | {r.measured} | {r.limit} | {r.status} | {r.notes} |" for r in rep.rows],
    ]
    head = [
        f"Produced by `{cmd}` ({seconds / 60:.1f} min).",
        "",
        *hardware(),
        f"- load average (1, 5, 15 min) at start: {load_before}; at end: {load_after}",
        "",
    ]
    return "\n".join([*head, *lines, "", "Details:", "", *[f"- {d}" for d in rep.details], ""])


ORDER = ["1", "2", "P", "3", "4", "5", "6", "S"]


def _target_of(text: str) -> str:
    """'4b. CEMA ...' -> '4'; 'S. stretch' -> 'S'."""
    head = text.strip().split(".", 1)[0].strip()
    return head[:1] if head[:1] in ORDER else head


def keep_previous(path: Path, rep: Report, only: set[str]) -> None:
    """Rows and details of targets not measured in this run, kept from the table in
    ``path`` and marked with the date they were measured (so that a partial run does not
    drop them); the table is then ordered by target."""
    start, end = "<!-- perf:begin -->", "<!-- perf:end -->"
    if not path.exists() or start not in path.read_text():
        return
    block = path.read_text().split(start, 1)[1].split(end, 1)[0]
    date = next(
        (ln.split(":", 1)[1].strip() for ln in block.splitlines() if ln.startswith("- date:")), "in an earlier run"
    )
    cpu = next((ln.split(":", 1)[1].split(";")[0].strip() for ln in block.splitlines() if ln.startswith("- CPU:")), "")
    date = f"{date}, {cpu}" if cpu else date
    kept: list[Row] = []
    for ln in block.splitlines():
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if not ln.startswith("| ") or len(cells) != 5 or cells[0] == "target" or _target_of(cells[0]) in only:
            continue
        note = cells[4] if "(measured " in cells[4] else f"{cells[4]} (measured {date})".strip()
        kept.append(Row(cells[0], cells[1], cells[2], cells[3], note))
    rep.rows = sorted(
        [*rep.rows, *kept],
        key=lambda r: ORDER.index(_target_of(r.target)) if _target_of(r.target) in ORDER else len(ORDER),
    )
    for ln in block.splitlines():
        if ln.startswith("- Target ") and _target_of(ln[len("- Target ") :].split(" ", 1)[0] + ".") not in only:
            text = ln[2:]
            rep.details.append(text if "(measured " in text else f"{text} (measured {date})")
    rep.details.sort(
        key=lambda d: (
            ORDER.index(_target_of(d[len("Target ") :].split(" ", 1)[0] + "."))
            if d.startswith("Target ") and _target_of(d[len("Target ") :].split(" ", 1)[0] + ".") in ORDER
            else len(ORDER)
        )
    )


def write_doc(path: Path, table: str) -> None:
    """Replace the measured section of docs/performance.md (between the markers), keeping
    the hand-written explanation around it."""
    start, end = "<!-- perf:begin -->", "<!-- perf:end -->"
    block = f"{start}\n{table}\n{end}"
    if path.exists() and start in path.read_text() and end in path.read_text():
        text = path.read_text()
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        path.write_text(before + block + after)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# Performance\n\n{block}\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="one repetition, fewer rounds (a smoke run; numbers are noisier)"
    )
    ap.add_argument("--only", default="", help="comma-separated targets: 1,2,P,3,4,5,6,S")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of targets 4, 6 and S")
    ap.add_argument(
        "--reps", type=int, default=None, help="interleaved repetitions per ratio (default 5; 1 with --quick)"
    )
    ap.add_argument("--out", default=None, help="markdown file to write (e.g. docs/performance.md)")
    args = ap.parse_args(argv)
    only = {t.strip().upper() for t in args.only.split(",") if t.strip()} or {"1", "2", "P", "3", "4", "5", "6", "S"}
    reps = args.reps or (1 if args.quick else 5)
    rounds = 2 if args.quick else 5
    cuda_ok = _cuda()
    if args.device == "cuda" and not cuda_ok:
        print(
            "note: --device cuda but CUDA is not available here: target 6 is skipped, the others run on the CPU",
            flush=True,
        )
    device = "cuda" if args.device == "cuda" and cuda_ok else "cpu"
    t0 = time.perf_counter()
    load_before = load()
    prepare_data([BASE])
    rep = Report()
    if "1" in only:
        target1(rep, reps, rounds)
    if "2" in only:
        target2(rep, max(1, reps - 1) if not args.quick else 1, rounds)
    if "P" in only:
        target_parallel(rep, 1 if args.quick else (args.reps or 3))
    if "3" in only:
        target3(rep, 1 if args.quick else max(1, reps - 1), 4 if args.quick else 6)
    if "4" in only:
        target4(rep, 3 if args.quick else 7, device, 1 if args.quick else 5)
    if "5" in only:
        target5(rep)
    if "6" in only:
        target6(rep, "cuda" if cuda_ok else "cpu", rounds)
    if "S" in only:
        stretch(rep, reps, device)
    if args.out:
        keep_previous(Path(args.out), rep, only)
    table = markdown(rep, args, load_before, load(), time.perf_counter() - t0)
    print("\n" + table)
    if args.out:
        write_doc(Path(args.out), table)
        print(f"written: {args.out}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
