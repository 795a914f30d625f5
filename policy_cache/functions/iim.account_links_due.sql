-- iim.account_links_due: its current definition, last set by migration 0032_account_linking.sql.
--
-- Active account links of every tenant whose access token expires within p_within, soonest first
-- (the refresher's scan; at most 1000).
CREATE OR REPLACE FUNCTION iim.account_links_due(p_within interval, p_limit integer)
    RETURNS TABLE (tenant_id uuid, id uuid)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
    SELECT l.tenant_id, l.id FROM iim.account_link l
    WHERE l.status = 'active' AND l.access_expires_at <= now() + p_within
    ORDER BY l.access_expires_at
    LIMIT least(greatest(p_limit, 1), 1000)
$$;
