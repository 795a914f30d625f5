"""The running IIM process: policy store and cache, call routing, FreeSWITCH links, HTTP surface."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import secrets
import signal
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from uuid import UUID

from aiohttp import web
from prometheus_client import Histogram

from fs_app.call import Call
from fs_app.dialstring import DialSettings
from fs_app.inbound import InboundClient, InboundPool, InboundSettings
from fs_app.outbound import OutboundServer, OutboundSettings
from fs_app.outreach.calls import AlertCallPlacer
from fs_app.outreach.ivr import IvrRegistry, with_alert_calls
from fs_app.passthrough import make_passthrough_handler
from fs_app.registrations import REGISTRATION_EVENTS, registration_listener
from fs_app.router import PolicyRouter
from iim.admin.api import create_registry_app, mount_registry
from iim.admin.settings import AdminSettings
from iim.call_audit import CallDecisionAudit
from iim.connectors.http import CALLBACK_PREFIX, connector_callback_app, connector_health_routes
from iim.connectors.registry import ConnectorRegistry, default_context
from iim.core.metrics import REGISTRY
from iim.core.secrets import resolve_secret
from iim.home.cloud_call import CloudAnnouncer, cloud_call_step
from iim.home.outbox_sink import OutboxSmsSink
from iim.home.sms_readout import SmsReadoutService
from iim.http import HealthProbe, create_app
from iim.scenarios.worker import IncidentWorker, WorkerSettings
from iim.settings import Settings
from iim.sms.outbox import OutboxRow, SmsSender
from iim.sms.smpp import SmppSettings, SmppTransport
from iim.tts.engine import EspeakTts
from iim.tts.urls import AudioUrlSigner, audio_routes
from iot_bridge.app import BridgeConfig, create_bridge_app
from iot_bridge.ratelimit import RateLimitSettings
from iot_bridge.server_cert import ensure_self_signed
from iot_bridge.tls import TenantCaRegistry, server_context
from policy_cache.audit import AuditFlusher
from policy_cache.cache import PolicyCache
from policy_cache.db import DbRole, Pool, connect_pool
from policy_cache.store import PgPolicyStore

log = logging.getLogger("iim.service")

LOOP_LAG = Histogram("iim_event_loop_lag_seconds", "How late the event loop ran a 100 ms timer",
                     buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5), registry=REGISTRY)


@dataclass(frozen=True, slots=True)
class DatabaseUrls:
    """Where the app role (registry, audit) and the cache role (routing reads) connect."""

    app_url: str
    cache_url: str


class Service:
    """Owns every long-lived resource; ``start`` brings them up, ``stop`` drains them.

    ``database`` skips the bootstrap (tests, or an operator who runs migrations separately).
    """

    def __init__(self, settings: Settings, *, database: DatabaseUrls | None = None) -> None:
        self.settings = settings
        self._database = database
        self.embedded: object | None = None
        self.pool: Pool | None = None
        self.directory_pool: Pool | None = None
        self.store: PgPolicyStore | None = None
        self.cache: PolicyCache | None = None
        self._app_url: str | None = None
        self.audit_flusher: AuditFlusher | None = None
        self.connectors: ConnectorRegistry | None = None
        self.tts: EspeakTts | None = None
        self.audio_urls: AudioUrlSigner | None = None
        self.readout: SmsReadoutService | None = None
        self.sms_sender: SmsSender | None = None
        self.audit: CallDecisionAudit | None = None
        passthrough = make_passthrough_handler(settings.passthrough_endpoint)
        self._passthrough = passthrough
        # Alert calls placed by the scenario worker come back here for their IVR; every other call is routed.
        self.ivr = IvrRegistry(max_pending=10_000)
        self.outbound = OutboundServer(
            with_alert_calls(self.ivr, self._route, on_orphan=self._orphan_call),
            OutboundSettings(host=settings.esl_host, port=settings.esl_port, linger=settings.esl_linger),
            fallback=passthrough,
        )
        self.router: PolicyRouter | None = None
        events = tuple(dict.fromkeys(("BACKGROUND_JOB", *REGISTRATION_EVENTS)))
        self.inbound = [
            InboundClient(InboundSettings(host=n.host, port=n.port, password=n.password(), name=n.name,
                                          events=events))
            for n in settings.fs_nodes
        ]
        self._runner: web.AppRunner | None = None
        self.http_port: int | None = None
        self.worker: IncidentWorker | None = None
        self._lag_watch: asyncio.Task[None] | None = None
        self._bridge_runner: web.AppRunner | None = None
        self.bridge_port: int | None = None

    async def _orphan_call(self, variables: Mapping[str, str]) -> None:
        """An answered alert call whose worker died: the scenario worker settles it and moves on."""
        if self.worker is not None:
            await self.worker.orphan_call(variables)

    async def _route(self, call: Call) -> None:
        """Calls go through the policy router once the store is up, else to the dialled number."""
        handler = self.router or self._passthrough
        await handler(call)

    def _app_pool(self) -> Pool:
        if self.pool is None:
            raise LookupError("policy store not connected")
        return self.pool

    def _directory_pool(self) -> Pool:
        if self.directory_pool is None:
            raise LookupError("policy store not connected")
        return self.directory_pool

    def _esl_health(self) -> dict[str, object]:
        nodes = {c.settings.node: c.connected for c in self.inbound}
        status = "ok" if all(nodes.values()) else "degraded"
        return {"status": status, "active_calls": self.outbound.active_calls, "freeswitch_nodes": nodes}

    def _policy_health(self) -> dict[str, object]:
        if not self.settings.policy_routing:
            return {}
        if self.cache is None:
            return {"status": "degraded", "policy_cache": {"ready": False, "detail": "policy store not connected"}}
        report = self.cache.health()
        if report["status"] == "down":
            report["status"] = "degraded"  # calls still go to the dialled number
        return report

    async def _watch_loop_lag(self) -> None:
        """How late the event loop runs a 100 ms timer: every call, event and job waits that long too."""
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + 0.1
            await asyncio.sleep(0.1)
            lag = max(0.0, loop.time() - expected)
            LOOP_LAG.observe(lag)
            if lag > 0.5:
                log.warning("event loop lagged %.0f ms", lag * 1e3)

    async def start(self) -> None:
        self._lag_watch = asyncio.create_task(self._watch_loop_lag(), name="loop-lag")
        await self.outbound.start()  # calls are answered (passthrough) from the first second
        if self.settings.policy_routing:
            await self._start_policy()
        for client in self.inbound:
            if self.cache is not None:
                client.add_listener(registration_listener(self.cache.set_device_online))
            await client.start()
        probes: list[HealthProbe] = [self._esl_health, self._policy_health]
        root = create_app(probes)
        if self.settings.policy_routing:
            registry_app = create_registry_app(self._app_pool, AdminSettings(), directory_pool=self._directory_pool)
            if self.connectors is not None:
                registry_app.add_routes(connector_health_routes(self.connectors))
            mount_registry(root, registry_app)
        if self.settings.policy_routing and self.pool is not None:
            await self._start_alarms(self.pool)
        self._runner = web.AppRunner(root, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.http_host, self.settings.http_port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.http_port = sockets[0].getsockname()[1] if sockets else self.settings.http_port
        # Everything built so far lives as long as the process: out of the collector's sight, a full
        # collection on the call path scans only what calls and alarms allocate.
        gc.collect()
        gc.freeze()
        log.info(
            "IIM serving",
            extra={"esl": f"{self.settings.esl_host}:{self.outbound.port}",
                   "http": f"{self.settings.http_host}:{self.http_port}",
                   "bridge": f"https://{self.settings.bridge_host}:{self.bridge_port}" if self.bridge_port else None,
                   "policy_cache": self.cache.status().subscribers if self.cache else None},
        )

    async def _start_policy(self) -> None:
        urls = self._database
        if urls is None and self.settings.app_database_url:
            urls = DatabaseUrls(self.settings.app_database_url,
                                self.settings.cache_database_url or self.settings.app_database_url)
        if urls is None:
            from policy_cache.bootstrap import bootstrap

            db = await bootstrap(database_url=self.settings.database_url, data_dir=self.settings.data_dir,
                                 demo=self.settings.demo_data)
            self.embedded = db.embedded
            urls = DatabaseUrls(db.app_url, db.cache_url)
        self._app_url = urls.app_url
        size = self.settings.db_pool_size
        self.pool = await connect_pool(urls.app_url, role=DbRole.APP, min_size=size, max_size=size)
        self.audit_flusher = AuditFlusher(self.pool)
        await self.audit_flusher.start()
        # Read-only, all tenants: for admins listing tenants (RLS hides them from the app role).
        self.directory_pool = await connect_pool(urls.cache_url, role=DbRole.CACHE, min_size=1, max_size=2)
        self.store = PgPolicyStore(urls.cache_url)
        self.cache = PolicyCache(self.store)
        try:
            await self.cache.start(timeout=self.settings.cache_load_timeout)
        except TimeoutError:
            log.error("policy cache not loaded in %s s: routing by dialled number until it is",
                      self.settings.cache_load_timeout)
        self.audit = CallDecisionAudit(self.pool)
        await self.audit.start()
        await self._start_home(self.pool)
        dial = DialSettings(phone_endpoint=self.settings.passthrough_endpoint.replace("{destination}", "{msisdn}"),
                            voicemail_domain=self.settings.sip_domain)
        assert self.connectors is not None
        announce = cloud_call_step(CloudAnnouncer(self.connectors), dial, OutboxSmsSink(self.pool))
        self.router = PolicyRouter(self.cache, self._passthrough, dial=dial, record_decision=self.audit.record,
                                   announce=announce)

    async def _start_home(self, pool: Pool) -> None:
        """The telecom -> home side: connectors, speech, SMS (read aloud under consent, escalation texts)."""
        s = self.settings
        public = s.public_base_url or f"https://{s.bridge_host}:{s.bridge_port}"
        self.connectors = ConnectorRegistry(default_context(callback_base_url=public))
        await self.connectors.load(s.connectors)
        self.tts = EspeakTts(Path(s.data_dir).parent / "tts-cache")
        secret = (resolve_secret(s.audio_url_secret_ref).encode() if s.audio_url_secret_ref
                  else secrets.token_bytes(32))
        self.audio_urls = AudioUrlSigner(secret, public, ttl_s=600)
        hash_key = resolve_secret(s.sms_hash_key_ref).encode() if s.sms_hash_key_ref else None
        self.readout = SmsReadoutService(pool, self.tts, self.audio_urls, self.connectors, OutboxSmsSink(pool),
                                         hash_key=hash_key)
        if s.smpp_host:
            transport = SmppTransport(SmppSettings(host=s.smpp_host, port=s.smpp_port, system_id=s.smpp_system_id,
                                                   password=resolve_secret(s.smpp_password_ref, default=""),
                                                   source_addr=s.smpp_source_addr))
            self.sms_sender = SmsSender(pool, transport, on_mo=self.readout.on_mo, on_undelivered=self._undelivered)
            await self.sms_sender.start()
        else:
            log.warning("no SMSC configured (IIM_SMPP_HOST): SMS stay queued in the outbox")

    async def _undelivered(self, tenant_id: UUID, row: OutboxRow) -> None:
        if self.worker is not None:
            await self.worker.sms_undelivered(tenant_id, row.key, row.incident_id)

    async def _start_alarms(self, pool: Pool) -> None:
        """The home -> telecom half: the HTTPS device bridge and the scenario worker."""
        s = self.settings
        if s.scenario_worker:
            placer = None
            if self.inbound:
                placer = AlertCallPlacer(
                    InboundPool(self.inbound), self.ivr,
                    socket_address=s.alert_socket_address or f"{s.esl_host}:{self.outbound.port}",
                    gateway_dial=DialSettings(phone_endpoint=s.alert_gateway_endpoint.replace("{destination}",
                                                                                             "{msisdn}")))
            app_url = self._app_url
            assert app_url is not None
            self.worker = IncidentWorker(pool, app_url, placer, WorkerSettings(
                caller_id_number=s.alert_caller_id,
                heartbeat_timeout=timedelta(seconds=s.job_heartbeat_timeout_s)), connectors=self.connectors,
                speech=self.tts if s.alert_prompt_tts == "iim" else None)
            await self.worker.start()
        if s.bridge_enabled:
            context, cas = await asyncio.to_thread(_bridge_tls, s)
            config = BridgeConfig(require_client_cert=s.bridge_require_client_cert, rate_limits=RateLimitSettings(
                device_rate=s.bridge_device_rate, device_burst=s.bridge_device_burst,
                source_rate=s.bridge_source_rate, source_burst=s.bridge_source_burst,
                tenant_rate=s.bridge_tenant_rate, tenant_burst=s.bridge_tenant_burst))
            app = create_bridge_app(pool, config, cas=cas if s.bridge_client_cas else None,
                                    opener=self.worker.begin_in if self.worker is not None else None)
            if self.audio_urls is not None and self.tts is not None:
                app.add_routes(audio_routes(self.audio_urls, self.tts))  # speech the vendor clouds fetch
            if self.connectors is not None:
                app.add_subapp(CALLBACK_PREFIX, connector_callback_app(self.connectors))
            self._bridge_runner = web.AppRunner(app, access_log=None)
            await self._bridge_runner.setup()
            site = web.TCPSite(self._bridge_runner, s.bridge_host, s.bridge_port, ssl_context=context)
            await site.start()
            sockets = getattr(site._server, "sockets", None) or []
            self.bridge_port = sockets[0].getsockname()[1] if sockets else s.bridge_port

    async def stop(self) -> None:
        if self._lag_watch is not None:
            self._lag_watch.cancel()
        if self._bridge_runner is not None:
            await self._bridge_runner.cleanup()
        if self.worker is not None:
            await self.worker.stop()
        if self.sms_sender is not None:
            await self.sms_sender.stop()
        if self.connectors is not None:
            await self.connectors.unload_all()
        if self.tts is not None:
            await self.tts.aclose()
        await self.outbound.close(self.settings.drain_timeout)
        for client in self.inbound:
            await client.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.audit is not None:
            await self.audit.close()
        if self.audit_flusher is not None:
            await self.audit_flusher.close()
        if self.cache is not None:
            await self.cache.close()
        if self.store is not None:
            await self.store.close()
        for pool in (self.pool, self.directory_pool):
            if pool is not None:
                await pool.close()
        stop = getattr(self.embedded, "stop", None)
        if stop is not None:
            await asyncio.to_thread(stop)


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


async def run(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM, then drain calls and stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    service = Service(settings)
    try:
        await service.start()
        await stop.wait()
        log.info("stopping: draining calls")
    finally:
        await service.stop()
