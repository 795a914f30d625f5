-- iim.presence_prune: its current definition, last set by migration 0037_presence_claim_prune.sql.
--
-- Expired presence claims, across tenants (owned by iim_sweeper): deletes at most p_limit claims expired more than
-- p_keep_s seconds ago and returns how many; each deletion reaches the change feed like any claim change.
CREATE OR REPLACE FUNCTION iim.presence_prune(p_keep_s integer, p_limit integer) RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
DECLARE
    v_pruned integer;
BEGIN
    DELETE FROM iim.presence_claim c
     WHERE c.id IN (
           SELECT q.id FROM iim.presence_claim q
            WHERE q.expires_at < now() - make_interval(secs => greatest(p_keep_s, 0))
            LIMIT least(greatest(p_limit, 1), 10000) FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS v_pruned = ROW_COUNT;
    RETURN v_pruned;
END
$$;
