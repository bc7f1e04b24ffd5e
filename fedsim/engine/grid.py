"""Grids: the in-process runtime, and the partition-id view every strategy sees.

:class:`InlineGrid` implements Flower's ``Grid`` by calling the ``ClientApp`` directly,
one client after another, each node with its own persistent ``Context``.

:class:`PartitionGrid` wraps any Grid (inline or Flower's simulation grid) and shows
strategies *partition ids* as node ids. Flower's node ids are random; partition ids are
not, so seeded sampling picks the same clients on every runtime. It also counts the bytes
that cross it and returns replies sorted by client, so aggregation order (and so float
sums) does not depend on which client finished first.

:class:`StoppableGrid` wraps Flower's simulation grid so that the ServerApp thread ends
at its next grid call once the runtime has stopped (crash, Ctrl-C): Flower's own grid
would wait for replies that will never come, and that non-daemon thread would keep the
process alive.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from uuid import uuid4

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedsim.arrays import record_nbytes
from fedsim.engine.client import HELLO

# Nodes asked for their partition id per message batch during discovery (bounds the
# messages and replies held at once; a Ray or deployed grid answers a batch in parallel).
DISCOVER_CHUNK = 1000


def call_client(client_app: ClientApp, msg: Message, context: Context) -> tuple[Message, float]:
    """One ClientApp call and how long it took; a client that raises answers with an
    ``Error`` reply (a failing client must not stop the round). Every runtime that runs
    ClientApp calls itself (inline, the Ray pool's driver and workers) goes through here."""
    t0 = time.perf_counter()
    try:
        reply = client_app(msg, context)
    except Exception as exc:  # noqa: BLE001 - any client failure becomes its reply
        reply = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
    return reply, time.perf_counter() - t0


class LocalGrid(Grid):
    """Flower's ``Grid`` for runtimes that keep every node's ``Context`` in this process
    (``contexts``: node id -> Context; node ``i`` holds partition ``i``). A subclass runs a
    batch of messages in :meth:`_run_batch`; the replies are kept until pulled."""

    def __init__(self, contexts: dict[int, Context]) -> None:
        self.contexts = contexts
        self._run = Run.create_empty(run_id=1)
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def partition_ids(self) -> dict[int, int]:
        """node id -> partition id, read from the nodes' configs: in-process, the
        discovery query round (a message to every node) is not needed."""
        return {node: int(ctx.node_config["partition-id"]) for node, ctx in self.contexts.items()}

    def _run_batch(self, messages: list[Message]) -> Iterable[Message]:
        """The replies to ``messages`` that arrived in time (each names its message)."""
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        msgs = list(messages)
        for msg in msgs:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
        for reply in self._run_batch(msgs):
            self._replies[reply.metadata.reply_to_message_id] = reply
        return [m.metadata.message_id for m in msgs]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))


class InlineGrid(LocalGrid):
    """Runs the ClientApp in this process, one message after another."""

    def __init__(self, client_app: ClientApp, contexts: dict[int, Context], timeout_s: float | None = None) -> None:
        super().__init__(contexts)
        self.client_app = client_app
        self.timeout_s = timeout_s

    def _deliver(self, msg: Message) -> Message | None:
        reply, elapsed = call_client(self.client_app, msg, self.contexts[msg.metadata.dst_node_id])
        if self.timeout_s is not None and elapsed > self.timeout_s and not reply.has_error():
            return None  # arrived too late: the server has moved on
        return reply

    def _run_batch(self, messages: list[Message]) -> Iterable[Message]:
        return [reply for msg in messages if (reply := self._deliver(msg)) is not None]


@dataclass
class Traffic:
    """Payload bytes (raw array data) and wire bytes (Flower's serialized records)."""

    up: int = 0
    down: int = 0
    up_wire: int = 0
    down_wire: int = 0

    def add(self, other: Traffic) -> None:
        self.up += other.up
        self.down += other.down
        self.up_wire += other.up_wire
        self.down_wire += other.down_wire


def _content_bytes(content: RecordDict) -> tuple[int, int]:
    payload = wire = 0
    for record in content.array_records.values():
        payload += record_nbytes(record)
        wire += record.count_bytes()
    return payload, wire


@dataclass
class PartitionGrid(Grid):
    """A view of ``inner`` whose node ids are partition ids (see module docstring)."""

    inner: Grid
    timeout_s: float | None = None
    traffic: Traffic = field(default_factory=Traffic)
    _to_node: dict[int, int] = field(default_factory=dict)
    _to_partition: dict[int, int] = field(default_factory=dict)
    _node_ids: tuple[int, ...] = ()

    def discover(self, expected: int, wait_s: float = 120.0, config: dict[str, str] | None = None) -> None:
        """Ask every node for its partition id (one tiny query round). ``config`` goes to
        every node with the question (a deployed SuperNode learns its scenario from it).
        An in-process grid that knows its nodes' partition ids (``partition_ids()``, the
        inline runtime) is not asked when there is nothing to tell the nodes (no ``config``):
        with 100,000 nodes the query round took seconds.
        Otherwise nodes are asked ``DISCOVER_CHUNK`` at a time, so the messages and
        replies in memory do not grow with the population."""
        deadline = time.time() + wait_s
        known = getattr(self.inner, "partition_ids", None)
        if callable(known) and not config:  # the edge apps learn their scenario from the question
            for node, pid in sorted(known().items()):
                self._to_node[pid] = node
                self._to_partition[node] = pid
        else:
            while len(list(self.inner.get_node_ids())) < expected and time.time() < deadline:
                time.sleep(0.2)
            nodes = sorted(self.inner.get_node_ids())
            deadline = time.time() + wait_s  # for all the answers, as one query round had
            for i in range(0, len(nodes), DISCOVER_CHUNK):
                msgs = [
                    Message(RecordDict({"config": ConfigRecord(dict(config or {}))}), dst_node_id=n, message_type=HELLO)
                    for n in nodes[i : i + DISCOVER_CHUNK]
                ]
                for reply in self.inner.send_and_receive(msgs, timeout=max(1.0, deadline - time.time())):
                    if reply.has_error():
                        raise RuntimeError(f"node {reply.metadata.src_node_id} failed to start: {reply.error.reason}")
                    pid = int(reply.content["metrics"]["partition-id"])
                    self._to_node[pid] = reply.metadata.src_node_id
                    self._to_partition[reply.metadata.src_node_id] = pid
        if len(self._to_node) != expected:
            raise RuntimeError(f"expected {expected} clients, {len(self._to_node)} answered")
        self._node_ids = tuple(sorted(self._to_node))

    # Grid API ---------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return self._node_ids  # sorted once at discovery: strategies ask every round

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(self._outbound(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._inbound(self.inner.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        timeout = timeout if timeout is not None else self.timeout_s
        replies = self.inner.send_and_receive(self._outbound(messages), timeout=timeout)
        return self._inbound(replies)

    def _outbound(self, messages: Iterable[Message]) -> list[Message]:
        out = []
        for msg in messages:
            payload, wire = _content_bytes(msg.content)
            self.traffic.down += payload
            self.traffic.down_wire += wire
            msg.metadata.dst_node_id = self._to_node[msg.metadata.dst_node_id]
            out.append(msg)
        return out

    def _inbound(self, replies: Iterable[Message]) -> list[Message]:
        out = []
        for reply in replies:
            # Metadata has no public setter for the source; strategies must see partition ids.
            reply.metadata.__dict__["_src_node_id"] = self._to_partition.get(
                reply.metadata.src_node_id, reply.metadata.src_node_id
            )
            if reply.has_content():
                payload, wire = _content_bytes(reply.content)
                self.traffic.up += payload
                self.traffic.up_wire += wire
            out.append(reply)
        return sorted(out, key=lambda m: m.metadata.src_node_id)

    def take_traffic(self) -> Traffic:
        t, self.traffic = self.traffic, Traffic()
        return t


class RunStopped(RuntimeError):
    """The runtime under the ServerApp stopped; raised at the ServerApp's next grid call."""


@dataclass
class StoppableGrid(Grid):
    """``inner`` with every wait cut short by ``stop`` (raises :class:`RunStopped`)."""

    inner: Grid
    stop: threading.Event
    poll_s: float = 0.1

    def _check(self) -> None:
        if self.stop.is_set():
            raise RunStopped("the simulation runtime stopped")

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        self._check()
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._check()
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._check()
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        # Flower's Grid.send_and_receive, with the stop event as the sleep between pulls.
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.inner.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            if self.stop.wait(self.poll_s):
                self._check()
        return replies


__all__ = ["ArrayRecord", "InlineGrid", "call_client", "PartitionGrid", "RunStopped", "StoppableGrid", "Traffic"]
