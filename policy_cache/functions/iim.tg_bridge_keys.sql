-- iim.tg_bridge_keys: its current definition, last set by migration 0018_bridge_key_changes.sql.
--
-- NOTIFY iim_bridge_keys {"tenant", "device"|"credential"} when what the device bridge caches changes.
CREATE OR REPLACE FUNCTION iim.tg_bridge_keys() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
    SET search_path = pg_catalog
AS $fn$
BEGIN
    IF TG_TABLE_NAME = 'device' THEN
        IF TG_OP <> 'INSERT' AND OLD.external_id IS NOT NULL THEN
            PERFORM pg_notify('iim_bridge_keys', json_build_object('tenant', OLD.tenant_id, 'device', OLD.external_id)::text);
        END IF;
        IF TG_OP <> 'DELETE' AND NEW.external_id IS NOT NULL THEN
            PERFORM pg_notify('iim_bridge_keys', json_build_object('tenant', NEW.tenant_id, 'device', NEW.external_id)::text);
        END IF;
    ELSE
        IF TG_OP <> 'INSERT' THEN
            PERFORM pg_notify('iim_bridge_keys', json_build_object('tenant', OLD.tenant_id, 'credential', OLD.name)::text);
        END IF;
        IF TG_OP <> 'DELETE' THEN
            PERFORM pg_notify('iim_bridge_keys', json_build_object('tenant', NEW.tenant_id, 'credential', NEW.name)::text);
        END IF;
    END IF;
    RETURN NULL;
END
$fn$;
