"""Every scenario in tests/broken/ fails with exit code 2, one line naming the file and the
key (the `# expect:` comment on its first line), no traceback, and no run folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim.cli import main

BROKEN = sorted((Path(__file__).parents[1] / "broken").glob("*.yaml"))


def test_corpus_is_large_enough():
    assert len(BROKEN) >= 30


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_broken_scenario(path, tmp_path, capsys):
    expect = path.read_text().splitlines()[0].removeprefix("# expect: ")
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("\n") == 0, err
    assert "Traceback" not in captured.err + captured.out
    assert err.startswith(f"error: {path}: "), err
    assert expect in err, err
    assert not out.exists()
