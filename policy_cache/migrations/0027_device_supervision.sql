-- 0027: device supervision: a heartbeat interval per device, when each device was last heard, its open conditions.
--
-- iim.device.heartbeat_interval_s (NULL: not supervised) is a registry field like the others. What changes with
-- every event lives apart, in iim.device_health, so a heartbeat never bumps the registry's version nor wakes the
-- policy cache: last_seen_at, silent_after (last heard, or since supervision started, plus the interval; NULL when
-- the device is not supervised or disabled) and conditions, a map of the device's open health conditions
-- ("offline", "battery_low", "self_test_failed") to when each was raised. A condition is raised once and cleared
-- once (the device heard again, battery_ok, self_test_passed): it opens at most one incident while it lasts.
--
-- The watchdog finds silent devices of every tenant with one indexed query (iim.silent_devices, owned by
-- iim_sweeper like iim.due_incidents) and marks each in its tenant's transaction (iim.device_silent), which
-- re-checks the row under its lock: two IIM instances scanning at once open one incident.

SET LOCAL ROLE iim_owner;

ALTER TABLE iim.device ADD COLUMN heartbeat_interval_s integer CHECK (heartbeat_interval_s BETWEEN 30 AND 604800);

CREATE TABLE iim.device_health (
    tenant_id     uuid        NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    device_id     uuid        NOT NULL,
    last_seen_at  timestamptz,
    silent_after  timestamptz,
    conditions    jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(conditions) = 'object'),
    PRIMARY KEY (tenant_id, device_id),
    FOREIGN KEY (tenant_id, device_id) REFERENCES iim.device (tenant_id, id) ON DELETE CASCADE
);
-- The watchdog's one query: supervised devices past their time that are not already marked offline.
CREATE INDEX device_health_silent_idx ON iim.device_health (silent_after)
    WHERE silent_after IS NOT NULL AND NOT (conditions ? 'offline');

ALTER TABLE iim.device_health ENABLE ROW LEVEL SECURITY;
ALTER TABLE iim.device_health FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON iim.device_health
    USING (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE ON iim.device_health TO iim_app;

-- Supervision starts (or its interval changes, or the device is enabled again) -> when it is due, counted from
-- when it was last heard (never heard: from now); stopped or disabled -> not due.
CREATE FUNCTION iim.tg_device_supervision() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.heartbeat_interval_s IS NOT DISTINCT FROM OLD.heartbeat_interval_s
       AND NEW.enabled IS NOT DISTINCT FROM OLD.enabled THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' AND NEW.heartbeat_interval_s IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO iim.device_health AS h (tenant_id, device_id, silent_after)
    VALUES (NEW.tenant_id, NEW.id,
            CASE WHEN NEW.enabled THEN now() + make_interval(secs => NEW.heartbeat_interval_s) END)
    ON CONFLICT (tenant_id, device_id) DO UPDATE
       SET silent_after = CASE WHEN NEW.enabled
                               THEN coalesce(h.last_seen_at, now()) + make_interval(secs => NEW.heartbeat_interval_s)
                          END;
    RETURN NULL;
END
$$;
CREATE TRIGGER device_supervision AFTER INSERT OR UPDATE OF heartbeat_interval_s, enabled ON iim.device
    FOR EACH ROW EXECUTE FUNCTION iim.tg_device_supervision();

-- The device was heard (any accepted event): last seen now, due again one interval later, "offline" cleared (the
-- registry status back to online when supervision had set it offline), p_clear cleared, p_raise raised unless it
-- is already open (raised: the caller opens its incident). Returns the live incidents of the cleared conditions.
CREATE FUNCTION iim.device_heard(p_device uuid, p_raise text, p_clear text[], p_actor text)
    RETURNS TABLE (raised boolean, clear uuid[])
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_interval integer;
    v_enabled boolean;
    v_prev jsonb;
    v_next jsonb;
BEGIN
    SELECT d.heartbeat_interval_s, d.enabled INTO v_interval, v_enabled FROM iim.device d WHERE d.id = p_device;
    INSERT INTO iim.device_health (device_id) VALUES (p_device) ON CONFLICT (tenant_id, device_id) DO NOTHING;
    SELECT h.conditions INTO v_prev FROM iim.device_health h WHERE h.device_id = p_device FOR UPDATE;
    v_next := v_prev - 'offline' - p_clear;
    raised := p_raise IS NOT NULL AND NOT (v_next ? p_raise);
    IF raised THEN
        v_next := v_next || jsonb_build_object(p_raise, now());
    END IF;
    UPDATE iim.device_health h
       SET last_seen_at = now(),
           silent_after = CASE WHEN v_enabled THEN now() + make_interval(secs => v_interval) END,
           conditions = v_next
     WHERE h.device_id = p_device;
    IF v_prev ? 'offline' THEN
        UPDATE iim.device d SET status = 'online' WHERE d.id = p_device AND d.status = 'offline';
        INSERT INTO iim.audit_pending (actor, action, entity, entity_id, detail)
        VALUES (p_actor, 'device.heard_again', 'device', p_device::text,
                jsonb_build_object('offline_since', v_prev ->> 'offline'));
    END IF;
    clear := ARRAY(SELECT i.id FROM iim.incident i
                    WHERE i.device_id = p_device AND i.hazard = ANY (p_clear || ARRAY['offline'])
                      AND i.state IN ('open', 'notifying') ORDER BY i.opened_at, i.id);
    RETURN NEXT;
END
$fn$;
REVOKE ALL ON FUNCTION iim.device_heard(uuid, text, text[], text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.device_heard(uuid, text, text[], text) TO iim_app;

-- A device the scan found silent, in its tenant's transaction: re-checked under the row's lock (heard meanwhile,
-- or marked by another instance: nothing), then marked offline (registry status too) and its "offline" incident
-- opened or joined through the live-incident index, as the intake does. No row: nothing to do.
CREATE FUNCTION iim.device_silent(p_device uuid, p_cutoff timestamptz, p_now timestamptz, p_actor text)
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
REVOKE ALL ON FUNCTION iim.device_silent(uuid, timestamptz, timestamptz, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.device_silent(uuid, timestamptz, timestamptz, text) TO iim_app;

-- The scan: every tenant's silent devices (ids only), oldest first. RLS keeps the app role to one tenant per
-- transaction, so this narrow definer function (owned by iim_sweeper) answers just that question.
CREATE FUNCTION iim.silent_devices(p_cutoff timestamptz, p_limit integer) RETURNS TABLE (tenant_id uuid, device_id uuid)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
AS $fn$
    SELECT h.tenant_id, h.device_id FROM iim.device_health h
     WHERE h.silent_after IS NOT NULL AND NOT (h.conditions ? 'offline') AND h.silent_after <= p_cutoff
     ORDER BY h.silent_after
     LIMIT least(greatest(p_limit, 1), 10000)
$fn$;
REVOKE ALL ON FUNCTION iim.silent_devices(timestamptz, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.silent_devices(timestamptz, integer) TO iim_app;

RESET ROLE;
GRANT SELECT ON iim.device_health TO iim_sweeper;
CREATE POLICY sweeper_read ON iim.device_health AS PERMISSIVE FOR SELECT TO iim_sweeper USING (true);
ALTER FUNCTION iim.silent_devices(timestamptz, integer) OWNER TO iim_sweeper;
SET LOCAL ROLE iim_owner;
