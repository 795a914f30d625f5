"""The registry (tenants, households, subscribers, devices, bindings, consents, policies, scenarios,
credential references): each table described once (:mod:`.tables`), one generic CRUD driven by those
descriptions (:mod:`.crud`), and the few operations only some entities have (:mod:`.operations`)::

    from policy_cache import registry
    async with tenant_tx(pool, tenant_id) as conn:
        home = await registry.create(conn, registry.HOUSEHOLD, HouseholdCreate(...), actor="ops@a")
        devices = await registry.list_rows(conn, registry.DEVICE, household_id=home.id)
"""

from policy_cache.registry.crud import (
    Correlation,
    create,
    delete,
    get,
    list_rows,
    revoke,
    row_values,
    store_errors,
    update,
)
from policy_cache.registry.operations import (
    get_numbering_plan,
    get_originate_plan,
    get_policy_for,
    get_subscriber_by_msisdn,
    plan_of,
    set_device_status,
    set_presence,
)
from policy_cache.registry.tables import (
    BINDING,
    BRAND,
    BY_NAME,
    CONSENT,
    CREDENTIAL_REF,
    DEVICE,
    HOUSEHOLD,
    NUMBERING_PLAN,
    ORIGINATE_ALLOW,
    ORIGINATE_LIMIT,
    POLICY,
    REGION,
    RETENTION_POLICY,
    SCENARIO,
    SIA_ACCOUNT,
    SUBSCRIBER,
    TABLES,
    TENANT,
    Filter,
    TableSpec,
)

__all__ = [
    "TableSpec", "Filter", "TABLES", "BY_NAME",
    "TENANT", "BRAND", "REGION", "HOUSEHOLD", "SUBSCRIBER", "DEVICE", "BINDING", "CONSENT", "POLICY", "SCENARIO",
    "CREDENTIAL_REF", "ORIGINATE_LIMIT", "ORIGINATE_ALLOW", "NUMBERING_PLAN", "RETENTION_POLICY",
    "SIA_ACCOUNT",
    "Correlation", "create", "get", "list_rows", "update", "revoke", "delete", "row_values", "store_errors",
    "get_numbering_plan", "get_originate_plan", "get_policy_for", "get_subscriber_by_msisdn", "plan_of",
    "set_device_status", "set_presence",
]
