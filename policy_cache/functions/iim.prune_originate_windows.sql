-- iim.prune_originate_windows: its current definition, last set by migration 0014_originate_window_pruning.sql.
CREATE OR REPLACE FUNCTION iim.prune_originate_windows() RETURNS integer
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog
AS $fn$
    WITH gone AS (DELETE FROM iim.originate_window w WHERE w.minute < now() - interval '2 hours' RETURNING 1)
    SELECT count(*)::integer FROM gone
$fn$;
