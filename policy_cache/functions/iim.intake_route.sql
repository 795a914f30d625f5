-- iim.intake_route: its current definition, last set by migration 0017_event_ids_per_device.sql.
CREATE OR REPLACE FUNCTION iim.intake_route(p_event_id text, p_device uuid, p_household uuid, p_hazard text)
    RETURNS TABLE (seen_fingerprint text, seen_response jsonb, incident_id uuid, opened boolean)
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    SELECT e.fingerprint, e.response INTO seen_fingerprint, seen_response
      FROM iim.device_event e WHERE e.device_id = p_device AND e.event_id = p_event_id;
    opened := false;
    IF FOUND OR p_hazard IS NULL THEN
        RETURN NEXT;  -- a replay (the caller compares fingerprints), or an event that opens nothing
        RETURN;
    END IF;
    UPDATE iim.incident i SET event_count = i.event_count + 1, last_event_at = now(), updated_at = now()
     WHERE i.device_id = p_device AND i.hazard = p_hazard AND i.state IN ('open', 'notifying')
    RETURNING i.id INTO incident_id;
    IF NOT FOUND THEN
        INSERT INTO iim.incident AS i (household_id, device_id, hazard, first_event_id)
        VALUES (p_household, p_device, p_hazard, p_event_id)
        ON CONFLICT (tenant_id, device_id, hazard) WHERE state IN ('open', 'notifying') DO NOTHING
        RETURNING i.id INTO incident_id;
        IF FOUND THEN
            opened := true;
        ELSE
            -- Another transaction opened it between our UPDATE and INSERT: join that one.
            UPDATE iim.incident i SET event_count = i.event_count + 1, last_event_at = now(), updated_at = now()
             WHERE i.device_id = p_device AND i.hazard = p_hazard AND i.state IN ('open', 'notifying')
            RETURNING i.id INTO incident_id;
        END IF;
    END IF;
    RETURN NEXT;
END
$fn$;
