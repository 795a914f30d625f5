"""The emulator's public value types: how callees behave, what a call looks like, what happened."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from fs_app.esl import Command
from fs_app.testing.faults import FaultConfig

DTMF_DIGITS = "0123456789*#ABCD"

TargetKind = Literal["answer", "busy", "no_answer", "not_registered", "unreachable", "reject"]


@dataclass(frozen=True, slots=True)
class TargetBehaviour:
    """How a dialled endpoint (a bridge/originate leg) behaves.

    Build it with the constructors: :meth:`answer`, :meth:`busy`, :meth:`no_answer`,
    :meth:`not_registered`, :meth:`unreachable`, :meth:`reject`.
    """

    kind: TargetKind
    after_ms: float = 0.0
    hangup_after_ms: float | None = None
    cause: str = "NORMAL_CLEARING"
    ring: bool = True
    callee_id_name: str = "Outbound Call"
    dtmf: str = ""

    def __post_init__(self) -> None:
        bad = set(self.dtmf) - set(DTMF_DIGITS)
        if bad:
            raise ValueError(f"not DTMF digits: {''.join(sorted(bad))!r}")

    @classmethod
    def answer(
        cls, after_ms: float = 0.0, hangup_after_ms: float | None = None, *, dtmf: str = ""
    ) -> TargetBehaviour:
        """Rings (180), answers after ``after_ms``; sends BYE ``hangup_after_ms`` after answering.

        ``dtmf``: the keys the callee presses, one per digit prompt (``play_and_get_digits``,
        ``read``) of an originated leg, in order; when they run out the callee stays silent
        (each further prompt times out) until it hangs up.
        """
        return cls("answer", after_ms=after_ms, hangup_after_ms=hangup_after_ms, dtmf=dtmf)

    @classmethod
    def busy(cls, after_ms: float = 0.0) -> TargetBehaviour:
        """486 Busy Here after ``after_ms``: USER_BUSY."""
        return cls("busy", after_ms=after_ms, cause="USER_BUSY", ring=False)

    @classmethod
    def no_answer(cls) -> TargetBehaviour:
        """Rings forever: the leg ends on leg_timeout (ALLOTTED_TIMEOUT) or the originate timeout (NO_ANSWER)."""
        return cls("no_answer", cause="NO_ANSWER")

    @classmethod
    def not_registered(cls) -> TargetBehaviour:
        """``user/x`` with no registration: USER_NOT_REGISTERED at once, no channel is created."""
        return cls("not_registered", cause="USER_NOT_REGISTERED", ring=False)

    @classmethod
    def unreachable(cls, after_ms: float = 0.0, cause: str = "NORMAL_TEMPORARY_FAILURE") -> TargetBehaviour:
        """No usable answer from the far end (default 503-like NORMAL_TEMPORARY_FAILURE)."""
        return cls("unreachable", after_ms=after_ms, cause=cause, ring=False)

    @classmethod
    def reject(cls, cause: str, after_ms: float = 0.0, ring: bool = False) -> TargetBehaviour:
        """Fail with any hangup cause (CALL_REJECTED, UNALLOCATED_NUMBER, ...)."""
        return cls("reject", after_ms=after_ms, cause=cause, ring=ring)


@dataclass(frozen=True, slots=True)
class CallSpec:
    """One call the emulator places to an outbound-socket application.

    The channel looks like an INVITE from ``caller_id_number`` to ``destination``
    arriving on sofia profile ``profile`` and routed by the dialplan to
    ``socket <app host>:<port> <socket_args>``.
    """

    destination: str = "7100"
    caller_id_number: str = "1000"
    caller_id_name: str | None = None
    socket_args: str = "async full"
    context: str = "public"
    profile: str = "external"
    caller_host: str = "127.0.0.1"
    caller_port: int = 5070
    caller_hangup_after_ms: float | None = None
    dtmf: str = ""
    dtmf_duration_ms: int = 280
    uuid: str | None = None
    variables: Mapping[str, str] = field(default_factory=dict)
    faults: FaultConfig | None = None
    first_command_timeout_s: float | None = None
    playback_ms: float | None = None
    max_duration_s: float = 120.0


Disconnect = Literal[
    "linger-exit",
    "linger-timeout",
    "no-linger",
    "app-exit",
    "app-closed",
    "first-command-timeout",
    "reset",
    "killed",
    "stalled",
    "timeout",
    "connect-failed",
]


@dataclass(slots=True)
class CallResult:
    """What happened on one outbound-socket call (filled in while it runs)."""

    uuid: str
    commands: list[Command] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    bridged_to: str | None = None
    hangup_cause: str | None = None
    originate_disposition: str | None = None
    answered: bool = False
    digits_collected: str | None = None
    disconnect: Disconnect | None = None
    error: str | None = None
    resumed: bool = False
    variables: dict[str, str] = field(default_factory=dict)
    connected_at: float | None = None
    first_command_at: float | None = None
    bridge_command_at: float | None = None
    hangup_at: float | None = None
    closed_at: float | None = None


@dataclass(slots=True)
class OriginateRecord:
    """One ``originate`` the emulator received (``api`` or ``bgapi``), for tests to assert on.

    ``destination`` is the user part of the first leg (``+79001234567`` for
    ``sofia/gateway/ims/+79001234567``); ``variables`` are the ``{..}`` (and ``<..>``)
    variables; ``at`` is wall-clock (``time.time()``); ``result`` is the job's output line
    (``+OK <uuid>`` / ``-ERR <CAUSE>``) once the originate has finished.
    """

    command: str
    endpoints: tuple[str, ...]
    destination: str
    variables: dict[str, str]
    app: str
    at: float
    monotonic: float
    result: str | None = None

    @property
    def uuid(self) -> str | None:
        return self.variables.get("origination_uuid")


@dataclass(frozen=True, slots=True)
class RecordingRecord:
    """One ``record`` application run: where it would have written, and for how long."""

    uuid: str
    path: str
    ms: int
    completion_cause: str | None
    #: for an ``http_cache://`` path, the upload's HTTP status (0: no response); None otherwise
    uploaded: int | None = None


@dataclass(frozen=True, slots=True)
class ExecutionRecord:
    """One application a channel ran (``execute``), in order: what a test reads to see what a caller heard."""

    uuid: str
    app: str
    arg: str | None


@dataclass(frozen=True, slots=True)
class BridgeRecord:
    """A ``bridge`` whose B-leg answered: the legs, the B-leg's dial-string variables, and the A-leg callee's keys
    pressed during the conversation that reached the B-leg (``dtmf_passed``, as RFC 2833 when the leg asked
    ``dtmf_type=rfc2833``) or were held back by ``bridge_filter_dtmf`` (``dtmf_filtered``)."""

    a_uuid: str
    b_uuid: str
    endpoint: str
    leg_vars: dict[str, str]
    dtmf_passed: str
    dtmf_filtered: str
