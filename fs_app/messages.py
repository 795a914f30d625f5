"""Taking a message when nobody answers: the voicemail fallback and the household's recorded message.

FreeSWITCH's ``voicemail`` application is not used: mod_voicemail is not loaded in ``freeswitch-conf/`` and its
greetings are stock sound files that no package here ships (the real switch answers "Invalid Application"
and the caller gets 502). Instead the operator's voicemail platform takes the call when one is configured
(``DialSettings.voicemail_endpoint``), and otherwise the switch plays IIM's own greeting and records.

Where it records: a directory (``DialSettings.recordings_dir``: the switch's own, or one IIM shares), or, when
``DialSettings.recording_url`` is set, an ``http_cache://http://...`` URL: mod_http_cache records to a local file
and PUTs it to that URL when the ``record`` application closes the file -- before ``record`` returns, so the
upload is over (done or failed) by the time this module sees the application complete.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from fs_app.call import Call, CallGone
from fs_app.dialstring import DialSettings

#: Longest message, silence threshold and the silence (seconds) that ends it (``record`` arguments).
MAX_MESSAGE_S, SILENCE_THRESHOLD, SILENCE_HITS_S = 120, 200, 3


@dataclass(frozen=True, slots=True)
class MessageTaken:
    """Where a message went: ``voicemail`` (the operator's platform) or the file the switch recorded, and how
    long the recording is (``record_ms``; None when the switch did not say, e.g. the socket went first)."""

    where: str
    recorded_ms: int | None = None

    @property
    def recorded(self) -> bool:
        return self.where != "voicemail"


def message_file_name(call_uuid: str) -> str:
    """The message's file name, in the switch's directory and in IIM's alike (one message per call)."""
    return f"iim-{call_uuid}.wav"


async def take_message(call: Call, settings: DialSettings, msisdn: str, *, voicemail: bool,
                       tenant: str = "") -> MessageTaken:
    """Let the caller leave a message for ``msisdn`` (a subscriber of ``tenant``).

    ``voicemail``: the caller reaches the subscriber's voicemail (the operator's platform when configured);
    otherwise the message is recorded for the household. A caller hanging up ends the recording: that is how
    most messages end, not an error.
    """
    if voicemail and settings.voicemail_endpoint:
        await call.bridge(settings.voicemail_endpoint.format(msisdn=msisdn))
        return MessageTaken("voicemail")
    if settings.recording_url is not None and tenant:
        path = settings.recording_url(tenant, call.uuid)  # uploaded to IIM when the file closes
    else:
        path = f"{settings.recordings_dir}/{message_file_name(call.uuid)}"
    await call.answer()
    await call.playback(settings.voicemail_prompt)
    recorded_ms: int | None = None
    with contextlib.suppress(CallGone):
        done = await call.execute("record", f"{path} {MAX_MESSAGE_S} {SILENCE_THRESHOLD} {SILENCE_HITS_S}",
                                  timeout=None)
        ms = done.variable("record_ms")
        recorded_ms = int(ms) if ms is not None and ms.isdigit() else None
    return MessageTaken(path, recorded_ms)
