"""``runtime.keep_freed_memory`` (:mod:`fedsim.engine.malloc`): a client process keeps the
memory a training step frees, instead of faulting it in again at the next step.

Measured by what it changes, page faults (not time: these machines are noisy), in a fresh
process per setting that builds a ``ClientRuntime`` (which applies the setting) and then
allocates, touches and frees a step-like working set (36 tensors of 3 MiB, 108 MiB) five
times. With glibc's defaults the trim threshold is twice the dynamic mmap threshold, which
never exceeds 32 MiB, so the first freed working set goes back to the kernel (or was mapped
block by block and unmapped) and the next is faulted in again; later ones may or may not
be, depending on the heap's history (measured here: 28,300 or 110,400 faults over the four
later repetitions, 110,592 pages). With the thresholds fixed (trim 128 MiB) the working set
stays in the process: 0-768 faults. (A client fit's own faults:
``python -m benchmarks.process_costs``.)"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import checkout_env, write_scenario

from fedsim.engine.malloc import keep_freed_memory

STEPS = """
import resource, sys, torch
from fedsim.engine.client import ClientRuntime
from fedsim.scenario import load_scenario

ClientRuntime(load_scenario(sys.argv[1], ["runtime.keep_freed_memory=" + sys.argv[2]]), None)
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    working_set = [torch.ones(3 << 18) for _ in range(36)]  # 36 x 3 MiB of float32, touched
    del working_set
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[1:]))
"""


def faults_of_later_steps(scenario: str, keep: bool) -> int:
    out = subprocess.run(
        [sys.executable, "-c", STEPS, scenario, str(keep).lower()],
        capture_output=True,
        text=True,
        env=checkout_env(),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not keep_freed_memory(), reason="not glibc: the setting does nothing here")
def test_client_processes_stop_faulting_in_the_memory_they_freed(tmp_path):
    scenario = str(write_scenario(tmp_path / "toy.yaml"))
    kept, default = faults_of_later_steps(scenario, True), faults_of_later_steps(scenario, False)
    pages = 4 * 36 * (3 << 20) // 4096  # the four later working sets, in 4 KiB pages
    assert default > pages // 10, (kept, default)  # glibc's defaults: faulted in again at least once
    assert kept < pages // 20, (kept, default)  # kept: reused
