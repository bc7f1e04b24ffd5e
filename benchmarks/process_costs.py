"""What three engine settings save in a client process, each measured side by side in
fresh processes (alternating A B, B A, ...), printed as a table of medians and ratios:

- ``optimizer``: building a process's first client optimizer on CPU, torch.optim's SGD
  (which imports ``torch._dynamo``) against :class:`fedsim.engine.optim.ClientOptimizer`
  (the same updates, no import); seconds, after torch, Flower and fedsim's client are
  imported.
- ``malloc``: client fits of the default scenario (``data.clients_per_domain=2``: 600
  training samples, ``cnn-small``, 1 torch thread), ``runtime.keep_freed_memory`` off and
  on: mean seconds per fit and minor page faults per fit (fits 2 to N; the first maps the
  working set).
- ``ray``: a private Ray as the pool starts it (1 CPU), ``runtime.lean_head`` off and on:
  ``ray.init``'s seconds and the CPU seconds of the Ray processes it started, up to 5 s
  after it returned.

    python -m benchmarks.process_costs [--reps 3] [--fits 10]

Speed targets live in benchmarks, not in tests (the machines are noisy); the tests check
what each setting changes (tests/engine/test_optim.py, test_malloc.py, test_ray_runtime.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

OPTIMIZER = """
import json, sys, time
import fedsim.engine.client  # torch, Flower, fedsim's client: imported by every client process
import torch
from fedsim.config import ClientConfig
from fedsim.engine.optim import ClientOptimizer
params = [torch.zeros(3, requires_grad=True)]
t0 = time.perf_counter()
if sys.argv[1] == "torch":
    torch.optim.SGD(params, lr=0.1)
else:
    ClientOptimizer(ClientConfig(lr=0.1), params)
print(json.dumps({"s": time.perf_counter() - t0, "dynamo": "torch._dynamo" in sys.modules}))
"""

FITS = """
import json, resource, sys, time
from fedsim.engine.client import ClientRuntime
from fedsim.engine.hooks import ClientHooks
from fedsim.scenario import load_scenario
sc = load_scenario(sys.argv[1], ["data.clients_per_domain=2", "runtime.keep_freed_memory=" + sys.argv[2]])
rt = ClientRuntime(sc, None)
times, faults = [], []
for i in range(int(sys.argv[3])):
    d = rt.data.client(i % 10)
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    rt._fit(ClientHooks({}), d.x_train, d.y_train, i)
    times.append(time.perf_counter() - t0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"fit_s": sum(times[1:]) / len(times[1:]), "faults": sum(faults[1:]) / len(faults[1:]),
                  "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

RAY = """
import json, logging, os, sys, time
import ray
from fedsim.engine.ray_start import lean_head
TCK = os.sysconf("SC_CLK_TCK")
def tree_cpu(root):
    cpu, kids = 0.0, {root}
    stats = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                s = open(f"/proc/{p}/stat").read()
                f = s[s.rfind(")") + 2:].split()
                stats[int(p)] = (int(f[1]), (int(f[11]) + int(f[12])) / TCK)
            except OSError:
                pass
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in stats.items():
            if ppid in kids and pid not in kids:
                kids.add(pid)
                grew = True
    return sum(stats[p][1] for p in kids - {root} if p in stats)
t0 = time.perf_counter()
with lean_head(sys.argv[1] == "lean"):
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level=logging.ERROR)
init_s = time.perf_counter() - t0
time.sleep(5)
cpu = tree_cpu(os.getpid())
ray.shutdown()
print(json.dumps({"init_s": init_s, "ray_cpu_s": cpu}))
"""


def child(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def pairs(code: str, a: list[str], b: list[str], reps: int) -> tuple[list[dict], list[dict]]:
    """``reps`` processes of each variant, alternating A B, B A, ..."""
    ra, rb = [], []
    for r in range(reps):
        order = [(a, ra), (b, rb)] if r % 2 == 0 else [(b, rb), (a, ra)]
        for args, into in order:
            into.append(child(code, *args))
    return ra, rb


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fits", type=int, default=10)
    args = ap.parse_args(argv)
    rows = []
    torch_opt, ours = pairs(OPTIMIZER, ["torch"], ["fedsim"], args.reps)
    rows.append(
        (
            "first client optimizer, s (torch.optim.SGD vs ClientOptimizer)",
            med(torch_opt, "s"),
            med(ours, "s"),
            f"torch._dynamo imported: {torch_opt[0]['dynamo']} vs {ours[0]['dynamo']}",
        )
    )
    scenario = str(REPO / "scenarios" / "multidomain.yaml")
    off, on = pairs(FITS, [scenario, "false", str(args.fits)], [scenario, "true", str(args.fits)], args.reps)
    rows.append(("client fit, s (keep_freed_memory false vs true)", med(off, "fit_s"), med(on, "fit_s"), ""))
    rows.append(
        (
            "minor page faults per fit (false vs true)",
            med(off, "faults"),
            med(on, "faults"),
            f"peak RSS {med(off, 'maxrss_mib'):.0f} vs {med(on, 'maxrss_mib'):.0f} MiB",
        )
    )
    full, lean = pairs(RAY, ["full"], ["lean"], args.reps)
    rows.append(("ray.init, s (lean_head false vs true)", med(full, "init_s"), med(lean, "init_s"), ""))
    rows.append(
        (
            "CPU s of Ray's processes, 5 s after ray.init (false vs true)",
            med(full, "ray_cpu_s"),
            med(lean, "ray_cpu_s"),
            "",
        )
    )
    print(f"process costs: medians of {args.reps} fresh processes per variant, alternating; {os.cpu_count()} cores")
    print("| measurement | before | after | after / before | note |\n|---|---|---|---|---|")
    for name, before, after, note in rows:
        print(f"| {name} | {before:.3g} | {after:.3g} | {after / before:.3f} | {note} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
