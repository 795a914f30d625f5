-- iim.device_heard: its current definition, last set by migration 0027_device_supervision.sql.
--
-- The device was heard (any accepted event): last seen now, due again one interval later, "offline" cleared (the
-- registry status back to online when supervision had set it offline), p_clear cleared, p_raise raised unless it
-- is already open (raised: the caller opens its incident). Returns the live incidents of the cleared conditions.
CREATE OR REPLACE FUNCTION iim.device_heard(p_device uuid, p_raise text, p_clear text[], p_actor text)
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
