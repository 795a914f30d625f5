-- 0037: expired presence claims are pruned.
--
-- A claim past its expiry says nothing (policy_cache.presence drops it at call time, the cache loads live claims
-- only), but its row stayed for ever. iim.presence_prune deletes, across tenants, at most p_limit claims expired
-- more than p_keep_s seconds ago (the window keeps a recent word visible in the household's presence listing).
-- Each deletion goes through the change feed like any claim change (the household's snapshots reload to the same
-- answer). The audit trail of claims is the audit log's and is not touched.
SET LOCAL ROLE iim_owner;

CREATE INDEX presence_claim_expiry ON iim.presence_claim (expires_at);

CREATE FUNCTION iim.presence_prune(p_keep_s integer, p_limit integer) RETURNS integer
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

REVOKE ALL ON FUNCTION iim.presence_prune(integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.presence_prune(integer, integer) TO iim_app;

RESET ROLE;
GRANT SELECT, DELETE, UPDATE (expires_at) ON iim.presence_claim TO iim_sweeper;  -- UPDATE: FOR UPDATE SKIP LOCKED
CREATE POLICY sweeper_prune ON iim.presence_claim AS PERMISSIVE FOR ALL TO iim_sweeper USING (true) WITH CHECK (true);
ALTER FUNCTION iim.presence_prune(integer, integer) OWNER TO iim_sweeper;
SET LOCAL ROLE iim_owner;
