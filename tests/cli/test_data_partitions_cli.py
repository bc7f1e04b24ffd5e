"""``fedsim data partitions``: the table matches the partition, the heat map is written,
bad input exits 2 and nothing is overwritten without --overwrite."""

from __future__ import annotations

import numpy as np
import yaml
from PIL import Image

from fedsim.cli import main
from fedsim.data.loading import load_dataset, partitions
from fedsim.scenario import load_scenario

SCENARIO = {
    "name": "toyparts",
    "seed": 3,
    "data": {
        "dataset": "toy",
        "image_size": 16,
        "clients_per_domain": 3,
        "partition": "pathological",
        "num_classes_per_partition": 2,
        "domains": ["red", "green"],
        "options": {"train_per_domain": 400},
    },
    "model": {"name": "cnn-small"},
    "client": {"batch_size": 4},
}


def write_scenario(tmp_path, **data):
    raw = {**SCENARIO, "data": {**SCENARIO["data"], **data}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def table_rows(text: str, title: str) -> list[list[str]]:
    lines = text.split(title, 1)[1].strip("\n").splitlines()
    rows = []
    for line in lines[1:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def test_table_and_heatmap(tmp_path, capsys):
    scenario_file = write_scenario(tmp_path)
    png = tmp_path / "plots" / "parts.png"
    assert main(["data", "partitions", str(scenario_file), "--out", str(png)]) == 0
    out = capsys.readouterr().out
    # the counts are the partition's, recomputed here from the clients' indices
    sc = load_scenario(scenario_file)
    parts = partitions(sc.data, sc.seed)
    ds = load_dataset(sc.data)
    rows = table_rows(out, "samples per client by label (train + test):")
    assert len(rows) == 7 and rows[-1][0] == "total"
    for p, row in zip(parts, rows):
        d = p.domain
        y = np.asarray(ds.domains[d].y_train)[np.r_[p.train[d], p.test[d]]]
        assert row == [str(p.client_id), d, str(p.num_train), str(p.num_test), *map(str, np.bincount(y, minlength=4))]
        assert sum(int(v) > 0 for v in row[4:]) == 2  # pathological, 2 classes per client
    assert rows[-1][1:] == [
        str(sum(int(r[i]) for r in rows[:-1])) for i in range(2, len(rows[0]))
    ]  # "total", (no domain), sums
    dom = table_rows(out, "samples per client by domain (train + test):")
    assert dom[0][:2] == ["0", "red"] and int(dom[0][2]) == parts[0].num_train + parts[0].num_test and dom[0][3] == "0"
    assert "samples in no client:" in out
    assert f"heat map: {png}" in out
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


def test_refuses_to_overwrite_and_bad_input(tmp_path, capsys):
    scenario_file = write_scenario(tmp_path)
    png = tmp_path / "parts.png"
    png.write_bytes(b"user's file")
    assert main(["data", "partitions", str(scenario_file), "--out", str(png)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {png}: exists; pass --overwrite to replace it or --out to choose another path"
    assert main(["data", "partitions", str(scenario_file), "--out", str(png), "--overwrite"]) == 2  # not fedsim's file
    assert "fedsim did not write it" in capsys.readouterr().err
    assert png.read_bytes() == b"user's file"
    png.unlink()
    assert main(["data", "partitions", str(scenario_file), "--out", str(png)]) == 0
    first = png.read_bytes()
    assert main(["data", "partitions", str(scenario_file), "--out", str(png)]) == 2
    assert (
        main(["data", "partitions", str(scenario_file), "--out", str(png), "--overwrite"]) == 0
    )  # its own PNG: replaced
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.read_bytes() == first
    capsys.readouterr()

    other = tmp_path / "other.png"
    for args, message in [
        (
            [str(scenario_file), "data.shard_size=10"],
            "data.shard_size: only used by partition shard (partition is pathological)",
        ),
        (
            [str(scenario_file), "data.num_classes_per_partition=5"],
            "data.num_classes_per_partition: 5 is more than the 4 classes in domain 'red'",
        ),
        ([str(tmp_path / "missing.yaml")], "file not found"),
    ]:
        assert main(["data", "partitions", *args, "--out", str(other)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err
        assert not other.exists()
    assert main(["data", "partitions", str(scenario_file), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "must end in .png" in capsys.readouterr().err


def test_default_png_name_in_cwd(tmp_path, capsys, monkeypatch):
    scenario_file = write_scenario(tmp_path, partition="linear", num_classes_per_partition=None)
    monkeypatch.chdir(tmp_path)
    assert main(["data", "partitions", str(scenario_file)]) == 0
    assert (tmp_path / "toyparts-partitions.png").is_file()
    rows = table_rows(capsys.readouterr().out, "samples per client by label (train + test):")
    totals = [int(r[2]) + int(r[3]) for r in rows[:3]]
    assert totals == sorted(totals) and totals[0] < totals[2]  # linear quantity skew within a domain
