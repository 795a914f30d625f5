-- iim.sms_purge_bodies: its current definition, last set by migration 0021_sms_bodies_kept_only_while_needed.sql.
--
-- Forget the bodies of incoming SMS received more than p_retention ago (every tenant; at most p_limit rows a
-- call); the rows and their metadata stay. Owned by iim_sweeper (no login, no BYPASSRLS).
CREATE OR REPLACE FUNCTION iim.sms_purge_bodies(p_retention interval, p_limit integer) RETURNS integer
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog
AS $fn$
    WITH gone AS (
        UPDATE iim.sms_inbound s SET body = NULL, content_hash = NULL,
                                     body_purged_at = coalesce(s.body_purged_at, now())
         WHERE (s.tenant_id, s.id) IN (
               SELECT q.tenant_id, q.id FROM iim.sms_inbound q
                WHERE q.content_hash IS NOT NULL AND q.received_at < now() - greatest(p_retention, interval '0')
                ORDER BY q.received_at
                LIMIT least(greatest(p_limit, 1), 10000)
                FOR UPDATE SKIP LOCKED)
        RETURNING 1)
    SELECT count(*)::integer FROM gone
$fn$;
