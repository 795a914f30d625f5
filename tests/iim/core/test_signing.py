"""Standard Webhooks verification refuses every malformed header with its own error, never another exception."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iim.core.signing import MalformedSignature, SignatureError, decode_secret, sign_webhook, verify_webhook

SECRET = b"k" * 32


def _headers(signature: str) -> dict[str, str]:
    return {"webhook-id": "msg_1", "webhook-timestamp": "1700000000", "webhook-signature": signature}


@pytest.mark.parametrize("signature", ["v1,é", "v1,éé==", "v1,\u0660\u0661", "v1,AAAA\u00a0"])
def test_a_non_ascii_signature_is_malformed_not_a_server_error(signature: str) -> None:
    with pytest.raises(MalformedSignature):
        verify_webhook(_headers(signature), b"{}", [SECRET], now=1700000000)


def test_a_non_ascii_secret_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="not base64"):
        decode_secret("whsec_é" + "A" * 40)


@settings(max_examples=300, deadline=None)
@given(signature=st.text(max_size=200), msg_id=st.text(max_size=40), timestamp=st.text(max_size=14))
def test_any_header_text_gives_only_signature_errors(signature: str, msg_id: str, timestamp: str) -> None:
    headers = {"webhook-id": msg_id, "webhook-timestamp": timestamp, "webhook-signature": signature}
    try:
        verify_webhook(headers, b"{}", [SECRET], now=1700000000)
    except SignatureError:
        pass


def test_a_correct_signature_still_verifies() -> None:
    signature = sign_webhook("msg_1", 1700000000, b"{}", SECRET)
    assert verify_webhook(_headers(signature), b"{}", [SECRET], now=1700000000).msg_id == "msg_1"
