-- 0010: the bridge's device lookup (device, its key reference) in one statement.
--
-- Every signed event from a device not in the bridge's short cache needs this row before anything else;
-- as a tenant transaction it cost four round trips (BEGIN, set_config, SELECT, COMMIT). The function
-- scopes itself to the tenant for its one query and then puts back whatever scope its caller had, so it
-- leaves no tenant behind, inside a transaction or not. SECURITY INVOKER: row-level security applies as
-- for any iim_app query.

SET LOCAL ROLE iim_owner;

CREATE FUNCTION iim.event_device(p_tenant uuid, p_external_id text)
    RETURNS TABLE (id uuid, household_id uuid, external_id text, type text, enabled boolean, connector text,
                   kind text, ref text)
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    caller_scope text := coalesce(current_setting('app.tenant', true), '');
BEGIN
    PERFORM set_config('app.tenant', p_tenant::text, true);
    RETURN QUERY
        SELECT d.id, d.household_id, d.external_id, d.type::text, d.enabled, d.connector, c.kind::text, c.ref
          FROM iim.device d
          LEFT JOIN iim.credential_ref c ON c.tenant_id = d.tenant_id AND c.id = d.credential_ref_id
         WHERE d.tenant_id = p_tenant AND d.external_id = p_external_id;
    PERFORM set_config('app.tenant', caller_scope, true);
END
$fn$;

REVOKE EXECUTE ON FUNCTION iim.event_device(uuid, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.event_device(uuid, text) TO iim_app;
