"""The newcomer's path: every documented command runs, in the order the docs give it.

Each document (README.md, docs/*.md) is read like a newcomer reads it: its fenced ```bash
blocks, top to bottom, one command per line (``\\`` continues a line, ``&&`` chains, ``#``
starts a comment). The ``fedsim`` commands run in that order, in a fresh folder holding a
copy of ``scenarios/`` (so a command that needs what an earlier one made, or that would
collide with it, fails here as it would for the reader), with tiny overrides appended so
the whole path takes seconds: the toy dataset, one round, a narrow model, short streams.
A documented command that exits non-zero fails the test.

Commands that cannot run here are listed in :data:`RULES` with the reason: nothing is
skipped silently, and a command no rule covers that is not a ``fedsim`` command fails the
test too (give it a rule, or make it a fedsim command).
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fedsim.cli.main import main as fedsim_main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# What is not run, by a pattern matched at the start of the command line (continuations
# joined, arguments as ``shlex.join`` writes them), and why.
RULES: list[tuple[str, str]] = [
    (r"pip install", "changes the environment the tests run in (the suite runs after it)"),
    ("python -m pytest", "the test suite itself"),
    ("python -m benchmarks", "a benchmark (minutes); tests/benchmarks/test_perf_benchmark.py runs its quick mode"),
    ("python benchmarks/", "a benchmark (minutes to hours) that rewrites docs"),
    ("python -c", "converts a downloaded dataset (no downloads here)"),
    (
        r"PYTHONPATH=\. fedsim run my-scenario\.yaml",
        "needs the files of docs/extending.md's worked examples: tests/test_docs_extending.py writes them and runs this line",
    ),
    ("FLWR_HOME=", "Flower's CLI against a SuperLink that `fedsim edge up` keeps running until Ctrl-C"),
    (
        r"(export FLWR_HOME=|mkdir -p '?\$FLWR_HOME|flower-superlink --simulation|cat '>' '?\$FLWR_HOME|flwr run \. sim )",
        "fedsim's app on Flower's simulation SuperLink (a server process); tests/engine/test_ray_runtime.py::test_fedsim_app_on_flowers_simulation_runtime_matches_inline runs this sequence",
    ),
    (
        "fedsim edge demo",
        "starts a SuperLink and SuperNode processes (minutes); tests/edge/test_edge.py runs it (marker edge)",
    ),
    ("fedsim edge up", "runs a SuperLink and SuperNodes until Ctrl-C"),
    (
        r"fedsim adapt .* --model runs/bench-tta/source",
        "adapts runs/bench-tta/source, made by `python benchmarks/tta.py` (skipped above)",
    ),
]
# Run, but changed, and why: what the change removes is tested elsewhere.
RAY_TO_INLINE = "runtime=ray runs its clients on Ray (tests/engine/test_ray_runtime.py, marker ray); here it runs inline, which checks everything else about the line (its arguments, its folders)"

TINY_DATA = {
    "data.dataset": "toy",
    "data.domains": "null",
    "data.image_size": "16",
    "data.samples_per_client": "32",
    "data.domain_test_samples": "32",
    "rounds": "1",
    "model.args": "{width: 8}",
    "client.batch_size": "16",
}
TINY_STREAM = {
    "adaptation.stream.corruptions": "[gaussian_noise]",
    "adaptation.stream.samples_per_shift": "32",
    "adaptation.stream.batch_size": "16",
    "adaptation.stream.seeds": "[0]",
}
TINY_FOUNDATION = {"adaptation.foundation.epochs": "1", "adaptation.foundation.args": "{width: 8}"}


@dataclass
class Command:
    doc: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def commands(doc: Path) -> list[Command]:
    """Every command of ``doc``'s ```bash blocks, in order."""
    text = doc.read_text()
    out = []
    for block in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M):
        first = text[: block.start()].count("\n") + 2
        lines = block.group(1).split("\n")
        i = 0
        while i < len(lines):
            heredoc = re.search(r"<<-?'?(\w+)'?", lines[i])
            if heredoc:  # the here-document's lines are the command's input, not commands
                end = next(
                    (j for j in range(i + 1, len(lines)) if lines[j].strip() == heredoc.group(1)), len(lines) - 1
                )
                lines[i] = lines[i][: heredoc.start()]
                del lines[i + 1 : end + 1]
            start, joined = i, lines[i]
            while joined.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                joined = joined.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            for part in re.split(r"\s&&\s", joined):
                words = shlex.split(part, comments=True)
                if words:
                    out.append(
                        Command(
                            doc.relative_to(ROOT).as_posix() if doc.is_relative_to(ROOT) else doc.name,
                            first + start,
                            shlex.join(words),
                        )
                    )
    return out


def expand_globs(words: list[str], cwd: Path) -> list[str]:
    """Wildcards expanded as the shell would (sorted; a pattern matching nothing stays)."""
    out = []
    for w in words:
        matches = (
            sorted(str(p.relative_to(cwd)) + ("/" if w.endswith("/") else "") for p in cwd.glob(w))
            if any(c in w for c in "*?[")
            else []
        )
        out.extend(matches or [w])
    return out


def rule(cmd: Command) -> str | None:
    for prefix, why in RULES:  # prefix: a regular expression
        if re.match(prefix, cmd.text):
            return why
    return None


def _keys(words: list[str]) -> set[str]:
    return {w.partition("=")[0] for w in words if "=" in w and not w.startswith("-")}


def tiny(words: list[str], cwd: Path) -> list[str]:
    """``words`` (a fedsim command) with overrides that make it quick; keys the line sets
    itself are left as documented."""
    command = words[1:3] if words[1] in ("data", "edge") else words[1:2]
    scenario = next((w for w in words[2:] if w.endswith((".yaml", ".yml"))), None)
    raw = yaml.safe_load((cwd / scenario).read_text()) if scenario and (cwd / scenario).is_file() else {}
    add: dict[str, str] = {}
    if command in (["run"], ["sweep"], ["data", "partitions"]) and scenario:
        add.update(TINY_DATA)
        if command == ["data", "partitions"]:
            add = {k: v for k, v in add.items() if k.startswith("data.")}
    if command in (["run"], ["sweep"], ["adapt"]) and "adaptation" in raw:
        add.update(TINY_STREAM)
        if "foundation" in raw["adaptation"]:
            add.update(TINY_FOUNDATION)
    if "runtime=ray" in words:
        words = ["runtime=inline" if w == "runtime=ray" else w for w in words]
    given = _keys(words)
    extra = [f"{k}={v}" for k, v in add.items() if k not in given]
    flags = next((i for i, w in enumerate(words) if w.startswith("--")), len(words))
    return words[:flags] + extra + words[flags:]


def _run_doc(doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    cwd = tmp_path / "clone"
    shutil.copytree(ROOT / "scenarios", cwd / "scenarios")
    monkeypatch.chdir(cwd)
    cmds = commands(doc)
    not_covered = [str(c) for c in cmds if rule(c) is None and not c.text.startswith("fedsim ")]
    assert not not_covered, "documented commands that are neither fedsim commands nor covered by a rule:\n" + "\n".join(
        not_covered
    )
    for cmd in cmds:
        why = rule(cmd)
        if why is not None or not cmd.text.startswith("fedsim "):
            print(f"not run: {cmd} ({why})")
            continue
        argv = tiny(expand_globs(shlex.split(cmd.text), cwd), cwd)
        code = fedsim_main(argv[1:])
        out = capsys.readouterr()
        assert code == 0, f"{cmd}\n  ran as: {shlex.join(argv)}\n  exit code {code}\n{out.err[-2000:]}"


# The README's sequence and docs/tta.md train and adapt several times (about a minute
# together on 2 cores); the other documents are quick.
SLOW = {"README.md", "tta.md"}


@pytest.mark.parametrize(
    "doc",
    [pytest.param(d, id=d.name, marks=[pytest.mark.slow] if d.name in SLOW else []) for d in DOCS if commands(d)],
)
def test_documented_commands_run_in_order(doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    _run_doc(doc, tmp_path, monkeypatch, capsys)


def test_extraction_and_rules(tmp_path: Path) -> None:
    """The parser sees what a reader sees: continuations joined, chains split, comments dropped."""
    doc = ROOT / "README.md"
    cmds = [c.text for c in commands(doc)]
    assert "pip install -e ." in cmds and "fedsim run scenarios/multidomain.yaml" in cmds
    assert not any("#" in c for c in cmds)
    sample = tmp_path / "sample.md"
    sample.write_text(
        "```bash\nfedsim adapt scenarios/tta-correlated.yaml \\\n"
        '  "adaptation.adapters=[source, tbn]" \\\n  --model runs/fedbn  # a comment\n'
        "fedsim list && fedsim --version\n```\n"
    )
    assert [c.text for c in commands(sample)] == [
        "fedsim adapt scenarios/tta-correlated.yaml 'adaptation.adapters=[source, tbn]' --model runs/fedbn",
        "fedsim list",
        "fedsim --version",
    ]
    assert rule(Command("x", 1, "fedsim edge demo scenarios/edge-demo.yaml")) is not None
    assert rule(Command("x", 1, "fedsim run scenarios/multidomain.yaml")) is None
    argv = tiny(["fedsim", "run", "scenarios/multidomain.yaml", "rounds=30", "runtime=ray", "--out", "runs/x"], ROOT)
    assert "rounds=30" in argv and "rounds=1" not in argv and "runtime=inline" in argv and "runtime=ray" not in argv
    assert argv[-2:] == ["--out", "runs/x"]
