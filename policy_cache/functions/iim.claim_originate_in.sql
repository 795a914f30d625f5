-- iim.claim_originate_in: its current definition, last set by migration 0012_alarm_writes_in_one_statement.sql.
--
-- iim.claim_originate as a statement of its own (autocommit): the exclusive lock is held from inside this
-- statement to its commit, never across a client round trip. Scoped to p_tenant for the statement only,
-- like iim.event_device.
CREATE OR REPLACE FUNCTION iim.claim_originate_in(p_tenant uuid, p_key text, p_max_concurrent integer, p_max_per_hour integer)
    RETURNS TABLE (claimed boolean, in_flight integer, last_hour integer)
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    caller_scope text := coalesce(current_setting('app.tenant', true), '');
BEGIN
    PERFORM set_config('app.tenant', p_tenant::text, true);
    SELECT c.claimed, c.in_flight, c.last_hour INTO claimed, in_flight, last_hour
      FROM iim.claim_originate(p_key, p_max_concurrent, p_max_per_hour) AS c;
    PERFORM set_config('app.tenant', caller_scope, true);
    RETURN NEXT;
END
$fn$;
