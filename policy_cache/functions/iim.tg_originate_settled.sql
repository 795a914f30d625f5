-- iim.tg_originate_settled: its current definition, last set by migration 0012_alarm_writes_in_one_statement.sql.
CREATE OR REPLACE FUNCTION iim.tg_originate_settled() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF OLD.dispatched_at IS NOT NULL AND OLD.finished_at IS NULL
       AND NOT (NEW.dispatched_at IS NOT NULL AND NEW.finished_at IS NULL) THEN
        INSERT INTO iim.originate_window AS w (tenant_id, minute, shard, calls, settled)
        VALUES (OLD.tenant_id, date_trunc('minute', OLD.dispatched_at), pg_backend_pid() % 32, 0, 1)
        ON CONFLICT (tenant_id, minute, shard) DO UPDATE SET settled = w.settled + 1;
    END IF;
    RETURN NULL;
END
$fn$;
