-- 0021: an incoming SMS's body is kept only as long as it is needed.
--
-- iim.sms_inbound kept every MO body in clear for ever, also of messages nobody consented to have read.
-- Now:
--  * the body is stored only when the destination's subscriber holds a live read_sms consent when the MO
--    arrives (iim/sms/store.py decides it in the INSERT); without one it is never written (NULL), and the
--    hook still gets it in memory to decide and audit the refusal;
--  * a body the read-out policy declined is forgotten in the transaction that records the refusal;
--  * every other body is purged after the retention (IIM_SMS_BODY_RETENTION_S, default 24 h) by the
--    sender's periodic iim.sms_purge_bodies;
--  * what stays is metadata: sender, destination, time, body_length, and when the body went. The
--    content_hash (sha256 of transport, sender, destination and body, kept to recognise a redelivered MO
--    within the dedup window) goes with the body: unkeyed, it would give a short body such as a 6-digit
--    code back to anyone who can read the table, by brute force.
-- Cross-tenant, so the purge is a narrow definer function owned by iim_sweeper, like iim.prune_originate_windows.

SET LOCAL ROLE iim_owner;

ALTER TABLE iim.sms_inbound ALTER COLUMN body DROP NOT NULL;
ALTER TABLE iim.sms_inbound ADD COLUMN body_length integer;
UPDATE iim.sms_inbound SET body_length = length(body);
ALTER TABLE iim.sms_inbound ALTER COLUMN body_length SET NOT NULL;
ALTER TABLE iim.sms_inbound ADD CONSTRAINT sms_inbound_body_length_check CHECK (body_length BETWEEN 0 AND 40000);
ALTER TABLE iim.sms_inbound ADD COLUMN body_purged_at timestamptz;
ALTER TABLE iim.sms_inbound ALTER COLUMN content_hash DROP NOT NULL;
CREATE INDEX sms_inbound_body_kept_idx ON iim.sms_inbound (received_at) WHERE content_hash IS NOT NULL;

RESET ROLE;
GRANT SELECT, UPDATE (body, content_hash, body_purged_at) ON iim.sms_inbound TO iim_sweeper;
CREATE POLICY sweeper_purge ON iim.sms_inbound AS PERMISSIVE FOR ALL TO iim_sweeper USING (true) WITH CHECK (true);
SET LOCAL ROLE iim_owner;

CREATE FUNCTION iim.sms_purge_bodies(p_retention interval, p_limit integer) RETURNS integer
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
REVOKE ALL ON FUNCTION iim.sms_purge_bodies(interval, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.sms_purge_bodies(interval, integer) TO iim_app;

RESET ROLE;
ALTER FUNCTION iim.sms_purge_bodies(interval, integer) OWNER TO iim_sweeper;
SET LOCAL ROLE iim_owner;
