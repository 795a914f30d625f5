-- iim.recording_purge: its current definition, last set by migration 0034_recording_retention.sql.
--
-- Recordings past their retention, across tenants (owned by iim_sweeper): deletes the due rows (expired, or older
-- than the tenant's recording_s) and returns their file names; the caller deletes the files before it commits.
CREATE OR REPLACE FUNCTION iim.recording_purge(p_limit integer)
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
