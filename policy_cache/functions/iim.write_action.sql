-- iim.write_action: its current definition, last set by migration 0028_sealed_fields.sql.
--
-- One action of a decision with its SMS rows and audit lines; nothing when its key exists (decided before,
-- by a run that is being resumed). p_dispatched: claimed now, so marked dispatched as it is written.
CREATE OR REPLACE FUNCTION iim.write_action(a jsonb, p_dispatched boolean) RETURNS boolean
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
        INSERT INTO iim.sms_outbox (key, msisdn, body, body_key, incident_id)
        SELECT s.key, s.msisdn, CASE WHEN s.body_key IS NULL THEN left(s.body, 1600) ELSE s.body END, s.body_key,
               v_incident
          FROM jsonb_to_recordset(a->'sms') AS s(key text, msisdn text, body text, body_key integer)
        ON CONFLICT (tenant_id, key) DO NOTHING;
    END IF;
    PERFORM iim.stage_audit(a->'audit');
    RETURN true;
END
$fn$;
