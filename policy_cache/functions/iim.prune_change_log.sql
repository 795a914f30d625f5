-- iim.prune_change_log: its current definition, last set by migration 0005_change_log.sql.
--
-- Retention (run by the owner/maintenance job): delete rows older than p_keep, remember the watermark.
CREATE OR REPLACE FUNCTION iim.prune_change_log(p_keep interval) RETURNS bigint
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog
    AS $$
DECLARE
    v_through bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(1229540685, 1);
    SELECT max(seq) INTO v_through FROM iim.change_log WHERE changed_at < now() - p_keep;
    IF v_through IS NULL THEN
        RETURN 0;
    END IF;
    DELETE FROM iim.change_log WHERE seq <= v_through;
    UPDATE iim.change_log_state SET pruned_through = greatest(pruned_through, v_through);
    RETURN v_through;
END
$$;
