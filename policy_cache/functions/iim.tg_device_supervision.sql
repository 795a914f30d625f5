-- iim.tg_device_supervision: its current definition, last set by migration 0027_device_supervision.sql.
--
-- Supervision starts (or its interval changes, or the device is enabled again) -> when it is due, counted from
-- when it was last heard (never heard: from now); stopped or disabled -> not due.
CREATE OR REPLACE FUNCTION iim.tg_device_supervision() RETURNS trigger
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
