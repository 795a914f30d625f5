"""The running IIM process: policy store and cache, call routing, FreeSWITCH links, HTTP surface.

Every long-lived part is an async context manager entered on one ``AsyncExitStack``, in the order the
parts need each other; the service's own background tasks belong to a ``TaskSupervisor`` on the same
stack. So stopping is the reverse of starting, and a start that fails at any stage unwinds exactly what
had started.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import secrets
import ssl
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Self
from uuid import UUID

from aiohttp import web
from prometheus_client import Histogram

from fs_app.call import Call
from fs_app.dialstring import DialSettings
from fs_app.inbound import InboundClient, InboundPool, InboundSettings
from fs_app.outbound import CallHandler, OutboundServer, OutboundSettings
from fs_app.outreach.calls import AlertCallPlacer
from fs_app.outreach.ivr import Adoption, IvrRegistry, with_alert_calls
from fs_app.passthrough import make_passthrough_handler
from fs_app.registrations import REGISTRATION_EVENTS, presence_listener, registration_listener
from fs_app.router import PolicyRouter
from iim import health
from iim.admin.api import create_registry_app, mount_registry
from iim.admin.hubs import hub_command_routes
from iim.admin.incidents import operator_routes
from iim.admin.links import link_routes
from iim.admin.routing import Access, Route
from iim.admin.settings import AdminSettings
from iim.admin.views import audit_heads_view
from iim.call_audit import CallDecisionAudit
from iim.connectors.contract import PresenceReport, PresenceUnavailable
from iim.connectors.http import CALLBACK_PREFIX, PresenceSink, connector_callback_app, connector_list_view
from iim.connectors.registry import ConnectorRegistry, default_context
from iim.core.errors import ConfigError
from iim.core.health import LagWindow, Readiness, readiness
from iim.core.lifecycle import TaskSupervisor
from iim.core.metrics import REGISTRY
from iim.core.secrets import UnresolvableReference, default_resolvers, resolve_secret
from iim.health import HealthMonitor, Source
from iim.home.cloud_call import CloudAnnouncer, cloud_call_step
from iim.home.missed_call import missed_call_sms
from iim.home.outbox_sink import OutboxSmsSink
from iim.home.recorded_message import MessageLinks, RecordedMessages, message_routes
from iim.home.recording_upload import RecordingUploads, UploadLinks, upload_routes
from iim.home.sms_readout import SmsReadoutService
from iim.http import HealthProbe, HttpSite, create_app
from iim.keys import store as key_store
from iim.keys.keyring import Keyring, load_master_keys
from iim.keys_api import KeyRotations, key_routes
from iim.linking.http import callback_routes
from iim.linking.resealing import convert_legacy
from iim.linking.sealing import AesGcmSealer
from iim.linking.service import LinkingService
from iim.privacy.purger import RetentionPurger
from iim.privacy.retention import RetentionDefaults
from iim.scenarios.operator.desk import OperatorDesk
from iim.scenarios.triggers.intake import TriggerIntake
from iim.scenarios.worker import IncidentWorker, WorkerSettings
from iim.settings import Settings, secret_references
from iim.sms.http_smsc import HttpSmscSettings, HttpSmscTransport
from iim.sms.outbox import InboundSms, MoHook, OutboxRow, SmsSender
from iim.sms.smpp import SmppSettings, SmppTransport
from iim.sms.transport import SmsTransport
from iim.supervision.watchdog import DeviceWatchdog, WatchdogSettings
from iim.telemetry import Tracing
from iim.tts.engine import EspeakTts
from iim.tts.switch_audio import SwitchAudio, switch_audio_routes
from iim.tts.urls import AudioUrlSigner, audio_routes, prompt_routes, prompt_url
from iot_bridge.app import BRIDGE_KEY, BridgeConfig, create_bridge_app
from iot_bridge.mqtt.ingress import MqttConfig, MqttIngress
from iot_bridge.ratelimit import RateLimitSettings
from iot_bridge.server_cert import ensure_self_signed
from iot_bridge.sia.receiver import SiaReceiver
from iot_bridge.sia.server import SiaServer, SiaServerConfig
from iot_bridge.tls import TenantCaRegistry, server_context
from policy_cache.audit import AuditFlusher
from policy_cache.audit_heads import AuditHeadPublisher, load_private_key
from policy_cache.cache import PolicyCache
from policy_cache.db import DbRole, Pool, connect_pool
from policy_cache.health import DatabaseProbe
from policy_cache.presence_feed import PresenceFeed, PresenceStoreDown, ReportOutcome
from policy_cache.registrar_presence import VIA as REGISTRAR_VIA
from policy_cache.registrar_presence import RegistrarPresence
from policy_cache.store import PgPolicyStore

log = logging.getLogger("iim.service")

#: Where an HTTP SMSC posts its signed receipts and MO (``receipts``, ``mo``): on the bridge, else the HTTP site.
SMSC_CALLBACK_PREFIX = "/v1/smsc/http"

LOOP_LAG = Histogram("iim_event_loop_lag_seconds", "How late the event loop ran a 100 ms timer",
                     buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5), registry=REGISTRY)


@dataclass(frozen=True, slots=True)
class DatabaseUrls:
    """Where the app role (registry, audit) and the cache role (routing reads) connect."""

    app_url: str
    cache_url: str


@dataclass(frozen=True, slots=True)
class PolicyParts:
    """The policy side, up: its pools, the cache the router reads, and what the home side shares."""

    app_url: str
    pool: Pool
    directory_pool: Pool
    cache: PolicyCache
    router: PolicyRouter
    connectors: ConnectorRegistry
    tts: EspeakTts
    audio_urls: AudioUrlSigner
    switch_audio: SwitchAudio
    database: DatabaseProbe
    keyring: Keyring
    audit_heads: AuditHeadPublisher | None = None
    smsc: SmsTransport | None = None
    #: live presence from registrations and connectors (the app's word comes through the admin API)
    presence: PresenceFeed | None = None
    #: households' account links at cloud connectors (tokens under each tenant's data key)
    linking: LinkingService | None = None


@dataclass(frozen=True, slots=True)
class Running:
    """What exists only once the service has started: the bound ports and the policy side (when enabled)."""

    http_port: int
    bridge_port: int | None
    policy: PolicyParts | None
    worker: IncidentWorker | None


class Service:
    """Owns every long-lived resource: ``async with Service(settings) as service`` runs it.

    ``database`` skips the bootstrap (tests, or an operator who runs migrations separately).
    """

    def __init__(self, settings: Settings, *, database: DatabaseUrls | None = None) -> None:
        self.settings = settings
        self._database = database
        self._passthrough = make_passthrough_handler(settings.passthrough_endpoint)
        # Calls go to the dialled number until the policy router is up.
        self._call_handler: CallHandler = self._passthrough
        # Set while the scenario worker runs: orphaned alert calls and undelivered SMS go to it.
        self._worker: IncidentWorker | None = None
        #: the MQTT ingress for local hubs while it runs (IIM_MQTT_ENABLED)
        self.mqtt: MqttIngress | None = None
        #: the SIA DC-09 alarm receiver while it runs (IIM_SIA_ENABLED)
        self.sia: SiaServer | None = None
        # Alert calls placed by the scenario worker come back here for their IVR; every other call is routed.
        self.ivr = IvrRegistry(max_pending=10_000)
        self.outbound = OutboundServer(
            with_alert_calls(self.ivr, self._route, on_orphan=self._orphan_call, pending=self._placing_call),
            OutboundSettings(host=settings.esl_host, port=settings.esl_port, linger=settings.esl_linger),
            fallback=self._passthrough,
        )
        events = tuple(dict.fromkeys(("BACKGROUND_JOB", *REGISTRATION_EVENTS)))
        self.inbound = [
            InboundClient(InboundSettings(host=n.host, port=n.port, password=n.password(), name=n.name,
                                          events=events))
            for n in settings.fs_nodes
        ]
        self._stack: AsyncExitStack | None = None
        self._running: Running | None = None
        #: the loop-lag watcher's measurements, for /livez
        self.loop_lag = LagWindow()
        # The HTTP SMSC's callback routes, when that transport is the one configured.
        self._smsc_callbacks: web.Application | None = None
        # Messages callers left, when IIM keeps them (IIM_RECORDINGS_DIR).
        self._messages: RecordedMessages | None = None
        # Their uploads from a switch on another host (IIM_RECORDINGS_UPLOAD).
        self._uploads: RecordingUploads | None = None
        #: the connector registry, once loaded, for account linking (which starts before it)
        self._link_connectors: list[ConnectorRegistry] = []

    @property
    def running(self) -> Running:
        if self._running is None:
            raise RuntimeError("the service is not running")
        return self._running

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start every part in order; if one fails, what already started is stopped before the error is raised."""
        if self._stack is not None:
            raise RuntimeError("the service is already running")
        async with AsyncExitStack() as stack:
            running = await self._start(stack)
            self._stack = stack.pop_all()
        self._running = running
        # Everything built so far lives as long as the process: out of the collector's sight, a full
        # collection on the call path scans only what calls and alarms allocate.
        gc.collect()
        gc.freeze()
        log.info(
            "IIM serving",
            extra={"esl": f"{self.settings.esl_host}:{self.outbound.port}",
                   "http": f"{self.settings.http_host}:{running.http_port}",
                   "bridge": f"https://{self.settings.bridge_host}:{running.bridge_port}"
                   if running.bridge_port else None,
                   "policy_cache": running.policy.cache.status().subscribers if running.policy else None},
        )

    async def aclose(self) -> None:
        """Stop in the reverse order of start: calls drain and queues flush while what they need is still up."""
        stack, self._stack = self._stack, None
        self._running = None
        if stack is not None:
            await stack.aclose()

    async def _start(self, stack: AsyncExitStack) -> Running:
        s = self.settings
        try:  # before anything runs: a reference no installed resolver can read is refused, not left unresolved
            default_resolvers().check_all(secret_references(s))
        except UnresolvableReference as exc:
            raise ConfigError(f"secret references: {exc}") from None
        # First in, last out: spans of everything that stops are still flushed.
        await stack.enter_async_context(Tracing(s.traces_exporter, endpoint=s.otlp_traces_endpoint))
        tasks = await stack.enter_async_context(TaskSupervisor())
        tasks.supervise(self._watch_loop_lag, name="loop-lag")
        # Calls are answered (passthrough) from the first second.
        stack.push_async_callback(self.outbound.aclose, s.drain_timeout)
        await self.outbound.start()
        policy = await self._start_policy(stack) if s.policy_routing else None
        if policy is not None:
            tasks.spawn(_watch_speech(policy.tts), name="tts-check")
            tasks.supervise(partial(policy.connectors.run_probes, s.connector_probe_interval_s,
                                    s.connector_probe_timeout_s), name="connector-probes")
            if policy.linking is not None:
                tasks.supervise(partial(policy.linking.run_refresher, s.link_refresh_interval_s),
                                name="link-refresher")
        if policy is not None:
            self._call_handler = policy.router
            stack.callback(setattr, self, "_call_handler", self._passthrough)
        for client in self.inbound:
            if policy is not None:
                client.add_listener(registration_listener(policy.cache.set_device_online))
                if policy.presence is not None:
                    client.add_listener(presence_listener(policy.presence.registration))
            await stack.enter_async_context(client)
        # Stopping drains calls here, before the parts calls use (router, audit, connectors, SMS) stop.
        stack.push_async_callback(self.outbound.aclose, s.drain_timeout)
        monitor = self._health_monitor(policy)
        tasks.supervise(monitor.run, name="health-monitor")
        root = self._http_app(policy, monitor)
        worker = await self._start_worker(stack, policy) if policy is not None and s.scenario_worker else None
        if worker is not None and policy is not None and s.supervision_enabled:
            # Silent devices become incidents through this worker (its clock, its inline start).
            await stack.enter_async_context(DeviceWatchdog(policy.pool, WatchdogSettings(
                grace_s=s.supervision_grace_s, scan_interval_s=s.supervision_scan_interval_s,
                clock=worker.settings.clock), opener=worker.begin_in))
        if s.mqtt_enabled and (policy is None or not s.bridge_enabled):
            raise ConfigError("IIM_MQTT_ENABLED needs policy routing and the device bridge (IIM_BRIDGE_ENABLED)")
        if s.sia_enabled and (policy is None or not s.bridge_enabled):
            raise ConfigError("IIM_SIA_ENABLED needs policy routing and the device bridge (IIM_BRIDGE_ENABLED)")
        if s.sia_enabled and not (s.sia_tcp or s.sia_udp):
            raise ConfigError("IIM_SIA_ENABLED needs IIM_SIA_TCP or IIM_SIA_UDP")
        bridge_port = await self._start_bridge(stack, policy, worker) if policy is not None and s.bridge_enabled \
            else None
        http = await stack.enter_async_context(HttpSite(root, s.http_host, s.http_port))
        return Running(http_port=http.port, bridge_port=bridge_port, policy=policy, worker=worker)

    async def _orphan_call(self, variables: Mapping[str, str]) -> Adoption | None:
        """An answered alert call whose worker died: the scenario worker adopts it (its IVR runs here)."""
        if self._worker is not None:
            return await self._worker.orphan_call(variables)
        return None

    def _placing_call(self, call_uuid: str) -> bool:
        return self._worker is not None and self._worker.placing(call_uuid)

    async def _route(self, call: Call) -> None:
        """Calls go through the policy router once the store is up, else to the dialled number."""
        await self._call_handler(call)

    def _esl_health(self) -> dict[str, object]:
        nodes = {c.settings.node: c.connected for c in self.inbound}
        status = "ok" if all(nodes.values()) else "degraded"
        return {"status": status, "active_calls": self.outbound.active_calls, "freeswitch_nodes": nodes}

    async def _watch_loop_lag(self) -> None:
        """How late the event loop runs a 100 ms timer: every call, event and job waits that long too."""
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + 0.1
            await asyncio.sleep(0.1)
            lag = max(0.0, loop.time() - expected)
            LOOP_LAG.observe(lag)
            self.loop_lag.record(time.monotonic(), lag)
            if lag > 0.5:
                log.warning("event loop lagged %.0f ms", lag * 1e3)

    def _health_monitor(self, policy: PolicyParts | None) -> HealthMonitor:
        """Every dependency ``/health`` details (PostgreSQL, each FreeSWITCH node, the SMSC, each connector,
        speech, the hubs' MQTT broker) and what ``/readyz`` requires."""
        sources: list[Source] = [health.freeswitch(self.inbound)]
        if policy is not None:
            sources[:0] = [health.database(policy.database)]
            if policy.smsc is not None:
                sources.append(health.smsc(policy.smsc))
            sources += [health.connectors(policy.connectors), health.tts(policy.tts)]
            if self.settings.mqtt_enabled:  # the ingress starts after this monitor: read when asked
                sources.append(health.mqtt(lambda: self.mqtt, f"{self.settings.mqtt_host}:{self.settings.mqtt_port}"))
        alert_calls = policy is not None and self.settings.scenario_worker and bool(self.inbound)

        def ready() -> Readiness:
            answering = None if policy is None else bool(policy.database.health()["status"] == "ok")
            return readiness(database_answering=answering,
                             cache_loaded=None if policy is None else policy.cache.ready,
                             alert_calls=alert_calls, nodes_connected=sum(c.connected for c in self.inbound))

        return HealthMonitor(sources, ready, loop_lag=self.loop_lag,
                             max_loop_lag_s=self.settings.livez_max_loop_lag_s)

    def _http_app(self, policy: PolicyParts | None, monitor: HealthMonitor) -> web.Application:
        """``/metrics``, ``/health``, ``/readyz``, ``/livez`` and, with policy routing, the registry API under
        ``/v1``."""
        probes: list[HealthProbe] = [self._esl_health]
        if policy is not None:
            probes.append(_policy_health(policy.cache))
            probes.append(policy.tts.health)  # degraded while speech fails: alert calls play the generic prompt
            probes.append(policy.database.health)
        root = create_app(probes, health=monitor)
        if policy is not None:
            if policy.linking is not None:
                callback_routes(root, policy.linking)  # the vendors send households back here (OAuth2)
            root.add_routes(prompt_routes(policy.tts))  # what FreeSWITCH plays for IIM (mod_http_cache)
            root.add_routes(switch_audio_routes(policy.switch_audio, policy.tts))  # alert calls' own prompts
            if self._messages is not None:
                root.add_routes(message_routes(self._messages))  # messages callers left, by signed link
            if self._uploads is not None:
                root.add_routes(upload_routes(self._uploads))  # ... as a switch elsewhere uploads them
            connectors = Route("GET", "/connectors", connector_list_view(policy.connectors), "listConnectors",
                               "Configured connectors: capabilities and health", "connectors", Access.READ)
            extra = [connectors]
            if policy.audit_heads is not None:
                extra.append(Route("GET", "/audit/head", audit_heads_view(policy.audit_heads.latest), "getAuditHeads",
                                   "The signed audit chain heads last published (a tenant token: its own)",
                                   "audit", Access.READ))
            admin_settings = AdminSettings()
            # Incidents and tests: decisions and test calls go through this process's scenario worker.
            desk = OperatorDesk(lambda: policy.pool, lambda: self._worker, policy.connectors,
                                deadline_s=admin_settings.store_deadline_s)
            extra.extend(operator_routes(desk))
            extra.extend(link_routes(lambda: policy.linking))
            extra.extend(hub_command_routes(lambda: self.mqtt))  # commands to hubs over MQTT (when it runs)
            # Data keys: status and rotation jobs (admin only); the jobs end with the HTTP site.
            # Jobs are kept in the database: those a previous run left are resumed once the site starts.
            rotations = KeyRotations(lambda: policy.pool, lambda: policy.keyring,
                                     lambda: None if policy.linking is None else policy.linking.legacy,
                                     directory=lambda: policy.directory_pool,
                                     deadline_s=admin_settings.store_deadline_s)
            root.on_startup.append(lambda _app: rotations.start())
            root.on_cleanup.append(lambda _app: rotations.aclose())
            extra.extend(key_routes(rotations, lambda: policy.pool, lambda: policy.directory_pool,
                                    lambda: policy.keyring))
            registry_app = create_registry_app(lambda: policy.pool, admin_settings,
                                               directory_pool=lambda: policy.directory_pool,
                                               extra_routes=tuple(extra), recordings_dir=self._recordings_dir(),
                                               unlink_on_erase=None if policy.linking is None
                                               else policy.linking.unlink_for_erasure)
            mount_registry(root, registry_app)
            if self._smsc_callbacks is not None and not self.settings.bridge_enabled:
                root.add_subapp(SMSC_CALLBACK_PREFIX, self._smsc_callbacks)
        return root

    async def _start_policy(self, stack: AsyncExitStack) -> PolicyParts:
        s = self.settings
        urls = self._database
        if urls is None and s.app_database_url:
            urls = DatabaseUrls(s.app_database_url, s.cache_database_url or s.app_database_url)
        if urls is None:
            from policy_cache.bootstrap import bootstrap

            db = await stack.enter_async_context(
                await bootstrap(database_url=s.database_url, data_dir=s.data_dir, demo=s.demo_data))
            urls = DatabaseUrls(db.app_url, db.cache_url)
        # asyncpg's pools are async context managers already (closed on exit).
        pool = await stack.enter_async_context(
            await connect_pool(urls.app_url, role=DbRole.APP, min_size=s.db_pool_size, max_size=s.db_pool_size,
                               command_timeout=s.db_command_timeout_s, acquire_timeout=s.db_acquire_timeout_s))
        database = await stack.enter_async_context(DatabaseProbe(pool))
        keyring = await self._keyring(pool)
        # Entered before the flusher, so closed after it: the heads signed at stop include the last lines.
        heads = await stack.enter_async_context(self._audit_heads(pool)) if s.audit_head_key_ref else None
        if heads is None:
            log.warning("audit chain heads are not signed nor published (IIM_AUDIT_HEAD_KEY_REF unset)")
        await stack.enter_async_context(AuditFlusher(pool))
        await stack.enter_async_context(RetentionPurger(pool, RetentionDefaults(
            sms_body_s=int(s.sms_body_retention_s), event_payload_s=s.retention_event_payload_s,
            audit_detail_s=s.retention_audit_detail_s, hub_command_s=s.retention_hub_command_s),
            interval_s=s.retention_purge_interval_s,
            recordings_dir=self._recordings_dir()))
        # Read-only, all tenants: for admins listing tenants (RLS hides them from the app role).
        directory_pool = await stack.enter_async_context(
            await connect_pool(urls.cache_url, role=DbRole.CACHE, min_size=1, max_size=2,
                               command_timeout=s.db_command_timeout_s, acquire_timeout=s.db_acquire_timeout_s))
        presence = await stack.enter_async_context(PresenceFeed(
            pool, directory_pool, prune_interval_s=s.presence_prune_interval_s, prune_keep_s=s.presence_claim_keep_s,
            prune_batch=s.presence_prune_batch))
        if s.registrar_presence:  # the Kamailio edge's registrations (kamailio.location), read as the cache role
            await stack.enter_async_context(RegistrarPresence(
                urls.cache_url, directory_pool, partial(presence.registration, via=REGISTRAR_VIA),
                edge_time_zone=s.registrar_edge_time_zone,
                reconcile_interval_s=s.registrar_reconcile_interval_s))
        store = await stack.enter_async_context(PgPolicyStore(urls.cache_url))
        cache = PolicyCache(store)
        stack.push_async_callback(cache.aclose)
        try:
            await cache.start(timeout=s.cache_load_timeout)
        except TimeoutError:
            log.error("policy cache not loaded in %s s: routing by dialled number until it is", s.cache_load_timeout)
        audit = await stack.enter_async_context(CallDecisionAudit(pool))
        linking = await self._start_linking(stack, pool, directory_pool, keyring)
        # Calls and SMS that start scenarios: queued off their paths, opened on the durable incident path.
        triggers = await stack.enter_async_context(TriggerIntake(
            pool, capacity=s.trigger_queue_capacity, max_age_s=s.trigger_max_age_s,
            retry_max_s=s.trigger_retry_max_s))
        connectors, tts, audio_urls, smsc = await self._start_home(stack, pool, keyring, linking, triggers=triggers)
        audio_base = s.switch_audio_base_url or f"http://{s.http_host}:{s.http_port}"
        sms = OutboxSmsSink(pool, keyring)
        self._messages = self._recorded_messages(pool, sms, connectors)
        dial = DialSettings(phone_endpoint=s.passthrough_endpoint.replace("{destination}", "{msisdn}"),
                            speaker_endpoint=s.speaker_endpoint,
                            confirm_prompt=prompt_url(audio_base, "confirm-call"),
                            voicemail_prompt=prompt_url(audio_base, "leave-message"))
        if self._messages is not None:  # the switch records where IIM keeps the messages, or uploads them there
            self._uploads = self._recording_uploads(self._messages.recordings_dir, audio_base)
            dial = replace(dial, recordings_dir=str(self._messages.recordings_dir),
                           recording_url=self._uploads.links.url if self._uploads is not None else None)
        announce = cloud_call_step(CloudAnnouncer(connectors), dial, sms, on_answer=audit.record_answer)
        router = PolicyRouter(cache, self._passthrough, dial=dial, record_decision=audit.record,
                              record_answer=audit.record_answer, announce=announce, missed_call=missed_call_sms(sms),
                              message=self._messages, on_inbound=triggers.on_call)
        try:
            switch_secret = (resolve_secret(s.switch_audio_secret_ref).encode() if s.switch_audio_secret_ref
                             else secrets.token_bytes(32))
            switch_audio = SwitchAudio(switch_secret, s.switch_audio_base_url)
        except (LookupError, ValueError) as exc:
            raise ConfigError(f"switch audio URLs: {exc}") from None
        if s.switch_audio_base_url is None:
            log.info("alert prompts are handed to FreeSWITCH as local files (single-host mode: "
                     "IIM_SWITCH_AUDIO_BASE_URL unset)")
        return PolicyParts(app_url=urls.app_url, pool=pool, directory_pool=directory_pool, cache=cache, router=router,
                           connectors=connectors, tts=tts, audio_urls=audio_urls, switch_audio=switch_audio,
                           audit_heads=heads, database=database, smsc=smsc, presence=presence, keyring=keyring,
                           linking=linking)

    async def _keyring(self, pool: Pool) -> Keyring:
        """Tenants' data keys under the master key; the registry's secret references are checked here too (a
        ``vault:`` row without a vault resolver is refused at start, not when a device first signs with it)."""
        s = self.settings
        master, previous = load_master_keys(s.master_key_ref, s.master_key_previous_refs,
                                            generated_file=Path(s.data_dir).parent / "master.key")
        schemes = await key_store.credential_ref_schemes(pool)
        missing = sorted(set(schemes) - default_resolvers().schemes)
        if missing:
            raise ConfigError("credential references in the registry use "
                              + ", ".join(f"{name}: ({schemes[name]} rows)" for name in missing)
                              + f" but no resolver for {', '.join(missing)} is installed "
                              f"(installed: {', '.join(sorted(default_resolvers().schemes))})")
        keyring = Keyring(pool, master, previous=previous, cache_size=s.data_key_cache_size)
        unknown = {m: n for m, n in (await key_store.data_key_masters(pool)).items() if m not in keyring.master_ids}
        if unknown:
            raise ConfigError(
                "data keys in the database are wrapped by master key(s) "
                + ", ".join(f"{m} ({n} keys)" for m, n in sorted(unknown.items()))
                + f" but this instance has {', '.join(sorted(keyring.master_ids))}: give IIM_MASTER_KEY_REF (and "
                "IIM_MASTER_KEY_PREVIOUS_REFS during a rotation) the master key the other instances use")
        return keyring

    def _recordings_dir(self) -> Path | None:
        """Where recorded messages are kept (``IIM_RECORDINGS_DIR``): the purge and erasure delete files there."""
        return Path(self.settings.recordings_dir).resolve() if self.settings.recordings_dir else None

    def _recorded_messages(self, pool: Pool, sms: OutboxSmsSink,
                           connectors: ConnectorRegistry | None = None) -> RecordedMessages | None:
        """Messages callers leave, kept and announced with a signed link (only with ``IIM_RECORDINGS_DIR``)."""
        s = self.settings
        if not s.recordings_dir:
            if s.recordings_upload:
                raise ConfigError("IIM_RECORDINGS_UPLOAD needs IIM_RECORDINGS_DIR (where IIM keeps the uploads)")
            log.info("recorded messages stay on the switch (IIM_RECORDINGS_DIR unset): missed-call SMS only")
            return None
        directory = Path(s.recordings_dir).resolve()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            secret = (resolve_secret(s.message_link_secret_ref).encode() if s.message_link_secret_ref
                      else secrets.token_bytes(32))
            links = MessageLinks(secret, s.message_link_base_url or f"http://{s.http_host}:{s.http_port}",
                                 ttl_s=s.message_link_ttl_s)
        except (LookupError, ValueError, OSError) as exc:
            raise ConfigError(f"recorded messages: {exc}") from None
        return RecordedMessages(pool, directory, links, sms, retention=timedelta(seconds=s.recording_retention_s),
                                connectors=connectors, notify_timeout_s=s.message_notify_timeout_s,
                                notify_attempts=s.message_notify_attempts)

    def _recording_uploads(self, directory: Path, base_url: str) -> RecordingUploads | None:
        """Where a switch on another host uploads the messages it records (only with ``IIM_RECORDINGS_UPLOAD``)."""
        s = self.settings
        if not s.recordings_upload:
            return None
        try:
            secret = (resolve_secret(s.recording_upload_secret_ref).encode() if s.recording_upload_secret_ref
                      else secrets.token_bytes(32))
            links = UploadLinks(secret, base_url)
        except (LookupError, ValueError) as exc:
            raise ConfigError(f"recording uploads: {exc}") from None
        log.info("the switch uploads recorded messages to %s/v1/recordings", links.base_url)
        return RecordingUploads(directory, links, timeout_s=s.recording_upload_timeout_s)

    def _audit_heads(self, pool: Pool) -> AuditHeadPublisher:
        s = self.settings
        assert s.audit_head_key_ref is not None
        try:
            key = load_private_key(s.audit_head_key_ref)
        except (LookupError, ValueError) as exc:
            raise ConfigError(f"audit head signing key: {exc}") from None
        heads_file = Path(s.audit_heads_file) if s.audit_heads_file else Path(s.data_dir).parent / "audit-heads.jsonl"
        return AuditHeadPublisher(pool, key, heads_file=heads_file, interval=s.audit_head_interval_s)

    async def _start_linking(self, stack: AsyncExitStack, pool: Pool, directory_pool: Pool,
                             keyring: Keyring) -> LinkingService:
        """Account linking (tokens sealed under each tenant's data key); its connectors are bound once they are
        loaded. Link secrets still in the old format are re-sealed first, with the old key
        (``IIM_LINK_TOKEN_KEY_REF``) if it is given; old-format tokens without it refuse the start."""
        s = self.settings
        legacy = None
        if s.link_token_key_ref is not None:
            try:
                legacy = AesGcmSealer.from_secret(resolve_secret(s.link_token_key_ref))
            except (LookupError, ValueError) as exc:
                raise ConfigError(f"IIM_LINK_TOKEN_KEY_REF: {exc}") from None
        await convert_legacy(pool, keyring, legacy)
        holder: list[ConnectorRegistry] = []
        self._link_connectors = holder

        def connectors() -> ConnectorRegistry:
            if not holder:
                raise LookupError("connectors are not loaded yet")
            return holder[0]

        return await stack.enter_async_context(LinkingService(lambda: pool, lambda: directory_pool, connectors, keyring,
                                                              legacy=legacy))

    async def _start_home(self, stack: AsyncExitStack, pool: Pool, keyring: Keyring,
                          linking: LinkingService | None = None, *, triggers: TriggerIntake | None = None,
                          ) -> tuple[ConnectorRegistry, EspeakTts, AudioUrlSigner, SmsTransport | None]:
        """The telecom -> home side: connectors, speech, SMS (read aloud under consent, escalation texts)."""
        s = self.settings
        public = s.public_base_url or f"https://{s.bridge_host}:{s.bridge_port}"
        connectors = await stack.enter_async_context(ConnectorRegistry(default_context(
            callback_base_url=public, linked_tokens=linking)))
        await connectors.load(s.connectors)
        if linking is not None:
            self._link_connectors.append(connectors)
        tts = await stack.enter_async_context(EspeakTts(Path(s.data_dir).parent / "tts-cache",
                                                                library=s.tts_library))
        secret = (resolve_secret(s.audio_url_secret_ref).encode() if s.audio_url_secret_ref
                  else secrets.token_bytes(32))
        audio_urls = AudioUrlSigner(secret, public, ttl_s=600)
        hash_key = resolve_secret(s.sms_hash_key_ref).encode() if s.sms_hash_key_ref else None
        readout = SmsReadoutService(pool, tts, audio_urls, connectors, OutboxSmsSink(pool, keyring),
                                     hash_key=hash_key)
        transport = self._sms_transport()
        if transport is not None:
            # The sender owns its transport: it starts it and closes it after the last receipts are written.
            await stack.enter_async_context(
                SmsSender(pool, transport, keyring=keyring,
                          on_mo=_both(readout.on_mo, triggers.on_mo) if triggers else readout.on_mo,
                          on_undelivered=self._undelivered,
                          mo_body_retention=s.sms_body_retention_s))
        else:
            log.warning("no SMSC configured (IIM_SMPP_HOST or IIM_HTTP_SMSC_URL): SMS stay queued in the outbox")
        return connectors, tts, audio_urls, transport

    def _sms_transport(self) -> SmsTransport | None:
        """The one SMSC the settings name: SMPP (``IIM_SMPP_HOST``) or an HTTP SMSC API (``IIM_HTTP_SMSC_URL``)."""
        s = self.settings
        if s.smpp_host and s.http_smsc_url:
            raise ConfigError("both IIM_SMPP_HOST and IIM_HTTP_SMSC_URL are set: configure one SMSC")
        if s.smpp_host:
            return SmppTransport(SmppSettings(host=s.smpp_host, port=s.smpp_port, system_id=s.smpp_system_id,
                                              password=resolve_secret(s.smpp_password_ref, default=""),
                                              source_addr=s.smpp_source_addr))
        if s.http_smsc_url:
            http = HttpSmscTransport(HttpSmscSettings(url=s.http_smsc_url, secret_ref=s.http_smsc_secret_ref,
                                                      source_addr=s.http_smsc_source_addr,
                                                      timeout=s.http_smsc_timeout_s))
            try:
                http.check_secret()
            except (LookupError, ValueError) as exc:
                raise ConfigError(f"HTTP SMSC secret: {exc}") from None
            self._smsc_callbacks = http.web_app()
            return http
        return None

    async def _undelivered(self, tenant_id: UUID, row: OutboxRow) -> None:
        if self._worker is not None:
            await self._worker.sms_undelivered(tenant_id, row.key, row.incident_id)

    async def _start_worker(self, stack: AsyncExitStack, policy: PolicyParts) -> IncidentWorker:
        """The home -> telecom half: incidents, their alert calls and SMS."""
        s = self.settings
        placer = None
        if self.inbound:
            placer = AlertCallPlacer(
                InboundPool(self.inbound), self.ivr,
                socket_address=s.alert_socket_address or f"{s.esl_host}:{self.outbound.port}",
                gateway_dial=DialSettings(phone_endpoint=s.alert_gateway_endpoint.replace("{destination}",
                                                                                         "{msisdn}"),
                                          speaker_endpoint=s.speaker_endpoint))
        worker = IncidentWorker(
            policy.pool, policy.app_url, placer,
            WorkerSettings(caller_id_number=s.alert_caller_id,
                           heartbeat_timeout=timedelta(seconds=s.job_heartbeat_timeout_s)),
            connectors=policy.connectors, speech=policy.tts if s.alert_prompt_tts == "iim" else None,
            prompt_location=policy.switch_audio.playable, keyring=policy.keyring)
        self._worker = worker
        stack.callback(setattr, self, "_worker", None)  # once the worker has stopped (the stack unwinds LIFO)
        return await stack.enter_async_context(worker)

    async def _start_bridge(self, stack: AsyncExitStack, policy: PolicyParts, worker: IncidentWorker | None) -> int:
        """The HTTPS device bridge, with the speech vendor clouds fetch and their action callbacks."""
        s = self.settings
        context, cas = await asyncio.to_thread(_bridge_tls, s)
        config = BridgeConfig(require_client_cert=s.bridge_require_client_cert, rate_limits=RateLimitSettings(
            device_rate=s.bridge_device_rate, device_burst=s.bridge_device_burst,
            source_rate=s.bridge_source_rate, source_burst=s.bridge_source_burst,
            tenant_rate=s.bridge_tenant_rate, tenant_burst=s.bridge_tenant_burst),
            store_deadline_s=s.bridge_store_deadline_s)
        app = create_bridge_app(policy.pool, config, cas=cas if s.bridge_client_cas else None,
                                opener=worker.begin_in if worker is not None else None, keys_dsn=policy.app_url)
        app.add_routes(audio_routes(policy.audio_urls, policy.tts))  # speech the vendor clouds fetch
        app.add_subapp(CALLBACK_PREFIX, connector_callback_app(
            policy.connectors, presence=_presence_sink(policy.presence) if policy.presence is not None else None))
        if self._smsc_callbacks is not None:
            app.add_subapp(SMSC_CALLBACK_PREFIX, self._smsc_callbacks)
        site = await stack.enter_async_context(HttpSite(app, s.bridge_host, s.bridge_port, ssl_context=context))
        if s.mqtt_enabled:
            self.mqtt = await stack.enter_async_context(MqttIngress(app[BRIDGE_KEY], _mqtt_config(s)))
            stack.callback(setattr, self, "mqtt", None)
        if s.sia_enabled:
            self.sia = await stack.enter_async_context(SiaServer(SiaReceiver(app[BRIDGE_KEY]), SiaServerConfig(
                host=s.sia_host, port=s.sia_port, tcp=s.sia_tcp, udp=s.sia_udp, idle_timeout_s=s.sia_idle_timeout_s)))
            stack.callback(setattr, self, "sia", None)
        return site.port


def _both(first: MoHook, second: MoHook) -> MoHook:
    """One MO hook that runs two: the scenario trigger (which only queues) first, so a slow read-aloud never
    holds it back."""
    async def hook(tenant_id: UUID, sms: InboundSms) -> None:
        await second(tenant_id, sms)
        await first(tenant_id, sms)
    return hook


async def _watch_speech(tts: EspeakTts, interval: float = 60.0) -> None:
    """Probe speech at start and every ``interval``: ``/health`` says ``degraded`` while it fails, also when no
    call has needed it yet, and ``ok`` again once it works."""
    while True:
        await tts.check()
        await asyncio.sleep(interval)


def _presence_sink(feed: PresenceFeed) -> PresenceSink:
    """Connectors' home/away reports into the presence feed (``POST /v1/connectors/{name}/presence``)."""

    async def sink(connector: str, report: PresenceReport) -> bool:
        try:
            outcome = await feed.connector_report(connector, report.target, report.state, report.ttl_s,
                                                  report.subject)
        except PresenceStoreDown as exc:
            raise PresenceUnavailable(str(exc)) from exc
        return outcome is ReportOutcome.APPLIED

    return sink


def _policy_health(cache: PolicyCache) -> HealthProbe:
    """The cache's health for ``/health``: an unloaded cache degrades the service (calls go to the dialled number)."""

    def probe() -> dict[str, object]:
        report = cache.health()
        if report["status"] == "down":
            report["status"] = "degraded"  # calls still go to the dialled number
        return report

    return probe


def _mqtt_config(s: Settings) -> MqttConfig:
    """The MQTT ingress's settings; IIM's client certificate is required (the broker knows IIM by it)."""
    if not (s.mqtt_cert_file and s.mqtt_key_file):
        raise ConfigError("IIM_MQTT_ENABLED needs IIM_MQTT_CERT_FILE and IIM_MQTT_KEY_FILE (IIM's client certificate)")
    return MqttConfig(cert_file=Path(s.mqtt_cert_file), key_file=Path(s.mqtt_key_file),
                      ca_file=Path(s.mqtt_ca_file) if s.mqtt_ca_file else None, host=s.mqtt_host, port=s.mqtt_port,
                      client_id=s.mqtt_client_id, prefix=s.mqtt_topic_prefix, keepalive_s=s.mqtt_keepalive_s,
                      hub_rate=s.mqtt_hub_rate, hub_burst=s.mqtt_hub_burst)


def _bridge_tls(s: Settings) -> tuple[ssl.SSLContext, TenantCaRegistry]:
    """The bridge's server context and the per-tenant device CAs (files read once, at start)."""
    if s.bridge_tls_cert_file and s.bridge_tls_key_file:
        cert, key = Path(s.bridge_tls_cert_file), Path(s.bridge_tls_key_file)
    else:
        cert, key = ensure_self_signed(Path(s.data_dir).parent / "tls")
        log.warning("device bridge: no certificate configured; using a self-signed one in %s", cert.parent)
    cas = TenantCaRegistry()
    for tenant, ca_file in s.bridge_client_cas.items():
        cas.add(tenant, Path(ca_file).read_bytes())
    context = server_context(cert, key, client_ca_files=[Path(f) for f in s.bridge_client_cas.values()],
                             require_client_cert=s.bridge_require_client_cert)
    return context, cas
