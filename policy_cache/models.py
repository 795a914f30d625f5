"""Pydantic v2 models of the registry at the API/registry boundary.

Per entity: ``XCreate`` (strict input: what a caller may set), ``XUpdate`` (strict, every field optional;
only fields explicitly set are written - ``None`` clears a nullable column) and ``X`` (a stored row, as
read back). Input models are strict (no str->int coercion in Python; JSON input may carry enum values and
ISO strings as usual) and forbid unknown fields.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime, time
from enum import StrEnum
from functools import cache
from typing import Annotated, Any, Self
from uuid import UUID
from zoneinfo import available_timezones

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    model_validator,
)

from iim.core.numbering import NumberingPlan, PlanError

__all__ = [
    "E164_PATTERN", "SIP_URI_PATTERN", "CREDENTIAL_REF_PATTERN",
    "DeviceType", "DeviceCapability", "DeviceStatus", "PresenceState", "BindingRole", "ConsentPurpose",
    "RingMode", "FallbackAction", "CredentialKind",
    "Msisdn", "SipUri", "IanaZone",
    "Tenant", "TenantCreate", "TenantUpdate",
    "Brand", "BrandCreate", "Region", "RegionCreate",
    "Household", "HouseholdCreate", "HouseholdUpdate",
    "Subscriber", "SubscriberCreate", "SubscriberUpdate",
    "Device", "DeviceCreate", "DeviceUpdate",
    "Binding", "BindingCreate", "BindingUpdate",
    "Consent", "ConsentCreate",
    "Policy", "PolicyCreate", "PolicyUpdate",
    "CredentialRef", "CredentialRefCreate", "CredentialRefUpdate",
    "ScenarioRecord", "ScenarioCreate", "ScenarioUpdate",
    "OriginateLimit", "OriginateLimitCreate", "OriginateLimitUpdate", "OriginateAllow", "OriginateAllowCreate",
    "CountryCode", "DialPrefix",
    "NumberingPlanRow", "NumberingPlanCreate", "NumberingPlanUpdate", "PhoneNumber",
    "SiaAccount", "SiaAccountCreate", "SiaAccountUpdate",
    "AuditEntry",
]

# The same patterns are CHECK constraints in the migrations (iim.is_e164, iim.is_sip_uri, credential_ref.ref).
E164_PATTERN = r"^\+[1-9][0-9]{6,14}$"
SIP_URI_PATTERN = r"^sips?:[^@\s:;]+@[A-Za-z0-9.-]+(:[0-9]{1,5})?(;[^\s]*)?$"
CREDENTIAL_REF_PATTERN = (
    r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:/\S+|vault:[A-Za-z0-9_./-]+(#[A-Za-z0-9_.-]+)?|kms:\S+)$"
)
_ZONE_RE = re.compile(r"^(UTC|[A-Z][A-Za-z_]+(/[A-Za-z0-9_+-]+)+)$")


class DeviceType(StrEnum):
    SPEAKER = "speaker"
    HUB = "hub"
    SENSOR = "sensor"
    WEARABLE = "wearable"
    DOORPHONE = "doorphone"


class DeviceCapability(StrEnum):
    SIP = "sip"
    WEBRTC = "webrtc"
    CLOUD_ANNOUNCE = "cloud_announce"
    TTS = "tts"
    DISPLAY = "display"
    #: a doorphone that opens on a DTMF key (RFC 2833) sent to its call: a call bridged to it passes keys through
    DTMF_OPEN = "dtmf_open"


class DeviceStatus(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    UNKNOWN = "unknown"


class PresenceState(StrEnum):
    HOME = "home"
    AWAY = "away"
    UNKNOWN = "unknown"


class BindingRole(StrEnum):
    OWNER = "owner"
    MEMBER = "member"
    BACKUP_CONTACT = "backup_contact"
    SECURITY_SERVICE = "security_service"


class ConsentPurpose(StrEnum):
    ANNOUNCE_CALLS = "announce_calls"
    READ_SMS = "read_sms"
    HEALTH_EVENTS = "health_events"
    PRESENCE = "presence"
    CALL_RECORDING = "call_recording"
    EMERGENCY_ESCALATION = "emergency_escalation"


class RingMode(StrEnum):
    PHONE_ONLY = "phone_only"
    HOME_ONLY = "home_only"
    SIMULTANEOUS = "simultaneous"
    PHONE_THEN_HOME = "phone_then_home"
    HOME_THEN_PHONE = "home_then_phone"


class FallbackAction(StrEnum):
    VOICEMAIL = "voicemail"
    RECORD_MESSAGE = "record_message"
    MISSED_CALL_SMS = "missed_call_sms"
    NONE = "none"


class CredentialKind(StrEnum):
    """What a credential reference points at (names of kinds, not secrets)."""

    OAUTH_TOKEN = "oauth_token"  # noqa: S105
    API_KEY = "api_key"
    SIP_PASSWORD = "sip_password"  # noqa: S105
    WEBHOOK_SECRET = "webhook_secret"  # noqa: S105
    CLIENT_CERTIFICATE = "client_certificate"
    SIGNING_KEY = "signing_key"
    OTHER = "other"


@cache
def _zones() -> frozenset[str]:
    return frozenset(available_timezones())


def _check_zone(value: str) -> str:
    if not _ZONE_RE.match(value) or value not in _zones():
        raise ValueError(f"{value!r} is not an IANA time zone name (e.g. 'Europe/Moscow')")
    return value


Msisdn = Annotated[str, StringConstraints(pattern=E164_PATTERN)]
#: A number as people type it (``8 900 123-45-67``, ``+7 900 ...``, ``00 44 ...``): the admin API reads it
#: under the tenant's numbering plan (iim.core.numbering) and stores E.164; anything else is a 422 there.
PhoneNumber = Annotated[str, StringConstraints(pattern=r"^\+?[0-9 ().\-/]{1,40}$")]
# The same patterns are CHECK constraints in migration 0019 (iim.originate_limit, iim.originate_allow).
CountryCode = Annotated[str, StringConstraints(pattern=r"^\+[1-9][0-9]{0,5}$")]
DialPrefix = Annotated[str, StringConstraints(pattern=r"^\+[0-9]{1,15}$")]
SipUri = Annotated[str, StringConstraints(pattern=SIP_URI_PATTERN, max_length=300)]
IanaZone = Annotated[str, AfterValidator(_check_zone)]


def _check_network(value: str) -> str:
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a network in CIDR form (e.g. '192.0.2.0/24'): {exc}") from None
    if net.prefixlen == 0:
        raise ValueError(f"{value!r} is every address: a home network is the household's own")
    return str(net)


def _networks_text(value: Any) -> Any:
    """PostgreSQL's cidr[] comes back as ``ipaddress`` networks; the row shows them as CIDR text."""
    return [str(v) for v in value] if isinstance(value, list | tuple) else value


#: A household's own network (its router's public address or prefix, its LAN behind the edge): ``192.0.2.0/24``.
HomeNetwork = Annotated[str, StringConstraints(max_length=43), AfterValidator(_check_network)]
HomeNetworks = Annotated[list[HomeNetwork], Field(max_length=32)]
#: md5(user:domain:password) in lower-case hex, user and domain from the device's sip_uri: what the SIP edge
#: (kamailio/) checks digests against; the clear password never reaches IIM
SipHa1 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
#: how often a supervised device is heard at least (seconds); silent past it (plus the watchdog's grace) it is
#: offline and that is an incident (iim.supervision); None: not supervised
HeartbeatInterval = Annotated[int, Field(strict=True, ge=30, le=604_800)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=100)]
Ident = Annotated[str, StringConstraints(min_length=1, max_length=200)]
ConnectorName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,63}$")]
CredentialRefUri = Annotated[str, StringConstraints(pattern=CREDENTIAL_REF_PATTERN, max_length=500)]
CredentialName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]
Priority = Annotated[int, Field(ge=0, le=1000)]
TimeoutS = Annotated[int, Field(ge=1, le=300)]
JsonObject = dict[str, JsonValue]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _Row(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# -- tenant / brand / region ----------------------------------------------------------------------------

class TenantCreate(_Input):
    """The new tenant's id is the transaction's tenant (``tenant_tx(pool, new_id)``)."""

    name: Name


class TenantUpdate(_Input):
    name: Name | None = None


class Tenant(_Row):
    id: UUID
    name: str
    created_at: datetime
    updated_at: datetime


class BrandCreate(_Input):
    name: Name


class Brand(_Row):
    tenant_id: UUID
    id: UUID
    name: str
    created_at: datetime
    updated_at: datetime


class RegionCreate(_Input):
    name: Name


class Region(_Row):
    tenant_id: UUID
    id: UUID
    name: str
    created_at: datetime
    updated_at: datetime


# -- household ------------------------------------------------------------------------------------------

class HouseholdCreate(_Input):
    name: Name
    time_zone: IanaZone
    brand_id: UUID | None = None
    region_id: UUID | None = None
    presence: PresenceState = PresenceState.UNKNOWN
    external_id: Ident | None = None
    #: where a personal registration counts as home (inside) or away (outside); empty: registrations say nothing
    home_networks: HomeNetworks = Field(default_factory=list)


class HouseholdUpdate(_Input):
    name: Name | None = None
    time_zone: IanaZone | None = None
    brand_id: UUID | None = None
    region_id: UUID | None = None
    presence: PresenceState | None = None
    external_id: Ident | None = None
    home_networks: HomeNetworks | None = None


class Household(_Row):
    tenant_id: UUID
    id: UUID
    name: str
    time_zone: str
    brand_id: UUID | None
    region_id: UUID | None
    presence: PresenceState
    presence_changed_at: datetime
    external_id: str | None
    home_networks: Annotated[list[str], BeforeValidator(_networks_text)] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime


# -- subscriber -----------------------------------------------------------------------------------------

class SubscriberCreate(_Input):
    msisdn: Msisdn
    sip_aor: SipUri | None = None
    internal_id: Ident | None = None
    external_id: Ident | None = None
    display_name: Annotated[str, StringConstraints(max_length=200)] | None = None


class SubscriberUpdate(_Input):
    msisdn: Msisdn | None = None
    sip_aor: SipUri | None = None
    internal_id: Ident | None = None
    external_id: Ident | None = None
    display_name: Annotated[str, StringConstraints(max_length=200)] | None = None


class Subscriber(_Row):
    tenant_id: UUID
    id: UUID
    msisdn: str
    sip_aor: str | None
    internal_id: str | None
    external_id: str | None
    display_name: str | None
    created_at: datetime
    updated_at: datetime


# -- device ---------------------------------------------------------------------------------------------

class _DeviceEndpoint(_Input):
    connector: ConnectorName | None = None
    connector_ref: Annotated[str, StringConstraints(min_length=1, max_length=500)] | None = None

    @model_validator(mode="after")
    def _connector_pair(self) -> Self:
        fields = self.model_fields_set
        if ("connector" in fields or "connector_ref" in fields) and (
            (self.connector is None) != (self.connector_ref is None)
        ):
            raise ValueError("connector and connector_ref go together (both set or both empty)")
        return self


class DeviceCreate(_DeviceEndpoint):
    household_id: UUID
    name: Name
    type: DeviceType
    vendor: ShortText | None = None
    model: ShortText | None = None
    external_id: Ident | None = None
    capabilities: frozenset[DeviceCapability] = frozenset()
    sip_uri: SipUri | None = None
    sip_ha1: SipHa1 | None = None
    credential_ref_id: UUID | None = None
    status: DeviceStatus = DeviceStatus.UNKNOWN
    enabled: bool = True
    heartbeat_interval_s: HeartbeatInterval | None = None
    #: does its registration say where a person is? None: by type (wearables do; speakers, hubs, sensors and
    #: doorphones are fixed and do not); true/false: this device does / does not
    presence_hint: bool | None = None


class DeviceUpdate(_DeviceEndpoint):
    """A device cannot move between households (delete it and create it in the other one)."""

    name: Name | None = None
    vendor: ShortText | None = None
    model: ShortText | None = None
    external_id: Ident | None = None
    capabilities: frozenset[DeviceCapability] | None = None
    sip_uri: SipUri | None = None
    sip_ha1: SipHa1 | None = None
    credential_ref_id: UUID | None = None
    status: DeviceStatus | None = None
    enabled: bool | None = None
    heartbeat_interval_s: HeartbeatInterval | None = None
    presence_hint: bool | None = None


class Device(_Row):
    tenant_id: UUID
    id: UUID
    household_id: UUID
    name: str
    type: DeviceType
    vendor: str | None
    model: str | None
    external_id: str | None
    capabilities: frozenset[DeviceCapability]
    sip_uri: str | None
    #: stored, never shown: the API, the CLI and reprs leave it out (it is password-equivalent for its realm)
    sip_ha1: str | None = Field(default=None, exclude=True, repr=False)
    connector: str | None
    connector_ref: str | None
    credential_ref_id: UUID | None
    status: DeviceStatus
    status_changed_at: datetime
    enabled: bool
    heartbeat_interval_s: int | None = None
    presence_hint: bool | None = None
    created_at: datetime
    updated_at: datetime


# -- binding --------------------------------------------------------------------------------------------

class BindingCreate(_Input):
    """``device_id=None``: the subscriber reaches every device of the household; else only that one."""

    subscriber_id: UUID
    household_id: UUID
    device_id: UUID | None = None
    role: BindingRole
    priority: Priority = 100


class BindingUpdate(_Input):
    role: BindingRole | None = None
    priority: Priority | None = None


class Binding(_Row):
    tenant_id: UUID
    id: UUID
    subscriber_id: UUID
    household_id: UUID
    device_id: UUID | None
    role: BindingRole
    priority: int
    created_at: datetime
    updated_at: datetime


# -- consent --------------------------------------------------------------------------------------------

class ConsentCreate(_Input):
    """A consent is granted now; it is revoked (never edited or deleted) through ``revoke_consent``.

    ``evidence`` records how it was obtained (channel, document/version, request id ...); it is required.
    """

    subscriber_id: UUID
    purpose: ConsentPurpose
    scope: JsonObject = Field(default_factory=dict)
    expires_at: datetime | None = None
    evidence: JsonObject = Field(min_length=1)

    @model_validator(mode="after")
    def _aware(self) -> Self:
        if self.expires_at is not None and self.expires_at.tzinfo is None:
            raise ValueError("expires_at must be timezone-aware")
        return self


class Consent(_Row):
    tenant_id: UUID
    id: UUID
    subscriber_id: UUID
    purpose: ConsentPurpose
    scope: JsonObject
    granted_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    evidence: JsonObject
    created_at: datetime
    updated_at: datetime

    def is_active(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


# -- policy ---------------------------------------------------------------------------------------------

class _PolicyFields(_Input):
    @model_validator(mode="after")
    def _quiet_hours(self) -> Self:
        start: time | None = getattr(self, "quiet_start", None)
        end: time | None = getattr(self, "quiet_end", None)
        fields = self.model_fields_set
        if "quiet_start" in fields and "quiet_end" in fields:
            if (start is None) != (end is None):
                raise ValueError("quiet_start and quiet_end go together")
            if start is not None and start == end:
                raise ValueError("quiet hours need quiet_start != quiet_end")
        for value in (start, end):
            if value is not None and value.tzinfo is not None:
                raise ValueError("quiet hours are local times of the household's zone (no tzinfo)")
        return self


class PolicyCreate(_PolicyFields):
    """Exactly one of ``subscriber_id`` (overrides) / ``household_id`` (default for its members).

    Quiet hours are local times in the household's zone; ``quiet_start > quiet_end`` wraps midnight.
    """

    subscriber_id: UUID | None = None
    household_id: UUID | None = None
    ring_mode: RingMode = RingMode.PHONE_ONLY
    phone_timeout_s: TimeoutS = 20
    home_timeout_s: TimeoutS = 20
    quiet_start: time | None = None
    quiet_end: time | None = None
    dnd: bool = False
    allowed_callers: list[Msisdn] = Field(default_factory=list)
    blocked_callers: list[Msisdn] = Field(default_factory=list)
    home_only_when_present: bool = False
    fallback: FallbackAction = FallbackAction.VOICEMAIL

    @model_validator(mode="after")
    def _one_target(self) -> Self:
        if (self.subscriber_id is None) == (self.household_id is None):
            raise ValueError("a policy belongs to exactly one of subscriber_id / household_id")
        if (self.quiet_start is None) != (self.quiet_end is None):
            raise ValueError("quiet_start and quiet_end go together")
        return self


class PolicyUpdate(_PolicyFields):
    ring_mode: RingMode | None = None
    phone_timeout_s: TimeoutS | None = None
    home_timeout_s: TimeoutS | None = None
    quiet_start: time | None = None
    quiet_end: time | None = None
    dnd: bool | None = None
    allowed_callers: list[Msisdn] | None = None
    blocked_callers: list[Msisdn] | None = None
    home_only_when_present: bool | None = None
    fallback: FallbackAction | None = None


class Policy(_Row):
    tenant_id: UUID
    id: UUID
    subscriber_id: UUID | None
    household_id: UUID | None
    ring_mode: RingMode
    phone_timeout_s: int
    home_timeout_s: int
    quiet_start: time | None
    quiet_end: time | None
    dnd: bool
    allowed_callers: list[str]
    blocked_callers: list[str]
    home_only_when_present: bool
    fallback: FallbackAction
    version: int
    created_at: datetime
    updated_at: datetime


# -- credential_ref -------------------------------------------------------------------------------------

class CredentialRefCreate(_Input):
    """A pointer into a secret store (``env:NAME``, ``file:/path``, ``vault:path#field``, ``kms:key``).

    The secret itself never enters the database.
    """

    name: CredentialName
    kind: CredentialKind
    ref: CredentialRefUri
    description: Annotated[str, StringConstraints(max_length=500)] | None = None


class CredentialRefUpdate(_Input):
    ref: CredentialRefUri | None = None
    description: Annotated[str, StringConstraints(max_length=500)] | None = None
    rotated_at: datetime | None = None


class CredentialRef(_Row):
    tenant_id: UUID
    id: UUID
    name: str
    kind: CredentialKind
    ref: str
    description: str | None
    rotated_at: datetime | None
    created_at: datetime
    updated_at: datetime


# -- scenario -------------------------------------------------------------------------------------------
#
# The definition columns are JSON here; their meaning and validation are iim.scenarios.model.Scenario (which
# imports this module's enums, hence no typed fields here). The scenario registry refuses a definition that
# does not validate, and the admin API validates its bodies with the typed models.

class ScenarioCreate(_Input):
    """A scenario of the tenant (both ``household_id`` and ``subscriber_id`` empty), of a household or of a
    subscriber. A new scenario is inert until enabled (``enabled`` defaults to false, as in the table)."""

    name: Name
    household_id: UUID | None = None
    subscriber_id: UUID | None = None
    trigger: JsonObject
    conditions: list[JsonObject] = Field(default_factory=list)
    steps: list[JsonObject] = Field(min_length=1)
    on_acknowledge: list[JsonObject] = Field(default_factory=list)
    enabled: bool = False


class ScenarioUpdate(_Input):
    name: Name | None = None
    household_id: UUID | None = None
    subscriber_id: UUID | None = None
    trigger: JsonObject | None = None
    conditions: list[JsonObject] | None = None
    steps: list[JsonObject] | None = None
    on_acknowledge: list[JsonObject] | None = None
    enabled: bool | None = None


class ScenarioRecord(_Row):
    """A stored scenario (``iim.scenarios.model.Scenario.from_record`` gives its typed definition)."""

    tenant_id: UUID
    id: UUID
    name: str
    household_id: UUID | None
    subscriber_id: UUID | None
    trigger: JsonObject
    conditions: list[JsonObject]
    steps: list[JsonObject]
    on_acknowledge: list[JsonObject]
    enabled: bool
    version: int
    created_at: datetime
    updated_at: datetime


# -- originate limits and allow-list (anti-toll-fraud) --------------------------------------------------
#
# What the alert-call guard (fs_app.outreach.guard) reads: one limits row per tenant (none: the service's
# defaults) and any number of allow-list entries. Special ranges (premium, satellite ...) are shipped data,
# not rows: only an allow-list entry inside one admits it.

class OriginateLimitCreate(_Input):
    """The tenant's caps and numbering plan (one row per tenant; deleting it restores the defaults)."""

    max_concurrent: int = Field(default=10, ge=0, le=10000,
                                description="alert calls ringing at once; more wait for a place (queued)")
    max_per_hour: int = Field(default=200, ge=0, le=1_000_000,
                              description="alert calls placed per hour; more wait for a place (queued)")
    country_codes: list[CountryCode] | None = Field(
        default=None, max_length=20,
        description="numbers admitted by default (country codes such as +7, or national prefixes such as "
                    "+79); premium and other special ranges never; null: the service's default plan")


class OriginateLimitUpdate(_Input):
    max_concurrent: int | None = Field(default=None, ge=0, le=10000)
    max_per_hour: int | None = Field(default=None, ge=0, le=1_000_000)
    country_codes: list[CountryCode] | None = Field(default=None, max_length=20)


class OriginateLimit(_Row):
    tenant_id: UUID
    id: UUID
    max_concurrent: int
    max_per_hour: int
    country_codes: list[str] | None
    created_at: datetime
    updated_at: datetime


class OriginateAllowCreate(_Input):
    """A number or prefix alert calls may reach besides the plan; inside a special range (``+7809``) it
    admits that much of the range."""

    prefix: DialPrefix = Field(description="an E.164 number or a prefix of one (+ and 1-15 digits)")
    note: Annotated[str, StringConstraints(max_length=500)] | None = Field(
        default=None, description="why it is allowed (ticket, customer)")


class OriginateAllow(_Row):
    tenant_id: UUID
    id: UUID
    prefix: str
    note: str | None
    created_at: datetime
    updated_at: datetime


# -- numbering plan -------------------------------------------------------------------------------------
#
# How the tenant's people and trunks write numbers (iim.core.numbering.NumberingPlan): one row per tenant;
# none, or deleted: the service's default (Russia). The same checks are CHECK constraints in migration 0024.

_Digits = Annotated[str, StringConstraints(pattern=r"^[0-9]{2,4}$")]


class _PlanChecks(_Input):
    @model_validator(mode="after")
    def _applicable(self) -> Self:
        values = self.model_dump(exclude_none=True)
        if "country_code" not in values:
            return self  # a partial update: the database checks the row it makes
        try:
            NumberingPlan(values["country_code"], values.get("trunk_prefix", ""),
                          tuple(values.get("international_prefixes", ("00",))),
                          tuple(values.get("national_lengths", (10,))))
        except PlanError as exc:
            raise ValueError(str(exc)) from exc
        return self


class NumberingPlanCreate(_PlanChecks):
    """The tenant's numbering plan: how national and international forms map to E.164."""

    country_code: Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]{0,2}$")] = Field(
        description="digits, no +: 7, 44, 49")
    trunk_prefix: Annotated[str, StringConstraints(pattern=r"^[0-9]{0,3}$")] = Field(
        default="", description="the national (trunk) prefix: 8 in Russia, 0 in the UK; empty: none")
    international_prefixes: list[_Digits] = Field(
        default_factory=lambda: ["00"], min_length=1, max_length=4,
        description="dialled before a country code instead of +: 810 and 00 in Russia")
    national_lengths: list[Annotated[int, Field(ge=6, le=14)]] = Field(
        default_factory=lambda: [10], min_length=1, max_length=12,
        description="digits of a national significant number (after the country code)")


class NumberingPlanUpdate(_PlanChecks):
    country_code: Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]{0,2}$")] | None = None
    trunk_prefix: Annotated[str, StringConstraints(pattern=r"^[0-9]{0,3}$")] | None = None
    international_prefixes: list[_Digits] | None = Field(default=None, min_length=1, max_length=4)
    national_lengths: list[Annotated[int, Field(ge=6, le=14)]] | None = Field(default=None, min_length=1,
                                                                              max_length=12)


class NumberingPlanRow(_Row):
    tenant_id: UUID
    id: UUID
    country_code: str
    trunk_prefix: str
    international_prefixes: list[str]
    national_lengths: list[int]
    created_at: datetime
    updated_at: datetime


# -- retention ------------------------------------------------------------------------------------------

_TEN_YEARS_S = 315_360_000


class RetentionPolicyCreate(_Input):
    """How long the tenant's personal content is kept (one row per tenant; null or no row: the service's
    defaults, ``IIM_RETENTION_*``). The purge replaces what is due by nothing (SMS bodies, event payloads) or
    by a tombstone (audit details, so the hash chain still verifies)."""

    sms_body_s: int | None = Field(default=None, ge=0, le=_TEN_YEARS_S,
                                   description="seconds an incoming SMS body is kept (null: the default)")
    event_payload_s: int | None = Field(default=None, ge=0, le=_TEN_YEARS_S,
                                        description="seconds a device event's payload is kept (null: the default)")
    audit_detail_s: int | None = Field(default=None, ge=86_400, le=_TEN_YEARS_S,
                                       description="seconds an audit row's detail is kept, at least a day "
                                                   "(null: the default)")
    recording_s: int | None = Field(default=None, ge=0, le=_TEN_YEARS_S,
                                    description="seconds a message a caller left (row and file) is kept "
                                                "(null: IIM_RECORDING_RETENTION_S when it was left)")
    hub_command_s: int | None = Field(default=None, ge=86_400, le=_TEN_YEARS_S,
                                      description="seconds a command sent to a hub (and its answer) is kept, at "
                                                  "least a day (null: IIM_RETENTION_HUB_COMMAND_S)")


class RetentionPolicyUpdate(_Input):
    sms_body_s: int | None = Field(default=None, ge=0, le=_TEN_YEARS_S)
    event_payload_s: int | None = Field(default=None, ge=0, le=_TEN_YEARS_S)
    audit_detail_s: int | None = Field(default=None, ge=86_400, le=_TEN_YEARS_S)
    recording_s: int | None = Field(default=None, ge=0, le=_TEN_YEARS_S)
    hub_command_s: int | None = Field(default=None, ge=86_400, le=_TEN_YEARS_S)


class RetentionPolicy(_Row):
    tenant_id: UUID
    id: UUID
    sms_body_s: int | None
    event_payload_s: int | None
    audit_detail_s: int | None
    recording_s: int | None
    hub_command_s: int | None
    created_at: datetime
    updated_at: datetime


# -- SIA DC-09 accounts ---------------------------------------------------------------------------------
#
# An alarm panel's account at IIM's DC-09 receiver (iot_bridge.sia): which device it speaks for and, by
# reference, its AES key. The same checks are CHECK constraints in migration 0027.

SiaHex = Annotated[str, StringConstraints(pattern=r"^[0-9A-Fa-f]{3,16}$", to_upper=True)]
SiaPrefix = Annotated[str, StringConstraints(pattern=r"^[0-9A-Fa-f]{1,6}$", to_upper=True)]
#: Where the account's AES key is: ``env:NAME`` or ``file:/path`` holding 32, 48 or 64 hex digits
SiaKeyRef = Annotated[str, StringConstraints(pattern=r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:/\S+)$", max_length=500)]


class SiaAccountCreate(_Input):
    """A panel's account number (3-16 hex digits, unique in the tenant) for one device of a household."""

    account: SiaHex = Field(description="the account number the panel sends (#acct), hex")
    device_id: UUID = Field(description="the registry device the panel's events are for")
    receiver: SiaPrefix | None = Field(default=None, description="the receiver number the panel must send "
                                                                 "(R...); null: any")
    line: SiaPrefix | None = Field(default=None, description="the line prefix the panel must send (L...); null: any")
    key_ref: SiaKeyRef | None = Field(default=None, description="env:/file: reference to the AES-128/192/256 key "
                                                                "(hex); null: plain messages only")
    enabled: bool = True
    description: Annotated[str, StringConstraints(max_length=500)] | None = None


class SiaAccountUpdate(_Input):
    device_id: UUID | None = None
    receiver: SiaPrefix | None = None
    line: SiaPrefix | None = None
    key_ref: SiaKeyRef | None = None
    enabled: bool | None = None
    description: Annotated[str, StringConstraints(max_length=500)] | None = None


class SiaAccount(_Row):
    tenant_id: UUID
    id: UUID
    account: str
    device_id: UUID
    receiver: str | None
    line: str | None
    key_ref: str | None
    enabled: bool
    description: str | None
    created_at: datetime
    updated_at: datetime


# -- audit ----------------------------------------------------------------------------------------------

class AuditEntry(_Row):
    tenant_id: UUID
    id: int
    at: datetime
    actor: str
    action: str
    entity: str
    entity_id: str | None
    detail: dict[str, Any]
    correlation: dict[str, Any]
    prev_hash: bytes
    row_hash: bytes
