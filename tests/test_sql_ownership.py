"""Stores own their SQL: statements are written only in the bottom floor and in each feature's store module.

Read from the source (``ast``): every string literal (f-string parts included) that opens like a statement
counts, wherever it is passed afterwards. Tests and benchmarks set up and inspect rows their own way and are
not looked at.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORT_ROOTS = ("fs_app", "policy_cache", "iot_bridge", "iim")

_STATEMENT = re.compile(r"^\s*(SELECT|INSERT\s+INTO|UPDATE\s+[\w.]+\s+SET|DELETE\s+FROM|WITH\s+\w+\s+AS)\b")
_WRITES_OUTBOX = re.compile(r"\b(INSERT\s+INTO|UPDATE)\s+iim\.sms_outbox\b")

#: Where SQL may be written, besides every module named ``store.py``.
ALLOWED = (
    "policy_cache/",  # the bottom floor: schema, registry CRUD, change feed, cache loader, audit chain
    "iim/scenarios/registry.py",  # scenario rows: the registry's CRUD for one more table
)


def _statements() -> list[tuple[str, int, str]]:
    found = []
    for root in IMPORT_ROOTS:
        for path in sorted((ROOT / root).rglob("*.py")):
            where = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and _STATEMENT.match(node.value):
                    found.append((where, node.lineno, node.value))
    return found


def _in_a_store(where: str) -> bool:
    return where.endswith("/store.py") or where.startswith(ALLOWED)


def test_sql_statements_are_written_only_in_store_modules() -> None:
    outside = [f"{where}:{line}: {sql.split()[0]} ..." for where, line, sql in _statements() if not _in_a_store(where)]
    assert outside == []


def test_only_the_sms_store_writes_the_sms_outbox() -> None:
    writers = {where for where, _, sql in _statements() if _WRITES_OUTBOX.search(sql)}
    assert writers == {"iim/sms/store.py"}


def test_the_allowed_list_names_only_modules_that_hold_sql() -> None:
    holding = {where for where, _, _ in _statements()}
    stale = [allowed for allowed in ALLOWED if not any(where.startswith(allowed) for where in holding)]
    assert stale == []
