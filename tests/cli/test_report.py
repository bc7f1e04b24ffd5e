"""fedsim report (issue 16 items 10, 11): runs that differ only by seed are one group, its
numbers the mean ± std of a direct re-computation from each run's metrics.jsonl and
adaptation_summary.json; labels and titles name what differs, never a folder; the three
outputs are never written over files fedsim did not write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_scenario
from PIL import Image

from fedsim.cli import main
from fedsim.report import Run, group_runs, report_figure

ADAPT = {
    "adapters": ["source", "tent"],
    "stream": {"corruptions": ["contrast"], "severities": [3], "batch_size": 16, "samples_per_shift": 16},
    "edges": [0],
}
RUNS = [("fedavg", 0), ("fedavg", 1), ("fedbn", 0), ("fedbn", 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 strategies x 2 seeds of the toy scenario, 2 rounds, each adapting (source, tent)."""
    base = tmp_path_factory.mktemp("report")
    scenario = write_scenario(
        base / "toy.yaml", rounds=2, data={"clients_per_domain": 1, "samples_per_client": 24}, adaptation=ADAPT
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDSIM_CACHE", str(base / "cache"))
        for strategy, seed in RUNS:
            assert (
                main(
                    [
                        "run",
                        str(scenario),
                        f"strategy.name={strategy}",
                        f"seed={seed}",
                        "--out",
                        str(base / f"{strategy}-{seed}"),
                    ]
                )
                == 0
            )
    return base


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def report(tmp_path: Path, folders: list[Path], name: str = "cmp") -> tuple[dict, str, Path]:
    out = tmp_path / f"{name}.png"
    assert main(["report", *map(str, folders), "--out", str(out)]) == 0
    return json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".md").read_text(), out


def test_groups_are_mean_and_std_over_seeds_of_the_runs_own_numbers(runs, tmp_path, capsys):
    doc, table, plot = report(tmp_path, [runs / f"{s}-{seed}" for s, seed in RUNS])
    assert [g["label"] for g in doc["groups"]] == ["toy strategy=fedavg", "toy strategy=fedbn"]
    for g, strategy in zip(doc["groups"], ["fedavg", "fedbn"]):
        folders = [runs / f"{strategy}-{seed}" for seed in (0, 1)]
        assert (g["strategy"], g["dataset"], g["rounds"], g["seeds"], g["unfinished"]) == (
            strategy,
            "toy",
            2,
            [0, 1],
            0,
        )
        recs = [records(f) for f in folders]
        finals = [r[-1]["accuracy"] for r in recs]
        bests = [max(x["accuracy"] for x in r) for r in recs]
        assert g["final_accuracy"] == pytest.approx({"mean": np.mean(finals), "std": np.std(finals), "n": 2})
        assert g["best_accuracy"] == pytest.approx({"mean": np.mean(bests), "std": np.std(bests), "n": 2})
        assert g["mb_up"]["mean"] == pytest.approx(np.mean([r[-1]["bytes_up_total"] / 1e6 for r in recs]))
        assert g["mb_down"]["mean"] == pytest.approx(np.mean([r[-1]["bytes_down_total"] / 1e6 for r in recs]))
        for domain in ("red", "green", "blue", "gray"):
            assert g["final_per_domain"][domain]["mean"] == pytest.approx(
                np.mean([r[-1]["per_domain"][domain] for r in recs])
            )
        assert g["curve"]["round"] == [1, 2]
        assert g["curve"]["accuracy_mean"] == pytest.approx([np.mean([r[i]["accuracy"] for r in recs]) for i in (0, 1)])
        assert g["curve"]["accuracy_std"] == pytest.approx([np.std([r[i]["accuracy"] for r in recs]) for i in (0, 1)])
        row = f"| {g['label']} | {strategy} | toy | 2 | 0, 1 | {np.mean(finals):.4f} ± {np.std(finals):.4f} | {np.mean(bests):.4f} ± {np.std(bests):.4f} |"
        assert row in table
        # the adaptation table: each adapter's online error over the group's runs
        errors = {
            a: [json.loads((f / "adaptation_summary.json").read_text())["results"][a]["error"] for f in folders]
            for a in ("source", "tent")
        }
        for adapter, values in errors.items():
            assert g["online_error"][adapter] == pytest.approx({"mean": np.mean(values), "std": np.std(values), "n": 2})
        cells = " | ".join(f"{np.mean(v):.4f} ± {np.std(v):.4f}" for v in errors.values())
        assert f"| {g['label']} | 0, 1 | {cells} |" in table
    assert table.index("## Test-time adaptation") > table.index("| toy strategy=fedbn |")
    assert len({g["final_accuracy"]["mean"] for g in doc["groups"]}) == 2 and all(
        g["final_accuracy"]["std"] > 0 for g in doc["groups"]
    )
    with Image.open(plot) as image:
        assert image.info["Software"].startswith("fedsim ")
    shown = capsys.readouterr().out
    assert "toy strategy=fedbn" in shown and "online error" in shown


def test_labels_and_titles_name_what_differs_never_a_folder(runs, tmp_path):
    doc, table, _ = report(tmp_path, [runs / f"{s}-{seed}" for s, seed in RUNS])
    assert doc["title"] == "toy: strategy compared (2 rounds, seeds 0, 1)"
    fig = report_figure(doc)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["toy strategy=fedavg (n=2)", "toy strategy=fedbn (n=2)"]
    assert fig._suptitle.get_text().startswith(doc["title"])
    group_column = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines() if line.startswith("| toy")]
    assert group_column and all(str(runs) not in c and "fedavg-0" not in c for c in group_column)
    # one group: named by its strategy, rounds and seeds
    one, _, _ = report(tmp_path, [runs / "fedbn-0", runs / "fedbn-1"], "one")
    assert [g["label"] for g in one["groups"]] == ["toy"]
    assert one["title"] == "toy (fedbn, 2 rounds, seeds 0, 1)"


def _run(scenario: dict, path: str = "x") -> Run:
    return Run(Path(path), scenario, {}, [], True)


def test_groups_are_scenarios_equal_except_seed_and_name():
    base = {
        "name": "toy",
        "seed": 0,
        "rounds": 2,
        "data": {"dataset": "toy"},
        "strategy": {"name": "fedavg", "args": {}},
        "client": {"lr": 0.1},
    }
    lr = json.loads(json.dumps(base)) | {"client": {"lr": 0.01}, "seed": 1}
    prox = json.loads(json.dumps(base)) | {"strategy": {"name": "fedprox", "args": {"mu": 0.1}}}
    renamed = base | {"name": "other", "seed": 3}
    groups = group_runs([_run(base), _run(lr), _run(base | {"seed": 2}), _run(prox), _run(renamed)])
    assert [len(g.runs) for g in groups] == [3, 1, 1]  # seed and name do not split a group
    assert [g.label for g in groups] == [
        "toy/other strategy=fedavg client.lr=0.1",
        "toy strategy=fedavg client.lr=0.01",
        "toy strategy=fedprox client.lr=0.1 strategy.args.mu=0.1",
    ]
    assert [g.label for g in group_runs([_run(base), _run(base | {"seed": 5})])] == ["toy"]


def test_no_adaptation_table_without_adaptation_summaries(runs, tmp_path):
    folders = []
    for name in ("fedavg-0", "fedavg-1"):
        shutil.copytree(runs / name, tmp_path / name)
        (tmp_path / name / "adaptation_summary.json").unlink()
        folders.append(tmp_path / name)
    doc, table, _ = report(tmp_path, folders, "plain")
    assert doc["groups"][0]["online_error"] == {} and "Test-time adaptation" not in table


def test_never_writes_over_files_fedsim_did_not_write(runs, tmp_path, capsys):
    folders = [str(runs / "fedavg-0"), str(runs / "fedbn-0")]
    out = tmp_path / "r.png"
    out.with_suffix(".json").write_text('{"mine": true}')
    for extra in ([], ["--overwrite"]):
        assert main(["report", *folders, "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "r.json" in err
    # nothing of the report was written, the user's file is as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"] and json.loads(
        out.with_suffix(".json").read_text()
    ) == {"mine": True}
    out.with_suffix(".json").unlink()
    assert main(["report", *folders, "--out", str(out)]) == 0
    assert main(["report", *folders, "--out", str(out)]) == 2  # exists: needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["report", *folders, "--out", str(out), "--overwrite"]) == 0  # its own report


def test_bad_runs_are_one_line_errors_and_nothing_is_written(runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "r.png"
    for args, needle in (
        ([str(tmp_path / "empty")], "scenario.yaml: missing"),
        ([str(runs / "fedavg-0"), str(runs / "fedavg-0") + "/"], "given twice"),
    ):
        assert main(["report", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
