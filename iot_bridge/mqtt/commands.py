"""Operator commands to local hubs over MQTT, and the hubs' answers to them.

A command is one of a fixed allow-list (:data:`COMMANDS`), each with its own typed arguments, and carries an id
the client chose: the same id again (for the same hub) is answered from the first one's row and publishes
nothing; with another command or other arguments it is a conflict. A new command is published at QoS 1 to
``{prefix}/{tenant}/{hub}/cmd`` inside the transaction that records it, and the row commits only once the
broker acknowledged the PUBLISH (its PUBACK): a broker that is not connected, or that does not take the
command in time, leaves no row (:class:`MqttUnavailable`) and the id free for the retry. If the commit then
fails the hub may see the command twice: hubs treat ``id`` as the command's idempotency key.

The hub answers on ``{prefix}/{tenant}/{hub}/cmd-ack`` (the broker's ACL lets it write only its own):
``{"id": ..., "status": "accepted" | "done" | "failed" | "rejected", "detail": ...}``. The topic is the hub's
identity (its client certificate, as for its events); an answer moves the command from ``sent`` to
``accepted`` and then to one final state, never back, and is audited with the hub as actor.

A hub's commands are listed newest first (:func:`list_commands`), a page at a time with an opaque cursor, and
kept as long as the tenant's retention says (``hub_command_s``; the purge is :mod:`iim.privacy.purger`'s).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal, Protocol
from uuid import UUID

import asyncpg
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from iim.core import cursor
from iot_bridge.events import ID_PATTERN
from iot_bridge.mqtt import store
from policy_cache import audit
from policy_cache.db import Connection

__all__ = ["ACK_STATES", "COMMANDS", "CommandConflict", "CommandPublisher", "HubAck", "HubCommandBody",
           "HubCommandPage", "HubCommandQuery", "HubCommandRecord", "HubDisabled", "MqttUnavailable",
           "UnknownCommand", "UnknownHub", "command_payload", "decode_cursor", "encode_cursor", "get_command",
           "list_commands", "read_ack", "record_ack", "send_command"]

_ID = re.compile(ID_PATTERN)
#: The biggest answer a hub may send (an id, a status and a short detail fit many times over).
MAX_ACK_BYTES = 2048

CommandId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
CommandName = Literal["arm", "disarm", "silence", "test", "reboot"]
AckState = Literal["accepted", "done", "failed", "rejected"]
ACK_STATES: tuple[str, ...] = ("accepted", "done", "failed", "rejected")
CommandState = Literal["sent", "accepted", "done", "failed", "rejected"]
Detail = Annotated[str, StringConstraints(min_length=1, max_length=500, pattern=r"^[^\x00-\x1f\x7f]+$")]


class MqttUnavailable(Exception):
    """No connection to the broker right now, or the broker did not take the command in time (not sent)."""


class UnknownHub(LookupError):
    """No hub of that id in the tenant (another tenant's hub included: the same answer)."""


class HubDisabled(Exception):
    """The hub is disabled in the registry: it gets no commands."""


class UnknownCommand(LookupError):
    """No command of that id was sent to the hub."""


class CommandConflict(Exception):
    """The id was used for another command (or other arguments) before."""


class _Arguments(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ArmArguments(_Arguments):
    mode: Literal["away", "stay", "night"] = Field(default="away", description="the arming mode")


class SilenceArguments(_Arguments):
    duration_s: int = Field(default=300, ge=10, le=3600, description="how long sounders stay silent")


class TestArguments(_Arguments):
    device: CommandId | None = Field(default=None, description="one of the hub's devices; none: the hub itself")


class NoArguments(_Arguments):
    pass


#: What hubs accept (the allow-list): each command's arguments.
COMMANDS: Mapping[str, type[_Arguments]] = {
    "arm": ArmArguments, "disarm": NoArguments, "silence": SilenceArguments, "test": TestArguments,
    "reboot": NoArguments,
}


class HubCommandBody(BaseModel):
    """``POST .../hubs/{hub}/commands``: the client's id for it, the command and its arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: CommandId = Field(description="the client's id for this command: a repeat returns the first result")
    name: CommandName = Field(description="arm, disarm, silence, test or reboot")
    arguments: dict[Annotated[str, StringConstraints(max_length=32)], str | int | bool] = Field(
        default_factory=dict, max_length=4,
        description="arm: mode (away, stay, night; default away); silence: duration_s (10..3600, default 300); "
                    "test: device (one of the hub's devices; default the hub); disarm, reboot: none")

    @field_validator("arguments")
    @classmethod
    def _typed(cls, value: dict[str, str | int | bool], info: ValidationInfo) -> dict[str, str | int | bool]:
        name = info.data.get("name")
        if name is not None:
            _resolve(str(name), value)
        return value

    def resolved_arguments(self) -> dict[str, Any]:
        """The arguments with their defaults, as the hub gets them and the row keeps them."""
        return _resolve(self.name, self.arguments)


def _resolve(name: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
    try:
        parsed = COMMANDS[name].model_validate(dict(arguments))
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"not arguments of {name}: {reasons}") from None
    return parsed.model_dump(exclude_none=True)


class HubCommandRecord(BaseModel):
    """A command as sent, and what the hub answered so far."""

    model_config = ConfigDict(extra="forbid")

    id: str
    hub: str
    name: CommandName
    arguments: dict[str, Any]
    state: CommandState = Field(description="sent (the broker took it), then the hub's answer: accepted, then done, "
                                            "failed or rejected")
    actor: str
    sent_at: datetime
    acked_at: datetime | None = Field(description="when the hub's last answer was recorded")
    ack_detail: str | None = Field(description="the hub's words with its answer")

    @classmethod
    def of(cls, hub: str, row: asyncpg.Record) -> HubCommandRecord:
        return cls(id=row["command_id"], hub=hub, name=row["name"], arguments=dict(row["arguments"]),
                   state=row["state"], actor=row["actor"], sent_at=row["sent_at"], acked_at=row["acked_at"],
                   ack_detail=row["ack_detail"])


def encode_cursor(sent_at: datetime, command_id: str) -> str:
    """The page cursor after a command (its time and id, newest first)."""
    return cursor.encode_cursor(sent_at, command_id)


def decode_cursor(text: str) -> tuple[datetime, str]:
    """Raises ValueError for anything :func:`encode_cursor` did not make."""
    at, command_id = cursor.decode_cursor(text)
    if not _ID.fullmatch(command_id):
        raise ValueError("not a cursor this API gave")
    return at, command_id


class HubCommandQuery(BaseModel):
    """Filters of ``GET .../hubs/{hub}/commands``, newest first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state: CommandState | None = Field(default=None, description="only commands in this state")
    limit: int = Field(default=50, ge=1, le=500, description="page size")
    after: str | None = Field(default=None, max_length=400, pattern=r"^[A-Za-z0-9_-]+$",
                              description="the next_after of the previous page")

    @field_validator("after")
    @classmethod
    def _cursor(cls, value: str | None) -> str | None:
        if value is not None:
            decode_cursor(value)
        return value


class HubCommandPage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[HubCommandRecord] = Field(description="newest first")
    next_after: str | None = Field(description="pass as ?after= for the next page; null on the last one")


class HubAck(BaseModel):
    """A hub's answer to a command, on its ``cmd-ack`` topic."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: CommandId
    status: AckState
    detail: Detail | None = None


class CommandPublisher(Protocol):
    """The MQTT side (:class:`~iot_bridge.mqtt.ingress.MqttIngress`)."""

    @property
    def connected(self) -> bool: ...

    async def publish_command(self, tenant: UUID, hub_id: str, payload: bytes) -> None: ...


def command_payload(record: HubCommandRecord) -> bytes:
    """What the hub reads on its ``cmd`` topic."""
    return json.dumps({"id": record.id, "name": record.name, "arguments": record.arguments,
                       "sent_at": record.sent_at.isoformat()}, separators=(",", ":")).encode()


async def _hub(conn: Connection, hub: str) -> asyncpg.Record:
    found = await store.find_hub(conn, hub) if _ID.fullmatch(hub) else None
    if found is None:
        raise UnknownHub(hub)
    return found


async def send_command(conn: Connection, publisher: CommandPublisher | None, tenant_id: UUID, hub: str,
                       body: HubCommandBody, *, actor: str, correlation: Mapping[str, Any] | None = None,
                       ) -> tuple[HubCommandRecord, bool]:
    """Send ``body`` to ``hub`` in the caller's tenant transaction: (the command, whether it is a repeat).

    Raises:
        UnknownHub, HubDisabled, CommandConflict: nothing was sent.
        MqttUnavailable: nothing was sent; the caller's transaction must roll back (a row may be staged).
    """
    device = await _hub(conn, hub)
    if not device["enabled"]:
        raise HubDisabled(hub)
    arguments = body.resolved_arguments()
    row = await store.find_command(conn, device["id"], body.id)
    if row is None:
        if publisher is None or not publisher.connected:
            raise MqttUnavailable("not connected to the MQTT broker")
        row = await store.insert_command(conn, device["id"], body.id, body.name, arguments, actor)
        if row is not None:
            record = HubCommandRecord.of(hub, row)
            await publisher.publish_command(tenant_id, hub, command_payload(record))
            await audit.append(conn, tenant_id, actor=actor, action="hub_command.send", entity="device",
                               entity_id=device["id"], correlation=correlation,
                               detail={"hub": hub, "command_id": body.id, "command": body.name,
                                       "arguments": arguments})
            return record, False
        row = await store.find_command(conn, device["id"], body.id)  # a concurrent request took the id
        assert row is not None
    if row["name"] != body.name or dict(row["arguments"]) != arguments:
        raise CommandConflict(f"command id {body.id!r} was used for another command to this hub")
    return HubCommandRecord.of(hub, row), True


async def get_command(conn: Connection, hub: str, command_id: str) -> HubCommandRecord:
    """The command ``command_id`` sent to ``hub``.

    Raises:
        UnknownHub, UnknownCommand
    """
    device = await _hub(conn, hub)
    row = await store.find_command(conn, device["id"], command_id) if _ID.fullmatch(command_id) else None
    if row is None:
        raise UnknownCommand(command_id)
    return HubCommandRecord.of(hub, row)


async def list_commands(conn: Connection, hub: str, query: HubCommandQuery, limit: int) -> HubCommandPage:
    """A page of the commands sent to ``hub``, newest first (at most ``limit``).

    Raises:
        UnknownHub
    """
    device = await _hub(conn, hub)
    after = decode_cursor(query.after) if query.after is not None else None
    rows = await store.list_commands(conn, device["id"], state=query.state, after=after, limit=limit)
    items = [HubCommandRecord.of(hub, row) for row in rows]
    last = items[-1] if len(items) >= limit else None
    return HubCommandPage(items=items, next_after=encode_cursor(last.sent_at, last.id) if last is not None else None)


def read_ack(payload: bytes) -> HubAck | None:
    """The hub's answer, or None for one that is not an answer (too big, not JSON, not the fields above)."""
    if len(payload) > MAX_ACK_BYTES:
        return None
    try:
        return HubAck.model_validate_json(payload)
    except ValidationError:
        return None


async def record_ack(conn: Connection, hub: str, ack: HubAck) -> bool:
    """Record the hub's answer in the caller's tenant transaction; whether it moved the command on."""
    row = await store.record_ack(conn, hub, ack.id, ack.status, ack.detail)
    if row is None:
        return False
    await audit.stage(conn, actor=f"hub:{hub}", action="hub_command.ack", entity="device", entity_id=row["device_id"],
                      detail={"hub": hub, "command_id": ack.id, "command": row["name"], "status": ack.status})
    return True
