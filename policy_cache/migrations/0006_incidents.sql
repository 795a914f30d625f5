-- 0006: device events, incidents and their actions, the SMS outbox, and the job-queue schema.
--
-- device_event is the intake ledger: one row per (tenant, event_id), written in the same transaction as
-- the incident it opened or updated and the job that acts on it, so a 202 is only ever given for work
-- that is committed. The first answer is stored with the row and replayed for retries of the same id.
-- incident_action rows are the idempotency keys of the escalation: a key is inserted (committed) before
-- its side effect starts, so a restarted worker sees that a call was already placed and never dials it
-- again. The job queue itself is pgqueuer's (schema iim_jobs, installed by policy_cache.jobs after the
-- SQL migrations, because its DDL belongs to the library version).

SET LOCAL ROLE iim_owner;

CREATE TYPE iim.incident_state AS ENUM ('open', 'notifying', 'acknowledged', 'false_alarm', 'resolved',
                                        'exhausted');

CREATE TABLE iim.incident (
    tenant_id      uuid               NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    id             uuid               NOT NULL DEFAULT gen_random_uuid(),
    household_id   uuid               NOT NULL,
    device_id      uuid               NOT NULL,
    hazard         text               NOT NULL CHECK (hazard ~ '^[a-z_]{1,32}$'),
    state          iim.incident_state NOT NULL DEFAULT 'open',
    -- The scenario as it was when the incident opened: editing a scenario never changes a running incident.
    scenario_id    uuid,
    scenario       jsonb              CHECK (scenario IS NULL OR jsonb_typeof(scenario) = 'object'),
    step           integer            NOT NULL DEFAULT 0 CHECK (step >= 0),
    attempt        integer            NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    deadline       timestamptz,
    first_event_id text               NOT NULL,
    event_count    integer            NOT NULL DEFAULT 1 CHECK (event_count >= 1),
    last_event_at  timestamptz        NOT NULL DEFAULT now(),
    reason         text               NOT NULL DEFAULT '',
    opened_at      timestamptz        NOT NULL DEFAULT now(),
    updated_at     timestamptz        NOT NULL DEFAULT now(),
    closed_at      timestamptz,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, household_id, device_id) REFERENCES iim.device (tenant_id, household_id, id)
        ON DELETE CASCADE,
    CHECK ((closed_at IS NULL) = (state IN ('open', 'notifying')))
);
-- Coalescing: at most one live incident per device and hazard; a burst of the same alarm updates it.
CREATE UNIQUE INDEX incident_live_uq ON iim.incident (tenant_id, device_id, hazard)
    WHERE state IN ('open', 'notifying');
CREATE INDEX incident_state_idx ON iim.incident (tenant_id, state, opened_at);

CREATE TABLE iim.device_event (
    tenant_id    uuid        NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    event_id     text        NOT NULL CHECK (event_id ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$'),
    device_id    uuid        NOT NULL,
    type         text        NOT NULL CHECK (type ~ '^[a-z_]{1,32}$'),
    occurred_at  timestamptz NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    -- sha256 of the event as received: the same id with another body is a conflict (422), not a retry.
    fingerprint  text        NOT NULL CHECK (fingerprint ~ '^[0-9a-f]{64}$'),
    payload      jsonb       NOT NULL CHECK (jsonb_typeof(payload) = 'object'),
    channel      text        NOT NULL CHECK (channel ~ '^(device|webhook:[A-Za-z0-9_.:-]{1,128})$'),
    msg_id       text,
    incident_id  uuid,
    response     jsonb       NOT NULL CHECK (jsonb_typeof(response) = 'object'),
    PRIMARY KEY (tenant_id, event_id),
    FOREIGN KEY (tenant_id, device_id) REFERENCES iim.device (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, incident_id) REFERENCES iim.incident (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX device_event_incident_idx ON iim.device_event (tenant_id, incident_id);
CREATE INDEX device_event_received_idx ON iim.device_event (received_at);

CREATE TABLE iim.incident_action (
    tenant_id    uuid        NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    key          text        NOT NULL CHECK (length(key) BETWEEN 1 AND 200),
    incident_id  uuid        NOT NULL,
    step         integer     NOT NULL,
    kind         text        NOT NULL CHECK (kind IN ('call', 'sms', 'notify', 'record')),
    destination  text,
    -- What the engine decided for this action (prompt, IVR digits, text): performed exactly as planned.
    spec         jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(spec) = 'object'),
    call_uuid    uuid,
    -- Set (and committed) just before the side effect starts: a resumed worker never repeats it.
    dispatched_at timestamptz,
    outcome      text        CHECK (outcome ~ '^[a-z_]{1,32}$'),
    detail       text        NOT NULL DEFAULT '',
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    PRIMARY KEY (tenant_id, key),
    FOREIGN KEY (tenant_id, incident_id) REFERENCES iim.incident (tenant_id, id) ON DELETE CASCADE,
    CHECK ((outcome IS NULL) = (finished_at IS NULL))
);
CREATE INDEX incident_action_incident_idx ON iim.incident_action (tenant_id, incident_id, step);
-- Toll-fraud caps count the tenant's calls of the last hour and those still ringing.
CREATE INDEX incident_action_calls_idx ON iim.incident_action (tenant_id, dispatched_at) WHERE kind = 'call';

-- SMS are written here before any transport sees them (the SMPP adapter sends and updates them).
CREATE TABLE iim.sms_outbox (
    tenant_id    uuid        NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    id           uuid        NOT NULL DEFAULT gen_random_uuid(),
    key          text        NOT NULL CHECK (length(key) BETWEEN 1 AND 200),
    msisdn       text        NOT NULL CHECK (iim.is_e164(msisdn)),
    body         text        NOT NULL CHECK (length(body) BETWEEN 1 AND 1600),
    status       text        NOT NULL DEFAULT 'queued'
                             CHECK (status IN ('queued', 'sending', 'sent', 'delivered', 'undelivered', 'failed')),
    attempts     integer     NOT NULL DEFAULT 0,
    incident_id  uuid,
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, key),
    FOREIGN KEY (tenant_id, incident_id) REFERENCES iim.incident (tenant_id, id) ON DELETE SET NULL (incident_id)
);
CREATE INDEX sms_outbox_status_idx ON iim.sms_outbox (status, created_at) WHERE status IN ('queued', 'sending');

-- Originate limits per tenant (anti-toll-fraud); a tenant without a row gets the service defaults.
CREATE TABLE iim.originate_limit (
    tenant_id         uuid        NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    max_concurrent    integer     NOT NULL DEFAULT 10 CHECK (max_concurrent BETWEEN 0 AND 10000),
    max_per_hour      integer     NOT NULL DEFAULT 200 CHECK (max_per_hour BETWEEN 0 AND 1000000),
    allowed_prefixes  text[]      NOT NULL DEFAULT '{}'
                                  CHECK (array_position(allowed_prefixes, NULL) IS NULL
                                         AND array_to_string(allowed_prefixes, '') ~ '^[0-9+]*$'),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id)
);

DO $rls$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['incident', 'device_event', 'incident_action', 'sms_outbox', 'originate_limit']
    LOOP
        EXECUTE format('ALTER TABLE iim.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE iim.%I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format($p$CREATE POLICY tenant_isolation ON iim.%I
                USING (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid)
                WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid)$p$, t);
    END LOOP;
END
$rls$;

-- The intake ledger is append-only for the service; incidents and actions move forward, never vanish.
GRANT SELECT, INSERT ON iim.device_event TO iim_app;
GRANT SELECT, INSERT, UPDATE ON iim.incident, iim.incident_action, iim.sms_outbox TO iim_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON iim.originate_limit TO iim_app;
