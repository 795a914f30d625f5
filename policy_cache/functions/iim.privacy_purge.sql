-- iim.privacy_purge: its current definition, last set by migration 0025_privacy_retention_and_erasure.sql.
CREATE OR REPLACE FUNCTION iim.privacy_purge(p_sms_body interval, p_event_payload interval, p_audit_detail interval, p_limit integer)
 RETURNS TABLE(tenant_id uuid, kind text, purged integer)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog'
AS $function$
DECLARE
    v_limit integer := least(greatest(p_limit, 1), 10000);
BEGIN
    IF p_audit_detail IS NULL OR p_audit_detail < interval '1 day' THEN
        RAISE EXCEPTION 'privacy_purge: audit details are kept at least a day' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH gone AS (
        UPDATE iim.sms_inbound s SET body = NULL, content_hash = NULL, body_purged_at = coalesce(s.body_purged_at, now())
         WHERE (s.tenant_id, s.id) IN (
               SELECT q.tenant_id, q.id FROM iim.sms_inbound q
                 LEFT JOIN iim.retention_policy r ON r.tenant_id = q.tenant_id
                WHERE (q.body IS NOT NULL OR q.content_hash IS NOT NULL)
                  AND q.received_at < now() - coalesce(make_interval(secs => r.sms_body_s), greatest(p_sms_body, interval '0'))
                LIMIT v_limit FOR UPDATE OF q SKIP LOCKED)
        RETURNING s.tenant_id)
    SELECT g.tenant_id, 'sms_body'::text, count(*)::integer FROM gone g GROUP BY g.tenant_id;
    RETURN QUERY
    WITH gone AS (
        UPDATE iim.device_event e SET payload = '{}'::jsonb, payload_purged_at = now()
         WHERE (e.tenant_id, e.event_id) IN (
               SELECT q.tenant_id, q.event_id FROM iim.device_event q
                 LEFT JOIN iim.retention_policy r ON r.tenant_id = q.tenant_id
                WHERE q.payload_purged_at IS NULL
                  AND q.received_at < now() - coalesce(make_interval(secs => r.event_payload_s),
                                                       greatest(p_event_payload, interval '0'))
                LIMIT v_limit FOR UPDATE OF q SKIP LOCKED)
        RETURNING e.tenant_id)
    SELECT g.tenant_id, 'event_payload'::text, count(*)::integer FROM gone g GROUP BY g.tenant_id;
    RETURN QUERY
    WITH gone AS (
        UPDATE iim.audit_log a
           SET detail = jsonb_build_object('tombstone', jsonb_build_object('reason', 'retention', 'at', now())),
               detail_salt = NULL
         WHERE (a.tenant_id, a.id) IN (
               SELECT q.tenant_id, q.id FROM iim.audit_log q
                 LEFT JOIN iim.retention_policy r ON r.tenant_id = q.tenant_id
                WHERE q.detail_salt IS NOT NULL
                  AND q.at < now() - coalesce(make_interval(secs => r.audit_detail_s), p_audit_detail)
                LIMIT v_limit FOR UPDATE OF q SKIP LOCKED)
        RETURNING a.tenant_id)
    SELECT g.tenant_id, 'audit_detail'::text, count(*)::integer FROM gone g GROUP BY g.tenant_id;
END
$function$
