"""The TTA benchmark end to end on its tiny regime (numbers meaningless, machinery real),
its teacher adapter, and the foundation settings it relies on (train_data, augment)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from bn_models import small_bn_cnn
from conftest import write_scenario

from benchmarks import tta
from benchmarks.tta_teacher import Teacher
from fedsim.adapters import build_adapter
from fedsim.data.loading import load_dataset, num_clients
from fedsim.scenario import load_scenario
from fedsim.tta.config import FoundationConfig
from fedsim.tta.deploy import augment_batch, corrupted_copy, pooled_train_data


def test_benchmark_runs_end_to_end_on_the_tiny_regime(tmp_path):
    work = tmp_path / "bench"
    assert tta.main(["--tiny", "--no-docs", "--work", str(work), "--seeds", "0", "1", "--threads", "1"]) == 0
    out = json.loads((work / "benchmark.json").read_text())
    reg = tta.TINY
    assert set(out["per_seed"]) == {"0", "1"}
    for s in ("0", "1"):
        seed = out["per_seed"][s]
        # every swept setting was played, in both batch-1 settings and all three streams
        for tag in ("main", "small"):
            for bs in reg.batch_sizes:
                assert set(seed["A"][tag][str(bs)]["results"]) == {
                    "source",
                    "tbn",
                    *(tta.alpha_label(a) for a in reg.alpha_a),
                }
        for key in ("iid", "0.1", "0.01"):
            res = seed["B"][key]["results"]
            assert {tta.unmix_label(k, c) for k, c in reg.unmix} <= set(res)
            assert {tta.tent_label(lr) for lr in reg.tent_lr} <= set(res)
        c = seed["C"]["results"]
        assert c["upload_all"]["upload_fraction"] == 1.0
        teachers = {tta.TEACHER_LABEL, "teacher (test-batch BN)", "teacher (source BN)"}
        assert teachers <= set(c)
        assert set(seed["C-teacher"]["results"]) == {"source", "tbn", *teachers}
        # each edge stream plays samples_per_shift images per corruption
        assert c["source"]["samples_per_stream"] == reg.samples_per_shift * len(reg.corruptions)
        assert seed["C"]["foundation"]["settings"]["train_data"] == "domains"
        assert seed["C"]["foundation"]["settings"]["augment_corruptions"] == list(reg.foundation["augment_corruptions"])
        # the teacher trains on a larger train split than the edges (train_per_domain)
        n_domains = len(seed["C"]["foundation"]["domains"])
        assert seed["C"]["foundation"]["train_samples"] == reg.foundation["train_per_domain"] * n_domains
    # the training seed follows the stream seed: two different source models
    runs = sorted(p.name for p in work.iterdir() if p.is_dir() and p.name.startswith("bench-tta-"))
    want = [
        tta.source_scenario(reg, s, px, pool)["name"]
        for s in (0, 1)
        for px, pool in ((reg.image_size, 2), (reg.small_image_size, reg.small_pool))
    ]
    assert runs == sorted(want) and len(set(want)) == 4
    assert (work / "tta-sensitivity.png").stat().st_size > 1000
    md = (work / "benchmark.md").read_text()
    assert md.startswith(tta.START) and md.rstrip().endswith(tta.END)
    claims = tta.claims(out)
    assert len([line for line in md.splitlines() if line.startswith("| ") and " hold" in line]) == len(claims)
    # best settings are chosen from the swept candidates, on seed 0, and scored on seed 1
    picked = tta.picks(out)
    assert picked["unmix_tns"] in {tta.unmix_label(k, c) for k, c in reg.unmix}
    assert tta.split_seeds(out) == (["0"], ["1"])
    # a re-run reuses every trained model and finished experiment
    before = {p: p.stat().st_mtime_ns for p in work.rglob("adaptation_summary.json")}
    assert tta.main(["--tiny", "--no-docs", "--work", str(work), "--seeds", "0", "1", "--threads", "1"]) == 0
    assert {p: p.stat().st_mtime_ns for p in work.rglob("adaptation_summary.json")} == before


def test_teacher_scores_the_foundation_with_test_batch_statistics():
    edge, foundation = small_bn_cnn(), small_bn_cnn(seed=3, width=12)
    x = torch.rand(8, 3, 16, 16)
    teacher = Teacher(edge, foundation=foundation)
    tbn = build_adapter("tbn", foundation)
    assert torch.allclose(teacher.predict_and_adapt(x), tbn.predict_and_adapt(x), atol=1e-6)
    source = Teacher(edge, foundation=foundation, normalization="source")
    assert torch.allclose(source.predict_and_adapt(x), foundation.eval()(x), atol=1e-6)
    with pytest.raises(ValueError, match="normalization"):
        Teacher(edge, foundation=foundation, normalization="x")


def test_foundation_train_data_domains_takes_every_train_image_of_the_trained_domains(tmp_path):
    path = write_scenario(tmp_path / "s.yaml", data={"dataset": "toy", "image_size": 16, "samples_per_client": 20})
    sc = load_scenario(str(path), [])
    ds = load_dataset(sc.data)
    x_c, y_c = pooled_train_data(sc, "clients")
    x_d, y_d = pooled_train_data(sc, "domains")
    assert len(y_c) <= num_clients(sc.data) * 20 < len(y_d)
    trained = {d for d in ds.domains}
    assert len(y_d) == sum(len(ds.domains[d].y_train) for d in trained)
    assert FoundationConfig().train_data == "clients" and FoundationConfig().augment is False
    with pytest.raises(ValueError):
        FoundationConfig(train_data="everything")


def test_augment_batch_is_seeded_in_range_and_changes_the_images():
    x = torch.rand(6, 3, 16, 16)
    a = augment_batch(x, torch.Generator().manual_seed(0))
    b = augment_batch(x, torch.Generator().manual_seed(0))
    c = augment_batch(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1 and not torch.allclose(a, x)


def test_cnn_small_pool_setting():
    from fedsim.models import build_model

    default = build_model("cnn-small", 10, 3, 16, "bn", {}, seed=0)
    assert default.classifier[1].in_features == 64 * 4  # pool 2: unchanged default
    gap = build_model("cnn-small", 10, 3, 16, "bn", {"pool": 1}, seed=0)
    assert gap.classifier[1].in_features == 64
    assert gap.eval()(torch.rand(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="pool"):
        build_model("cnn-small", 10, 3, 16, "bn", {"pool": 0})


def test_corrupted_copy_corrupts_about_half_seeded_and_checks_names():
    x = torch.rand(200, 3, 16, 16)
    a = corrupted_copy(x, ["impulse_noise", "pixelate"], seed=0)
    assert torch.equal(a, corrupted_copy(x, ["impulse_noise", "pixelate"], seed=0))
    changed = (a != x).flatten(1).any(1).float().mean()
    assert 0.35 < changed < 0.65
    assert a.min() >= 0 and a.max() <= 1
    assert FoundationConfig(augment_corruptions=["fog"]).augment_corruptions == ["fog"]
    with pytest.raises(ValueError, match="unknown corruption"):
        FoundationConfig(augment_corruptions=["fgo"])


def test_teacher_tbr_predicts_with_running_test_statistics_set_by_the_first_batch():
    from fedsim.adapters._norm import BatchRenorm

    edge, foundation = small_bn_cnn(), small_bn_cnn(seed=3, width=12)
    x1, x2 = torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16) * 0.5
    teacher = Teacher(edge, foundation=foundation, normalization="tbr")
    renorms = [m for m in teacher.model.modules() if isinstance(m, BatchRenorm)]
    assert renorms and not any(bool(m.initialized) for m in renorms)
    p1 = teacher.predict_and_adapt(x1)
    assert all(bool(m.initialized) and m.training for m in renorms)
    # the first batch set the running statistics (to its own, then moved them towards its own:
    # unchanged) and was predicted with them
    assert torch.allclose(p1, copy.deepcopy(teacher.model).eval()(x1), atol=1e-5)
    first = renorms[0].running_mean.clone()
    frozen = copy.deepcopy(teacher.model).eval()  # the statistics as they are before x2
    # the second batch is predicted with the statistics as they were, which it then moves
    assert torch.allclose(teacher.predict_and_adapt(x2), frozen(x2), atol=1e-6)
    assert not torch.allclose(renorms[0].running_mean, first)
    # reset: back to unset statistics
    teacher.reset()
    assert not any(bool(m.initialized) for m in renorms)


def test_foundation_train_per_domain_builds_a_larger_train_split_with_the_same_test_split(tmp_path):
    data = {
        "dataset": "digits5",
        "image_size": 12,
        "samples_per_client": 20,
        "options": {"train_per_domain": 30, "test_per_domain": 10},
    }
    path = write_scenario(tmp_path / "s.yaml", data=data, client={"batch_size": 4})
    sc = load_scenario(str(path), [])
    x_d, y_d = pooled_train_data(sc, "domains")
    x_big, y_big = pooled_train_data(sc, "domains", train_per_domain=50)
    n_domains = len(load_dataset(sc.data).domains)
    assert len(y_d) == 30 * n_domains and len(y_big) == 50 * n_domains
    bigger = sc.data.model_copy(update={"options": {**sc.data.options, "train_per_domain": 50}})
    for d, split in load_dataset(sc.data).domains.items():
        assert torch.equal(torch.as_tensor(split.x_test), torch.as_tensor(load_dataset(bigger).domains[d].x_test))
    with pytest.raises(ValueError, match="train_per_domain"):
        FoundationConfig(train_per_domain=100)  # train_data defaults to the clients' shares
    with pytest.raises(ValueError, match="train_per_domain"):
        pooled_train_data(sc, "clients", train_per_domain=50)
    assert FoundationConfig(train_data="domains", train_per_domain=100).train_per_domain == 100


def test_a_finished_experiment_stays_reusable_when_a_setting_with_a_default_is_added():
    from fedsim.tta.config import AdaptationConfig

    cfg = AdaptationConfig.model_validate({"adapters": ["tbn"], "stream": {"corruptions": ["gaussian_noise"]}})
    recorded = json.loads(cfg.model_dump_json())
    del recorded["foundation"]["train_per_domain"]  # as written before the setting existed
    assert tta.same_config(recorded, cfg)
    recorded["foundation"]["epochs"] += 1
    assert not tta.same_config(recorded, cfg)
    assert not tta.same_config({"adapters": 3}, cfg) and not tta.same_config(None, cfg)


def test_a_retrained_source_model_voids_its_experiments_but_keeps_its_foundation(tmp_path):
    """Raising the source model's rounds retrains it in the same folder: every experiment on
    it runs again (no stale reuse by folder name), the other model's experiments and CEMA's
    cached foundation (keyed by its settings, the data and the seed) are reused."""
    work = tmp_path / "bench"
    tta.run(tta.TINY, work, [0], "AC")
    main_run = work / tta.source_scenario(tta.TINY, 0, tta.TINY.image_size)["name"]
    foundations = sorted(p.name for p in (main_run / "foundation").glob("*.safetensors"))
    assert foundations
    before = {p: p.stat().st_mtime_ns for p in work.rglob("adaptation_summary.json")}
    out = tta.run(dataclasses.replace(tta.TINY, rounds=tta.TINY.rounds + 1), work, [0], "AC")
    assert json.loads((main_run / "summary.json").read_text())["rounds"] == tta.TINY.rounds + 1
    rerun = {p.parent.name for p, t in before.items() if p.stat().st_mtime_ns != t}
    bs = tta.TINY.batch_sizes
    assert rerun == {*(f"A-main-bs{b}" for b in bs), "C-teacher", "C-cema"}
    assert out["per_seed"]["0"]["C"]["foundation"]["cached"] is True
    assert sorted(p.name for p in (main_run / "foundation").glob("*.safetensors")) == foundations
