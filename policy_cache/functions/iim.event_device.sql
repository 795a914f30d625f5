-- iim.event_device: its current definition, last set by migration 0010_event_device_lookup.sql.
CREATE OR REPLACE FUNCTION iim.event_device(p_tenant uuid, p_external_id text)
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
