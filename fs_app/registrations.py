"""Device presence from FreeSWITCH registrations (``sofia::register`` / ``unregister`` / ``expire``).

An inbound ESL listener: it turns the three CUSTOM events into "AoR online/offline"
calls on whatever keeps device status (the policy cache). ``sofia::register`` and
``sofia::unregister`` name the AoR in ``from-user``/``from-host``; ``sofia::expire``
uses ``user``/``host`` and a smaller header set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fs_app.esl import Event

log = logging.getLogger("iim.esl.registrations")

REGISTRATION_EVENTS = ("CUSTOM", "sofia::register", "sofia::unregister", "sofia::expire")

DeviceStatusSink = Callable[[str, bool], object]


def registration_aor(event: Event) -> tuple[str, bool] | None:
    """``(aor, online)`` for a registration event, None for anything else."""
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
    if subclass == "sofia::register" and (event.get("expires") or "1") == "0":
        online = False
    return f"{user}@{host}", online


def registration_listener(sink: DeviceStatusSink) -> Callable[[Event], None]:
    """An inbound-client listener that reports every registration change to ``sink``."""

    def on_event(event: Event) -> None:
        found = registration_aor(event)
        if found is not None:
            aor, online = found
            log.debug("device %s", "registered" if online else "gone", extra={"aor": aor})
            sink(aor, online)

    return on_event
