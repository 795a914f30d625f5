-- iim.intake_event: its current definition, last set by migration 0012_alarm_writes_in_one_statement.sql.
CREATE OR REPLACE FUNCTION iim.intake_event(p_event_id text, p_device uuid, p_household uuid, p_hazard text, p_cleared boolean,
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
