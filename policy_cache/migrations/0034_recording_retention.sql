-- 0034: recordings under retention and erasure.
--
-- A message a caller left (iim.recorded_message, 0030) is a row plus a file in IIM's recordings directory.
-- The tenant's retention gets a recording_s column (null or no row: the row's own expires_at, set from
-- IIM_RECORDING_RETENTION_S when the message was left). iim.recording_purge deletes, across tenants, the rows
-- that are due (expired, or older than the tenant's recording_s) and returns their file names: the caller
-- deletes the files in the same transaction before it commits, so a file is never left without its row
-- being retried. Erasure deletes a subscriber's rows itself (tenant transaction; iim_app may DELETE).
SET LOCAL ROLE iim_owner;

ALTER TABLE iim.retention_policy
    ADD COLUMN recording_s integer CHECK (recording_s BETWEEN 0 AND 315360000);

CREATE INDEX recorded_message_created ON iim.recorded_message (created_at);
CREATE INDEX recorded_message_subscriber ON iim.recorded_message (tenant_id, subscriber_id);

CREATE FUNCTION iim.recording_purge(p_limit integer)
    RETURNS TABLE (tenant_id uuid, file_name text)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
BEGIN
    RETURN QUERY
    DELETE FROM iim.recorded_message m
     WHERE (m.tenant_id, m.id) IN (
           SELECT q.tenant_id, q.id FROM iim.recorded_message q
             LEFT JOIN iim.retention_policy r ON r.tenant_id = q.tenant_id
            WHERE q.expires_at <= now()
               OR (r.recording_s IS NOT NULL AND q.created_at < now() - make_interval(secs => r.recording_s))
            LIMIT least(greatest(p_limit, 1), 10000) FOR UPDATE OF q SKIP LOCKED)
    RETURNING m.tenant_id, m.file_name;
END
$$;

REVOKE ALL ON FUNCTION iim.recording_purge(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.recording_purge(integer) TO iim_app;

RESET ROLE;
GRANT SELECT, DELETE, UPDATE (expires_at) ON iim.recorded_message TO iim_sweeper;  -- UPDATE: FOR UPDATE SKIP LOCKED
CREATE POLICY sweeper_purge ON iim.recorded_message AS PERMISSIVE FOR ALL TO iim_sweeper USING (true) WITH CHECK (true);
ALTER FUNCTION iim.recording_purge(integer) OWNER TO iim_sweeper;
SET LOCAL ROLE iim_owner;
