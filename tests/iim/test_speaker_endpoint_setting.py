"""``IIM_SPEAKER_ENDPOINT``: how speaker legs are dialled (the switch's directory or the Kamailio edge). It goes
into every dial string, so only the documented placeholders and no dial string syntax are accepted."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from iim.settings import Settings


@pytest.mark.parametrize("endpoint", ["user/{aor}", "sofia/external/{aor};fs_path=sip:10.0.0.2:5060",
                                      "sofia/external/{user}@10.0.0.2:5060"])
def test_directory_and_edge_endpoints_are_accepted(endpoint: str) -> None:
    assert Settings(speaker_endpoint=endpoint).speaker_endpoint == endpoint


@pytest.mark.parametrize(("endpoint", "why"), [
    ("sofia/external/10.0.0.2", "must contain"),
    ("sofia/{host}/{aor}", "may only use"),
    ("user/{aor},sofia/gateway/ims/900", "separators"),
    ("user/{aor}|user/1000", "separators"),
    ("[x=1]user/{aor}", "separators"),
    ("user/{aor} x", "separators"),
])
def test_an_endpoint_that_could_change_the_dial_string_is_refused(endpoint: str, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        Settings(speaker_endpoint=endpoint)
