-- 0012: what one alarm writes, in one statement per transaction step.
--
-- Measured on the alarm path (benchmarks.event_to_originate): a client round trip costs ~90 us of CPU
-- (PostgreSQL ~40, the asyncpg client ~50) before the statement does anything, and an alarm took ~43 of
-- them. Here the intake (replay check, incident opened or joined, the ledger row, its audit line) is one
-- statement, and a decision of the scenario engine (outcomes, the incident's progress, its actions with
-- their SMS rows and audit lines, the toll-fraud claim of its calls) is another. The rules stay where
-- they were: the engine decides in Python; these functions only write what it decided, with the same
-- idempotency (an action key already present writes nothing more). SECURITY INVOKER: row-level security
-- applies; call them inside the tenant's transaction.

SET LOCAL ROLE iim_owner;

CREATE FUNCTION iim.intake_event(p_event_id text, p_device uuid, p_household uuid, p_hazard text, p_cleared boolean,
                                 p_type text, p_occurred_at timestamptz, p_fingerprint text, p_payload jsonb,
                                 p_channel text, p_msg_id text, p_actor text)
    RETURNS TABLE (seen_fingerprint text, response jsonb, incident_id uuid, opened boolean, live uuid[])
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_action text;
BEGIN
    SELECT r.seen_fingerprint, r.seen_response, r.incident_id, r.opened
      INTO seen_fingerprint, response, incident_id, opened
      FROM iim.intake_route(p_event_id, p_device, p_household, CASE WHEN p_cleared THEN NULL ELSE p_hazard END) r;
    IF seen_fingerprint IS NOT NULL THEN
        RETURN NEXT;  -- a replay: the caller compares fingerprints and answers as the first time
        RETURN;
    END IF;
    IF p_cleared THEN
        -- "cleared": every live incident of the device is ticked by the caller; the event names the first.
        live := ARRAY(SELECT i.id FROM iim.incident i
                       WHERE i.device_id = p_device AND i.state IN ('open', 'notifying') ORDER BY i.opened_at, i.id);
        incident_id := live[1];
        v_action := CASE WHEN incident_id IS NULL THEN 'recorded' ELSE 'cleared' END;
    ELSE
        v_action := CASE WHEN incident_id IS NULL THEN 'recorded' WHEN opened THEN 'opened' ELSE 'updated' END;
    END IF;
    response := jsonb_build_object('event_id', p_event_id, 'status', 'accepted', 'incident_id', incident_id::text,
                                   'action', v_action);
    INSERT INTO iim.device_event (event_id, device_id, type, occurred_at, fingerprint, payload, channel, msg_id,
                                  incident_id, response)
    VALUES (p_event_id, p_device, p_type, p_occurred_at, p_fingerprint, p_payload, p_channel, p_msg_id, incident_id,
            response);
    IF incident_id IS NOT NULL THEN
        INSERT INTO iim.audit_pending (actor, action, entity, entity_id, detail, correlation)
        VALUES (p_actor, 'incident.' || v_action, 'incident', incident_id::text,
                jsonb_build_object('hazard', p_type, 'channel', p_channel), jsonb_build_object('event_id', p_event_id));
    END IF;
    RETURN NEXT;
END
$fn$;

REVOKE EXECUTE ON FUNCTION iim.intake_event(text, uuid, uuid, text, boolean, text, timestamptz, text, jsonb, text,
                                            text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.intake_event(text, uuid, uuid, text, boolean, text, timestamptz, text, jsonb, text,
                                           text, text) TO iim_app;

-- The caps' counts come from iim.originate_window alone: per tenant, minute (of dispatch) and shard, the
-- calls dispatched and, of those, the ones no longer in flight (finished, or put back to be retried).
-- Counting the ringing calls themselves cost a scan of every call in flight (and of the dead index entries
-- of those just finished) in every claim. Sharded by backend so that claims running side by side (see
-- below) do not queue on one row lock until their commits.
ALTER TABLE iim.originate_window ADD COLUMN shard smallint NOT NULL DEFAULT 0 CHECK (shard BETWEEN 0 AND 31);
ALTER TABLE iim.originate_window ADD COLUMN settled integer NOT NULL DEFAULT 0 CHECK (settled >= 0);
ALTER TABLE iim.originate_window DROP CONSTRAINT originate_window_pkey;
ALTER TABLE iim.originate_window ADD PRIMARY KEY (tenant_id, minute, shard);

-- Rows written before this migration: every call of theirs that is no longer ringing is settled. As the
-- superuser running the migration: the table's row-level security hides every tenant from iim_owner.
RESET ROLE;
UPDATE iim.originate_window w
   SET settled = greatest(0, w.calls - (SELECT count(*) FROM iim.incident_action a
                                         WHERE a.tenant_id = w.tenant_id AND a.kind IN ('call', 'record')
                                           AND a.dispatched_at IS NOT NULL AND a.finished_at IS NULL
                                           AND date_trunc('minute', a.dispatched_at) = w.minute));
SET LOCAL ROLE iim_owner;

CREATE FUNCTION iim.tg_originate_settled() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF OLD.dispatched_at IS NOT NULL AND OLD.finished_at IS NULL
       AND NOT (NEW.dispatched_at IS NOT NULL AND NEW.finished_at IS NULL) THEN
        INSERT INTO iim.originate_window AS w (tenant_id, minute, shard, calls, settled)
        VALUES (OLD.tenant_id, date_trunc('minute', OLD.dispatched_at), pg_backend_pid() % 32, 0, 1)
        ON CONFLICT (tenant_id, minute, shard) DO UPDATE SET settled = w.settled + 1;
    END IF;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER originate_settled AFTER UPDATE OF dispatched_at, finished_at ON iim.incident_action
    FOR EACH ROW WHEN (OLD.dispatched_at IS NOT NULL AND OLD.finished_at IS NULL)
    EXECUTE FUNCTION iim.tg_originate_settled();

-- Nothing counts the ringing calls through their index any more; without it, recording a call's dispatch or
-- outcome is a HOT update (no indexed column changes).
DROP INDEX iim.incident_action_ringing_idx;

-- The outbox's number check as the expression itself: a SQL function in a CHECK is inlined, that is parsed
-- again, in every statement that writes the table (the hot path writes one per alarm). Same rule as
-- iim.is_e164.
ALTER TABLE iim.sms_outbox DROP CONSTRAINT sms_outbox_msisdn_check;
ALTER TABLE iim.sms_outbox ADD CONSTRAINT sms_outbox_msisdn_check CHECK (msisdn ~ '^\+[1-9][0-9]{6,14}$');

-- The tenant's originate lock (held until commit) and the counts its caps are checked against: calls in
-- flight (dispatched in the last ten minutes, not settled) and dispatched in the last hour. Exclusive: the
-- counts are exact while it is held. Shared: claims far below the caps run side by side, each missing at
-- most the claims of the other transactions running then (fewer than max_connections, each of at most
-- four calls), so a shared claim is only taken with that margin to spare (iim.persist_decision).
CREATE FUNCTION iim.originate_budget(p_shared boolean DEFAULT false, OUT in_flight integer, OUT last_hour integer)
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF p_shared THEN
        PERFORM pg_advisory_xact_lock_shared(1229540685,
                                             hashtext('originate:' || current_setting('app.tenant', true)));
    ELSE
        PERFORM pg_advisory_xact_lock(1229540685, hashtext('originate:' || current_setting('app.tenant', true)));
    END IF;
    SELECT coalesce(sum(w.calls - w.settled) FILTER (WHERE w.minute > now() - interval '10 minutes'), 0),
           coalesce(sum(w.calls), 0)
      INTO in_flight, last_hour
      FROM iim.originate_window w WHERE w.minute > now() - interval '1 hour';
END
$fn$;

-- plpgsql rather than SQL for these helpers: plpgsql keeps its plans for the session, a SQL function called
-- from plpgsql is planned again in every transaction.
CREATE FUNCTION iim.count_originates(p_calls integer) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    INSERT INTO iim.originate_window AS w (minute, shard, calls)
    VALUES (date_trunc('minute', now()), pg_backend_pid() % 32, p_calls)
    ON CONFLICT (tenant_id, minute, shard) DO UPDATE SET calls = w.calls + excluded.calls;
END
$fn$;

-- Audit lines of a decision ({actor, action, entity, entity_id, detail, correlation}), staged for the chain.
CREATE FUNCTION iim.stage_audit(p_lines jsonb) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF jsonb_array_length(coalesce(p_lines, '[]')) > 0 THEN
        INSERT INTO iim.audit_pending (actor, action, entity, entity_id, detail, correlation)
        SELECT l.actor, l.action, l.entity, l.entity_id, l.detail, l.correlation
          FROM jsonb_to_recordset(p_lines)
               AS l(actor text, action text, entity text, entity_id text, detail jsonb, correlation jsonb);
    END IF;
END
$fn$;

CREATE OR REPLACE FUNCTION iim.claim_originate(p_key text, p_max_concurrent integer, p_max_per_hour integer)
    RETURNS TABLE (claimed boolean, in_flight integer, last_hour integer)
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    SELECT b.in_flight, b.last_hour INTO in_flight, last_hour FROM iim.originate_budget(false) AS b;
    claimed := false;
    IF in_flight < p_max_concurrent AND last_hour < p_max_per_hour THEN
        UPDATE iim.incident_action a SET dispatched_at = now()
         WHERE a.key = p_key AND a.dispatched_at IS NULL AND a.outcome IS NULL
           AND EXISTS (SELECT 1 FROM iim.incident i  -- an incident closed meanwhile calls nobody any more
                        WHERE i.id = a.incident_id AND i.state IN ('open', 'notifying'));
        IF FOUND THEN
            PERFORM iim.count_originates(1);
            claimed := true;
        END IF;
    END IF;
    RETURN NEXT;
END
$fn$;

-- iim.claim_originate as a statement of its own (autocommit): the exclusive lock is held from inside this
-- statement to its commit, never across a client round trip. Scoped to p_tenant for the statement only,
-- like iim.event_device.
CREATE FUNCTION iim.claim_originate_in(p_tenant uuid, p_key text, p_max_concurrent integer, p_max_per_hour integer)
    RETURNS TABLE (claimed boolean, in_flight integer, last_hour integer)
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    caller_scope text := coalesce(current_setting('app.tenant', true), '');
BEGIN
    PERFORM set_config('app.tenant', p_tenant::text, true);
    SELECT c.claimed, c.in_flight, c.last_hour INTO claimed, in_flight, last_hour
      FROM iim.claim_originate(p_key, p_max_concurrent, p_max_per_hour) AS c;
    PERFORM set_config('app.tenant', caller_scope, true);
    RETURN NEXT;
END
$fn$;

-- One action of a decision with its SMS rows and audit lines; nothing when its key exists (decided before,
-- by a run that is being resumed). p_dispatched: claimed now, so marked dispatched as it is written.
CREATE FUNCTION iim.write_action(a jsonb, p_dispatched boolean) RETURNS boolean
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_incident uuid := (a->>'incident_id')::uuid;
    k text;
BEGIN
    INSERT INTO iim.incident_action AS t (key, incident_id, step, kind, destination, spec, call_uuid, outcome, detail,
                                          finished_at, dispatched_at)
    VALUES (a->>'key', v_incident, (a->>'step')::integer, a->>'kind', a->>'destination', a->'spec',
            (a->>'call_uuid')::uuid, a->>'outcome', left(coalesce(a->>'detail', ''), 500),
            CASE WHEN a->>'outcome' IS NOT NULL THEN now() END, CASE WHEN p_dispatched THEN now() END)
    ON CONFLICT (tenant_id, key) DO NOTHING
    RETURNING t.key INTO k;
    IF k IS NULL THEN
        RETURN false;
    END IF;
    IF jsonb_array_length(coalesce(a->'sms', '[]')) > 0 THEN
        INSERT INTO iim.sms_outbox (key, msisdn, body, incident_id)
        SELECT s.key, s.msisdn, left(s.body, 1600), v_incident
          FROM jsonb_to_recordset(a->'sms') AS s(key text, msisdn text, body text)
        ON CONFLICT (tenant_id, key) DO NOTHING;
    END IF;
    PERFORM iim.stage_audit(a->'audit');
    RETURN true;
END
$fn$;

-- p: {"outcomes": [{key, outcome, detail}],            recorded on actions that have none yet
--     "incident": {id, state, step, attempt, deadline, reason, closed, scenario} or absent,
--     "actions":  [{key, incident_id, step, kind, destination, spec, call_uuid, outcome, detail,
--                   "sms": [{key, msisdn, body}], "audit": [line]}],   sms and audit only if the key is new
--     "audit":    [{actor, action, entity, entity_id, detail, correlation}],
--     "claim":    {keys, max_concurrent, max_per_hour}}   calls to claim under the tenant's caps as they are written
-- Returns {"inserted": [keys written now], "claims": [{key, claimed}]}.
CREATE FUNCTION iim.persist_decision(p jsonb) RETURNS jsonb
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    inc jsonb := p->'incident';
    a jsonb;
    claim_keys text[] := ARRAY(SELECT jsonb_array_elements_text(coalesce(p->'claim'->'keys', '[]')));
    inserted text[] := '{}';
    claims jsonb := '[]';
    v_in_flight integer;
    v_last_hour integer;
    v_claimed integer := 0;
    v_margin integer;
    v_ok boolean;
BEGIN
    -- One indexed UPDATE per outcome: a join with the recordset would be planned for ~100 rows (a scan).
    FOR a IN SELECT x FROM jsonb_array_elements(coalesce(p->'outcomes', '[]')) AS x LOOP
        UPDATE iim.incident_action t
           SET outcome = a->>'outcome', detail = left(coalesce(a->>'detail', ''), 500), finished_at = now()
         WHERE t.key = a->>'key' AND t.outcome IS NULL;
    END LOOP;
    IF inc IS NOT NULL THEN
        UPDATE iim.incident i
           SET state = (inc->>'state')::iim.incident_state, step = (inc->>'step')::integer,
               attempt = (inc->>'attempt')::integer, deadline = (inc->>'deadline')::timestamptz,
               reason = left(inc->>'reason', 1000), updated_at = now(),
               closed_at = CASE WHEN (inc->>'closed')::boolean THEN now() END,
               scenario = CASE WHEN jsonb_typeof(inc->'scenario') = 'object' THEN inc->'scenario' ELSE i.scenario END
         WHERE i.id = (inc->>'id')::uuid;
    END IF;
    FOR a IN SELECT x FROM jsonb_array_elements(coalesce(p->'actions', '[]')) AS x
              WHERE NOT (x->>'key' = ANY (claim_keys)) LOOP
        IF iim.write_action(a, false) THEN
            inserted := inserted || (a->>'key');
        END IF;
    END LOOP;
    PERFORM iim.stage_audit(p->'audit');
    -- Last: the tenant's originate lock is held from here to the caller's COMMIT. Taken shared, and claims
    -- are written dispatched, only far enough below the caps (iim.originate_budget); otherwise the calls are
    -- written undispatched ("claimed": false) for the caller to claim exactly after its commit
    -- (iim.claim_originate_in), so the exclusive lock is never held across a client round trip.
    IF cardinality(claim_keys) > 0 THEN
        v_ok := false;
        IF cardinality(claim_keys) <= 4 THEN
            SELECT b.in_flight, b.last_hour INTO v_in_flight, v_last_hour FROM iim.originate_budget(true) AS b;
            v_margin := 4 * current_setting('max_connections')::integer + cardinality(claim_keys);
            v_ok := v_in_flight + v_margin <= (p->'claim'->>'max_concurrent')::integer
                    AND v_last_hour + v_margin <= (p->'claim'->>'max_per_hour')::integer;
        END IF;
        FOR a IN SELECT x FROM jsonb_array_elements(p->'actions') AS x WHERE x->>'key' = ANY (claim_keys) LOOP
            CONTINUE WHEN NOT iim.write_action(a, v_ok);
            inserted := inserted || (a->>'key');
            claims := claims || jsonb_build_object('key', a->>'key', 'claimed', v_ok);
            IF v_ok THEN
                v_claimed := v_claimed + 1;
            END IF;
        END LOOP;
        IF v_claimed > 0 THEN
            PERFORM iim.count_originates(v_claimed);
        END IF;
    END IF;
    RETURN jsonb_build_object('inserted', to_jsonb(inserted), 'claims', claims);
END
$fn$;

REVOKE EXECUTE ON FUNCTION iim.originate_budget(boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.originate_budget(boolean) TO iim_app;
REVOKE EXECUTE ON FUNCTION iim.stage_audit(jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.stage_audit(jsonb) TO iim_app;
REVOKE EXECUTE ON FUNCTION iim.count_originates(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.count_originates(integer) TO iim_app;
REVOKE EXECUTE ON FUNCTION iim.claim_originate_in(uuid, text, integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.claim_originate_in(uuid, text, integer, integer) TO iim_app;
REVOKE EXECUTE ON FUNCTION iim.write_action(jsonb, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.write_action(jsonb, boolean) TO iim_app;
REVOKE EXECUTE ON FUNCTION iim.persist_decision(jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.persist_decision(jsonb) TO iim_app;
