"""The missed-call SMS: what the subscriber gets when a call to them went unanswered (the policy's fallback).

One text for both paths that take a call: the policy router (SIP legs, ``PolicyRouter(missed_call=...)``) and
the cloud announcement (``cloud_call``). The SMS goes through the outbox; its key is the call's uuid, so a
notifier run twice for the same call queues one SMS.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from uuid import UUID

from fs_app.routing import CallFacts
from iim.home.ports import SmsSink
from policy_cache.snapshot import RoutingSnapshot

__all__ = ["missed_call_key", "missed_call_sms", "missed_call_text"]

log = logging.getLogger("iim.home.call")


def missed_call_text(caller: str | None) -> str:
    return f"Missed call from {caller or 'an unknown number'}: nobody took it at home."


def missed_call_key(call_uuid: str) -> str:
    """The outbox key of a call's missed-call SMS (one per call)."""
    return f"missed-call:{call_uuid}"


def missed_call_sms(sink: SmsSink) -> Callable[[RoutingSnapshot, CallFacts], Awaitable[None]]:
    """The router's ``missed_call`` notifier: the SMS to the subscriber's own number, queued in the outbox.

    Never raises: a lost SMS is logged with its traceback, and the call's hangup goes on."""

    async def notify(snapshot: RoutingSnapshot, facts: CallFacts) -> None:
        try:
            await sink.send(UUID(snapshot.tenant_id), snapshot.msisdn, missed_call_text(facts.caller),
                            missed_call_key(facts.uuid))
        except Exception:
            log.exception("missed-call SMS not queued", extra={"call_id": facts.uuid})

    return notify
