"""``IIM_REGISTRAR_*``: presence from the Kamailio edge's registrations. The edge's time zone goes into every
reconcile query (``expires AT TIME ZONE``): a name PostgreSQL would refuse must stop the start, not loop the
reconciler on errors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from iim.settings import Settings


def test_presence_from_the_edge_is_on_by_default_with_the_edge_in_utc() -> None:
    settings = Settings()
    assert (settings.registrar_presence, settings.registrar_edge_time_zone) == (True, "UTC")


@pytest.mark.parametrize("zone", ["Europe/Moscow", "Asia/Vladivostok"])
def test_an_iana_zone_is_accepted(zone: str) -> None:
    assert Settings(registrar_edge_time_zone=zone).registrar_edge_time_zone == zone


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "", "../etc/passwd"])
def test_an_unknown_zone_is_refused(zone: str) -> None:
    with pytest.raises(ValidationError, match="unknown time zone"):
        Settings(registrar_edge_time_zone=zone)
