"""Device presence from FreeSWITCH registrations (``sofia::register`` / ``unregister`` / ``expire``).

An inbound ESL listener: it turns the three CUSTOM events into "AoR online/offline"
calls on whatever keeps device status (the policy cache). ``sofia::register`` and
``sofia::unregister`` name the AoR in ``from-user``/``from-host``; ``sofia::expire``
uses ``user``/``host`` and a smaller header set. A registration's ``network-ip`` is the address the REGISTER
came from (where the phone is; what the household's home networks are compared with).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from fs_app.esl import Event

log = logging.getLogger("iim.esl.registrations")

REGISTRATION_EVENTS = ("CUSTOM", "sofia::register", "sofia::unregister", "sofia::expire")

DeviceStatusSink = Callable[[str, bool], object]
#: ``(aor, online, expires_s, sources)``
PresenceSink = Callable[[str, bool, float | None, tuple[str, ...]], object]


@dataclass(frozen=True, slots=True)
class RegistrationChange:
    """One registration event: the AoR, whether it is registered now, for how long (seconds; None: not said) and
    from where (``network-ip``; None: not said)."""

    aor: str
    online: bool
    expires_s: float | None
    source: str | None = None


def registration_change(event: Event) -> RegistrationChange | None:
    """The registration change an event reports, None for anything else.

    ``sofia::register`` carries a relative ``expires`` (seconds); ``expires: 0`` is an unregister. ``unregister``
    and ``expire`` end the registration (``expire``'s ``expires`` is an epoch, not a lifetime: not read).
    """
    if event.name != "CUSTOM":
        return None
    subclass = event.subclass
    if subclass == "sofia::register":
        online = True
    elif subclass in ("sofia::unregister", "sofia::expire"):
        online = False
    else:
        return None
    user = event.get("from-user") or event.get("user") or event.get("username")
    host = event.get("from-host") or event.get("host") or event.get("realm")
    if not user or not host:
        return None
    expires: float | None = None
    if subclass == "sofia::register":
        raw = event.get("expires") or ""
        expires = float(raw) if raw.isdigit() else None
        if expires == 0:
            online, expires = False, None
    return RegistrationChange(f"{user}@{host}", online, expires, event.get("network-ip") or None)


def registration_aor(event: Event) -> tuple[str, bool] | None:
    """``(aor, online)`` for a registration event, None for anything else."""
    found = registration_change(event)
    return None if found is None else (found.aor, found.online)


def registration_listener(sink: DeviceStatusSink) -> Callable[[Event], None]:
    """An inbound-client listener that reports every registration change to ``sink``."""

    def on_event(event: Event) -> None:
        found = registration_aor(event)
        if found is not None:
            aor, online = found
            log.debug("device %s", "registered" if online else "gone", extra={"aor": aor})
            sink(aor, online)

    return on_event


def presence_listener(sink: PresenceSink) -> Callable[[Event], None]:
    """An inbound-client listener that hands every registration change, with its lifetime, to ``sink`` (live
    presence: a person's phone registered from the home network says they are home until it runs out)."""

    def on_event(event: Event) -> None:
        found = registration_change(event)
        if found is not None:
            sink(found.aor, found.online, found.expires_s, () if found.source is None else (found.source,))

    return on_event
