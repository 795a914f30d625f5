"""What home deliveries need from the other parts of IIM, as small protocols.

The messaging, TTS and connector packages are wired in by the service; these protocols keep this
package (and its tests) independent of their concrete classes. Only ``iim.connectors.contract`` - the
shared contract every connector implements - is imported directly.
"""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import datetime
from typing import Protocol
from uuid import UUID

from iim.connectors.contract import ConnectorLookup

__all__ = ["ConnectorLookup", "MoMessage", "RenderedSpeech", "SmsSink", "SpeechRenderer", "UrlSigner"]


class MoMessage(Protocol):
    """A stored mobile-originated SMS, as the messaging hook hands it over."""

    @property
    def sms_id(self) -> str: ...

    @property
    def source(self) -> str: ...

    @property
    def destination(self) -> str: ...  # our subscriber's MSISDN

    @property
    def body(self) -> str: ...

    @property
    def received_at(self) -> datetime: ...


class RenderedSpeech(Protocol):
    """A rendered prompt: ``key`` names the audio for :class:`UrlSigner`."""

    @property
    def key(self) -> str: ...

    @property
    def cached(self) -> bool: ...


class SpeechRenderer(Protocol):
    """Text to speech (``tts.EspeakTts``). May be sync (run in a thread) or async; raises when TTS is down."""

    def render(self, text: str, *, voice: str | None = None) -> RenderedSpeech | Awaitable[RenderedSpeech]: ...


class UrlSigner(Protocol):
    """A signed, expiring URL a vendor cloud can fetch the audio from (``tts.AudioUrlSigner``)."""

    def sign(self, key: str) -> str: ...


class SmsSink(Protocol):
    """Queue an SMS to a subscriber; ``key`` makes it idempotent (the same key is sent once)."""

    async def send(self, tenant_id: UUID, msisdn: str, text: str, key: str) -> None: ...
