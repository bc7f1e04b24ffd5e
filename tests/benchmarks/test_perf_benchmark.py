"""The performance benchmark's machinery, functionally (no timing assertions): the bare
loop does the same optimizer work as fedsim, the torch.func clients compute what the
sequential ones do, the TTA job times what it claims, the doc writer keeps the prose."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import write_scenario

from benchmarks import _perf_jobs as jobs
from benchmarks._perf_bare import bare_run, check_supported
from benchmarks.perf import Report, Row, markdown, write_doc
from fedsim.data.loading import ClientDataCache, num_clients
from fedsim.scenario import load_scenario


def test_bare_loop_and_fedsim_take_the_same_optimizer_steps(tmp_path):
    path = write_scenario(tmp_path / "toy.yaml", rounds=2, evaluation={"every": 2})
    sc = load_scenario(str(path), [])
    fed = jobs.fedsim_run({"scenario": str(path)})
    bare = bare_run(sc)
    cache = ClientDataCache(sc.data, sc.seed)
    per_round = sum(math.ceil(len(cache.client(c).y_train) / sc.client.batch_size) for c in range(num_clients(sc.data)))
    assert fed["steps"] == bare["steps"] == sc.rounds * per_round
    assert len(fed["round_s"]) == sc.rounds
    # same data, same batches, same initial weights: the same model up to float rounding
    assert fed["accuracy"] == pytest.approx(bare["accuracy"], abs=0.05)


def test_bare_loop_rejects_what_it_does_not_reproduce(tmp_path):
    path = write_scenario(tmp_path / "toy.yaml", strategy={"name": "fedbn"})
    with pytest.raises(ValueError, match="FedAvg"):
        check_supported(load_scenario(str(path), []))


def test_cohort_job_times_the_same_training_both_ways(tmp_path):
    path = write_scenario(tmp_path / "toy.yaml", rounds=3, evaluation={"every": 3}, model={"normalization": "gn"})
    out = {}
    for side, extra in (("seq", []), ("vec", ["runtime.vectorize=true"])):
        out[side] = jobs.cohort({"scenario": str(path), "overrides": extra, "save": str(tmp_path / f"{side}.npz")})
    seq, vec = out["seq"], out["vec"]
    assert len(seq["train_s"]) == len(vec["train_s"]) == 3 and min(seq["train_s"] + vec["train_s"]) > 0
    assert seq["steps"] == vec["steps"] == [8 * 5] * 3  # 8 clients x 80 samples / batch 16, every round
    assert seq["cohorts"] == [] and vec["cohorts"] == [8, 8, 8] and vec["fallbacks"] == []
    with np.load(tmp_path / "seq.npz") as a, np.load(tmp_path / "vec.npz") as b:
        assert a.files == b.files
        assert max(float(np.abs(a[k] - b[k]).max()) for k in a.files) < 1e-5


def test_tta_job_times_every_adapter_without_the_cloud():
    res = jobs.tta(
        {
            "reps": 1,
            "batches": 2,
            "train_steps": 2,
            "width": 8,
            "batch": 16,
            "data": {"dataset": "toy", "image_size": 16},
        }
    )
    assert set(res["ratio"]) == {
        "alpha_bn",
        "unmix_tns",
        "cema_edge",
        "cema_edge_upload_all",
        "cema_edge_source_bn",
        "tbn",
    }
    assert all(np.isfinite(v) and v > 0 for v in res["ratio"].values())
    assert res["cema_cloud_steps"] == 0  # only the edge is timed
    assert res["cema_all_upload_fraction"] == 1.0  # the upload_all row packs every sample


def test_write_doc_replaces_only_the_measured_block(tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text("# P\n\nprose before\n\n<!-- perf:begin -->\nold\n<!-- perf:end -->\n\nprose after\n")
    rep = Report([Row("1. x", "1.01", "<= 1.10", "PASS")], ["detail"])

    class Args:
        quick, only, device, reps = True, "1", "cpu", None

    write_doc(doc, markdown(rep, Args, "1 1 1", "2 2 2", 60.0))
    text = doc.read_text()
    assert "prose before" in text and "prose after" in text and "old" not in text
    assert "| 1. x | 1.01 | <= 1.10 | PASS |  |" in text and "load average" in text


def test_a_partial_run_keeps_rows_of_other_targets_even_with_a_pipe_in_a_note(tmp_path):
    """Rows are read back from the doc by a later run that measures other targets: a '|'
    in a note (the pool's log lines joined) must not make that row unreadable and lost."""
    from benchmarks.perf import keep_previous

    doc = tmp_path / "performance.md"
    doc.write_text("<!-- perf:begin -->\nold\n<!-- perf:end -->\n")

    class Args:
        quick, only, device, reps = False, "P", "cpu", None

    first = Report()
    first.add(Row("Pc. idle: forced", "0.7", "reported", "REPORTED", "one | two"))
    write_doc(doc, markdown(first, Args, "1 1 1", "1 1 1", 60.0))
    second = Report()
    second.add(Row("1. x", "1.01", "<= 1.10", "PASS"))
    keep_previous(doc, second, {"1"})
    assert [r.target for r in second.rows] == ["1. x", "Pc. idle: forced"]
    assert second.rows[1].notes.startswith("one / two")


def test_parallel_target_order_alternates_and_never_runs_the_a_a_pair_back_to_back():
    """Target P's runtimes run A B C ..., then in reverse: every runtime follows different ones
    across repetitions, and the A/A control (inline twice) is never run back to back."""
    from benchmarks.perf import PAR_RUNTIMES, run_order

    for names in (list(PAR_RUNTIMES), [n for n in PAR_RUNTIMES if n != "pool1"]):
        seq = [name for rep in range(4) for name in run_order(names, rep)]
        assert sorted(seq) == sorted(names * 4)
        pairs = set(zip(seq, seq[1:]))
        assert ("inline", "inline2") not in pairs and ("inline2", "inline") not in pairs
        followers = {b for a, b in pairs if a == "flower"}
        assert len(followers) >= 2  # a Ray run's aftermath does not always fall on the same runtime


@pytest.mark.ray
def test_process_costs_benchmark_prints_each_measurement_before_and_after(capsys):
    """benchmarks.process_costs runs end to end (1 process per variant, 2 fits): five rows,
    each with both numbers and their ratio; the optimizer row says which side imported
    torch._dynamo."""
    from benchmarks.process_costs import main as process_costs

    assert process_costs(["--reps", "1", "--fits", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 6, rows  # the header and five measurements
    for row in rows[1:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(float(x) >= 0 for x in cells[1:4]), row
    assert "torch._dynamo imported: True vs False" in rows[1]
