"""``runtime.keep_freed_memory`` (:mod:`fedsim.engine.malloc`): a client process keeps the
memory a training step frees, instead of faulting it in again at the next step.

Measured by what it changes, page faults (not time: these machines are noisy): two client
fits of the default scenario in a fresh process each, with the setting on and off."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, checkout_env

from fedsim.engine.malloc import keep_freed_memory

FITS = """
import resource, sys
from fedsim.engine.client import ClientRuntime
from fedsim.engine.hooks import ClientHooks
from fedsim.scenario import load_scenario

sc = load_scenario(sys.argv[1], ["data.clients_per_domain=2", "runtime.keep_freed_memory=" + sys.argv[2]])
rt = ClientRuntime(sc, None)
d = rt.data.client(0)
rt._fit(ClientHooks({}), d.x_train, d.y_train, 0)  # the first fit maps the working set
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for seed in (1, 2):
    rt._fit(ClientHooks({}), d.x_train, d.y_train, seed)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_of_two_fits(keep: bool) -> int:
    out = subprocess.run(
        [sys.executable, "-c", FITS, str(REPO / "scenarios" / "multidomain.yaml"), str(keep).lower()],
        capture_output=True,
        text=True,
        env=checkout_env(),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not keep_freed_memory(), reason="not glibc: the setting does nothing here")
def test_client_fits_stop_faulting_in_the_memory_they_freed():
    kept, default = faults_of_two_fits(True), faults_of_two_fits(False)
    # measured here: 800-2,700 against 36,000-49,000
    assert kept * 5 < default, (kept, default)
