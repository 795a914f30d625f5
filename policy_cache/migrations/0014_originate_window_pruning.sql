-- 0014: the toll-fraud counters forget what no cap reads any more.
--
-- iim.originate_window gains a row per tenant, minute and shard (up to 32) with calls; the caps read the
-- last hour only (iim.originate_budget), and nothing deleted older rows: a busy tenant added up to 46,080
-- rows a day, for ever. The deadline sweep now deletes rows older than two hours (the hourly cap's window
-- and an hour to spare). A call settling after its row was pruned re-creates it with calls = 0 and is
-- pruned again; no count that a cap reads changes.
-- Cross-tenant, so a narrow definer function owned by iim_sweeper, like iim.due_incidents.

RESET ROLE;
GRANT SELECT, DELETE ON iim.originate_window TO iim_sweeper;
CREATE POLICY sweeper_prune ON iim.originate_window AS PERMISSIVE FOR ALL TO iim_sweeper USING (true)
    WITH CHECK (false);
SET LOCAL ROLE iim_owner;

CREATE FUNCTION iim.prune_originate_windows() RETURNS integer
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog
AS $fn$
    WITH gone AS (DELETE FROM iim.originate_window w WHERE w.minute < now() - interval '2 hours' RETURNING 1)
    SELECT count(*)::integer FROM gone
$fn$;
REVOKE ALL ON FUNCTION iim.prune_originate_windows() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.prune_originate_windows() TO iim_app;

RESET ROLE;
ALTER FUNCTION iim.prune_originate_windows() OWNER TO iim_sweeper;
SET LOCAL ROLE iim_owner;
