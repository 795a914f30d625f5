"""The registry's entities, described once: one :class:`TableSpec` per table.

The generic CRUD (:mod:`policy_cache.registry.crud`), the admin API's resources and OpenAPI document
(:mod:`iim.admin.resources`) and the ``iim`` CLI commands (:mod:`iim.admin.cli`) are all driven by these
specs, so adding a field is an edit of :mod:`policy_cache.models` (plus its migration) and adding an entity
is its models, one spec here and its migration. ``tests/iim/admin/test_registry_specs.py`` checks that the
specs, the OpenAPI schemas and the CLI cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from policy_cache import models as m

__all__ = [
    "TableSpec", "Filter", "TABLES", "BY_NAME",
    "TENANT", "BRAND", "REGION", "HOUSEHOLD", "SUBSCRIBER", "DEVICE", "BINDING", "CONSENT", "POLICY",
    "SCENARIO", "CREDENTIAL_REF", "ORIGINATE_LIMIT", "ORIGINATE_ALLOW", "NUMBERING_PLAN", "RETENTION_POLICY",
    "SIA_ACCOUNT",
]

R = TypeVar("R", bound=BaseModel)
C = TypeVar("C", bound=BaseModel)
U = TypeVar("U", bound=BaseModel | None)


@dataclass(frozen=True, slots=True)
class Filter:
    """A list filter: equality on ``column`` (typed like the create model's field of that name)."""

    column: str
    description: str


@dataclass(frozen=True, slots=True)
class TableSpec(Generic[R, C, U]):
    """One registry table and what may be done with its rows.

    ``R`` is the stored row, ``C`` what a caller may set on create, ``U`` on update (``None``: rows are
    never edited). Every change writes one audit row with ``entity=name`` and ``action=name.<verb>``.
    """

    #: singular, snake case: the audit log's ``entity``, the SQL table ``iim.<name>``, the CLI command
    #: (``credential_ref`` -> ``iim credential-ref``)
    name: str
    #: the API path segment and OpenAPI tag (``/v1/tenants/{tenant_id}/<plural>``)
    plural: str
    record: type[R]
    create: type[C]
    update: type[U] | None = None
    #: equality filters of the list operation (API query parameters, CLI ``list`` options)
    filters: tuple[Filter, ...] = ()
    #: the database bumps ``version`` on every change; updates may be conditional (``expected_version``)
    versioned: bool = False
    #: columns summarised as a sha256 digest in audit details (personal data the audit need not repeat);
    #: keys that look like secrets (password, token, api_key ...) are redacted in every table
    digest: frozenset[str] = field(default_factory=frozenset)
    #: rows may be deleted (consents are revoked instead and kept)
    deletable: bool = True
    #: the timestamp a revocation sets (rows are revoked, not deleted); ``None``: no revocation
    revoked_at: str | None = None
    #: the verb of the create operation (API summary and operation id, CLI sub-command): "grant" a consent
    create_verb: str = "create"
    #: the column holding the row's tenant (the tenant table's own ``id``)
    tenant_column: str = "tenant_id"
    #: the columns the CLI shows in its table view
    columns: tuple[str, ...] = ("id",)
    #: one line for the CLI's help and the operator
    description: str = ""

    @property
    def table(self) -> str:
        return f"iim.{self.name}"

    @property
    def label(self) -> str:
        """The entity in prose: ``credential ref``."""
        return self.name.replace("_", " ")

    @property
    def command(self) -> str:
        """The CLI command: ``credential-ref``."""
        return self.name.replace("_", "-")


TENANT: TableSpec[m.Tenant, m.TenantCreate, m.TenantUpdate] = TableSpec(
    "tenant", "tenants", m.Tenant, m.TenantCreate, m.TenantUpdate, tenant_column="id",
    columns=("id", "name", "created_at"),
)
BRAND: TableSpec[m.Brand, m.BrandCreate, None] = TableSpec(
    "brand", "brands", m.Brand, m.BrandCreate, columns=("id", "name"),
    description="Brands of the tenant (operator -> brand/region -> household).",
)
REGION: TableSpec[m.Region, m.RegionCreate, None] = TableSpec(
    "region", "regions", m.Region, m.RegionCreate, columns=("id", "name"),
    description="Regions of the tenant.",
)
HOUSEHOLD: TableSpec[m.Household, m.HouseholdCreate, m.HouseholdUpdate] = TableSpec(
    "household", "households", m.Household, m.HouseholdCreate, m.HouseholdUpdate,
    filters=(Filter("brand_id", "only households of this brand"),
             Filter("region_id", "only households of this region")),
    columns=("id", "name", "time_zone", "presence", "external_id"),
    description="Households (homes/locations); deleting one deletes its devices, bindings and policy.",
)
SUBSCRIBER: TableSpec[m.Subscriber, m.SubscriberCreate, m.SubscriberUpdate] = TableSpec(
    "subscriber", "subscribers", m.Subscriber, m.SubscriberCreate, m.SubscriberUpdate,
    filters=(Filter("msisdn", "only the subscriber with this E.164 number"),),
    columns=("id", "msisdn", "sip_aor", "display_name", "external_id"),
    description="Subscribers (MSISDN unique per tenant); deleting one deletes its bindings, consents, policy.",
)
DEVICE: TableSpec[m.Device, m.DeviceCreate, m.DeviceUpdate] = TableSpec(
    "device", "devices", m.Device, m.DeviceCreate, m.DeviceUpdate,
    filters=(Filter("household_id", "only devices of this household"),),
    columns=("id", "household_id", "name", "type", "status", "enabled"),
    description="Devices of a household (speakers, hubs, sensors, wearables, doorphones).",
)
BINDING: TableSpec[m.Binding, m.BindingCreate, m.BindingUpdate] = TableSpec(
    "binding", "bindings", m.Binding, m.BindingCreate, m.BindingUpdate,
    filters=(Filter("subscriber_id", "only bindings of this subscriber"),
             Filter("household_id", "only bindings to this household")),
    columns=("id", "subscriber_id", "household_id", "device_id", "role", "priority"),
    description="Subscriber <-> household (<-> device) bindings.",
)
CONSENT: TableSpec[m.Consent, m.ConsentCreate, None] = TableSpec(
    "consent", "consents", m.Consent, m.ConsentCreate,
    filters=(Filter("subscriber_id", "only consents of this subscriber"),
             Filter("purpose", "only consents for this purpose")),
    digest=frozenset({"evidence"}), deletable=False, revoked_at="revoked_at", create_verb="grant",
    columns=("id", "subscriber_id", "purpose", "granted_at", "expires_at", "revoked_at"),
    description="Consents are granted and revoked (revoked_at is set), never edited or deleted.",
)
POLICY: TableSpec[m.Policy, m.PolicyCreate, m.PolicyUpdate] = TableSpec(
    "policy", "policies", m.Policy, m.PolicyCreate, m.PolicyUpdate, versioned=True,
    columns=("id", "subscriber_id", "household_id", "ring_mode", "dnd", "version"),
    description="Routing policies of a subscriber (override) or a household (default for its members).",
)
SCENARIO: TableSpec[m.ScenarioRecord, m.ScenarioCreate, m.ScenarioUpdate] = TableSpec(
    "scenario", "scenarios", m.ScenarioRecord, m.ScenarioCreate, m.ScenarioUpdate, versioned=True,
    filters=(Filter("household_id", "only scenarios of this household"),
             Filter("subscriber_id", "only scenarios of this subscriber"),
             Filter("name", "only the scenario so named"),
             Filter("enabled", "only enabled (true) or disabled (false) scenarios")),
    columns=("id", "name", "household_id", "subscriber_id", "enabled", "version"),
    description="Escalation scenarios for device incidents: trigger, conditions, steps (see iim.scenarios.model); "
                "also: iim scenario simulate | templates.",
)
CREDENTIAL_REF: TableSpec[m.CredentialRef, m.CredentialRefCreate, m.CredentialRefUpdate] = TableSpec(
    "credential_ref", "credential-refs", m.CredentialRef, m.CredentialRefCreate, m.CredentialRefUpdate,
    columns=("id", "name", "kind", "ref", "rotated_at"),
    description="References into the secret store (env:, file:, vault:, kms:); never the secret itself.",
)

ORIGINATE_LIMIT: TableSpec[m.OriginateLimit, m.OriginateLimitCreate, m.OriginateLimitUpdate] = TableSpec(
    "originate_limit", "originate-limits", m.OriginateLimit, m.OriginateLimitCreate, m.OriginateLimitUpdate,
    columns=("id", "max_concurrent", "max_per_hour", "country_codes", "updated_at"),
    description="The tenant's alert-call caps and numbering plan (one row; none or deleted: the defaults). "
                "Calls over a cap wait for a place; numbers outside the plan are refused.",
)
ORIGINATE_ALLOW: TableSpec[m.OriginateAllow, m.OriginateAllowCreate, None] = TableSpec(
    "originate_allow", "originate-allows", m.OriginateAllow, m.OriginateAllowCreate,
    columns=("id", "prefix", "note", "created_at"),
    description="Allow-list of alert-call numbers/prefixes beyond the plan; only an entry inside a premium or "
                "other special range (+7809...) admits it.",
)
NUMBERING_PLAN: TableSpec[m.NumberingPlanRow, m.NumberingPlanCreate, m.NumberingPlanUpdate] = TableSpec(
    "numbering_plan", "numbering-plans", m.NumberingPlanRow, m.NumberingPlanCreate, m.NumberingPlanUpdate,
    columns=("id", "country_code", "trunk_prefix", "international_prefixes", "national_lengths", "updated_at"),
    description="How the tenant's numbers are dialled (country code, trunk and international prefixes, national "
                "lengths; one row; none or deleted: Russia). National forms of numbers are read under it, "
                "by calls, alert calls and this API alike.",
)

RETENTION_POLICY: TableSpec[m.RetentionPolicy, m.RetentionPolicyCreate, m.RetentionPolicyUpdate] = TableSpec(
    "retention_policy", "retention-policies", m.RetentionPolicy, m.RetentionPolicyCreate, m.RetentionPolicyUpdate,
    columns=("id", "sms_body_s", "event_payload_s", "audit_detail_s", "recording_s", "hub_command_s",
             "updated_at"),
    description="How long the tenant keeps incoming SMS bodies, device-event payloads, audit details, "
                "recorded messages and commands sent to hubs (one "
                "row; null or none: the service's defaults); enforced by the retention purge.",
)

SIA_ACCOUNT: TableSpec[m.SiaAccount, m.SiaAccountCreate, m.SiaAccountUpdate] = TableSpec(
    "sia_account", "sia-accounts", m.SiaAccount, m.SiaAccountCreate, m.SiaAccountUpdate,
    filters=(Filter("device_id", "only accounts of this device"),),
    columns=("id", "account", "device_id", "receiver", "line", "enabled"),
    description="Alarm panels' SIA DC-09 accounts: account number -> device, optional receiver/line, AES key "
                "by reference (env:/file:).",
)

#: Every registry table, in the order the API documents and the CLI lists them (the tenant first).
TABLES: tuple[TableSpec[Any, Any, Any], ...] = (
    TENANT, BRAND, REGION, HOUSEHOLD, SUBSCRIBER, DEVICE, BINDING, CONSENT, POLICY, SCENARIO, CREDENTIAL_REF,
    ORIGINATE_LIMIT, ORIGINATE_ALLOW, NUMBERING_PLAN, RETENTION_POLICY, SIA_ACCOUNT,
)
BY_NAME: dict[str, TableSpec[Any, Any, Any]] = {t.name: t for t in TABLES}
