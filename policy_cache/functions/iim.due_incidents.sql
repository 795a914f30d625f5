-- iim.due_incidents: its current definition, last set by migration 0006_incidents.sql.
--
-- The sweep needs every tenant's due incidents (ids only); RLS keeps the app role to one tenant per
-- transaction, so this narrow definer function answers just that question.
CREATE OR REPLACE FUNCTION iim.due_incidents(p_limit integer) RETURNS TABLE (tenant_id uuid, id uuid)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
        SELECT i.tenant_id, i.id FROM iim.incident i
         WHERE i.state IN ('open', 'notifying') AND i.deadline <= now()
         ORDER BY i.deadline
         LIMIT least(greatest(p_limit, 1), 10000)
    $$;
