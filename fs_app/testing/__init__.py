"""FreeSWITCH 1.10.12 Event Socket emulator for tests, benchmarks and trying IIM without a switch.

It sends the bytes FreeSWITCH sends (checked against recorded sessions): the outbound
socket (FreeSWITCH dials the application) and the inbound socket (the application
connects to port 8021), channel events with FreeSWITCH's header order, scripted
callees for ``bridge``/``originate``, and fault knobs for adversity tests.
See ``fs_app/testing/README.md`` for the API in one page.
"""

from fs_app.testing.dialstring import DialBranch, DialLeg, DialString, DialStringError, parse_dialstring
from fs_app.testing.emulator import FreeSwitchEmulator
from fs_app.testing.faults import FaultConfig
from fs_app.testing.inbound import InboundServer
from fs_app.testing.load import LoadProfile, LoadReport, run_load, run_profile
from fs_app.testing.spec import CallResult, CallSpec, OriginateRecord, RecordingRecord, TargetBehaviour

__all__ = [
    "CallResult",
    "CallSpec",
    "DialBranch",
    "DialLeg",
    "DialString",
    "DialStringError",
    "FaultConfig",
    "FreeSwitchEmulator",
    "InboundServer",
    "LoadProfile",
    "LoadReport",
    "OriginateRecord",
    "RecordingRecord",
    "TargetBehaviour",
    "parse_dialstring",
    "run_load",
    "run_profile",
]
