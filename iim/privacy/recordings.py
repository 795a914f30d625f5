"""Deleting the files of recorded messages whose rows are going (retention purge, erasure).

Called inside the transaction that deletes the rows, before it commits: a file that cannot be deleted fails
the transaction, so its row stays and the next purge (or erasure) tries again; a row is never gone while its
file is left behind unnoticed. Only plain names in the recordings directory are touched (the same pattern
as ``iim.recorded_message.file_name``), never a path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

__all__ = ["remove_recording_files"]

_FILE = re.compile(r"iim-[A-Za-z0-9-]{1,64}\.wav")


def remove_recording_files(directory: Path | None, names: Iterable[str]) -> int:
    """Delete these recordings from ``directory``; how many files were there. A file already gone counts as
    gone; any other ``OSError`` propagates (the caller's transaction rolls back)."""
    if directory is None:
        return 0
    removed = 0
    for name in names:
        if not _FILE.fullmatch(name):
            raise ValueError(f"not a recording's file name: {name!r}")
        try:
            (directory / name).unlink()
        except FileNotFoundError:
            continue
        removed += 1
    return removed
