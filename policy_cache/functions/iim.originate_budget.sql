-- iim.originate_budget: its current definition, last set by migration 0012_alarm_writes_in_one_statement.sql.
--
-- The tenant's originate lock (held until commit) and the counts its caps are checked against: calls in
-- flight (dispatched in the last ten minutes, not settled) and dispatched in the last hour. Exclusive: the
-- counts are exact while it is held. Shared: claims far below the caps run side by side, each missing at
-- most the claims of the other transactions running then (fewer than max_connections, each of at most
-- four calls), so a shared claim is only taken with that margin to spare (iim.persist_decision).
CREATE OR REPLACE FUNCTION iim.originate_budget(p_shared boolean DEFAULT false, OUT in_flight integer, OUT last_hour integer)
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF p_shared THEN
        PERFORM pg_advisory_xact_lock_shared(1229540685,
                                             hashtext('originate:' || current_setting('app.tenant', true)));
    ELSE
        PERFORM pg_advisory_xact_lock(1229540685, hashtext('originate:' || current_setting('app.tenant', true)));
    END IF;
    SELECT coalesce(sum(w.calls - w.settled) FILTER (WHERE w.minute > now() - interval '10 minutes'), 0),
           coalesce(sum(w.calls), 0)
      INTO in_flight, last_hour
      FROM iim.originate_window w WHERE w.minute > now() - interval '1 hour';
END
$fn$;
