"""A secret-store resolver plug-in for tests: ``vault:PATH#FIELD`` read from a JSON file standing in for the
store (``IIM_TEST_VAULT_FILE``: ``{"PATH": {"FIELD": "value"}}``). Registered through an entry point of group
``iim.secret_resolvers`` by :func:`install_entry_point`, as a real plug-in package would be."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["VaultResolver", "install_entry_point"]


class VaultResolver:
    scheme = "vault"

    def resolve(self, where: str) -> str | None:
        path, _, field = where.partition("#")
        store = json.loads(Path(os.environ["IIM_TEST_VAULT_FILE"]).read_text(encoding="utf-8"))
        value = store.get(path, {}).get(field or "value")
        return value if isinstance(value, str) else None


def install_entry_point(site: Path, *, name: str = "vault", target: str = "tests.secret_plugin:VaultResolver") -> None:
    """A distribution's metadata in ``site`` (put it on ``sys.path``) declaring the plug-in's entry point."""
    dist = site / f"iim_test_{name}_resolver-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: iim-test-{name}-resolver\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[iim.secret_resolvers]\n{name} = {target}\n")
