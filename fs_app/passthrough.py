"""The routing we have before subscriber policy exists: bridge the call to its dialled number.

It is also the safe default when call logic fails: a call is never dropped because
IIM could not decide; it goes where the caller dialled.
"""

from __future__ import annotations

import logging
import re

from fs_app.call import Call
from fs_app.outbound import CallHandler

log = logging.getLogger("iim.call")

# Digits, optional leading +, * and # (service codes); nothing that could alter a dial string.
_DIALLABLE = re.compile(r"\+?[0-9*#]{1,32}")

# Q.850 causes FreeSWITCH accepts for a hangup we relay back to the caller.
RELAYABLE_CAUSES = frozenset({
    "UNALLOCATED_NUMBER", "NORMAL_CLEARING", "USER_BUSY", "NO_USER_RESPONSE", "NO_ANSWER",
    "SUBSCRIBER_ABSENT", "CALL_REJECTED", "DESTINATION_OUT_OF_ORDER", "INVALID_NUMBER_FORMAT",
    "NORMAL_CIRCUIT_CONGESTION", "NORMAL_TEMPORARY_FAILURE", "RECOVERY_ON_TIMER_EXPIRE",
    "ORIGINATOR_CANCEL", "ALLOTTED_TIMEOUT", "MEDIA_TIMEOUT", "USER_NOT_REGISTERED", "PROGRESS_TIMEOUT",
})


def relay_cause(cause: str | None) -> str:
    """The cause to hang the caller up with after a failed bridge."""
    return cause if cause in RELAYABLE_CAUSES else "NORMAL_TEMPORARY_FAILURE"


def dial_string(endpoint_template: str, destination: str, *, ignore_early_media: bool = True) -> str:
    if not _DIALLABLE.fullmatch(destination):
        raise ValueError(f"not a diallable number: {destination[:40]!r}")
    prefix = "{ignore_early_media=true}" if ignore_early_media else ""
    return prefix + endpoint_template.format(destination=destination)


def make_passthrough_handler(endpoint_template: str) -> CallHandler:
    """A handler that bridges to ``endpoint_template`` with ``{destination}`` filled in."""

    async def bridge_dialled_number(call: Call) -> None:
        destination = call.destination_number or ""
        try:
            target = dial_string(endpoint_template, destination)
        except ValueError:
            log.warning("refusing to dial %r", destination[:40], extra={"call_id": call.uuid})
            await call.hangup("INVALID_NUMBER_FORMAT")
            return
        result = await call.bridge(target)
        if not call.hung_up:
            await call.hangup("NORMAL_CLEARING" if result.answered else relay_cause(result.hangup_cause))

    return bridge_dialled_number
