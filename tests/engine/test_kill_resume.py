"""kill -9 a real `fedsim run` process mid-run; `--resume` finishes with identical metrics."""

from __future__ import annotations

import json
import signal
import subprocess
import time

from conftest import fedsim_process, write_scenario


def metrics(out):
    return [
        {k: v for k, v in json.loads(x).items() if k not in ("wall_s", "strategy_metrics")}
        for x in (out / "metrics.jsonl").read_text().splitlines()
    ]


def fedsim(*args: str) -> subprocess.Popen:
    return fedsim_process(*args, stdout=subprocess.DEVNULL)


def test_kill_9_then_resume_matches_uninterrupted(tmp_path):
    # a FedBN run (client state on disk) slow enough to be killed mid-run
    scenario = write_scenario(
        tmp_path / "s.yaml",
        rounds=6,
        strategy={"name": "fedbn"},
        data={"clients_per_domain": 3, "options": {"train_per_domain": 600}},
    )
    ref = tmp_path / "ref"
    assert fedsim("run", str(scenario), "--out", str(ref)).wait(timeout=600) == 0

    out = tmp_path / "killed"
    proc = fedsim("run", str(scenario), "--out", str(out))
    ckpts = out / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts / "round_00002" / "meta.json").exists():
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside round 3 or 4
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(metrics(out))
    assert 2 <= done < 6, f"kill landed after {done} rounds"

    # kill the resumed run too, at a random point (maybe inside a checkpoint write)
    import random

    proc = fedsim("run", "--resume", str(out))
    time.sleep(random.Random().uniform(1.0, 4.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert fedsim("run", "--resume", str(out)).wait(timeout=600) == 0
    assert metrics(out) == metrics(ref)
