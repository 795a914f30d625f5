"""The incident worker: runs the engine's decisions, placing their calls itself or through pgqueuer jobs.

A decision (on open, after each outcome, at each deadline) is written in one statement with its actions.
Its alert calls are claimed under the tenant's toll-fraud caps in the same transaction and placed as soon
as it commits, by the process that decided (no job hop); near the caps they are claimed exactly right
after the commit instead. A call's key is marked dispatched (committed) *before* the originate is sent,
so nobody is dialled twice: a worker that dies while its call rings leaves the call to the group's
deadline (or, if the callee answers, to whichever process the call's IVR reaches, which settles it at
once). Two job kinds remain: ``incident.tick`` (the intake's fallback, "cleared" events) and
``incident.action`` (notifications through a connector, calls retried after FreeSWITCH was unreachable,
calls of a worker without a switch, calls a toll-fraud cap keeps waiting for a place); a resumed action job
that finds its call dispatched asks the switch (``uuid_exists``) and never redials. A call is marked sent once
the switch accepted its originate; one claimed and never sent (its process killed in between) is taken over by
the sweep of any worker and placed, or adopted when the switch already has its ``origination_uuid``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from uuid import UUID

from pgqueuer.core.executors import DatabaseRetryEntrypointExecutor, EntrypointExecutorParameters
from pgqueuer.core.qm import QueueManager
from pgqueuer.domain import models as pgq_models
from pgqueuer.types import Channel
from prometheus_client import Counter, Histogram

from fs_app.outreach import metrics as outreach_metrics
from fs_app.outreach.calls import AlertCall, AlertCallPlacer, CallOutcome, CallOutcomeKind
from fs_app.outreach.guard import (
    OriginateLimits,
    Refusal,
    Wait,
    check_caps,
    destination_kind,
    destination_refusal,
    limits_from,
)
from fs_app.outreach.ivr import Adoption, IvrResult
from fs_app.outreach.prompts import GENERIC_ALARM_PROMPT, speakable
from iim.connectors.contract import Connector, ConnectorError, ConnectorLookup, Notification
from iim.core.errors import STORE_UNAVAILABLE
from iim.core.lifecycle import AsyncResource, TaskSupervisor
from iim.core.metrics import REGISTRY
from iim.core.tracing import CHANNEL_VARIABLE, Span, SpanKind, attrs, context_from, span, traceparent_of
from iim.keys.keyring import Keyring
from iim.scenarios import store
from iim.scenarios.consent import refusal as consent_refusal
from iim.scenarios.engine import (
    CALL_SLACK_S,
    REARM_COOL_DOWN,
    TERMINAL,
    ActionOutcome,
    Advance,
    IncidentState,
    PlaceCall,
    Progress,
    RecordMessage,
    advance,
    begin,
    current_actions,
    on_cleared,
    ready_to_advance,
    rearm,
    reopen,
    select_scenario,
    settle,
)
from iim.scenarios.model import IvrOutcome, Scenario
from iim.scenarios.templates import TEMPLATES
from iim.tts.engine import TtsUnavailable
from iot_bridge.intake import IncidentJobs
from policy_cache import errors as store_errors
from policy_cache import jobs
from policy_cache.db import Connection, DbRole, Pool, connect, tenant_tx

__all__ = ["IncidentWorker", "WorkerSettings"]

log = logging.getLogger(__name__)

INCIDENTS = Counter("iim_incidents", "Incident transitions, by state reached", ["state"], registry=REGISTRY)
ACTIONS = Counter("iim_incident_actions", "Incident actions performed, by kind and outcome", ["kind", "outcome"],
                  registry=REGISTRY)
STEP_SECONDS = Histogram("iim_incident_step_seconds", "From a decision to the action's outcome, by kind",
                         ["kind"], buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 15, 30, 60, 120), registry=REGISTRY)
ORIGINATE_REFUSED = outreach_metrics.REFUSALS  # one name per concept: iim_originate_refused
ORIGINATE_CLAIMS = Counter("iim_originate_claims", "Alert calls claimed under the toll-fraud caps, by where: with "
                           "the decision (far below the caps), after_commit (near them, exact), job (retries)",
                           ["path"], registry=REGISTRY)
ORIGINATE_QUEUED = Counter("iim_originate_queued", "Alert calls a toll-fraud cap kept waiting (queued and tried "
                           "again, not refused), by cap", ["reason"], registry=REGISTRY)
PROMPT_FALLBACKS = Counter("iim_alert_prompt_fallbacks", "Alert calls that played the generic prompt instead of "
                           "their own, by why: unavailable (speech failed), refused (text it cannot say), late "
                           "(answered before the render), no_generic (not even the generic one)", ["reason"],
                           registry=REGISTRY)
CONSENT_REFUSED = Counter("iim_consent_refused", "Incident actions refused for want of consent, by purpose",
                          ["purpose"], registry=REGISTRY)
ORPHANED_CALLS = Counter("iim_alert_calls_orphaned", "Answered alert calls whose worker had died, adopted here",
                         registry=REGISTRY)

_REACHED_BY_CALL = {
    CallOutcomeKind.ANSWERED: ActionOutcome.ANSWERED, CallOutcomeKind.NO_ANSWER: ActionOutcome.NO_ANSWER,
    CallOutcomeKind.BUSY: ActionOutcome.BUSY, CallOutcomeKind.FAILED: ActionOutcome.FAILED,
    CallOutcomeKind.UNREACHABLE: ActionOutcome.UNREACHABLE, CallOutcomeKind.REFUSED: ActionOutcome.REFUSED,
}


@dataclass
class WorkerSettings:
    caller_id_number: str = "+70000000000"
    caller_id_name: str = "IIM alarm"
    default_limits: OriginateLimits = field(default_factory=OriginateLimits)
    #: a job whose worker stopped heart-beating this long ago is picked up again (crash recovery)
    heartbeat_timeout: timedelta = timedelta(seconds=30)
    max_concurrent_jobs: int = 500
    #: how often live incidents past their deadline are looked for (deadlines are not parked as jobs)
    sweep_interval_s: float = 0.5
    #: how often the sweep deletes toll-fraud counters older than the caps' window
    window_prune_interval_s: float = 300.0
    #: after an exhausted chain, the same device and hazard alarming again is held this long (engine.rearm)
    rearm_cool_down: timedelta = REARM_COOL_DOWN
    #: a call claimed this long ago and never sent (its process died in between) is placed by any worker
    unsent_grace_s: float = 15.0
    #: how often the sweep looks for such calls (and once at start)
    unsent_interval_s: float = 2.0
    batch_size: int = 20
    #: FreeSWITCH unreachable: the call is retried after these delays (an SMS goes out at once)
    unreachable_retries: tuple[float, ...] = (2.0, 8.0, 30.0)
    #: a placed call's outcome is written again after these delays while PostgreSQL is away
    store_retry_delays: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
    tts_engine: str = "flite"
    tts_voice: str = "kal"
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))


class RenderedPrompt(Protocol):
    @property
    def path(self) -> Path: ...

    @property
    def key(self) -> str: ...


#: What the switch is told to play for a rendered prompt (``iim.tts.switch_audio.SwitchAudio.playable``: a signed
#: ``http_cache://`` URL to IIM's HTTP site, or the local path when IIM and FreeSWITCH share a host).
PromptLocation = Callable[[RenderedPrompt], str]


class PromptRenderer(Protocol):
    """Speech for IVR prompts (``iim.tts.engine.EspeakTts``): the call's own text, and the generic prompt with
    the IVR's instructions that plays until (or instead of) it."""

    async def render(self, text: str, *, voice: str | None = None) -> RenderedPrompt: ...

    async def generic(self, meanings: Mapping[str, str], *, record: bool = False) -> RenderedPrompt: ...


@dataclass(frozen=True, slots=True)
class _Placement:
    """A call of a committed decision: claimed with it (``claim_under`` None), or to claim under these
    limits first."""

    tenant_id: UUID
    incident: store.IncidentRow
    key: str
    kind: str
    call: AlertCall
    meanings: dict[str, str]
    claim_under: OriginateLimits | None


@dataclass
class _AfterCommit:
    """What a decision leaves for after its transaction commits: ringing calls of a decided group to hang
    up, calls to place, incidents to judge again."""

    ringing: list[store.ActionRow] = field(default_factory=list)
    calls: list[_Placement] = field(default_factory=list)
    retick: list[tuple[UUID, UUID]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.ringing or self.calls or self.retick)


def _ids(job: pgq_models.Job) -> dict[str, str]:
    payload: dict[str, str] = json.loads(job.payload or b"{}")
    return payload


class IncidentWorker(AsyncResource):
    def __init__(self, pool: Pool, app_url: str, placer: AlertCallPlacer | None,
                 settings: WorkerSettings | None = None, *, connectors: ConnectorLookup | None = None,
                 speech: PromptRenderer | None = None, prompt_location: PromptLocation | None = None,
                 keyring: Keyring) -> None:
        self.connectors = connectors
        self.keyring = keyring
        self.speech = speech
        self.prompt_location: PromptLocation = prompt_location or _local_path
        self.pool = pool
        self.app_url = app_url
        self.placer = placer
        if placer is not None:
            placer.watch_originates(self._witnessed)
        self.settings = settings or WorkerSettings()
        self._conn: Connection | None = None
        self._qm: QueueManager | None = None
        self._tasks = TaskSupervisor()
        self._closing = False
        self._jobs_stopped = asyncio.Event()
        #: calls placed straight after the decision that claimed them, and other after-commit work
        self._inline: set[asyncio.Task[None]] = set()
        #: call uuids this worker is placing now (an orphaned call is one no live worker places)
        self._placing: set[str] = set()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        # Both loops are supervised: PostgreSQL restarted under the job connection made pgqueuer's run raise,
        # and an unsupervised task left every job queued until another IIM started.
        self._tasks.supervise(self._run_jobs, name="incident-jobs", initial=0.2, ceiling=5.0,
                              until=lambda: self._closing)
        self._tasks.supervise(self._sweep_forever, name="incident-deadlines", initial=0.2, ceiling=5.0,
                              until=lambda: self._closing)

    async def _run_jobs(self) -> None:
        """One pgqueuer QueueManager on a connection of its own (LISTEN and dequeues), for as long as that
        connection lives; the supervisor starts a fresh one on a fresh connection after it dies."""
        if self._closing:
            return
        conn = await connect(self.app_url, role=DbRole.APP)
        settings = jobs.job_settings()
        qm = QueueManager(jobs.queries_for(conn), channel=Channel(settings.channel))
        factory = self._retrying
        qm.entrypoint(IncidentJobs.TICK, executor_factory=factory, on_failure="hold")(self._tick_job)
        qm.entrypoint(IncidentJobs.ACTION, executor_factory=factory, on_failure="hold")(self._action_job)
        # A lost connection stops the manager at once (rather than at its next dequeue, up to 5 s later).
        conn.add_termination_listener(lambda _conn: qm.shutdown.set())
        self._conn, self._qm = conn, qm
        self._jobs_stopped.clear()
        try:
            await qm.run(dequeue_timeout=timedelta(seconds=5), batch_size=self.settings.batch_size,
                         max_concurrent_tasks=self.settings.max_concurrent_jobs,
                         heartbeat_timeout=self.settings.heartbeat_timeout)
        finally:
            self._conn = self._qm = None
            try:
                await asyncio.wait_for(conn.close(), 5)
            except STORE_UNAVAILABLE:
                conn.terminate()  # dead already, or too slow to close
            except BaseException:
                conn.terminate()
                raise
            finally:
                self._jobs_stopped.set()

    @staticmethod
    def _retrying(params: EntrypointExecutorParameters) -> DatabaseRetryEntrypointExecutor:
        """Transient failures (PostgreSQL away) requeue the job with backoff instead of losing it."""
        return DatabaseRetryEntrypointExecutor(params, max_attempts=20, initial_delay=timedelta(seconds=1),
                                               max_delay=timedelta(seconds=60))

    async def aclose(self) -> None:
        self._closing = True
        if self._inline:
            _, pending = await asyncio.wait(set(self._inline), timeout=10)
            for task in pending:
                task.cancel()
        qm = self._qm
        if qm is not None:  # running jobs finish (up to 10 s) before the loops are cancelled
            qm.shutdown.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._jobs_stopped.wait(), timeout=10)
        await self._tasks.aclose()

    # ------------------------------------------------------------------ SMS receipts
    async def sms_undelivered(self, tenant_id: UUID, sms_key: str, incident_id: UUID | None) -> None:
        """The SMSC says an escalation SMS was not delivered (or expired): record it on its action and let the
        engine judge the incident now rather than at its deadline."""
        if incident_id is None:
            return
        async with tenant_tx(self.pool, tenant_id) as conn:
            incident = await store.load_incident(conn, incident_id, full=False)
            if incident is None or incident.state in TERMINAL:
                return
            await store.mark_sms_undelivered(conn, sms_key)
            await store.audit(conn, tenant_id, "sms-receipt", "incident.sms_undelivered", incident_id,
                              {"key": sms_key}, event_id=incident.first_event_id)
        await self.tick(tenant_id, incident_id, reason="sms_undelivered")

    # ------------------------------------------------------------------ deadlines
    async def _sweep_forever(self) -> None:
        """Tick every live incident whose deadline passed. Several workers may sweep: a tick locks the
        incident and re-checks its deadline, so a second tick of the same incident does nothing."""
        pruned_at = reconciled_at = float("-inf")
        while True:
            if time.monotonic() - reconciled_at >= self.settings.unsent_interval_s:
                reconciled_at = time.monotonic()
                await self._place_unsent()
            await asyncio.sleep(self.settings.sweep_interval_s)
            if time.monotonic() - pruned_at >= self.settings.window_prune_interval_s:
                pruned_at = time.monotonic()
                await self._prune_windows()
            try:
                due = await store.due_incidents(self.pool, 500)
            except STORE_UNAVAILABLE as exc:
                log.warning("deadline sweep: store unavailable (%s); retrying", type(exc).__name__)
                continue
            for tenant_id, incident_id in due:
                try:
                    await self.tick(tenant_id, incident_id, reason="deadline")
                except Exception:
                    # One incident's failure must not stop the others' deadlines; it is swept again next time.
                    log.exception("deadline tick failed", extra={"incident_id": str(incident_id)})

    async def _place_unsent(self) -> None:
        """Calls claimed but never sent (their process was killed in between) are placed, or adopted when the
        switch has them, under the same origination_uuid: the owner is not skipped for the backup."""
        if self.placer is None:
            return
        try:
            unsent = await store.unsent_calls(self.pool, self.settings.unsent_grace_s, 100)
        except STORE_UNAVAILABLE as exc:
            log.warning("unsent calls not looked for: store unavailable (%s)", type(exc).__name__)
            return
        for tenant_id, incident_id, key in unsent:
            if str(store.call_uuid_for(key)) in self._placing:
                continue
            try:
                await self._take_over(tenant_id, incident_id, key)
            except Exception:
                log.exception("unsent call not taken over", extra={"incident_id": str(incident_id)})

    async def _take_over(self, tenant_id: UUID, incident_id: UUID, key: str) -> None:
        async with tenant_tx(self.pool, tenant_id) as conn:
            incident = await store.load_incident(conn, incident_id)
            if incident is None or incident.state is not IncidentState.NOTIFYING or incident.group is None:
                return
            action = next((a for a in incident.group if a.key == key), None)
            if action is None:  # a call of a group decided meanwhile: it is not placed any more
                await store.record_outcome(conn, key, "superseded", "claimed, never sent; its group is decided")
                return
            if not await store.take_over_unsent(conn, key, self.settings.unsent_grace_s):
                return  # another worker took it over, or it was sent meanwhile
            alert = _safe_alert_call(self.settings, tenant_id, incident, action)
            await store.audit(conn, tenant_id, "scenario-engine", "incident.call_taken_over", incident.id,
                              {"key": key, "detail": "claimed by a worker that died before sending it"},
                              event_id=incident.first_event_id, call_uuid=action.call_uuid)
        if not isinstance(alert, AlertCall):
            return  # the deadline settles it
        meanings = dict((action.spec.get("ivr") or {}).get("digits", {}))
        log.warning("alert call claimed but never sent: placing it now", extra={
            "call_id": alert.call_uuid, "incident_id": str(incident_id), "event_id": incident.first_event_id})
        self._spawn(self._run_call(tenant_id, incident_id, key, action.kind, alert, meanings, time.perf_counter(),
                                   adopt=True))

    async def _prune_windows(self) -> None:
        """Housekeeping beside the sweep: its failure is logged and retried later, never stops deadlines."""
        try:
            pruned = await store.prune_originate_windows(self.pool)
        except STORE_UNAVAILABLE as exc:
            log.warning("toll-fraud counters not pruned: store unavailable (%s)", type(exc).__name__)
        except Exception:
            log.exception("toll-fraud counters not pruned")
        else:
            if pruned:
                log.info("toll-fraud counters: %d rows older than the caps' window deleted", pruned)

    # ------------------------------------------------------------------ tick
    async def _tick_job(self, job: pgq_models.Job) -> None:
        ids = _ids(job)
        try:
            await self.tick(UUID(ids["tenant"]), UUID(ids["incident"]), reason=ids.get("reason", ""))
        except Exception:
            # Logged here with the incident; the retrying executor requeues the job with backoff.
            log.exception("incident tick failed (attempt %d); will retry", job.attempts,
                          extra={"incident_id": ids.get("incident")})
            raise

    async def tick(self, tenant_id: UUID, incident_id: UUID, *, reason: str = "") -> None:
        async with tenant_tx(self.pool, tenant_id) as conn:
            if reason == "deadline" and await store.hold_for_unsent(conn, incident_id,
                                                                    self.settings.unsent_grace_s + 5):
                # A call of this step was claimed and never sent: the take-over places it before the step
                # is judged, or that contact would never be called.
                return
            incident = await store.load_incident(conn, incident_id)
            after = await self._tick_in(conn, tenant_id, incident, reason=reason)
        await self._follow(after)

    async def _hang_up(self, ringing: list[store.ActionRow]) -> None:
        """The group is decided: calls of it still ringing are hung up (the doorphone rang phone and home)."""
        for action in ringing:
            if action.call_uuid is not None and self.placer is not None:
                await self.placer.hang_up(str(action.call_uuid))

    async def _tick_in(self, conn: Connection, tenant_id: UUID, incident: store.IncidentRow | None, *,
                       reason: str, outcomes: Sequence[store.OutcomeWrite] = (),
                       audit_lines: Sequence[dict[str, Any]] = ()) -> _AfterCommit:
        """Judge ``incident`` (fully loaded and locked in ``conn``'s transaction) and persist what follows,
        with ``outcomes`` and ``audit_lines`` recorded just before (one statement either way); returns what
        is left for after the commit."""
        after = _AfterCommit()
        if incident is None or incident.state in TERMINAL:
            await store.write_outcomes(conn, outcomes, audit_lines)
            return after
        incident_id = incident.id
        now = self.settings.clock()
        if reason == "cleared":
            await store.write_outcomes(conn, outcomes, audit_lines)
            progress = on_cleared(incident.progress)
            await store.clear_incident(conn, incident_id, progress.state)
            await store.audit(conn, tenant_id, "scenario-engine", f"incident.{progress.state.value}",
                              incident_id, {"reason": "the device reported the hazard cleared"},
                              event_id=incident.first_event_id)
            INCIDENTS.labels(progress.state.value).inc()
            return after
        if incident.scenario is None:
            await store.write_outcomes(conn, outcomes, audit_lines)
            return await self._begin(conn, tenant_id, incident, now)
        scenario = incident.scenario
        due = incident.deadline is None or now >= incident.deadline
        recorded = {o.key: o.outcome for o in outcomes}
        if incident.state is IncidentState.NOTIFYING:
            assert incident.group is not None, "judged on a fully loaded incident"
            group = incident.group
            settled = {a.key: recorded.get(a.key) if a.outcome is None else a.outcome for a in group}
            judged = {key: ActionOutcome(value) for key, value in settled.items()
                      if value is not None and value in ActionOutcome._value2member_map_}
            out = current_actions(str(incident_id), scenario, incident.facts, incident.progress, now)
            if not (due or ready_to_advance(incident.progress, out, judged)):
                await store.write_outcomes(conn, outcomes, audit_lines)
                return after
            after.ringing = [a for a in group if a.dispatched_at is not None and settled.get(a.key) is None
                             and a.call_uuid is not None]
        elif not due:
            await store.write_outcomes(conn, outcomes, audit_lines)
            return after  # a retry pause or a wait step that is not over yet
        else:
            judged = {}
        decision = advance(str(incident_id), scenario, incident.facts, incident.progress, judged, now)
        await self._persist(conn, tenant_id, incident, decision, None, now, after, outcomes, audit_lines)
        return after

    # ------------------------------------------------------------------ operators
    async def settle(self, tenant_id: UUID, incident_id: UUID, decision: IvrOutcome, *, actor: str, note: str = "",
                     correlation: Mapping[str, str] | None = None) -> IncidentState:
        """An operator's decision on a live incident (acknowledge, false alarm), taken by the rules of a key
        press (:func:`engine.settle`): the same transition, ``on_acknowledge`` messages and hang-up of the
        group's calls still ringing as a DTMF "1" or "2", written in one statement with the operator's audit
        line. Returns the state reached. Raises :class:`policy_cache.errors.NotFound` (no such incident in this
        tenant) or :class:`policy_cache.errors.Conflict` (it has already ended)."""
        after = _AfterCommit()
        async with tenant_tx(self.pool, tenant_id) as conn:
            incident = await store.load_incident(conn, incident_id)
            if incident is None:
                raise store_errors.NotFound(f"incident {incident_id} not found", entity="incident")
            if incident.state in TERMINAL:
                raise store_errors.Conflict(f"the incident has already ended ({incident.state})", entity="incident")
            now = self.settings.clock()
            line = store.audit_line(actor, "incident.operator_decision", incident_id,
                                    {"decision": decision.value, "note": note}, event_id=incident.first_event_id)
            line["correlation"].update(correlation or {})
            if incident.scenario is None:  # not begun (held by the re-arm rule): nothing is out, nothing to judge
                state = IncidentState.ACKNOWLEDGED if decision is IvrOutcome.ACKNOWLEDGE else IncidentState.FALSE_ALARM
                reason = f"{state} (operator {actor}) before its chain started"
                await store.end_unbegun(conn, incident_id, state, reason)
                await store.write_outcomes(conn, (), [line, store.audit_line(
                    actor, f"incident.{state.value}", incident_id, {"reason": reason},
                    event_id=incident.first_event_id)])
                INCIDENTS.labels(state.value).inc()
                return state
            if incident.state is IncidentState.NOTIFYING and incident.group is not None:
                after.ringing = [a for a in incident.group if a.dispatched_at is not None and a.outcome is None
                                 and a.call_uuid is not None]
            advanced = settle(str(incident_id), incident.scenario, incident.facts, incident.progress, decision, now,
                              by=f"operator {actor}")
            await self._persist(conn, tenant_id, incident, advanced, None, now, after, audit_lines=[line],
                                actor=actor)
        self._spawn(self._follow(after))  # off the operator's request: hang-ups and on_acknowledge calls
        return advanced.progress.state

    async def reopen(self, tenant_id: UUID, incident_id: UUID, *, actor: str, note: str, resume_calls: bool,
                     correlation: Mapping[str, str] | None = None) -> IncidentState:
        """Make an ended incident live again (:func:`engine.reopen`). Only with ``resume_calls`` is anything
        placed: the chain goes on at once with the first group not yet tried; otherwise the incident stays open
        and held (no deadline is due) until an operator acknowledges or closes it. Returns the state it had
        ended in. Raises :class:`policy_cache.errors.NotFound` (no such incident in this tenant) or
        :class:`policy_cache.errors.Conflict` (it is live, or its device has another live incident of that
        hazard)."""
        async with tenant_tx(self.pool, tenant_id) as conn:
            incident = await store.load_incident(conn, incident_id)
            if incident is None:
                raise store_errors.NotFound(f"incident {incident_id} not found", entity="incident")
            if incident.state not in TERMINAL:
                raise store_errors.Conflict(f"the incident is live ({incident.state}): nothing to reopen",
                                            entity="incident")
            if incident.scenario is None:
                progress = Progress(IncidentState.OPEN, 0, 0)
            else:
                tried = await store.step_tried(conn, incident_id, incident.progress.step)
                progress = reopen(incident.scenario, incident.progress, step_tried=tried)
            how = "calls resume" if resume_calls else "held: nobody is called until an operator decides"
            reason = f"reopened by operator {actor} at step {progress.step}; {how}"
            await store.reopen_incident(conn, incident_id, progress, reason, held=not resume_calls)
            line = store.audit_line(actor, "incident.reopened", incident_id,
                                    {"note": note, "resume_calls": resume_calls, "from_state": incident.state.value,
                                     "step": progress.step}, event_id=incident.first_event_id)
            line["correlation"].update(correlation or {})
            await store.write_outcomes(conn, (), [line])
        INCIDENTS.labels("reopened").inc()
        if resume_calls:
            await self.tick(tenant_id, incident_id, reason="reopened")
        return incident.state

    async def place_test_call(self, call: AlertCall, meanings: Mapping[str, str], text: str | None) -> CallOutcome:
        """An operator's test call (``iim test call``): the alert call's originate and IVR (placed here, its
        answer comes back to this process's outbound socket), the generic prompt first and ``text`` rendered
        while it rings, as for an alarm. Nothing is written: the caller guards, audits and counts it."""
        if self.placer is None:
            return CallOutcome(CallOutcomeKind.UNREACHABLE, None, None, detail="no FreeSWITCH node is configured")
        if self.speech is not None:
            call, _ = await self._generic_first(call, meanings)
        self._placing.add(call.call_uuid)
        try:
            placing = asyncio.create_task(self.placer.place(call))
            if self.speech is not None and text:
                await self._test_prompt(call, text)
            return await placing
        finally:
            self._placing.discard(call.call_uuid)

    async def _test_prompt(self, call: AlertCall, text: str) -> None:
        assert self.speech is not None
        assert self.placer is not None
        try:
            rendered = await self.speech.render(text)
        except (TtsUnavailable, ValueError) as exc:
            log.warning("test call plays the generic prompt (%s)", exc, extra={"call_id": call.call_uuid})
            return
        self.placer.use_prompt(call.call_uuid, self.prompt_location(rendered))

    async def begin_in(self, conn: Connection, tenant_id: UUID, incident_id: UUID) -> Callable[[], None] | None:
        """Start a just-opened incident inside the intake's transaction: its first calls are claimed with the
        event itself and placed as soon as it commits (the returned callback; None when there is nothing to
        do then). The intake falls back to a tick job if this raises."""
        incident = await store.load_incident(conn, incident_id)
        if incident is None or incident.scenario is not None or incident.state is not IncidentState.OPEN:
            return None
        after = await self._begin(conn, tenant_id, incident, self.settings.clock())
        if after.empty:
            return None
        return lambda: self._spawn(self._follow(after))

    async def _begin(self, conn: Connection, tenant_id: UUID, incident: store.IncidentRow,
                     now: datetime) -> _AfterCommit:
        after = _AfterCommit()
        prior = await store.prior_chain(conn, incident.id)
        held_until = rearm(prior, now, self.settings.rearm_cool_down)
        if held_until is not None:
            assert prior is not None
            reason = (f"held until {held_until:%Y-%m-%d %H:%M:%S%z}: the last {incident.facts.event_type.value} "
                      f"chain of this device ran out at {prior.closed_at:%H:%M:%S%z} with nobody acknowledging, and "
                      "the device has not reported cleared since; a full chain starts after the cool-down")
            await store.hold_incident(conn, incident.id, held_until, reason)
            await store.audit(conn, tenant_id, "scenario-engine", "incident.held", incident.id,
                              {"reason": reason, "until": held_until.isoformat()}, event_id=incident.first_event_id)
            INCIDENTS.labels("held").inc()
            return after
        scenario = _choose(await store.load_scenarios(conn, incident.household_id), incident, now)
        if scenario is None:
            await store.exhaust_incident(conn, incident.id, "no scenario matches")
            await store.audit(conn, tenant_id, "scenario-engine", "incident.exhausted", incident.id,
                              {"reason": "no scenario matches this event"}, event_id=incident.first_event_id)
            INCIDENTS.labels("exhausted").inc()
            return after
        decision = begin(str(incident.id), scenario, incident.facts, now)
        await self._persist(conn, tenant_id, incident, decision, scenario, now, after)
        return after

    async def _persist(self, conn: Connection, tenant_id: UUID, incident: store.IncidentRow, decision: Advance,
                       scenario: Scenario | None, now: datetime, after: _AfterCommit,
                       outcomes: Sequence[store.OutcomeWrite] = (), audit_lines: Sequence[dict[str, Any]] = (),
                       *, actor: str = "scenario-engine") -> None:
        """Write a decision. With a switch to call through, its calls pass the toll-fraud guard and are claimed
        under the tenant's caps in this transaction (near the caps: right after it, exactly), and ``after``
        places them once it commits: no job hop. A worker that dies before placing one leaves no job behind:
        the group's deadline moves the incident on, as for a call whose worker died while it rang."""
        progress = decision.progress
        with span("scenario.decide", attributes=attrs(
                tenant=str(tenant_id), incident_id=str(incident.id), event_id=incident.first_event_id,
                state=progress.state.value, step=progress.step, attempt=progress.attempt,
                actions=len(decision.actions))) as traced:
            # Stored with each call's spec: the call joins this trace whoever places it (a take-over, a job).
            await self._persist_in(conn, tenant_id, incident, decision, scenario, now, after, outcomes, audit_lines,
                                   traceparent_of(traced), actor)

    async def _persist_in(self, conn: Connection, tenant_id: UUID, incident: store.IncidentRow, decision: Advance,
                          scenario: Scenario | None, now: datetime, after: _AfterCommit,
                          outcomes: Sequence[store.OutcomeWrite], audit_lines: Sequence[dict[str, Any]],
                          traceparent: str | None, actor: str) -> None:
        limits = limits_from(incident.originate_limits, self.settings.default_limits, incident.numbering_plan)
        claim: store.CallClaim | None = None
        no_consent = {a.key: r for a in decision.actions if (r := consent_refusal(a, incident.facts)) is not None}
        calls = {a.key: a for a in decision.actions
                 if isinstance(a, PlaceCall | RecordMessage) and a.key not in no_consent}
        built: dict[str, tuple[AlertCall, dict[str, str]]] = {}  # key -> the call and its digits' meanings
        if self.placer is not None and incident.bound is not None and calls:
            refused: dict[str, tuple[str, str]] = {}
            for key, action in calls.items():
                refusal = destination_refusal(action.destination or "", bound=incident.bound, limits=limits)
                if refusal is not None:
                    refused[key] = (refusal.reason, refusal.detail)
                    continue
                # Built before the claim: a call that cannot be built is refused with the others, in this
                # transaction, and the incident moves on; it never aborts the decision.
                row = store.ActionRow(key=key, incident_id=incident.id, step=action.step,
                                      kind="call" if isinstance(action, PlaceCall) else "record",
                                      destination=action.destination, call_uuid=store.call_uuid_for(key),
                                      dispatched_at=now, outcome=None,
                                      spec=store.action_spec(action, traceparent=traceparent))
                alert = _safe_alert_call(self.settings, tenant_id, incident, row)
                if isinstance(alert, AlertCall):
                    built[key] = (alert, dict((row.spec.get("ivr") or {}).get("digits", {})))
                else:
                    refused[key] = ("invalid_call", alert)
            claim = store.CallClaim(limits.max_concurrent, limits.max_per_hour, refused)
        persisted = await store.persist_advance(conn, tenant_id, incident, decision, scenario=scenario, now=now,
                                                actor=actor, keyring=self.keyring, outcomes=outcomes,
                                                audit_lines=audit_lines, claim=claim, traceparent=traceparent,
                                                consent_refused=no_consent)
        _count_settled(persisted.settled)
        INCIDENTS.labels(decision.progress.state.value).inc()
        for key in persisted.consent_refused:
            CONSENT_REFUSED.labels(no_consent[key].purpose).inc()
        if persisted.consent_refused and decision.deadline is not None:
            after.retick.append((tenant_id, incident.id))  # the engine moves on at once
        if claim is None:
            return
        for key in persisted.refused:
            _refused(incident, "call" if isinstance(calls[key], PlaceCall) else "record", claim.refused[key][0])
        if persisted.refused and (tenant_id, incident.id) not in after.retick:
            after.retick.append((tenant_id, incident.id))  # the engine moves on at once
        ORIGINATE_CLAIMS.labels("decision").inc(len(persisted.claimed))
        for key in [*persisted.claimed, *persisted.deferred]:
            action = calls[key]
            kind = "call" if isinstance(action, PlaceCall) else "record"
            alert, meanings = built[key]
            placed = _Placement(tenant_id, incident, key, kind, alert, meanings,
                                None if key in persisted.claimed else limits)
            after.calls.append(placed)

    async def _follow(self, after: _AfterCommit) -> None:
        """After a decision's commit: hang up what it decided, place the calls it claimed, judge again the
        incidents whose calls were refused."""
        await self._hang_up(after.ringing)
        for placement in after.calls:
            self._spawn(self._place_claimed(placement))
        for tenant_id, incident_id in after.retick:
            await self.tick(tenant_id, incident_id, reason="outcome")

    async def _place_claimed(self, p: _Placement) -> None:
        """Place a call its decision claimed; one it left unclaimed (near the tenant's caps) is claimed first,
        exactly, in a statement of its own, and refused like any call over the caps."""
        started = time.perf_counter()
        if p.claim_under is not None:
            limits = p.claim_under
            claimed, in_flight, last_hour = await store.claim_originate_now(
                self.pool, p.tenant_id, p.key, max_concurrent=limits.max_concurrent, max_per_hour=limits.max_per_hour)
            if claimed:
                ORIGINATE_CLAIMS.labels("after_commit").inc()
            else:
                # Binding and plan passed with the decision; only the caps keep it now: it waits (queued).
                verdict = check_caps(limits, in_flight=in_flight, last_hour=last_hour)
                if verdict is None:  # under the caps yet not claimed: dispatched elsewhere
                    return
                if isinstance(verdict, Wait):
                    async with tenant_tx(self.pool, p.tenant_id) as conn:
                        await self._queue(conn, p.tenant_id, p.incident, p.key, p.call, verdict, waits=0)
                    return
                refusal = verdict
                _refused(p.incident, p.kind, refusal.reason)
                async with tenant_tx(self.pool, p.tenant_id) as conn:
                    await store.write_outcomes(
                        conn, [store.OutcomeWrite(p.key, ActionOutcome.REFUSED.value, refusal.detail)],
                        [store.audit_line("toll-fraud-guard", "originate.refused", p.incident.id,
                                          {"key": p.key, "reason": refusal.reason, "detail": refusal.detail},
                                          event_id=p.incident.first_event_id)])
                await self.tick(p.tenant_id, p.incident.id, reason="outcome")
                return
        await self._run_call(p.tenant_id, p.incident.id, p.key, p.kind, p.call, p.meanings, started)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._inline.add(task)
        task.add_done_callback(self._inline_done)

    def _inline_done(self, task: asyncio.Task[None]) -> None:
        self._inline.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("alert call follow-up failed", exc_info=task.exception())

    # ------------------------------------------------------------------ actions
    async def _action_job(self, job: pgq_models.Job) -> None:
        ids = _ids(job)
        try:
            await self.perform(UUID(ids["tenant"]), UUID(ids["incident"]), ids["key"], waits=int(ids.get("waits", 0)))
        except Exception:
            log.exception("incident action failed (attempt %d); will retry", job.attempts,
                          extra={"incident_id": ids.get("incident"), "action_key": ids.get("key")})
            raise

    async def perform(self, tenant_id: UUID, incident_id: UUID, key: str, *, waits: int = 0) -> None:
        """Perform one action by its key, then let the engine judge the outcome (a tick, run right here).
        ``waits``: how often a cap already kept this call waiting.

        If this worker dies after recording an outcome and before that tick, the job runs again: it finds
        the outcome recorded and only ticks. (The deadline sweep is the last resort.)
        """
        started = time.perf_counter()
        call: AlertCall | None = None
        adopt = False
        meanings: dict[str, str] = {}
        kind = ""
        tick_after = False
        notify: tuple[store.IncidentRow, store.ActionRow, list[store.NotificationTarget]] | None = None
        async with tenant_tx(self.pool, tenant_id) as conn:
            incident = await store.load_incident(conn, incident_id, full=False)
            action = await store.load_action(conn, key)
            if incident is None or action is None:
                return
            kind = action.kind
            acknowledgement = key.split("/")[1] == "ack"  # the on_acknowledge messages, sent once it ended
            current = (action.step, key.split("/")[2]) == (incident.progress.step, str(incident.progress.attempt))
            message = action.kind in ("sms", "notify")
            if action.outcome is not None:
                tick_after = incident.state not in TERMINAL
            # A call of a group that was decided meanwhile is not placed; a text or notification still goes out
            # (its group was meant to reach people at once: the call may have been answered first, or a
            # restarted worker may reach it late, but the person must get it).
            elif not acknowledgement and not message and (incident.state in TERMINAL or not current):
                await store.record_outcome(conn, key, "superseded", f"incident is {incident.state.value}")
            elif action.kind == "notify":
                notify = (incident, action, await store.notification_targets(conn, incident.household_id))
            elif message:
                await self._message(conn, tenant_id, incident, action)
                tick_after = not acknowledgement
            elif action.dispatched_at is not None and self.placer is not None \
                    and not await store.was_sent(conn, key):
                # Its job was picked up again after its process died before the switch accepted the call:
                # place it (adopt it, if the switch has its uuid after all) rather than fail it.
                built = _safe_alert_call(self.settings, tenant_id, incident, action)
                if isinstance(built, AlertCall):
                    call, adopt = built, True
                    meanings = dict((action.spec.get("ivr") or {}).get("digits", {}))
                else:
                    await self._resume_call(conn, tenant_id, incident, action)
                    tick_after = True
            elif action.dispatched_at is not None:
                await self._resume_call(conn, tenant_id, incident, action)
                tick_after = True
            else:
                dispatched = await self._dispatch(conn, tenant_id, incident, action, waits=waits)
                call = dispatched if isinstance(dispatched, AlertCall) else None
                # A job's call may be the retry of one counted unreachable that the switch took after all (its
                # answer lost with the link, a take-over that could not ask): the switch is asked first.
                adopt = call is not None
                meanings = dict((action.spec.get("ivr") or {}).get("digits", {}))
                tick_after = dispatched is None  # refused: the engine moves on now (a queued call waits)
        if notify is not None:
            await self._notify(tenant_id, *notify)
            tick_after = key.split("/")[1] != "ack"
        if call is not None:
            await self._run_call(tenant_id, incident_id, key, kind, call, meanings, started, retry_store=False,
                                 adopt=adopt)
        if tick_after:
            await self.tick(tenant_id, incident_id, reason="outcome")

    async def _run_call(self, tenant_id: UUID, incident_id: UUID, key: str, kind: str, call: AlertCall,
                        meanings: dict[str, str], started: float, *, retry_store: bool = True,
                        adopt: bool = False) -> None:
        """Place a dispatched call (``adopt``: one a dead worker claimed, adopted if the switch has it), then
        record its outcome and let the engine judge it. ``retry_store``: the outcome is kept and written again
        while PostgreSQL is away (a job instead fails and is retried)."""
        # A child of the decision that claimed the call (its context stored with the call); the switch gets this
        # span's context as a channel variable, and the call's events (answer, keys, hang-up) join it from there.
        with span("alert_call.originate", parent=call.variables.get(CHANNEL_VARIABLE), kind=SpanKind.CLIENT,
                  attributes=attrs(tenant=str(tenant_id), incident_id=str(incident_id), call_id=call.call_uuid,
                                   event_id=call.variables.get("iim_event_id"), action_kind=kind, adopted=adopt,
                                   destination_kind=destination_kind(call.destination))) as traced:
            traceparent = traceparent_of(traced)
            if traceparent is not None:
                call = dataclasses.replace(call, variables={**call.variables, CHANNEL_VARIABLE: traceparent})
            await self._run_call_in(tenant_id, incident_id, key, kind, call, meanings, started,
                                    retry_store=retry_store, adopt=adopt, traced=traced)

    async def _run_call_in(self, tenant_id: UUID, incident_id: UUID, key: str, kind: str, call: AlertCall,
                           meanings: dict[str, str], started: float, *, retry_store: bool, adopt: bool,
                           traced: Span) -> None:
        self._placing.add(call.call_uuid)
        try:
            text = None
            if self.speech is not None and self.placer is not None and call.prompt:
                call, text = await self._generic_first(call, meanings)
            placing = asyncio.create_task(self._place(call, tenant_id, key, adopt=adopt))
            if text is not None:
                await self._speak_while_ringing(tenant_id, incident_id, key, call, text)
            outcome = await placing
        finally:
            self._placing.discard(call.call_uuid)
        STEP_SECONDS.labels(kind).observe(time.perf_counter() - started)
        if traced.is_recording():
            traced.set_attributes(attrs(outcome=outcome.kind.value, hangup_cause=outcome.hangup_cause,
                                        digit=outcome.digit, recorded=outcome.recorded))
        for delay in (*self.settings.store_retry_delays, None) if retry_store else (None,):
            try:
                await self._finish_call(tenant_id, incident_id, key, call, outcome, meanings)
            except STORE_UNAVAILABLE as exc:
                if delay is None:
                    raise
                log.warning("recording the call's outcome: store unavailable (%s); retrying in %.0f s",
                            type(exc).__name__, delay, extra={"call_id": call.call_uuid})
                await asyncio.sleep(delay)
            else:
                self._forget(call.call_uuid, outcome)
                return

    def placing(self, call_uuid: str) -> bool:
        """Is a worker here placing (or about to take over) this call? Its socket then waits to be claimed."""
        return call_uuid in self._placing

    def _forget(self, call_uuid: str, outcome: CallOutcome) -> None:
        """The outcome is recorded: the switch's note that it took the call is no longer needed (unreachable
        calls are retried, and a retry asks the switch again)."""
        if self.placer is not None and outcome.kind is not CallOutcomeKind.UNREACHABLE:
            self._spawn(self.placer.forget(call_uuid))

    async def _notify(self, tenant_id: UUID, incident: store.IncidentRow, action: store.ActionRow,
                      targets: list[store.NotificationTarget]) -> None:
        """Tell the household through its connectors (outside any transaction: vendor clouds are slow);
        when no connector takes it (none, down, refusing), text the household's contacts instead."""
        text = str(action.spec.get("text") or store.alarm_text(incident))
        correlation = {"event_id": incident.first_event_id, "incident_id": str(incident.id)}
        delivered: list[str] = []
        errors: list[str] = []
        for target in targets:
            connector = self._connector(target.connector)
            if connector is None:
                errors.append(f"{target.connector}: not loaded")
                continue
            try:
                await connector.send_notification(Notification(target=target.connector_ref, title="IIM alarm",
                                                               text=text, correlation=correlation))
            except ConnectorError as exc:  # ConnectorUnavailable included: the cloud is down or refusing
                errors.append(f"{target.connector}: {type(exc).__name__}")
            else:
                delivered.append(target.device_id)
        async with tenant_tx(self.pool, tenant_id) as conn:
            if delivered:
                outcome, detail = "notified", f"{len(delivered)} device(s)"
                await store.record_outcome(conn, action.key, outcome, detail)
                await store.audit(conn, tenant_id, "scenario-engine", "incident.notify", incident.id,
                                  {"key": action.key, "outcome": outcome, "detail": detail, "devices": delivered},
                                  event_id=incident.first_event_id)
            else:
                detail = ("smart home unreachable: " + "; ".join(errors)) if errors else "no connected device"
                outcome = await store.notify_by_sms(conn, tenant_id, incident, action.key, text, detail,
                                                    keyring=self.keyring)
        ACTIONS.labels("notify", outcome).inc()

    def _connector(self, name: str) -> Connector | None:
        if self.connectors is None:
            return None
        try:
            return self.connectors.get(name)
        except (KeyError, ConnectorError):
            return None

    async def _message(self, conn: Connection, tenant_id: UUID, incident: store.IncidentRow,
                       action: store.ActionRow) -> None:
        if action.kind == "sms" and action.destination:
            await store.queue_action_sms(conn, tenant_id, incident, action, keyring=self.keyring)
            outcome, detail = "queued", "queued in the SMS outbox"
        else:
            outcome, detail = "skipped", "no notification connector is configured for this household"
        await store.record_outcome(conn, action.key, outcome, detail)
        await store.audit(conn, tenant_id, "scenario-engine", f"incident.{action.kind}", incident.id,
                          {"key": action.key, "outcome": outcome, "detail": detail}, event_id=incident.first_event_id)
        ACTIONS.labels(action.kind, outcome).inc()

    async def _dispatch(self, conn: Connection, tenant_id: UUID, incident: store.IncidentRow,
                        action: store.ActionRow, *, waits: int = 0) -> AlertCall | Wait | None:
        """Guard, then mark dispatched (committed with this transaction) and build the call; a :class:`Wait`
        when a cap keeps it (queued again), None when it is refused or was dispatched elsewhere."""
        destination = action.destination or ""
        alert = _safe_alert_call(self.settings, tenant_id, incident, action)
        if not isinstance(alert, AlertCall):  # this action fails; the incident moves on
            _refused(incident, action.kind, "invalid_call")
            await store.write_outcomes(
                conn, [store.OutcomeWrite(action.key, ActionOutcome.REFUSED.value, alert)],
                [store.audit_line("scenario-engine", "originate.refused", incident.id,
                                  {"key": action.key, "reason": "invalid_call", "detail": alert},
                                  event_id=incident.first_event_id)])
            return None
        limits_row, bound, numbering = await store.originate_facts(conn, incident.household_id)
        limits = limits_from(limits_row, self.settings.default_limits, numbering)
        # Shape, binding and plan first (no lock); the caps are checked and claimed in one locked step.
        refusal: Refusal | None = destination_refusal(destination, bound=bound, limits=limits)
        if refusal is None:
            claimed, in_flight, last_hour = await store.claim_originate(
                conn, action.key, max_concurrent=limits.max_concurrent, max_per_hour=limits.max_per_hour)
            if claimed:
                ORIGINATE_CLAIMS.labels("job").inc()
            else:
                verdict = check_caps(limits, in_flight=in_flight, last_hour=last_hour,
                                     waited_s=await store.call_waited_s(conn, action.key))
                if verdict is None:  # under the caps yet not claimed: another worker dispatched it
                    log.warning("alert call already dispatched elsewhere; not dialled again",
                                extra={"event_id": incident.first_event_id, "incident_id": str(incident.id)})
                    return None
                if isinstance(verdict, Wait):
                    await self._queue(conn, tenant_id, incident, action.key, alert, verdict, waits=waits)
                    return verdict
                refusal = verdict
        if refusal is not None:
            _refused(incident, action.kind, refusal.reason)
            await store.write_outcomes(
                conn, [store.OutcomeWrite(action.key, ActionOutcome.REFUSED.value, refusal.detail)],
                [store.audit_line("toll-fraud-guard", "originate.refused", incident.id,
                                  {"key": action.key, "reason": refusal.reason, "detail": refusal.detail},
                                  event_id=incident.first_event_id)])
            return None
        return alert

    async def _queue(self, conn: Connection, tenant_id: UUID, incident: store.IncidentRow, key: str,
                     call: AlertCall, wait: Wait, *, waits: int) -> None:
        """A cap keeps the call from its place: try it again shortly (an action job) and hold the group's
        deadline meanwhile; the first time, tell the operator (warning, metric, audit line)."""
        hold_s = (wait.retry_after_s + call.ring_s + call.record_s + call.tries * (call.digit_timeout_s + 10)
                  + CALL_SLACK_S)
        await store.queue_capped_call(conn, tenant_id, incident.id, key, delay=wait.retry_after_s, hold_s=hold_s,
                                      waits=waits + 1)
        extra = {"event_id": incident.first_event_id, "incident_id": str(incident.id)}
        if waits:
            log.info("alert call still waiting: %s (%s); retry in %.1f s", wait.reason, wait.detail,
                     wait.retry_after_s, extra=extra)
            return
        ORIGINATE_QUEUED.labels(wait.reason).inc()
        log.warning("alert call queued by the toll-fraud guard: %s (%s); retry in %.1f s", wait.reason,
                    wait.detail, wait.retry_after_s, extra=extra)
        await store.audit(conn, tenant_id, "toll-fraud-guard", "originate.queued", incident.id,
                          {"key": key, "reason": wait.reason, "detail": wait.detail,
                           "retry_in_s": round(wait.retry_after_s, 1)}, event_id=incident.first_event_id)

    async def _generic_first(self, call: AlertCall, meanings: Mapping[str, str]) -> tuple[AlertCall, str | None]:
        """The call as it is placed when our TTS speaks: with the generic prompt (the IVR's instructions, no
        name), whatever its own text becomes; and that text, to render while it rings. The private text is
        never handed to the switch, so no render failure or timing can leak it through FreeSWITCH's ``say:``."""
        assert self.speech is not None
        text = (call.prompt or "").removeprefix("say:") or None
        try:
            generic = await self.speech.generic(meanings, record=call.record_s > 0)
            fallback: str | None = self.prompt_location(generic)
        except (OSError, ValueError) as exc:  # the cache directory cannot be written
            log.error("generic prompt unavailable (%s); the call plays no prompt", exc,
                      extra={"call_id": call.call_uuid})
            fallback = None
        return dataclasses.replace(call, prompt=fallback), text

    async def _speak_while_ringing(self, tenant_id: UUID, incident_id: UUID, key: str, call: AlertCall,
                                   text: str) -> None:
        """Render the call's own prompt with our TTS while the phone rings and give the IVR the WAV (its URL on
        IIM's HTTP site, or its path on a single host: :attr:`prompt_location`); when
        speech fails or is late the callee hears the generic prompt it was placed with, and the incident gets
        a ``degraded: prompt`` note (the group's SMS carries the details in writing)."""
        assert self.speech is not None
        assert self.placer is not None
        reason: str | None = None
        why = ""
        try:
            rendered = await self.speech.render(text)
        except TtsUnavailable as exc:  # down, timed out, voice refused
            reason, why = "unavailable", str(exc)
        except ValueError as exc:  # a text it cannot say (too long, nothing speakable)
            reason, why = "refused", str(exc)
        else:
            if not self.placer.use_prompt(call.call_uuid, self.prompt_location(rendered)):
                reason, why = "late", "the call was answered before its prompt was rendered"
        if reason is not None and call.prompt is None:
            reason, why = "no_generic", "neither its own nor the generic prompt could be played"
        if reason is None:
            return
        PROMPT_FALLBACKS.labels(reason).inc()
        log.warning("alert call plays the generic prompt (%s: %s)", reason, why, extra={"call_id": call.call_uuid})
        try:
            async with tenant_tx(self.pool, tenant_id) as conn:
                await store.audit(conn, tenant_id, "scenario-engine", "incident.degraded", incident_id,
                                  {"degraded": "prompt", "key": key, "reason": reason, "detail": why[:200]},
                                  event_id=call.variables.get("iim_event_id"), call_uuid=UUID(call.call_uuid))
        except STORE_UNAVAILABLE as exc:  # the call goes on; only the note is lost
            log.warning("degraded-prompt note not written (%s)", type(exc).__name__, extra={"call_id": call.call_uuid})

    async def _place(self, call: AlertCall, tenant_id: UUID, key: str, *, adopt: bool = False) -> CallOutcome:
        if self.placer is None:
            return CallOutcome(CallOutcomeKind.UNREACHABLE, None, None, detail="no FreeSWITCH node is configured")

        def sent() -> None:  # off the call's path: the phone rings meanwhile
            self._spawn(self._mark_sent(tenant_id, key))

        if adopt:
            return await self.placer.place_or_adopt(call, on_sent=sent)
        return await self.placer.place(call, on_sent=sent)

    async def _finish_call(self, tenant_id: UUID, incident_id: UUID, key: str, call: AlertCall,
                           outcome: CallOutcome, meanings: dict[str, str]) -> None:
        """Record the call's outcome and let the engine judge it, in one transaction."""
        result = _engine_outcome(call, outcome, meanings)
        async with tenant_tx(self.pool, tenant_id) as conn:
            incident = await store.load_incident(conn, incident_id)
            if incident is None:
                return
            if outcome.kind is CallOutcomeKind.UNREACHABLE:
                spent = await self._unreachable(conn, tenant_id, incident, key, call)
                # Judged with the outcome it records: the engine moves on now, not at the group's deadline.
                after = (await self._tick_in(conn, tenant_id, incident, reason="outcome", outcomes=[spent])
                         if spent is not None else _AfterCommit())
            else:
                line = store.audit_line("scenario-engine", "incident.call", incident_id,
                                        {"key": key, "outcome": result.value, "digit": outcome.digit,
                                         "hangup_cause": outcome.hangup_cause},
                                        event_id=incident.first_event_id, call_uuid=UUID(call.call_uuid))
                recorded = store.OutcomeWrite(key, result.value, outcome.detail or (outcome.hangup_cause or ""))
                after = await self._tick_in(conn, tenant_id, incident, reason="outcome", outcomes=[recorded],
                                            audit_lines=[line])
        if outcome.kind is not CallOutcomeKind.UNREACHABLE:
            ACTIONS.labels("call", result.value).inc()
            log.info("alert call %s", result.value, extra={"call_id": call.call_uuid,
                                                           "event_id": incident.first_event_id,
                                                           "incident_id": str(incident_id)})
        await self._follow(after)

    async def _unreachable(self, conn: Connection, tenant_id: UUID, incident: store.IncidentRow, key: str,
                           call: AlertCall) -> store.OutcomeWrite | None:
        """FreeSWITCH is down: text the person now, and retry the call while the step is still current.

        When the retries are spent, the call's outcome (unreachable) to record with the engine's judgement."""
        retries = await store.unreachable_retries(conn, key)
        if call.destination.startswith("+"):
            await store.text_unreachable(conn, tenant_id, incident, key, retries, call.destination,
                                         keyring=self.keyring)
        delays = self.settings.unreachable_retries
        spent = None
        if retries < len(delays):
            # The group waits for the retry: a switch that blinked must not skip this contact for the next one.
            hold_s = (delays[retries] + call.ring_s + call.record_s + call.tries * (call.digit_timeout_s + 10)
                      + CALL_SLACK_S)
            await store.retry_call(conn, tenant_id, incident.id, key, retries, delays[retries], hold_s=hold_s)
            detail = f"switch unreachable; SMS sent, call retry {retries + 1} in {delays[retries]:.0f} s"
        else:
            detail = "switch unreachable; retries spent"
            spent = store.OutcomeWrite(key, ActionOutcome.UNREACHABLE.value, detail)
        await store.audit(conn, tenant_id, "scenario-engine", "incident.call_unreachable", incident.id,
                          {"key": key, "detail": detail}, event_id=incident.first_event_id,
                          call_uuid=UUID(call.call_uuid))
        ACTIONS.labels("call", "unreachable").inc()
        return spent

    async def orphan_call(self, variables: Mapping[str, str]) -> Adoption | None:
        """An alert call was answered and reached this process, but no worker here placed it: the worker that
        did has died (or gave up on it). The person is on the line: adopt the call, so its IVR runs here with
        the generic prompt (the instructions, no private text) and its result is recorded as the placer would
        have; never redialled. None when it is not a call of a live step (settled meanwhile): hung up."""
        try:
            tenant_id = UUID(variables["iim_tenant_id"])
            incident_id = UUID(variables["iim_incident_id"])
            flat = variables["iim_action_key"]
        except (KeyError, ValueError):
            return None  # placed by an IIM that did not say its tenant: the deadline decides
        key = f"{flat[:36]}/{flat[37:].replace('-', '/')}"
        if not key.startswith(f"{incident_id}/") or str(store.call_uuid_for(key)) in self._placing:
            return None
        # The database may be restarting too (a fault seldom comes alone): retry briefly, the callee waits.
        for delay in (0.25, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, None):
            try:
                found = await self._adoptable(tenant_id, incident_id, key)
            except STORE_UNAVAILABLE as exc:
                if delay is None:
                    raise
                log.warning("adopting an answered alert call: store unavailable (%s); retrying", type(exc).__name__,
                            extra={"incident_id": str(incident_id)})
                await asyncio.sleep(delay)
                continue
            break
        if found is None:
            return None
        alert, action = found
        meanings = dict((action.spec.get("ivr") or {}).get("digits", {}))
        if self.speech is not None and alert.prompt:
            alert, _ = await self._generic_first(alert, meanings)
        ORPHANED_CALLS.inc()

        async def done(result: IvrResult) -> None:
            outcome = CallOutcome(CallOutcomeKind.ANSWERED, result.hangup_cause, result.digit, result.recorded,
                                  result.detail)
            for delay in (*self.settings.store_retry_delays, None):
                try:
                    await self._finish_call(tenant_id, incident_id, key, alert, outcome, meanings)
                except STORE_UNAVAILABLE:
                    if delay is None:
                        raise
                    await asyncio.sleep(delay)
                else:
                    self._forget(alert.call_uuid, outcome)
                    return

        return Adoption(alert, done)

    def _witnessed(self, variables: Mapping[str, str]) -> None:
        """The switch reported an alert call of another process (its placer may have died before it recorded
        the call as sent): record it as sent, so a take-over never dials it again."""
        try:
            tenant_id = UUID(variables["iim_tenant_id"])
            flat = variables["iim_action_key"]
        except (KeyError, ValueError):
            return
        key = f"{flat[:36]}/{flat[37:].replace('-', '/')}"
        if str(store.call_uuid_for(key)) not in self._placing:
            self._spawn(self._mark_sent(tenant_id, key))

    async def _mark_sent(self, tenant_id: UUID, key: str) -> None:
        """Record that the switch took the call, retrying while PostgreSQL is away (it often is when a process
        dies): a mark that never lands lets a take-over dial the callee a second time for the same step."""
        for delay in (*self.settings.store_retry_delays, None):
            try:
                await store.mark_sent(self.pool, tenant_id, key)
            except STORE_UNAVAILABLE as exc:
                if delay is None:  # the take-over then asks the switch (uuid_exists) instead
                    log.warning("a call the switch took not recorded as sent: store unavailable (%s)",
                                type(exc).__name__)
                    return
                await asyncio.sleep(delay)
            else:
                return

    async def _adoptable(self, tenant_id: UUID, incident_id: UUID,
                         key: str) -> tuple[AlertCall, store.ActionRow] | None:
        """The call of a live step that ``key`` names, audited as adopted; None when it is settled or unknown."""
        async with tenant_tx(self.pool, tenant_id) as conn:
            incident = await store.load_incident(conn, incident_id)
            group = {a.key: a for a in (incident.group or ())} if incident is not None else {}
            action = group.get(key)
            if incident is None or action is None or action.outcome is not None or action.dispatched_at is None:
                return None  # settled meanwhile, or a call of an earlier group
            alert = _safe_alert_call(self.settings, tenant_id, incident, action)
            if not isinstance(alert, AlertCall):
                return None
            await store.audit(conn, tenant_id, "scenario-engine", "incident.call_adopted", incident.id,
                              {"key": key, "detail": "answered after its worker was gone; IVR run here"},
                              event_id=incident.first_event_id, call_uuid=action.call_uuid)
        return alert, action

    async def _resume_call(self, conn: Connection, tenant_id: UUID, incident: store.IncidentRow,
                           action: store.ActionRow) -> None:
        """A previous worker dispatched this call and died: find out, never dial again."""
        exists = None
        if self.placer is not None and action.call_uuid is not None:
            exists = await self.placer.call_exists(str(action.call_uuid))
        if exists:
            # Still up on the switch but its IVR ran in the dead worker: let the deadline decide.
            outcome, detail = ActionOutcome.NO_INPUT, "worker restarted during the call; not redialled"
        else:
            outcome, detail = ActionOutcome.FAILED, "worker restarted after dispatch; the call is not redialled"
        await store.record_outcome(conn, action.key, outcome.value, detail)
        await store.audit(conn, tenant_id, "scenario-engine", "incident.call_resumed", incident.id,
                          {"key": action.key, "outcome": outcome.value, "detail": detail},
                          event_id=incident.first_event_id, call_uuid=action.call_uuid)
        ACTIONS.labels(action.kind, outcome.value).inc()


def _local_path(rendered: RenderedPrompt) -> str:
    """Single-host mode: the switch reads the file from IIM's cache directory."""
    return str(rendered.path)


def _refused(incident: store.IncidentRow, kind: str, reason: str) -> None:
    ORIGINATE_REFUSED.labels(reason).inc()
    ACTIONS.labels(kind, "refused").inc()
    log.warning("alert call refused: %s", reason,
                extra={"event_id": incident.first_event_id, "incident_id": str(incident.id)})


def _count_settled(settled: list[tuple[str, str]]) -> None:
    for kind, outcome in settled:
        ACTIONS.labels(kind, outcome).inc()


def _choose(scenarios: list[Scenario], incident: store.IncidentRow, now: datetime) -> Scenario | None:
    """The tenant's own scenarios first; the shipped templates are the default for the rest."""
    return (select_scenario(scenarios, incident.facts, now)
            or select_scenario(list(TEMPLATES.values()), incident.facts, now))


def _alert_call(settings: WorkerSettings, tenant_id: UUID, incident: store.IncidentRow, action: store.ActionRow,
                *, prompt_text: str | None = None) -> AlertCall:
    """The call an alert action places, as its spec says (a recording or an IVR), tagged for its incident."""
    assert action.call_uuid is not None
    spec = action.spec
    variables = {"iim_tenant_id": str(tenant_id), "iim_incident_id": str(incident.id),
                 "iim_action_key": action.key.replace("/", "-"),
                 "iim_event_id": incident.first_event_id,
                 "tts_engine": settings.tts_engine, "tts_voice": settings.tts_voice}
    traceparent = spec.get("traceparent")
    if isinstance(traceparent, str) and context_from(traceparent) is not None:  # a stored value, checked again
        variables[CHANNEL_VARIABLE] = traceparent
    common: dict[str, Any] = {
        "call_uuid": str(action.call_uuid), "destination": action.destination or "",
        "caller_id_number": settings.caller_id_number, "caller_id_name": settings.caller_id_name,
        "prompt": _say(prompt_text or spec.get("prompt_text")), "variables": variables}
    if action.kind == "record":
        return AlertCall(ring_s=30, record_s=int(spec.get("max_s", 60)),
                         record_path=f"/var/lib/freeswitch/recordings/iim/{action.call_uuid}.wav", **common)
    ivr = spec.get("ivr") or {}
    return AlertCall(ring_s=int(spec.get("ring_s", 30)), digits="".join(sorted(ivr.get("digits", {}))),
                     tries=int(ivr.get("tries", 1)), digit_timeout_s=int(ivr.get("digit_timeout_s", 5)),
                     **common)


def _safe_alert_call(settings: WorkerSettings, tenant_id: UUID, incident: store.IncidentRow,
                     action: store.ActionRow) -> AlertCall | str:
    """The action's call; with the generic prompt if its own cannot be played; else why it cannot be built
    (then only this action fails: user text must never stop an alarm)."""
    try:
        return _alert_call(settings, tenant_id, incident, action)
    except ValueError as exc:
        log.error("alert call not built as specified (%s); trying the generic prompt", exc,
                  extra={"event_id": incident.first_event_id, "incident_id": str(incident.id)})
    try:
        return _alert_call(settings, tenant_id, incident, action, prompt_text=GENERIC_ALARM_PROMPT)
    except ValueError as exc:
        return f"the call cannot be built: {exc}"[:300]


def _say(text: str | None) -> str | None:
    """A FreeSWITCH TTS playable (``say:`` with the channel's tts_engine): the text rendered to a speakable
    form (:func:`speakable`; no ``${``, controls or separators reach the switch), or the generic prompt. With
    our own TTS (``IIM_ALERT_PROMPT_TTS=iim``) it never leaves the process: :meth:`IncidentWorker._generic_first`
    places the call with the generic WAV and renders this text while it rings."""
    if not text:
        return None
    return "say:" + (speakable(text) or GENERIC_ALARM_PROMPT)


def _engine_outcome(call: AlertCall, outcome: CallOutcome, meanings: dict[str, str]) -> ActionOutcome:
    """What the call means for the escalation: the IVR digit's meaning when one was pressed."""
    if outcome.kind is not CallOutcomeKind.ANSWERED:
        return _REACHED_BY_CALL[outcome.kind]
    if call.record_s > 0:
        return ActionOutcome.RECORDED if outcome.recorded else ActionOutcome.ANSWERED
    if not call.digits:
        return ActionOutcome.ANSWERED
    if outcome.digit is None or outcome.digit not in meanings:
        return ActionOutcome.NO_INPUT
    return ActionOutcome(meanings[outcome.digit])
