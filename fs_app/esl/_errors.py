"""ESL error hierarchy.

    EslError
    +-- LocalProtocolError      we asked for something illegal (bad command, injection)
    |   +-- EslInjectionError   a value would have smuggled CR/LF into the framing
    +-- RemoteProtocolError     the peer sent bytes that are not ESL
    |   +-- UnexpectedReply     a reply arrived with no command outstanding (EslSession)
    +-- EslConnectionError      the transport went away (driver level)
        +-- EslTimeout          the peer did not answer in time
"""

from __future__ import annotations

from typing import Any


class EslError(Exception):
    """Root of every error the ESL layer raises."""


class LocalProtocolError(EslError):
    """Our side tried to send something the protocol does not allow."""


class EslInjectionError(LocalProtocolError):
    """A command line or header value contains CR or LF (ESL header injection)."""


class RemoteProtocolError(EslError):
    """The peer sent a frame we cannot parse; the stream cannot be trusted after it.

    ``messages`` holds what the failing ``feed()`` call decoded before the bad frame
    (the decoder's output type; empty when raised elsewhere).
    """

    messages: list[Any]

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.messages = []


class UnexpectedReply(RemoteProtocolError):
    """A reply arrived with no command outstanding: the reply FIFO cannot be trusted any more."""


class EslConnectionError(EslError):
    """The connection is closed or broke while a command was outstanding."""


class EslTimeout(EslConnectionError):
    """The peer did not answer a command (or complete an application) in time."""
