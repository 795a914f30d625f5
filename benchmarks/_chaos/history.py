"""The client's history: every alarm request as an ``invoke`` and its completion, as JSON lines.

Completions follow Jepsen: ``ok`` (2xx: the alarm is acknowledged, the service owes it its escalation),
``fail`` (it certainly did not happen: a 4xx/5xx answer, a refused connection), ``info`` (unknown: the
connection broke mid-request, or no answer came within the client's deadline, ``error="timeout"``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

OpType = Literal["invoke", "ok", "fail", "info"]
TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class Op:
    """One line of the history. ``t`` is wall-clock seconds (``time.time()``), comparable with the database
    and the switch's log; ``req`` pairs an invoke with its completion."""

    type: OpType
    req: int
    alarm: str
    t: float
    instance: str = ""
    deadline_s: float = 0.0
    status: int | None = None
    incident_id: str | None = None
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None and v != ""})

    @classmethod
    def from_json(cls, line: str) -> Op:
        return cls(**json.loads(line))


class HistoryWriter:
    """Appends ops to a JSON-lines file as they happen (one write per op: a killed run keeps its history)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ops: list[Op] = []
        self._fh = path.open("a", encoding="utf-8")

    def add(self, op: Op) -> None:
        self.ops.append(op)
        self._fh.write(op.to_json() + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_history(path: Path) -> list[Op]:
    """The ops of a history file (a torn last line after a kill is skipped)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(Op.from_json(line))
        except (ValueError, TypeError):
            continue
    return out


def pairs(ops: Iterable[Op]) -> Iterator[tuple[Op, Op | None]]:
    """Each invoke with its completion (None: the history ends without one, itself a hung request)."""
    done = {op.req: op for op in ops if op.type != "invoke"}
    for op in ops:
        if op.type == "invoke":
            yield op, done.get(op.req)
