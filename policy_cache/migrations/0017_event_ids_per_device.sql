-- 0017: an event_id is a device's own: the intake ledger deduplicates per device, not per tenant.
--
-- Devices number their events themselves (counters, short random ids, vendor ids), so two devices of one
-- tenant can send the same event_id. Keyed by (tenant, event_id), the second device's real alarm was taken
-- for a replay of the first's with another body and refused with a 422 on every retry, for ever. The
-- ledger's key becomes (tenant, device, event_id): the same id from the same device is still a replay (the
-- first answer) or a conflict (another body), and from another device it is a new event. The replay check
-- of iim.intake_route looks up the device's own id through the new primary key (which also serves the
-- ON DELETE CASCADE of the device foreign key).
-- On a large ledger the new primary key blocks writes to iim.device_event while it builds.

SET LOCAL ROLE iim_owner;

ALTER TABLE iim.device_event DROP CONSTRAINT device_event_pkey,
    ADD CONSTRAINT device_event_pkey PRIMARY KEY (tenant_id, device_id, event_id);

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
