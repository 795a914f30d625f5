-- 0009: the toll-fraud caps and the dispatch mark of an alert call in one statement.
--
-- The tenant's originate lock serialises every alert call of a tenant from the cap check to the commit.
-- Held across several client round trips it became a convoy under load (each holder waiting for its
-- client between statements); here the lock, the counts, the dispatch mark and the minute's counter are
-- one server-side step, and the caller commits right after. SECURITY INVOKER: row-level security applies,
-- so it only ever sees and changes the calling tenant's rows.

SET LOCAL ROLE iim_owner;

CREATE FUNCTION iim.claim_originate(p_key text, p_max_concurrent integer, p_max_per_hour integer)
    RETURNS TABLE (claimed boolean, in_flight integer, last_hour integer)
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    PERFORM pg_advisory_xact_lock(1229540685, hashtext('originate:' || current_setting('app.tenant', true)));
    SELECT count(*) INTO in_flight FROM iim.incident_action a
     WHERE a.kind IN ('call', 'record') AND a.dispatched_at IS NOT NULL AND a.finished_at IS NULL
       AND a.dispatched_at > now() - interval '10 minutes';
    SELECT coalesce(sum(w.calls), 0) INTO last_hour FROM iim.originate_window w
     WHERE w.minute > now() - interval '1 hour';
    claimed := false;
    IF in_flight < p_max_concurrent AND last_hour < p_max_per_hour THEN
        UPDATE iim.incident_action a SET dispatched_at = now()
         WHERE a.key = p_key AND a.dispatched_at IS NULL AND a.outcome IS NULL;
        IF FOUND THEN
            INSERT INTO iim.originate_window AS w (minute, calls) VALUES (date_trunc('minute', now()), 1)
                ON CONFLICT (tenant_id, minute) DO UPDATE SET calls = w.calls + 1;
            claimed := true;
        END IF;
    END IF;
    RETURN NEXT;
END
$fn$;

REVOKE EXECUTE ON FUNCTION iim.claim_originate(text, integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.claim_originate(text, integer, integer) TO iim_app;
