"""Service settings from ``IIM_*`` environment variables (pydantic-settings).

Everything binds to loopback by default; secrets are never values here, only
references (``*_ref``) resolved from the environment at start.
"""

from __future__ import annotations

from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from yarl import URL

from iim.core.errors import ConfigError
from iim.core.secrets import resolve_secret


class FreeSwitchNode(BaseSettings):
    """One FreeSWITCH node for the inbound client: ``host:port`` and a password reference."""

    host: str = "127.0.0.1"
    port: int = 8021
    password_ref: str = Field(default="env:IIM_FS_PASSWORD", description="env:VAR holding the ESL password")
    name: str = ""

    def password(self) -> str:
        """The resolved Event Socket password; :class:`ConfigError` when it is unset, empty or FreeSWITCH's
        well-known default (an ESL port answering to ``ClueCon`` lets anyone originate calls)."""
        where = self.name or f"{self.host}:{self.port}"
        try:
            value = resolve_secret(self.password_ref)
        except LookupError:
            raise ConfigError(f"FreeSWITCH node {where}: {self.password_ref} is not set "
                              "(refusing to start without the Event Socket password)") from None
        if value in ("", "ClueCon"):
            raise ConfigError(f"FreeSWITCH node {where}: {self.password_ref} is empty or FreeSWITCH's default "
                              "password (refusing to start with it)")
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IIM_", env_nested_delimiter="__", extra="ignore")

    esl_host: str = "127.0.0.1"
    esl_port: int = Field(default=8084, ge=0, le=65535)
    esl_linger: bool = True
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8088, ge=0, le=65535)
    log_level: str = "INFO"
    # Where a call goes before policy routing exists: its dialled number through the core gateway.
    passthrough_endpoint: str = "sofia/gateway/ims/{destination}"
    # How a speaker leg is dialled: the switch's directory (``user/{aor}``), or through the Kamailio edge where
    # speakers register (kamailio/README.md), e.g. "sofia/external/{aor};fs_path=sip:10.0.0.2:5060".
    speaker_endpoint: str = "user/{aor}"
    # Presence from the Kamailio edge's registrations (kamailio.location, migration 0035): LISTEN + reconcile on the
    # cache role. Harmless without an edge (the table stays empty). The edge writes expires in its local time:
    # name its zone; the whole table is re-read this often (and on every reconnect).
    registrar_presence: bool = True
    registrar_edge_time_zone: str = "UTC"
    registrar_reconcile_interval_s: float = Field(default=300.0, gt=0, le=3600)
    fs_nodes: list[FreeSwitchNode] = Field(default_factory=list)
    drain_timeout: float = 10.0
    # Policy routing: PostgreSQL at IIM_DATABASE_URL (a superuser/owner URL used for migrations), or an
    # embedded PostgreSQL in data_dir when it is not set.
    policy_routing: bool = True
    database_url: str | None = Field(default=None, repr=False)
    # Already-migrated database, connected as the service roles directly (no bootstrap, no migrations):
    # for deployments that run `iim db migrate` separately, and for extra worker processes.
    app_database_url: str | None = Field(default=None, repr=False)
    cache_database_url: str | None = Field(default=None, repr=False)
    # Connections of the service role, all opened at start: a burst of alarms must not wait for new
    # connections (SCRAM, role check, type introspection cost tens of ms each on a busy host). More is not
    # faster: each backend compiles its own plans and caches, and on a 2-core database host 16 of them
    # doubled the alarm path's p99 against 4-8 (BENCHMARKS.md). A few per database core.
    db_pool_size: int = Field(default=8, ge=2, le=500)
    # Every wait for PostgreSQL has a deadline: per statement, and for a free pooled connection. A stalled
    # server (not a lost one: its connections stay open) then turns into errors and 503s, not hung requests.
    db_command_timeout_s: float = Field(default=30.0, gt=0)
    db_acquire_timeout_s: float = Field(default=10.0, gt=0)
    data_dir: str = ".iim-data/pg"
    demo_data: bool = True
    cache_load_timeout: float = 60.0
    sip_domain: str = "iim.local"
    # HTTPS device bridge (IoT -> telecom). Without a certificate a self-signed one is made in data_dir.
    bridge_enabled: bool = True
    bridge_host: str = "127.0.0.1"
    bridge_port: int = Field(default=8443, ge=0, le=65535)
    bridge_tls_cert_file: str | None = None
    bridge_tls_key_file: str | None = None
    # Per-tenant device CAs for mutual TLS: {"<tenant uuid>": "/path/ca.pem"}.
    bridge_client_cas: dict[str, str] = Field(default_factory=dict)
    bridge_require_client_cert: bool = False
    # The longest a device request waits for PostgreSQL in all (key lookup and intake): past it, 503 with
    # Retry-After (the device retries the same event_id; an event that was committed anyway is replayed).
    bridge_store_deadline_s: float = Field(default=1.5, gt=0)
    # Rate limits (token buckets): per device, per source address, per tenant.
    bridge_device_rate: float = 1.0
    bridge_device_burst: int = 10
    bridge_source_rate: float = 50.0
    bridge_source_burst: int = 200
    bridge_tenant_rate: float = 500.0
    bridge_tenant_burst: int = 2000
    # MQTT ingress for local hubs (iot_bridge/mqtt): IIM subscribes to iim/+/+/events on a broker with its own
    # client certificate; off by default. Needs the device bridge (same keys, limits, intake).
    mqtt_enabled: bool = False
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = Field(default=8883, ge=1, le=65535)
    mqtt_ca_file: str | None = None  # the broker's CA (unset: the system's)
    mqtt_cert_file: str | None = None
    mqtt_key_file: str | None = None
    mqtt_client_id: str = Field(default="iim", pattern=r"^[A-Za-z0-9_.-]{1,23}$")
    mqtt_topic_prefix: str = Field(default="iim", pattern=r"^[A-Za-z0-9_.-]{1,64}(/[A-Za-z0-9_.-]{1,64}){0,3}$")
    mqtt_keepalive_s: int = Field(default=30, ge=5, le=3600)
    mqtt_hub_rate: float = Field(default=5.0, gt=0)
    mqtt_hub_burst: int = Field(default=50, ge=1)
    # SIA DC-09 alarm receiver (iot_bridge/sia): professional alarm panels and telecare units over TCP and UDP
    # on one port; accounts in the registry (iim sia-account). Off by default; needs the device bridge.
    sia_enabled: bool = False
    sia_host: str = "127.0.0.1"
    sia_port: int = Field(default=12000, ge=0, le=65535)
    sia_tcp: bool = True
    sia_udp: bool = True
    sia_idle_timeout_s: float = Field(default=120.0, gt=0)
    # Scenario worker: where FreeSWITCH connects back for alert-call IVRs (this process's outbound server).
    scenario_worker: bool = True
    alert_socket_address: str | None = None
    alert_caller_id: str = "+70000000000"
    alert_gateway_endpoint: str = "sofia/gateway/ims/{destination}"
    job_heartbeat_timeout_s: float = Field(default=30.0, gt=0)
    # Call and SMS triggers (iim/scenarios/triggers): offers wait on a bounded in-memory queue, never in the call
    # or SMS path; one the store did not take (PostgreSQL away or stalled) is tried again with backoff, doubling
    # up to trigger_retry_max_s, until it is trigger_max_age_s old, then dropped (a call long over announced
    # now helps nobody). Lost with the process: it lives in memory only.
    trigger_queue_capacity: int = Field(default=1000, ge=1, le=100_000)
    trigger_max_age_s: float = Field(default=300.0, gt=0, le=86_400)
    trigger_retry_max_s: float = Field(default=10.0, ge=0.5, le=600)
    # Device supervision (with the scenario worker): a device with a heartbeat interval heard nothing from for
    # that long plus the grace is marked offline and opens its device_health incident; scanned this often.
    supervision_enabled: bool = True
    supervision_grace_s: float = Field(default=120.0, ge=0, le=86_400)
    supervision_scan_interval_s: float = Field(default=15.0, gt=0, le=3600)
    # Who speaks alert-call prompts: "iim" renders them with espeak-ng while the phone rings and the switch
    # fetches the WAV from IIM's HTTP site (IIM_SWITCH_AUDIO_BASE_URL; unset: the switch reads it from IIM's
    # cache directory, same host only); until then, or if it fails, the callee hears the generic prompt and
    # the private text never reaches the switch. "freeswitch" leaves `say:` to its TTS module (the text is
    # then sent to the switch).
    alert_prompt_tts: Literal["iim", "freeswitch"] = "iim"
    # Another libespeak-ng than the espeakng-loader wheel's (unset: the wheel's). A path that cannot be loaded
    # leaves speech down (alert calls play the generic prompt): the fault-injection suite starts instances so.
    tts_library: str | None = None
    # SMS: an SMPP account at the SMSC (unset: SMS stay queued in the outbox until one is configured).
    smpp_host: str | None = None
    smpp_port: int = Field(default=2775, ge=1, le=65535)
    smpp_system_id: str = "iim"
    smpp_password_ref: str = Field(default="env:IIM_SMPP_PASSWORD", description="env:VAR or file:/path")
    smpp_source_addr: str = "IIM"
    # Or an HTTP SMSC API (iim/sms/http_smsc.py): submits signed with the shared secret (whsec_..., by
    # reference); its receipts and MO arrive signed at /v1/smsc/http/{receipts,mo} on the device bridge (on the
    # HTTP site when the bridge is off). One SMSC: setting both this and IIM_SMPP_HOST refuses the start.
    http_smsc_url: str | None = None
    http_smsc_secret_ref: str = Field(default="env:IIM_HTTP_SMSC_SECRET", description="env:VAR or file:/path")
    http_smsc_source_addr: str | None = "IIM"
    http_smsc_timeout_s: float = Field(default=10.0, gt=0)
    # Bodies of incoming SMS that may be read out are forgotten this long after they arrived (metadata stays).
    sms_body_retention_s: float = Field(default=86400.0, ge=60)
    # Retention defaults for tenants without their own (iim retention-policy): device-event payloads and audit
    # details; the purge runs every retention_purge_interval_s and audits what it purged.
    retention_event_payload_s: int = Field(default=30 * 86400, ge=0)
    retention_audit_detail_s: int = Field(default=365 * 86400, ge=86400)
    # Commands sent to hubs (and their answers) are deleted this long after they were sent; at least a day, so a
    # client retrying a command never finds its id free again.
    retention_hub_command_s: int = Field(default=90 * 86400, ge=86400)
    retention_purge_interval_s: float = Field(default=3600.0, ge=1)
    # Presence claims expired more than presence_claim_keep_s ago are deleted (their audit lines stay), at most
    # presence_prune_batch per round, every presence_prune_interval_s (again at once while a round comes back full).
    presence_prune_interval_s: float = Field(default=3600.0, ge=1)
    presence_claim_keep_s: int = Field(default=86400, ge=0)
    presence_prune_batch: int = Field(default=1000, ge=1, le=10000)
    # Smart-home connectors, JSON: [{"name": "acme", "plugin": "webhook", "config": {...}}] (secrets by ref).
    connectors: list[dict[str, object]] = Field(default_factory=list)
    # Each ready connector's probe() runs this often, each within the timeout ("up" means checked).
    connector_probe_interval_s: float = Field(default=30.0, gt=0, le=3600)
    connector_probe_timeout_s: float = Field(default=5.0, gt=0, le=120)
    # Account linking (OAuth2 code + PKCE, connectors with "account_linking"): tokens are sealed under each tenant's
    # data key. link_token_key_ref is the OLD process-wide key (32 bytes, hex or base64, by reference), needed only
    # while links sealed with it remain: the start re-seals them under the envelope, then it may be removed (a start
    # without it refuses while any remain). Links due are renewed every link_refresh_interval_s.
    link_token_key_ref: str | None = Field(default=None, description="env:VAR or file:/path (old format only)")
    link_refresh_interval_s: float = Field(default=30.0, gt=0, le=3600)
    # /livez fails (503) once the event loop ran a timer this late within 10 s, or stopped measuring for this long.
    livez_max_loop_lag_s: float = Field(default=5.0, gt=0, le=600)
    # Where vendor clouds reach IIM (signed audio URLs, user-action callbacks); default: the device bridge.
    public_base_url: str | None = None
    # Where FreeSWITCH reaches this IIM's HTTP site for the prompts IIM owns, through mod_http_cache: the
    # system prompts (GET /v1/prompts/NAME.wav; default http://IIM_HTTP_HOST:IIM_HTTP_PORT) and each alert
    # call's rendered prompt (signed GET /v1/audio/ID.wav). Unset is the single-host mode: alert prompts are
    # handed to the switch as paths in IIM's cache directory. Set it whenever the switch runs elsewhere.
    switch_audio_base_url: str | None = None
    # Messages callers leave (the record_message fallback): the switch records into this directory and IIM keeps
    # them there (one host, or a directory both mount); unset: the switch's own recordings directory, and the
    # household gets the missed-call SMS only. Kept under the subscriber's call_recording consent for
    # recording_retention_s, announced by SMS with a signed link (GET /v1/messages/...) valid message_link_ttl_s
    # at message_link_base_url (default http://IIM_HTTP_HOST:IIM_HTTP_PORT).
    recordings_dir: str | None = None
    recording_retention_s: float = Field(default=30 * 86400.0, ge=60)
    message_link_ttl_s: int = Field(default=7 * 86400, ge=60)
    message_link_base_url: str | None = None
    message_link_secret_ref: str | None = Field(default=None, description="unset: a random key per process")
    # The same announcement goes to the household's cloud connectors (one notification per connector, same link):
    # each send has this deadline, and a failed one is tried again by a later announcement up to this many times.
    message_notify_timeout_s: float = Field(default=10.0, gt=0, le=60)
    message_notify_attempts: int = Field(default=3, ge=1, le=10)
    # A switch on another host (no shared directory): it records each message to a signed, one-call upload URL
    # on IIM's HTTP site (http_cache://SWITCH_AUDIO_BASE/v1/recordings/...; mod_http_cache PUTs the WAV when
    # the recording ends) and IIM stores it in recordings_dir. Needs recordings_dir. Each body must arrive
    # within recording_upload_timeout_s; the URLs' HMAC key by reference (unset: a random key per process, so
    # the PUT must reach the IIM that signed it -- set it when several IIMs share the recordings directory).
    recordings_upload: bool = False
    recording_upload_secret_ref: str | None = Field(default=None, description="env:VAR or file:/path")
    recording_upload_timeout_s: float = Field(default=30.0, gt=0, le=600)
    # HMAC key of the switch's audio URLs (unset: a random key per process; the URLs live minutes).
    switch_audio_secret_ref: str | None = Field(default=None, description="env:VAR or file:/path")
    audio_url_secret_ref: str | None = Field(default=None, description="unset: a random key per process")
    sms_hash_key_ref: str | None = Field(default=None, description="key for audit hashes of read-aloud SMS")
    # Audit chain heads signed outside the database (Ed25519, PEM or 32-byte seed by reference) and published
    # to a JSON-lines file, the log and GET /v1/audit/head; unset: not published (a warning at start).
    audit_head_key_ref: str | None = Field(default=None, description="env:VAR or file:/path of the signing key")
    audit_heads_file: str | None = None
    audit_head_interval_s: float = Field(default=300.0, ge=1)
    # Traces (OpenTelemetry; the SDK and exporter come with `pip install 'iim[otel]'`): "otlp", "console" or
    # "none"; unset follows the standard OTEL_TRACES_EXPORTER, else "otlp" once OTEL_EXPORTER_OTLP_ENDPOINT is set.
    traces_exporter: Literal["otlp", "console", "none"] | None = None
    # The OTLP/HTTP traces URL (unset: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or the SDK's http://localhost:4318).
    otlp_traces_endpoint: str | None = None
    # Envelope encryption of sensitive fields (SMS bodies): the master key wrapping every tenant's data key,
    # by reference (32 bytes, hex or base64); unset: generated once into <data_dir>/../master.key. During a
    # master rotation the old key goes into the JSON list of previous ones (still accepted for unwrapping).
    master_key_ref: str | None = Field(default=None, description="env:VAR, file:/path or an installed scheme")
    master_key_previous_refs: list[str] = Field(default_factory=list)
    data_key_cache_size: int = Field(default=4096, ge=1)

    @field_validator("speaker_endpoint")
    @classmethod
    def _has_speaker(cls, value: str) -> str:
        if "{aor}" not in value and "{user}" not in value:
            raise ValueError("speaker_endpoint must contain {aor} or {user}")
        try:
            value.format(aor="a@b", user="a", domain="b")
        except (KeyError, IndexError, ValueError):
            raise ValueError("speaker_endpoint may only use {aor}, {user} and {domain}") from None
        if any(ch in ",|[]'\"\\" or ch.isspace() for ch in value):
            raise ValueError("speaker_endpoint must not hold spaces, quotes or dial string separators")
        return value

    @field_validator("registrar_edge_time_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name, e.g. UTC or Europe/Moscow)") from None
        return value

    @field_validator("switch_audio_base_url")
    @classmethod
    def _switch_audio_url(cls, value: str | None) -> str | None:
        """Refused at start, not at the first alarm: the switch could fetch no prompt from a malformed URL."""
        if value is None:
            return None
        url = URL(value)
        if url.scheme not in ("http", "https") or not url.host or url.query_string or url.fragment:
            raise ValueError("switch_audio_base_url must be an absolute http(s) URL without query or fragment")
        return value

    @field_validator("http_smsc_url")
    @classmethod
    def _http_smsc_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = URL(value)
        if url.scheme not in ("http", "https") or not url.host or url.fragment:
            raise ValueError("http_smsc_url must be an absolute http(s) URL")
        return value

    @field_validator("passthrough_endpoint")
    @classmethod
    def _has_destination(cls, value: str) -> str:
        if "{destination}" not in value:
            raise ValueError("passthrough_endpoint must contain {destination}")
        return value


def secret_references(settings: Settings) -> list[tuple[str, str]]:
    """Every secret reference the service will resolve, ``(setting, ref)``: checked at start, so one whose scheme
    has no resolver is refused before anything runs (not the first time it is needed)."""
    found: list[tuple[str, str]] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if name.endswith("_ref") and isinstance(value, str):
            found.append((f"IIM_{name.upper()}", value))
    found.extend((f"IIM_MASTER_KEY_PREVIOUS_REFS[{i}]", ref) for i, ref in enumerate(settings.master_key_previous_refs))
    found.extend((f"IIM_FS_NODES[{i}].password_ref", node.password_ref) for i, node in enumerate(settings.fs_nodes))

    def walk(where: str, value: object) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and key.endswith("_ref") and isinstance(item, str):
                    found.append((f"{where}.{key}", item))
                else:
                    walk(f"{where}.{key}", item)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(f"{where}[{i}]", item)

    for i, connector in enumerate(settings.connectors):
        walk(f"IIM_CONNECTORS[{i}]", connector)
    return found
