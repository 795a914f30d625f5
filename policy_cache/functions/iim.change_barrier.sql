-- iim.change_barrier: its current definition, last set by migration 0005_change_log.sql.
--
-- Barrier for a full load: waits for in-flight writers, returns the highest committed seq. A snapshot
-- taken after this returns contains every change <= that seq (and maybe some later ones, which the next
-- changes_since re-delivers; reloading a subscriber twice is harmless).
-- Runs with the caller's rights (the cache role reads change_log through its policy).
CREATE OR REPLACE FUNCTION iim.change_barrier() RETURNS bigint
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog
    AS $$
DECLARE
    v_max bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(1229540685, 1);
    SELECT coalesce(max(seq), (SELECT pruned_through FROM iim.change_log_state)) INTO v_max FROM iim.change_log;
    RETURN v_max;
END
$$;
