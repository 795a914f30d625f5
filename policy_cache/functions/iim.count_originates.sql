-- iim.count_originates: its current definition, last set by migration 0012_alarm_writes_in_one_statement.sql.
--
-- plpgsql rather than SQL for these helpers: plpgsql keeps its plans for the session, a SQL function called
-- from plpgsql is planned again in every transaction.
CREATE OR REPLACE FUNCTION iim.count_originates(p_calls integer) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    INSERT INTO iim.originate_window AS w (minute, shard, calls)
    VALUES (date_trunc('minute', now()), pg_backend_pid() % 32, p_calls)
    ON CONFLICT (tenant_id, minute, shard) DO UPDATE SET calls = w.calls + excluded.calls;
END
$fn$;
