-- iim.unsent_calls: its current definition, last set by migration 0022_unsent_calls_and_rearm.sql.
CREATE OR REPLACE FUNCTION iim.unsent_calls(p_older interval, p_limit integer)
    RETURNS TABLE (tenant_id uuid, incident_id uuid, key text)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
AS $fn$
    SELECT a.tenant_id, a.incident_id, a.key FROM iim.incident_action a
      JOIN iim.incident i ON i.tenant_id = a.tenant_id AND i.id = a.incident_id
     WHERE a.kind IN ('call', 'record') AND a.dispatched_at IS NOT NULL AND a.sent_at IS NULL
       AND a.finished_at IS NULL AND a.dispatched_at < now() - p_older AND i.state = 'notifying'
     ORDER BY a.dispatched_at
     LIMIT least(greatest(p_limit, 1), 10000)
$fn$;
