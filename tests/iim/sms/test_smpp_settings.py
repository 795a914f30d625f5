"""An SMSC account that SMPP 3.4 cannot bind is refused at configuration, naming the field, not the secret."""

from __future__ import annotations

import pytest

from iim.sms.smpp import SmppSettings


@pytest.mark.parametrize(("field", "value", "most"), [
    ("password", "nine-char", 8), ("system_id", "a-system-id-of-16", 15), ("system_type", "thirteen-char", 12),
])
def test_a_bind_field_longer_than_smpp_allows_is_a_configuration_error(field: str, value: str, most: int) -> None:
    account = {"host": "127.0.0.1", "port": 2775, "system_id": "iim", "password": "secret", field: value}
    with pytest.raises(ValueError, match=rf"SMPP {field} is longer than SMPP 3.4 allows \({most} characters\)") as err:
        SmppSettings(**account)  # type: ignore[arg-type]
    assert value not in str(err.value)


def test_a_non_ascii_password_is_refused() -> None:
    with pytest.raises(ValueError, match="SMPP password must be ASCII"):
        SmppSettings(host="127.0.0.1", port=2775, system_id="iim", password="пароль")


def test_fields_at_the_limit_are_accepted() -> None:
    SmppSettings(host="127.0.0.1", port=2775, system_id="a" * 15, password="b" * 8, system_type="c" * 12)
