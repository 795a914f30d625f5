"""Device presence from recorded FreeSWITCH registration events (i06)."""

from __future__ import annotations

from fs_app.esl import EslCodec, Event
from fs_app.registrations import presence_listener, registration_aor, registration_listener
from tests.conftest import transcript_stream


def _events() -> list[Event]:
    codec = EslCodec()
    out: list[Event] = []
    for chunk in transcript_stream("i06_sofia_register_events", "inbound"):
        out.extend(m for m in codec.feed(chunk) if isinstance(m, Event))
    return out


def test_register_unregister_and_expire_become_online_and_offline() -> None:
    changes = [found for e in _events() if (found := registration_aor(e)) is not None]
    assert changes == [
        ("1001@127.0.0.1", True),
        ("1001@127.0.0.1", False),
        ("1002@127.0.0.1", True),
        ("1002@127.0.0.1", False),
    ]


def test_listener_reports_each_change_to_the_sink() -> None:
    seen: list[tuple[str, bool]] = []
    listener = registration_listener(lambda aor, online: seen.append((aor, online)))
    for event in _events():
        listener(event)
    assert seen[-1] == ("1002@127.0.0.1", False)
    assert len(seen) == 4


def test_presence_hears_each_registration_with_its_lifetime_and_the_address_it_came_from() -> None:
    seen: list[tuple[str, bool, float | None, tuple[str, ...]]] = []
    listener = presence_listener(lambda aor, online, expires, sources: seen.append((aor, online, expires, sources)))
    for event in _events():
        listener(event)
    assert seen[0] == ("1001@127.0.0.1", True, 3600.0, ("127.0.0.1",))  # the recorded event's network-ip
    assert [(aor, online) for aor, online, _, _ in seen] == [
        ("1001@127.0.0.1", True), ("1001@127.0.0.1", False), ("1002@127.0.0.1", True), ("1002@127.0.0.1", False)]
