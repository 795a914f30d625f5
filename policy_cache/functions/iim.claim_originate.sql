-- iim.claim_originate: its current definition, last set by migration 0012_alarm_writes_in_one_statement.sql.
CREATE OR REPLACE FUNCTION iim.claim_originate(p_key text, p_max_concurrent integer, p_max_per_hour integer)
    RETURNS TABLE (claimed boolean, in_flight integer, last_hour integer)
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    SELECT b.in_flight, b.last_hour INTO in_flight, last_hour FROM iim.originate_budget(false) AS b;
    claimed := false;
    IF in_flight < p_max_concurrent AND last_hour < p_max_per_hour THEN
        UPDATE iim.incident_action a SET dispatched_at = now()
         WHERE a.key = p_key AND a.dispatched_at IS NULL AND a.outcome IS NULL
           AND EXISTS (SELECT 1 FROM iim.incident i  -- an incident closed meanwhile calls nobody any more
                        WHERE i.id = a.incident_id AND i.state IN ('open', 'notifying'));
        IF FOUND THEN
            PERFORM iim.count_originates(1);
            claimed := true;
        END IF;
    END IF;
    RETURN NEXT;
END
$fn$;
