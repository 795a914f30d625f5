"""A channel: caller profile, ordered variables, state, and the CHANNEL_* events it fires.

Header order and header set follow ``switch_channel_event_set_data`` as the 1.10.12
recordings show it::

    [pre headers] Event-Name .. Event-Sequence [pre-data headers]
    Channel-State, Channel-Call-State, Channel-State-Number, Channel-Name, Unique-ID,
    Call-Direction, Presence-Call-Direction, Channel-HIT-Dialplan, Channel-Call-UUID,
    Answer-State, [Hangup-Cause], [Channel-Read/Write-Codec-*],
    Caller-*, [Other-Type, Other-Leg-*], [variable_*], [post headers]

Rendering is cheap by construction: every variable keeps its pre-encoded
``variable_x: value\\n`` line, the joined block is cached until a variable changes,
and the caller profile block is cached until the profile changes. An event nobody
listens to is not rendered at all (it only consumes an Event-Sequence number).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from fs_app.testing import wire
from fs_app.testing.core import EventStamp, EventView, SwitchCore
from fs_app.testing.wire import _ENCODE_CACHE as _ENCODED
from fs_app.testing.wire import encode_value

PROFILE_FIELDS: tuple[str, ...] = (
    "Direction", "Logical-Direction", "Username", "Dialplan", "Caller-ID-Name", "Caller-ID-Number",
    "Orig-Caller-ID-Name", "Orig-Caller-ID-Number", "Callee-ID-Name", "Callee-ID-Number", "Network-Addr",
    "ANI", "Destination-Number", "Unique-ID", "Source", "Context", "Channel-Name", "Profile-Index",
    "Profile-Created-Time", "Channel-Created-Time", "Channel-Answered-Time", "Channel-Progress-Time",
    "Channel-Progress-Media-Time", "Channel-Hangup-Time", "Channel-Transfer-Time", "Channel-Resurrect-Time",
    "Channel-Bridged-Time", "Channel-Last-Hold", "Channel-Hold-Accum", "Screen-Bit", "Privacy-Hide-Name",
    "Privacy-Hide-Number",
)
_TIME_FIELDS = frozenset(f for f in PROFILE_FIELDS if f.endswith(("-Time", "-Last-Hold", "-Hold-Accum")))
_ALWAYS = _TIME_FIELDS | {"Screen-Bit", "Privacy-Hide-Name", "Privacy-Hide-Number"}

STATE_NUMBERS = {
    "CS_NEW": 0, "CS_INIT": 1, "CS_ROUTING": 2, "CS_SOFT_EXECUTE": 3, "CS_EXECUTE": 4, "CS_EXCHANGE_MEDIA": 5,
    "CS_PARK": 6, "CS_CONSUME_MEDIA": 7, "CS_HIBERNATE": 8, "CS_RESET": 9, "CS_HANGUP": 10, "CS_REPORTING": 11,
    "CS_DESTROY": 12, "CS_NONE": 13,
}
CALL_STATE_NUMBERS = {
    "DOWN": 0, "DIALING": 1, "RINGING": 2, "EARLY": 3, "ACTIVE": 4, "HELD": 5, "RING_WAIT": 6, "HANGUP": 7,
    "UNHELD": 8,
}
_CODEC_PLAIN = (
    "Channel-Read-Codec-Name: PCMU\nChannel-Read-Codec-Rate: 8000\nChannel-Read-Codec-Bit-Rate: 64000\n"
    "Channel-Write-Codec-Name: PCMU\nChannel-Write-Codec-Rate: 8000\nChannel-Write-Codec-Bit-Rate: 64000\n"
)
_CODEC_PAIRS = [
    ("Channel-Read-Codec-Name", "PCMU"), ("Channel-Read-Codec-Rate", "8000"),
    ("Channel-Read-Codec-Bit-Rate", "64000"), ("Channel-Write-Codec-Name", "PCMU"),
    ("Channel-Write-Codec-Rate", "8000"), ("Channel-Write-Codec-Bit-Rate", "64000"),
]


# switch_caller_get_field_by_name: variable name -> caller profile field.
_PROFILE_LOOKUP = {
    "dialplan": "Dialplan", "username": "Username", "caller_id_name": "Caller-ID-Name", "ani": "ANI",
    "caller_id_number": "Caller-ID-Number", "network_addr": "Network-Addr", "destination_number": "Destination-Number",
    "uuid": "Unique-ID", "source": "Source", "context": "Context", "chan_name": "Channel-Name",
    "profile_index": "Profile-Index", "orig_caller_id_name": "Orig-Caller-ID-Name",
    "orig_caller_id_number": "Orig-Caller-ID-Number", "callee_id_name": "Callee-ID-Name",
    "callee_id_number": "Callee-ID-Number", "profile_created_time": "Profile-Created-Time",
    "created_time": "Channel-Created-Time", "answered_time": "Channel-Answered-Time",
    "progress_time": "Channel-Progress-Time", "progress_media_time": "Channel-Progress-Media-Time",
    "hungup_time": "Channel-Hangup-Time", "transfer_time": "Channel-Transfer-Time",
}


def now_us() -> int:
    return int(time.time() * 1_000_000)


class CallerProfile:
    """A caller profile; empty optional fields are omitted, as FreeSWITCH omits them.

    Each field keeps its encoded line with a placeholder prefix (``\x00-Field: value``);
    rendering for a prefix (Caller, Channel, Other-Leg) is one ``str.replace``.
    """

    __slots__ = ("_cache", "_lines", "_template", "_values")

    def __init__(self, values: dict[str, str]) -> None:
        self._values: dict[str, str] = {}
        self._lines: dict[str, str] = {}
        self._cache: dict[str, str] = {}
        self._template: str | None = None
        for field in PROFILE_FIELDS:
            value = values.get(field)
            if value is None and field in _ALWAYS:
                value = "0" if field in _TIME_FIELDS else ("true" if field == "Screen-Bit" else "false")
            if value is not None and (value != "" or field in _ALWAYS):
                self._values[field] = value
                self._lines[field] = f"\x00-{field}: {encode_value(value)}\n"

    def get(self, field: str) -> str | None:
        return self._values.get(field)

    def set(self, field: str, value: str | None) -> None:
        """Set (or with None/"" drop) a field, keeping FreeSWITCH's field order."""
        self._cache.clear()
        self._template = None
        if not value and field not in _ALWAYS:
            self._values.pop(field, None)
            self._lines.pop(field, None)
            return
        value = value or "0"
        line = f"\x00-{field}: {encode_value(value)}\n"
        if field in self._values:
            self._values[field] = value
            self._lines[field] = line
            return
        values: dict[str, str] = {}
        lines: dict[str, str] = {}
        for name in PROFILE_FIELDS:
            if name == field:
                values[name] = value
                lines[name] = line
            elif name in self._values:
                values[name] = self._values[name]
                lines[name] = self._lines[name]
        self._values = values
        self._lines = lines

    def copy(self, drop: Iterable[str] = ()) -> CallerProfile:
        dropped = tuple(drop)
        clone = CallerProfile.__new__(CallerProfile)
        clone._values = dict(self._values)
        clone._lines = dict(self._lines)
        clone._cache = {}
        clone._template = None if dropped else self._template
        for name in dropped:
            clone._values.pop(name, None)
            clone._lines.pop(name, None)
        return clone

    def render(self, prefix: str) -> str:
        cached = self._cache.get(prefix)
        if cached is None:
            template = self._template
            if template is None:
                template = self._template = "".join(self._lines.values())
            cached = self._cache[prefix] = template.replace("\x00", prefix)
        return cached

    def pairs(self, prefix: str) -> list[tuple[str, str]]:
        return [(f"{prefix}-{k}", v) for k, v in self._values.items()]


class Channel:
    """One FreeSWITCH session as seen through its events."""

    def __init__(
        self,
        core: SwitchCore,
        *,
        uuid: str,
        name: str,
        direction: str,
        profile: CallerProfile,
        variables: Iterable[tuple[str, str]],
        state: str = "CS_EXECUTE",
        call_state: str = "RINGING",
        answer_state: str = "ringing",
        hit_dialplan: bool = True,
        created_us: int | None = None,
    ) -> None:
        self.core = core
        self.uuid = uuid
        self.name = name
        self._name_enc = encode_value(name)
        self.direction = direction
        self.profile = profile
        self.state = state
        self.state_number = STATE_NUMBERS[state]
        self.call_state = call_state
        self.answer_state = answer_state
        self.hit_dialplan = "true" if hit_dialplan else "false"
        self.hangup_cause: str | None = None
        self.media = False
        self.other_type: str | None = None
        self.other: CallerProfile | None = None
        self.created_us = created_us or now_us()
        self.answered_us = 0
        self.progress_us = 0
        self.progress_media_us = 0
        self.bridged_us = 0
        self.hangup_us = 0
        self.last_app: str | None = None
        self.last_arg: str | None = None
        self.hangup_disposition: str | None = None
        self.vars: dict[str, str] = {}
        self._lines: dict[str, str] = {}
        self._block: str | None = None
        self.set_vars(variables)

    # --------------------------------------------------------------- variables

    @property
    def up(self) -> bool:
        return self.hangup_cause is None

    @property
    def answered(self) -> bool:
        return self.answered_us != 0

    def get_var(self, name: str) -> str | None:
        return self.vars.get(name)

    def lookup(self, name: str) -> str | None:
        """``switch_channel_get_variable``: channel variables, then caller-profile fields."""
        value = self.vars.get(name)
        if value is not None:
            return value
        field = _PROFILE_LOOKUP.get(name)
        if field is not None:
            return self.profile.get(field) or None
        return None

    def set_var(self, name: str, value: str | None) -> None:
        """Set a variable (moving it to the end, like FreeSWITCH); None deletes it."""
        vars_ = self.vars
        lines = self._lines
        if name in vars_:
            del vars_[name]
            del lines[name]
        if value is not None:
            vars_[name] = value
            encoded = _ENCODED.get(value)
            lines[name] = f"variable_{name}: {encoded if encoded is not None else encode_value(value)}\n"
        self._block = None

    def adopt(self, prototype: Channel, overrides: Iterable[tuple[str, str]]) -> None:
        """Take a copy of ``prototype``'s variables, replacing some values where they stand."""
        self.vars = dict(prototype.vars)
        self._lines = dict(prototype._lines)
        self._block = None
        for name, value in overrides:
            self.set_var_in_place(name, value)

    def set_var_in_place(self, name: str, value: str) -> None:
        """Change a variable's value without moving it (how originate updates its result vars)."""
        if name not in self.vars:
            self.set_var(name, value)
            return
        self.vars[name] = value
        self._lines[name] = f"variable_{name}: {encode_value(value)}\n"
        self._block = None

    def set_vars(self, items: Iterable[tuple[str, str | None]]) -> None:
        """Many :meth:`set_var` in one go (the hot path: templates, media, CDR)."""
        vars_ = self.vars
        lines = self._lines
        cache = _ENCODED
        for name, value in items:
            if name in vars_:
                del vars_[name]
                del lines[name]
            if value is not None:
                vars_[name] = value
                encoded = cache.get(value)
                if encoded is None:
                    encoded = value if value.isdigit() and value.isascii() else encode_value(value)
                lines[name] = f"variable_{name}: {encoded}\n"
        self._block = None

    def var_block(self) -> str:
        block = self._block
        if block is None:
            block = self._block = "".join(self._lines.values())
        return block

    # ------------------------------------------------------------------ states

    def set_state(self, state: str) -> None:
        self.state = state
        self.state_number = STATE_NUMBERS[state]

    def set_call_state(self, call_state: str) -> None:
        """Change the call state and fire CHANNEL_CALLSTATE, as switch_channel_set_callstate does."""
        original = self.call_state
        if original == call_state:
            return
        self.call_state = call_state
        self.fire(
            "CHANNEL_CALLSTATE",
            pre_data=(("Original-Channel-Call-State", original),
                      ("Channel-Call-State-Number", str(CALL_STATE_NUMBERS[call_state]))),
            with_vars=False,
        )

    # ------------------------------------------------------------------ events

    def _data_plain(self, hangup_in_data: bool) -> str:
        text = (
            f"Channel-State: {self.state}\nChannel-Call-State: {self.call_state}\n"
            f"Channel-State-Number: {self.state_number}\nChannel-Name: {self._name_enc}\n"
            f"Unique-ID: {self.uuid}\nCall-Direction: {self.direction}\n"
            f"Presence-Call-Direction: {self.direction}\nChannel-HIT-Dialplan: {self.hit_dialplan}\n"
            f"Channel-Call-UUID: {self.uuid}\nAnswer-State: {self.answer_state}\n"
        )
        if hangup_in_data and self.hangup_cause is not None:
            text += f"Hangup-Cause: {self.hangup_cause}\n"
        if self.media:
            text += _CODEC_PLAIN
        return text

    def _data_pairs(self, hangup_in_data: bool) -> list[tuple[str, str]]:
        pairs = [
            ("Channel-State", self.state), ("Channel-Call-State", self.call_state),
            ("Channel-State-Number", str(self.state_number)), ("Channel-Name", self.name),
            ("Unique-ID", self.uuid), ("Call-Direction", self.direction),
            ("Presence-Call-Direction", self.direction), ("Channel-HIT-Dialplan", self.hit_dialplan),
            ("Channel-Call-UUID", self.uuid), ("Answer-State", self.answer_state),
        ]
        if hangup_in_data and self.hangup_cause is not None:
            pairs.append(("Hangup-Cause", self.hangup_cause))
        if self.media:
            pairs.extend(_CODEC_PAIRS)
        return pairs

    def fire(
        self,
        name: str,
        *,
        pre: Sequence[tuple[str, str]] = (),
        pre_data: Sequence[tuple[str, str]] = (),
        post: Sequence[tuple[str, str]] = (),
        with_vars: bool = True,
        hangup_in_data: bool = True,
        body: str | None = None,
    ) -> None:
        """Create and route one channel event (rendered only if someone wants it)."""
        core = self.core
        seq = core.next_seq()
        if not core.wants(self.uuid, name):
            return
        core.dispatch(ChannelEvent(self, name, seq, core.clock.stamp(), pre, pre_data, post, with_vars,
                                   hangup_in_data, body))

    def render_plain(self, event: ChannelEvent) -> str:
        parts = [wire.plain_line(k, v) for k, v in event.pre] if event.pre else []
        parts.append(self.core.std_plain(event.name, event.seq, event.stamp))
        for k, v in event.pre_data:
            parts.append(wire.plain_line(k, v))
        parts.append(self._data_plain(event.hangup_in_data))
        parts.append(self.profile.render("Caller"))
        if self.other is not None and self.other_type is not None:
            parts.append(f"Other-Type: {self.other_type}\n")
            parts.append(self.other.render("Other-Leg"))
        if event.with_vars:
            parts.append(self.var_block())
        for k, v in event.post:
            parts.append(wire.plain_line(k, v))
        body = event.body
        if body is not None:
            parts.append(f"Content-Length: {len(body.encode())}\n\n{body}")
        else:
            parts.append("\n")
        return "".join(parts)

    def render_pairs(self, event: ChannelEvent) -> list[tuple[str, str]]:
        out = list(event.pre)
        out += self.core.std_pairs(event.name, event.seq, event.stamp)
        out += event.pre_data
        out += self._data_pairs(event.hangup_in_data)
        out += self.profile.pairs("Caller")
        if self.other is not None and self.other_type is not None:
            out.append(("Other-Type", self.other_type))
            out += self.other.pairs("Other-Leg")
        if event.with_vars:
            out += [(f"variable_{k}", v) for k, v in self.vars.items()]
        out += event.post
        return out

    def channel_data(self, *, async_mode: bool, full: bool) -> bytes:
        """The outbound ``connect`` reply: CHANNEL_DATA serialised as a command/reply header block."""
        core = self.core
        seq = core.next_seq()
        text = (
            core.std_plain("CHANNEL_DATA", seq, core.clock.stamp())
            + self.profile.render("Channel")
            + self._data_plain(True)
            + self.profile.render("Caller")
        )
        if self.other is not None and self.other_type is not None:
            text += f"Other-Type: {self.other_type}\n" + self.other.render("Other-Leg")
        text += self.var_block() + wire.connect_reply_trailer(async_mode=async_mode, full=full)
        return text.encode()

    # ------------------------------------------------------- semantic changes

    def ring_ready(self) -> None:
        """Remote side rings (180): CHANNEL_PROGRESS."""
        if self.progress_us:
            return
        self.progress_us = now_us()
        self.profile.set("Channel-Progress-Time", str(self.progress_us))
        self.fire("CHANNEL_PROGRESS")

    def pre_answer(self, media: Iterable[tuple[str, str]]) -> None:
        """Early media: CHANNEL_PROGRESS_MEDIA, then call state EARLY."""
        if self.progress_media_us or self.answered_us:
            return
        self.set_vars(media)
        self.set_var("endpoint_disposition", "EARLY MEDIA")
        self.media = True
        self.progress_media_us = now_us()
        self.profile.set("Channel-Progress-Media-Time", str(self.progress_media_us))
        self.answer_state = "early"
        self.fire("CHANNEL_PROGRESS_MEDIA")
        self.set_call_state("EARLY")

    def mark_answered(self, extra: Iterable[tuple[str, str]] = ()) -> None:
        """CHANNEL_ANSWER, then call state ACTIVE."""
        if self.answered_us:
            return
        self.set_vars(extra)
        self.media = True
        self.answered_us = now_us()
        self.profile.set("Channel-Answered-Time", str(self.answered_us))
        self.answer_state = "answered"
        self.fire("CHANNEL_ANSWER")
        self.set_call_state("ACTIVE")

    def mark_hangup(self, cause: str, extra: Iterable[tuple[str, str]] = ()) -> bool:
        """Start the hangup: CHANNEL_HANGUP. Returns False if the channel was already down."""
        if self.hangup_cause is not None:
            return False
        self.hangup_cause = cause
        self.hangup_us = now_us()
        self.state_number = STATE_NUMBERS["CS_HANGUP"]
        self.answer_state = "hangup"
        self.profile.set("Channel-Hangup-Time", str(self.hangup_us))
        if self.other is not None:
            self.other.set("Channel-Hangup-Time", str(self.hangup_us))
        self.set_vars(extra)
        self.fire("CHANNEL_HANGUP")
        return True


class ChannelEvent(EventView):
    """A CHANNEL_* event; renders from its channel while the channel is in the state it describes."""

    __slots__ = ("channel", "hangup_in_data", "post", "pre", "pre_data", "stamp", "with_vars")

    def __init__(
        self,
        channel: Channel,
        name: str,
        seq: int,
        stamp: EventStamp,
        pre: Sequence[tuple[str, str]],
        pre_data: Sequence[tuple[str, str]],
        post: Sequence[tuple[str, str]],
        with_vars: bool,
        hangup_in_data: bool,
        body: str | None,
    ) -> None:
        super().__init__(name, seq, unique_id=channel.uuid, body=body)
        self.channel = channel
        self.stamp = stamp
        self.pre = pre
        self.pre_data = pre_data
        self.post = post
        self.with_vars = with_vars
        self.hangup_in_data = hangup_in_data

    def render_plain(self) -> str:
        return self.channel.render_plain(self)

    def render_pairs(self) -> list[tuple[str, str]]:
        return self.channel.render_pairs(self)
