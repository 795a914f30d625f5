"""Operators register alarm panels' SIA DC-09 accounts through the admin API (real PostgreSQL, real socket):
audited with the actor, checked at the boundary (a 422, never a 5xx), a key only by reference, per tenant."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import pytest

from tests.iim.admin.test_admin_api import Api, _assert_problem, _audit, api

__all__ = ["api"]

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def _device(api: Api) -> str:
    status, home, _ = await api.call("POST", api.t(api.tenant_a, "/households"),
                                     body={"name": "Alarm flat", "time_zone": "Europe/Moscow"})
    assert status == 201, home
    status, device, _ = await api.call("POST", api.t(api.tenant_a, "/devices"), body={
        "household_id": home["id"], "name": "Alarm panel", "type": "hub", "external_id": f"panel-{uuid4().hex[:12]}"})
    assert status == 201, device
    device_id: str = device["id"]
    return device_id


async def test_operator_registers_a_panel_account_and_the_change_is_audited(api: Api) -> None:
    device = await _device(api)
    status, account, _ = await api.call("POST", api.t(api.tenant_a, "/sia-accounts"), "op-a", body={
        "account": "12ab34", "device_id": device, "line": "7", "key_ref": "env:PANEL_12AB34_KEY"})
    assert status == 201, account
    assert (account["account"], account["line"], account["receiver"], account["enabled"]) == ("12AB34", "7", None,
                                                                                             True)
    entries = await _audit(api, api.tenant_a, account["id"])
    assert [(e["action"], e["actor"]) for e in entries] == [("sia_account.create", "alice@tenant-a")]
    status, page, _ = await api.call("GET", api.t(api.tenant_a, "/sia-accounts"), "op-a",
                                     params={"device_id": device})
    assert (status, [a["account"] for a in page["items"]]) == (200, ["12AB34"])
    status, other, _ = await api.call("GET", api.t(api.tenant_a, f"/sia-accounts/{account['id']}"), "op-b")
    assert status in (403, 404), other  # another tenant's operator cannot read it


@pytest.mark.parametrize("body", [
    {"account": "XYZ"},  # not hex
    {"account": "12"},  # too short
    {"key_ref": "vault:kv/panel"},  # env: or file: only
    {"key_ref": "00112233445566778899AABBCCDDEEFF"},  # a key itself, not a reference
    {"line": "1234567"},
])
async def test_bad_account_fields_are_a_422(api: Api, body: dict[str, Any]) -> None:
    device = await _device(api)
    status, problem, resp = await api.call("POST", api.t(api.tenant_a, "/sia-accounts"),
                                           body={"account": "ABCDEF", "device_id": device, **body})
    _assert_problem(status, problem, resp, 422, "validation-failed")


async def test_one_account_number_twice_in_a_tenant_is_a_conflict(api: Api) -> None:
    device = await _device(api)
    first, _, _ = await api.call("POST", api.t(api.tenant_a, "/sia-accounts"), body={"account": "C0FFEE",
                                                                                      "device_id": device})
    assert first == 201
    status, problem, _ = await api.call("POST", api.t(api.tenant_a, "/sia-accounts"),
                                        body={"account": "c0ffee", "device_id": device})
    assert status == 409, problem
