"""Client state that survives between rounds (FedBN's local BN, error-feedback buffers).

In a simulation the state lives in the run folder, one safetensors file per client and
item, versioned by round: ``clients/<id>/<item>.r<round>.safetensors``. A client in
round r reads the newest version written before r, so a run resumed from the checkpoint
of round r-1 sees exactly the state it saw the first time, whatever a killed round r
had already written. Only the sampled clients' state is in memory, so populations of
thousands fit. Without a run folder (Flower deployment) the state lives in the node's
``context.state``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from flwr.app import Context

from fedsim.arrays import NamedArrays, load_arrays, numpy_to_record, record_to_numpy, save_arrays

_VERSION = re.compile(r"^(?P<item>[A-Za-z0-9_\-]+)\.r(?P<round>\d+)\.safetensors$")


class ClientState:
    """Read the state a client had before ``server_round``; stage and commit new state."""

    def __init__(
        self,
        root: Path | None,
        client_id: int,
        server_round: int,
        context: Context | None = None,
        inclusive: bool = False,
    ) -> None:
        self.folder = None if root is None else Path(root) / "clients" / str(client_id)
        self.server_round = server_round
        self.context = context
        self.inclusive = inclusive  # evaluation after round r reads round r's state
        self._staged: dict[str, NamedArrays] = {}
        self._read_round: dict[str, int] = {}

    def _versions(self, item: str) -> list[tuple[int, Path]]:
        if self.folder is None or not self.folder.exists():
            return []
        out = []
        for path in self.folder.iterdir():
            m = _VERSION.match(path.name)
            if m and m.group("item") == item:
                out.append((int(m.group("round")), path))
        return sorted(out)

    def get(self, item: str) -> NamedArrays | None:
        if item in self._staged:
            return self._staged[item]
        if self.folder is None:
            if self.context is not None and item in self.context.state:
                return record_to_numpy(self.context.state[item])  # type: ignore[arg-type]
            return None
        limit = self.server_round if self.inclusive else self.server_round - 1
        usable = [(r, p) for r, p in self._versions(item) if r <= limit]
        if not usable:
            return None
        r, path = usable[-1]
        self._read_round[item] = r
        return load_arrays(path)

    def put(self, item: str, arrays: NamedArrays) -> None:
        self._staged[item] = {k: np.asarray(v) for k, v in arrays.items()}

    def commit(self) -> None:
        """Write staged items for this round; drop versions older than the one read."""
        for item, arrays in self._staged.items():
            if self.folder is None:
                if self.context is not None:
                    self.context.state[item] = numpy_to_record(arrays)
                continue
            save_arrays(self.folder / f"{item}.r{self.server_round}.safetensors", arrays)
            keep_from = self._read_round.get(item, self.server_round)
            for r, path in self._versions(item):
                if r < keep_from:
                    path.unlink(missing_ok=True)
        self._staged.clear()
