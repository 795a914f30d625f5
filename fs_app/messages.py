"""Taking a message when nobody answers: the voicemail fallback and the household's recorded message.

FreeSWITCH's ``voicemail`` application is not used: mod_voicemail is not loaded in ``freeswitch-conf/`` and its
greetings are stock sound files that no package here ships (the real switch answers "Invalid Application"
and the caller gets 502). Instead the operator's voicemail platform takes the call when one is configured
(``DialSettings.voicemail_endpoint``), and otherwise the switch plays IIM's own greeting and records.
"""

from __future__ import annotations

from fs_app.call import Call
from fs_app.dialstring import DialSettings

#: Longest message, silence threshold and the silence (seconds) that ends it (``record`` arguments).
MAX_MESSAGE_S, SILENCE_THRESHOLD, SILENCE_HITS_S = 120, 200, 3


async def take_message(call: Call, settings: DialSettings, msisdn: str, *, voicemail: bool) -> str:
    """Let the caller leave a message for ``msisdn``; returns where it went (``voicemail`` or a file path).

    ``voicemail``: the caller reaches the subscriber's voicemail (the operator's platform when configured);
    otherwise the message is recorded for the household.
    """
    if voicemail and settings.voicemail_endpoint:
        await call.bridge(settings.voicemail_endpoint.format(msisdn=msisdn))
        return "voicemail"
    path = f"{settings.recordings_dir}/iim-{call.uuid}.wav"
    await call.answer()
    await call.playback(settings.voicemail_prompt)
    await call.execute("record", f"{path} {MAX_MESSAGE_S} {SILENCE_THRESHOLD} {SILENCE_HITS_S}", timeout=None)
    return path
