-- iim.persist_decision: its current definition, last set by migration 0012_alarm_writes_in_one_statement.sql.
--
-- p: {"outcomes": [{key, outcome, detail}],            recorded on actions that have none yet
--     "incident": {id, state, step, attempt, deadline, reason, closed, scenario} or absent,
--     "actions":  [{key, incident_id, step, kind, destination, spec, call_uuid, outcome, detail,
--                   "sms": [{key, msisdn, body}], "audit": [line]}],   sms and audit only if the key is new
--     "audit":    [{actor, action, entity, entity_id, detail, correlation}],
--     "claim":    {keys, max_concurrent, max_per_hour}}   calls to claim under the tenant's caps as they are written
-- Returns {"inserted": [keys written now], "claims": [{key, claimed}]}.
CREATE OR REPLACE FUNCTION iim.persist_decision(p jsonb) RETURNS jsonb
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
