"""Secrets by reference (``SCHEME:WHERE``), never values in settings or rows.

``env:NAME`` and ``file:/path`` are built in. Other schemes (``vault:``, ``kms:`` ...) are plug-ins: an object
with a ``scheme`` and a ``resolve(where)`` registered under the ``iim.secret_resolvers`` entry point group (as
connectors are under ``iim.connectors``). A reference whose scheme has no resolver is refused with
:class:`UnresolvableReference` -- at start (:meth:`SecretResolvers.check`), not on first use, so a ``vault:``
reference is never accepted and silently left unresolved.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

__all__ = [
    "ENTRY_POINT_GROUP", "SecretResolver", "SecretResolvers", "UnresolvableReference", "default_resolvers",
    "discover_resolvers", "resolve_secret", "set_default_resolvers",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "iim.secret_resolvers"


@runtime_checkable
class SecretResolver(Protocol):
    """One secret-store scheme. ``resolve`` may block (it runs at start and on reloads, never per message)."""

    scheme: str

    def resolve(self, where: str) -> str | None:
        """The secret at ``where`` (the reference after ``SCHEME:``), or None when there is none."""


class UnresolvableReference(ValueError):
    """A reference whose scheme no installed resolver handles (or that is not ``SCHEME:WHERE`` at all)."""


class _Env:
    scheme = "env"

    def resolve(self, where: str) -> str | None:
        return os.environ.get(where)


class _File:
    scheme = "file"

    def resolve(self, where: str) -> str | None:
        try:
            with open(where, encoding="utf-8") as fh:
                return fh.read().strip()
        except OSError:
            return None


def discover_resolvers(group: str = ENTRY_POINT_GROUP) -> tuple[dict[str, SecretResolver], dict[str, str]]:
    """Load every entry point of ``group`` (a resolver class or instance): ``(resolvers by scheme, errors)``.

    A plug-in that fails to import is reported, not raised: only references of its scheme are then refused.
    """
    found: dict[str, SecretResolver] = {}
    errors: dict[str, str] = {}
    for ep in entry_points(group=group):
        try:
            loaded = ep.load()
            resolver = loaded() if isinstance(loaded, type) else loaded
        except Exception as exc:  # noqa: BLE001 -- third-party import code can raise anything; isolate it
            errors[ep.name] = f"resolver plug-in {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
            log.error("%s", errors[ep.name])
            continue
        if not isinstance(resolver, SecretResolver) or resolver.scheme != ep.name:
            errors[ep.name] = f"resolver plug-in {ep.name!r} ({ep.value}) is not a resolver of scheme {ep.name!r}"
            log.error("%s", errors[ep.name])
            continue
        found.setdefault(ep.name, resolver)
    return found, errors


class SecretResolvers:
    """The schemes this process can resolve: ``env``/``file`` plus plug-ins (discovered when not given)."""

    def __init__(self, plugins: Mapping[str, SecretResolver] | Iterable[SecretResolver] | None = None) -> None:
        if plugins is None:
            found, self._errors = discover_resolvers()
        elif isinstance(plugins, Mapping):
            found, self._errors = dict(plugins), {}
        else:
            found, self._errors = {r.scheme: r for r in plugins}, {}
        self._by_scheme: dict[str, SecretResolver] = {"env": _Env(), "file": _File(), **found}

    @property
    def schemes(self) -> frozenset[str]:
        return frozenset(self._by_scheme)

    def check(self, ref: str) -> SecretResolver:
        """The resolver for ``ref``'s scheme; :class:`UnresolvableReference` (saying what is installed) if none."""
        scheme, sep, where = ref.partition(":")
        if not sep or not scheme or not where:
            raise UnresolvableReference("a secret reference names its scheme: SCHEME:WHERE (env:NAME, file:/path, ...)")
        resolver = self._by_scheme.get(scheme)
        if resolver is None:
            why = self._errors.get(scheme) or (
                f"no resolver for secret reference scheme {scheme!r} is installed "
                f"(installed: {', '.join(sorted(self._by_scheme))}; plug-ins register the entry point group "
                f"{ENTRY_POINT_GROUP!r})")
            raise UnresolvableReference(why)
        return resolver

    def check_all(self, refs: Iterable[tuple[str, str]]) -> None:
        """Refuse every ``(what, ref)`` whose scheme cannot be resolved, all named in one error."""
        problems = []
        for what, ref in refs:
            try:
                self.check(ref)
            except UnresolvableReference as exc:
                problems.append(f"{what}: {exc}")
        if problems:
            raise UnresolvableReference("; ".join(problems))

    def resolve(self, ref: str, *, default: str | None = None) -> str:
        """Resolve ``ref``; the value is never logged. LookupError when the store has no such secret."""
        resolver = self.check(ref)
        value = resolver.resolve(ref.partition(":")[2])
        if value is None:
            if default is None:
                raise LookupError(f"credential reference {ref!r} does not resolve")
            return default
        return value


_default: SecretResolvers | None = None


def default_resolvers() -> SecretResolvers:
    """The process's resolvers (entry points discovered once, on first use)."""
    global _default
    if _default is None:
        _default = SecretResolvers()
    return _default


def set_default_resolvers(resolvers: SecretResolvers | None) -> None:
    """Replace the process's resolvers (None: discover again on next use); for embedding and tests."""
    global _default
    _default = resolvers


def resolve_secret(ref: str, *, default: str | None = None,
                   resolvers: Callable[[], SecretResolvers] = default_resolvers) -> str:
    """Resolve a ``credential_ref`` through the installed resolvers; the value is never logged."""
    return resolvers().resolve(ref, default=default)
