-- iim.device_silent: its current definition, last set by migration 0027_device_supervision.sql.
--
-- A device the scan found silent, in its tenant's transaction: re-checked under the row's lock (heard meanwhile,
-- or marked by another instance: nothing), then marked offline (registry status too) and its "offline" incident
-- opened or joined through the live-incident index, as the intake does. No row: nothing to do.
CREATE OR REPLACE FUNCTION iim.device_silent(p_device uuid, p_cutoff timestamptz, p_now timestamptz, p_actor text)
    RETURNS TABLE (incident_id uuid, opened boolean)
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_seen timestamptz;
    v_household uuid;
    v_event text;
BEGIN
    SELECT h.last_seen_at INTO v_seen FROM iim.device_health h
     WHERE h.device_id = p_device AND h.silent_after <= p_cutoff AND NOT (h.conditions ? 'offline')
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE iim.device_health h SET conditions = h.conditions || jsonb_build_object('offline', p_now)
     WHERE h.device_id = p_device;
    UPDATE iim.device d SET status = 'offline' WHERE d.id = p_device AND d.status <> 'offline';
    SELECT d.household_id INTO v_household FROM iim.device d WHERE d.id = p_device;
    v_event := 'supervision-offline-' || floor(extract(epoch FROM p_now))::bigint::text;
    INSERT INTO iim.audit_pending (actor, action, entity, entity_id, detail, correlation)
    VALUES (p_actor, 'device.offline', 'device', p_device::text,
            jsonb_build_object('last_seen_at', v_seen), jsonb_build_object('event_id', v_event));
    opened := false;
    INSERT INTO iim.incident AS i (household_id, device_id, hazard, first_event_id)
    VALUES (v_household, p_device, 'offline', v_event)
    ON CONFLICT (tenant_id, device_id, hazard) WHERE state IN ('open', 'notifying') DO NOTHING
    RETURNING i.id INTO incident_id;
    IF FOUND THEN
        opened := true;
        INSERT INTO iim.audit_pending (actor, action, entity, entity_id, detail, correlation)
        VALUES (p_actor, 'incident.opened', 'incident', incident_id::text,
                jsonb_build_object('hazard', 'offline', 'channel', 'supervision'),
                jsonb_build_object('event_id', v_event));
    ELSE
        SELECT i.id INTO incident_id FROM iim.incident i
         WHERE i.device_id = p_device AND i.hazard = 'offline' AND i.state IN ('open', 'notifying');
    END IF;
    RETURN NEXT;
END
$fn$;
