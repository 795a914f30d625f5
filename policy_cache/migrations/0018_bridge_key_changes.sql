-- 0018: the device bridge hears at once when a device's keys or standing change.
--
-- The bridge caches each device's verification keys (and the devices it does not know) so a flood of
-- events does not become a flood of queries. Kept for a fixed time, a revoked key or a disabled device went
-- on being accepted for up to that long. Now every change that can alter what the bridge would answer
-- (a device added, removed, enabled or disabled, renamed, moved, given another key or connector; a key
-- reference added, changed or removed) sends NOTIFY iim_bridge_keys on commit, with the tenant and the
-- device's external id or the key reference's name as JSON, and the bridge drops those entries. Device
-- status changes (registrations, frequent) send nothing. SECURITY INVOKER: it only reads OLD and NEW.

SET LOCAL ROLE iim_owner;

CREATE FUNCTION iim.tg_bridge_keys() RETURNS trigger
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

CREATE TRIGGER zz_bridge_keys AFTER INSERT OR DELETE ON iim.device
    FOR EACH ROW EXECUTE FUNCTION iim.tg_bridge_keys();
CREATE TRIGGER zz_bridge_keys_update AFTER UPDATE ON iim.device
    FOR EACH ROW
    WHEN (OLD.enabled IS DISTINCT FROM NEW.enabled OR OLD.external_id IS DISTINCT FROM NEW.external_id
          OR OLD.credential_ref_id IS DISTINCT FROM NEW.credential_ref_id OR OLD.connector IS DISTINCT FROM NEW.connector
          OR OLD.household_id IS DISTINCT FROM NEW.household_id OR OLD.type IS DISTINCT FROM NEW.type)
    EXECUTE FUNCTION iim.tg_bridge_keys();
CREATE TRIGGER zz_bridge_keys AFTER INSERT OR UPDATE OR DELETE ON iim.credential_ref
    FOR EACH ROW EXECUTE FUNCTION iim.tg_bridge_keys();
