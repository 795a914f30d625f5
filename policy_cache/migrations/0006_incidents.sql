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
-- Deadlines of live incidents (a group nobody answered, a retry pause, a wait step) are found by a sweep,
-- not parked as delayed jobs: the job queue stays small however many incidents wait.
CREATE INDEX incident_deadline_idx ON iim.incident (deadline) WHERE state IN ('open', 'notifying');

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
-- Toll-fraud caps: calls still ringing are counted through this small index (only ringing calls are in it),
-- calls of the last hour through iim.originate_window (one row per tenant and minute).
CREATE INDEX incident_action_ringing_idx ON iim.incident_action (tenant_id, dispatched_at)
    WHERE kind IN ('call', 'record') AND dispatched_at IS NOT NULL AND finished_at IS NULL;

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

CREATE TABLE iim.originate_window (
    tenant_id  uuid        NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    minute     timestamptz NOT NULL,
    calls      integer     NOT NULL CHECK (calls >= 0),
    PRIMARY KEY (tenant_id, minute)
);

DO $rls$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['incident', 'device_event', 'incident_action', 'sms_outbox', 'originate_limit',
                             'originate_window']
    LOOP
        EXECUTE format('ALTER TABLE iim.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE iim.%I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format($p$CREATE POLICY tenant_isolation ON iim.%I
                USING (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid)
                WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid)$p$, t);
    END LOOP;
END
$rls$;

-- Audit lines of the alarm path are staged in the business transaction (a plain insert, no lock) and
-- moved into the tenant's hash chain by iim.audit_flush() in batches, one chain lock per tenant per batch.
-- A chain lock taken in every alarm transaction (iim.audit_append) serialised them all per tenant; staged
-- lines are as durable (same commit) and reach the chain a moment later. Chain order is flush order.
CREATE TABLE iim.audit_pending (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id    uuid        NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor        text        NOT NULL CHECK (length(actor) BETWEEN 1 AND 200),
    action       text        NOT NULL CHECK (length(action) BETWEEN 1 AND 100),
    entity       text        NOT NULL CHECK (length(entity) BETWEEN 1 AND 100),
    entity_id    text        CHECK (length(entity_id) <= 200),
    detail       jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(detail) = 'object'),
    correlation  jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(correlation) = 'object')
);
ALTER TABLE iim.audit_pending ENABLE ROW LEVEL SECURITY;
ALTER TABLE iim.audit_pending FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON iim.audit_pending
    USING (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid);
GRANT INSERT ON iim.audit_pending TO iim_app;

CREATE FUNCTION iim.audit_flush(p_limit integer) RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
DECLARE
    r record;
    v_tenant uuid := NULL;
    v_prev bytea;
    v_hash bytea;
    v_id bigint;
    v_moved integer := 0;
BEGIN
    -- Lock order as iim.audit_append: the change sequence (shared), then tenant chains (ascending tenant).
    PERFORM pg_advisory_xact_lock_shared(1229540685, 1);
    FOR r IN
        WITH moved AS (
            DELETE FROM iim.audit_pending p
             WHERE p.id IN (SELECT q.id FROM iim.audit_pending q ORDER BY q.id
                             LIMIT least(greatest(p_limit, 1), 10000) FOR UPDATE SKIP LOCKED)
            RETURNING p.*)
        SELECT * FROM moved ORDER BY tenant_id, id
    LOOP
        IF v_tenant IS DISTINCT FROM r.tenant_id THEN
            v_tenant := r.tenant_id;
            PERFORM pg_advisory_xact_lock(1229540685, hashtext(v_tenant::text));
            SELECT a.row_hash INTO v_prev FROM iim.audit_log a WHERE a.tenant_id = v_tenant ORDER BY a.id DESC LIMIT 1;
            v_prev := coalesce(v_prev, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
        END IF;
        v_id := nextval(pg_get_serial_sequence('iim.audit_log', 'id'));
        v_hash := sha256(v_prev || convert_to(iim.audit_canonical(r.tenant_id, v_id, r.at, r.actor, r.action,
                                                                 r.entity, r.entity_id, r.detail, r.correlation),
                                              'UTF8'));
        INSERT INTO iim.audit_log (tenant_id, id, at, actor, action, entity, entity_id, detail, correlation,
                                   prev_hash, row_hash)
        OVERRIDING SYSTEM VALUE
        VALUES (r.tenant_id, v_id, r.at, r.actor, r.action, r.entity, r.entity_id, r.detail, r.correlation,
                v_prev, v_hash);
        v_prev := v_hash;
        v_moved := v_moved + 1;
    END LOOP;
    RETURN v_moved;
END
$$;
REVOKE ALL ON FUNCTION iim.audit_flush(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.audit_flush(integer) TO iim_app;

-- The sweep needs every tenant's due incidents (ids only); RLS keeps the app role to one tenant per
-- transaction, so this narrow definer function answers just that question.
CREATE FUNCTION iim.due_incidents(p_limit integer) RETURNS TABLE (tenant_id uuid, id uuid)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
        SELECT i.tenant_id, i.id FROM iim.incident i
         WHERE i.state IN ('open', 'notifying') AND i.deadline <= now()
         ORDER BY i.deadline
         LIMIT least(greatest(p_limit, 1), 10000)
    $$;
REVOKE ALL ON FUNCTION iim.due_incidents(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.due_incidents(integer) TO iim_app;

-- Both functions above must see every tenant's rows, and FORCE ROW LEVEL SECURITY filters even the table
-- owner. They are therefore owned by iim_sweeper: no login, no BYPASSRLS, only these permissive policies
-- and grants (read due incidents; move staged audit lines into the chain). Nothing else runs as it.
RESET ROLE;
DO $role$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'iim_sweeper') THEN
        CREATE ROLE iim_sweeper NOLOGIN;
    END IF;
    ALTER ROLE iim_sweeper NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
END
$role$;
GRANT USAGE ON SCHEMA iim TO iim_sweeper;
GRANT SELECT ON iim.incident TO iim_sweeper;
GRANT SELECT, UPDATE, DELETE ON iim.audit_pending TO iim_sweeper;  -- UPDATE: FOR UPDATE SKIP LOCKED
GRANT SELECT, INSERT ON iim.audit_log TO iim_sweeper;
GRANT USAGE ON SEQUENCE iim.audit_log_id_seq TO iim_sweeper;
GRANT EXECUTE ON FUNCTION iim.audit_canonical(uuid, bigint, timestamptz, text, text, text, text, jsonb, jsonb)
    TO iim_sweeper;
CREATE POLICY sweeper_all ON iim.incident AS PERMISSIVE FOR SELECT TO iim_sweeper USING (true);
CREATE POLICY sweeper_all ON iim.audit_pending AS PERMISSIVE FOR ALL TO iim_sweeper USING (true) WITH CHECK (true);
CREATE POLICY sweeper_all ON iim.audit_log AS PERMISSIVE FOR ALL TO iim_sweeper USING (true) WITH CHECK (true);
ALTER FUNCTION iim.due_incidents(integer) OWNER TO iim_sweeper;
ALTER FUNCTION iim.audit_flush(integer) OWNER TO iim_sweeper;
SET LOCAL ROLE iim_owner;

-- PostgreSQL grants EXECUTE to PUBLIC on new functions: the audit append (a definer function) must be
-- callable by the app role only, or the cache role could write into any tenant's chain.
REVOKE EXECUTE ON FUNCTION iim.audit_append(uuid, text, text, text, text, jsonb, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.audit_append(uuid, text, text, text, text, jsonb, jsonb) TO iim_app;

-- The intake ledger is append-only for the service; incidents and actions move forward, never vanish.
GRANT SELECT, INSERT ON iim.device_event TO iim_app;
GRANT SELECT, INSERT, UPDATE ON iim.incident, iim.incident_action, iim.sms_outbox TO iim_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON iim.originate_limit TO iim_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON iim.originate_window TO iim_app;
