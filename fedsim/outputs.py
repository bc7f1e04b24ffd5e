"""What fedsim created, and therefore the only things it replaces or deletes.

A folder fedsim creates (a run folder, an adaptation output folder, a certificate folder, a
sweep folder) gets a marker file, ``.fedsim`` (JSON: kind, fedsim version), the moment it is
created.
``--overwrite`` and the cleanup after a failed start remove or replace a folder only when

- it is not the working directory or one of its parents (nor a file, nor a link),
- it is provably fedsim's: it carries the marker of this kind of output, or, for folders
  written before the marker existed, it holds the kind's signature files (a run folder:
  ``scenario.yaml`` plus ``metrics.jsonl`` or ``checkpoints/``; an adaptation folder:
  ``adaptation.yaml`` plus ``adaptation.jsonl`` or ``adaptation_summary.json``),
- every entry in it is a known fedsim artefact of that kind (one foreign file and it stays;
  a sweep folder's entries besides its own files must each be a fedsim run folder).

A replaced folder is first renamed to a hidden sibling and only then deleted, so a crash in
between leaves it whole. Single files fedsim writes where the user points (the report's
plot, table and numbers, the data grid) are replaced only when fedsim wrote them: PNGs carry
``Software: fedsim ...`` in their metadata, the markdown table a first-line comment, the
report's JSON ``"written_by": "fedsim report"``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fedsim import __version__
from fedsim.schema import ScenarioError, short_source

MARKER = ".fedsim"
PNG_SOFTWARE = f"fedsim {__version__}"  # PNG metadata of every plot fedsim writes
MD_HEADER = "<!-- written by fedsim report -->"
JSON_WRITER = "fedsim report"  # the "written_by" of report.json

# Top-level entries each kind of folder may hold (besides the marker and atomic-write temps).
ADAPTATION_ENTRIES = frozenset({"adaptation.yaml", "adaptation.jsonl", "adaptation_summary.json", "adaptation.png"})
RUN_ENTRIES = frozenset(
    {
        "scenario.yaml",
        "metrics.jsonl",
        "summary.json",
        "accuracy.png",
        "checkpoints",
        "clients",
        "foundation",
        "edge",
        ".lock",
        *ADAPTATION_ENTRIES,
    }
)
CERT_ENTRIES = frozenset({"ca.crt", "server.pem", "server.key"})
SWEEP_ENTRIES = frozenset({"sweep.json", "sweep.md", "sweep.png", ".lock"})  # plus one run folder per point
CERT_CA_NAME = "fedsim demo CA"  # common name of the CA fedsim edge certs issues

ENTRIES = {"run": RUN_ENTRIES, "adaptation": ADAPTATION_ENTRIES, "certs": CERT_ENTRIES, "sweep": SWEEP_ENTRIES}
LEGACY = {  # (always present, one of these) in folders written before the marker existed
    "run": ("scenario.yaml", ("metrics.jsonl", "checkpoints")),
    "adaptation": ("adaptation.yaml", ("adaptation.jsonl", "adaptation_summary.json")),
}


class UnsafeOutput(ScenarioError):
    """fedsim refuses to write or delete there (a one-line message, exit code 2)."""


def is_cwd_or_parent(path: Path) -> bool:
    """Whether ``path`` is the working directory or one of its parents."""
    here = Path.cwd().resolve()
    target = path.resolve()
    return target == here or target in here.parents


def check_location(path: Path, what: str) -> None:
    """Refuse an output folder that is the working directory, one of its parents, a link
    or a file: fedsim would write among (or later replace) what is not its own."""
    if is_cwd_or_parent(path):
        raise UnsafeOutput(
            f"{path}: is the working directory or one of its parents; give the {what} its own folder (--out)"
        )
    if path.is_symlink():
        raise UnsafeOutput(f"{path}: is a symbolic link; give the {what} a real folder")
    if path.exists() and not path.is_dir():
        raise UnsafeOutput(f"{path}: exists and is not a folder")


def write_marker(folder: Path, kind: str) -> None:
    """Mark ``folder`` as created by fedsim (call right after creating it)."""
    (folder / MARKER).write_text(json.dumps({"kind": kind, "fedsim": __version__}) + "\n")


def marker_kind(folder: Path) -> str | None:
    """The kind in ``folder``'s marker, or None when there is no readable marker."""
    try:
        return str(json.loads((folder / MARKER).read_text())["kind"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_temp(name: str) -> bool:
    # leftovers of fedsim.arrays.atomic_write_bytes / save_arrays after a kill
    return name.startswith(".") and name.endswith(".tmp")


def _fedsim_ca(folder: Path) -> bool:
    """A certificate folder from before the marker: its CA is the one fedsim issues."""
    try:
        from cryptography import x509  # optional dependency (edge extra): only for edge certs

        cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    except (ImportError, OSError, ValueError):
        return False
    return any(a.value == CERT_CA_NAME for a in cert.subject)


def ownership_problem(folder: Path, kind: str) -> str | None:
    """Why ``folder`` is not a fedsim ``kind`` folder fedsim may replace; None when it is."""
    if folder.is_symlink() or not folder.is_dir():
        return "not a folder"
    names = [p.name for p in folder.iterdir()]
    marked = marker_kind(folder)
    if marked is None and MARKER in names:
        return f"its {MARKER} marker is unreadable"
    if marked is not None and marked != kind:
        return f"it is a fedsim {marked} folder, not {'an' if kind[0] in 'aeiou' else 'a'} {kind} folder"
    if marked is None:
        if kind == "certs":
            if not _fedsim_ca(folder):
                return "its ca.crt was not issued by fedsim edge certs"
        elif kind not in LEGACY:  # a kind that always had the marker
            return f"it has no {MARKER} marker"
        else:
            always, one_of = LEGACY[kind]
            if always not in names or not any(n in names for n in one_of):
                return f"it has no {MARKER} marker and is not {'an' if kind[0] in 'aeiou' else 'a'} {kind} folder fedsim wrote"
    allowed = ENTRIES[kind]
    foreign = sorted(
        n
        for n in names
        if n != MARKER
        and n not in allowed
        and not _is_temp(n)
        and not (kind == "run" and n.startswith("adapt-"))
        and not (kind == "sweep" and ownership_problem(folder / n, "run") is None)
    )
    if foreign:
        return f"it holds files fedsim did not write ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})"
    if kind == "run":  # adaptation outputs kept inside a run folder must be fedsim's too
        for name in names:
            if name.startswith("adapt-") and (problem := ownership_problem(folder / name, "adaptation")):
                return f"{name}: {problem}"
    return None


def remove_owned(folder: Path, kind: str) -> None:
    """Delete a fedsim ``kind`` folder, after proving it is one (else :class:`UnsafeOutput`).

    The folder is renamed to a hidden sibling first, then deleted: a crash in between
    leaves the old folder whole under that name rather than half deleted."""
    if is_cwd_or_parent(folder):
        raise UnsafeOutput(f"{folder}: is the working directory or one of its parents; fedsim never deletes it")
    if problem := ownership_problem(folder, kind):
        raise UnsafeOutput(f"{folder}: not replaced: {problem}; move it away yourself or choose another --out")
    trash = folder.with_name(f".{folder.name}.replaced-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(folder, trash)
    shutil.rmtree(trash)


def create_folder(folder: Path, kind: str, overwrite: bool, exists_message: str) -> None:
    """Create a fresh, marked ``kind`` folder at ``folder``.

    An existing empty folder is used as is; a non-empty one raises ``exists_message`` unless
    ``overwrite``, and is then replaced only when it is fedsim's (:func:`remove_owned`)."""
    check_location(folder, f"{kind} folder")
    if folder.is_dir() and any(
        p.name != ".lock" for p in folder.iterdir()
    ):  # .lock: fedsim.runlock's, held by this process
        if not overwrite:
            raise UnsafeOutput(exists_message)
        remove_owned(folder, kind)
    folder.mkdir(parents=True, exist_ok=True)
    write_marker(folder, kind)


def png_written_by_fedsim(path: Path) -> bool:
    try:
        from PIL import Image  # a matplotlib dependency; only read when a plot is about to be replaced

        with Image.open(path) as image:
            return str(image.info.get("Software", "")).startswith("fedsim ")
    except (ImportError, OSError, ValueError):
        return False


def md_written_by_fedsim(path: Path) -> bool:
    try:
        with open(path) as fh:
            return fh.readline().strip() == MD_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def json_written_by_fedsim(path: Path) -> bool:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("written_by") == JSON_WRITER


def check_file_target(path: Path, overwrite: bool, owned: bool | None = None) -> None:
    """Refuse to write ``path`` when it exists, unless ``overwrite`` and fedsim wrote it
    (``owned``: defaults to the PNG metadata check)."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise UnsafeOutput(f"{path}: exists and is not a regular file")
    if not path.exists():
        return
    if not overwrite:
        raise UnsafeOutput(f"{path}: exists; pass --overwrite to replace it or --out to choose another path")
    if not (png_written_by_fedsim(path) if owned is None else owned):
        raise UnsafeOutput(
            f"{path}: not replaced: fedsim did not write it; move it away yourself or choose another --out"
        )


def check_out_folder(out: str | Path, option: str = "--out") -> None:
    """The folder a command will create or fill: not a file, not under a file, and in a
    writable place. Checked before anything is created."""
    shown = short_source(str(out))
    if "\0" in str(out):
        raise ScenarioError(f"{option} {shown}: a path must not contain a NUL byte")
    path = Path(out)
    try:
        if path.exists() and not path.is_dir():
            raise ScenarioError(f"{option} {shown}: is a file, not a folder")
        existing = path
        while not existing.exists():
            if existing.is_symlink():  # a dangling link: mkdir would fail on it
                raise ScenarioError(f"{option} {shown}: {existing} is a broken symbolic link")
            existing = existing.parent
        if not existing.is_dir():
            raise ScenarioError(f"{option} {shown}: {existing} is a file, so no folder can be made under it")
        readonly = bool(os.statvfs(existing).f_flag & os.ST_RDONLY) if hasattr(os, "statvfs") else False
        if readonly or not os.access(existing, os.W_OK | os.X_OK):
            raise ScenarioError(f"{option} {shown}: {existing} is not writable")
    except OSError as exc:  # e.g. a name too long for the file system
        raise ScenarioError(f"{option} {shown}: {exc.strerror or exc}") from None
