-- iim.hub_command_purge: its current definition, last set by migration 0040_hub_command_list_and_retention.sql.
--
-- Hub commands past their retention, across tenants (owned by iim_sweeper): deletes at most p_limit commands sent
-- longer ago than the tenant's hub_command_s (null or no row: p_keep_s, at least a day) and returns how many per
-- tenant.
CREATE OR REPLACE FUNCTION iim.hub_command_purge(p_keep_s integer, p_limit integer)
    RETURNS TABLE (tenant_id uuid, purged integer)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
BEGIN
    IF p_keep_s IS NULL OR p_keep_s < 86400 THEN
        RAISE EXCEPTION 'hub_command_purge: hub commands are kept at least a day' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH gone AS (
        DELETE FROM iim.hub_command c
         WHERE (c.tenant_id, c.device_id, c.command_id) IN (
               SELECT q.tenant_id, q.device_id, q.command_id FROM iim.hub_command q
                 LEFT JOIN iim.retention_policy r ON r.tenant_id = q.tenant_id
                WHERE q.sent_at < now() - make_interval(secs => coalesce(r.hub_command_s, p_keep_s))
                LIMIT least(greatest(p_limit, 1), 10000) FOR UPDATE OF q SKIP LOCKED)
        RETURNING c.tenant_id)
    SELECT g.tenant_id, count(*)::integer FROM gone g GROUP BY g.tenant_id;
END
$$;
