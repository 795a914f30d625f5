-- iim.sms_claim: its current definition, last set by migration 0028_sealed_fields.sql.
--
-- Claim up to p_limit due rows of any tenant: queued rows whose time has come and sending rows whose lease
-- expired (their sender died between claim and update). Each claim is an attempt. SKIP LOCKED: several
-- senders share the work without waiting on each other.
CREATE OR REPLACE FUNCTION iim.sms_claim(p_limit integer, p_lease interval)
    RETURNS TABLE (tenant_id uuid, id uuid, key text, msisdn text, body text, body_key integer, flash boolean,
                   source text, attempts integer, smsc_message_ids text[])
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 10000 THEN
        RAISE EXCEPTION 'sms_claim: limit must be 1..10000' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_lease IS NULL OR p_lease < interval '1 second' OR p_lease > interval '1 hour' THEN
        RAISE EXCEPTION 'sms_claim: lease must be 1 s..1 h' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH due AS (
        SELECT o.tenant_id, o.id FROM iim.sms_outbox o
        WHERE o.status IN ('queued', 'sending') AND o.next_attempt_at <= now()
        ORDER BY o.next_attempt_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE iim.sms_outbox o
       SET status = 'sending', attempts = o.attempts + 1, next_attempt_at = now() + p_lease, updated_at = now()
      FROM due
     WHERE o.tenant_id = due.tenant_id AND o.id = due.id
    RETURNING o.tenant_id, o.id, o.key, o.msisdn, o.body, o.body_key, o.flash, o.source, o.attempts,
              o.smsc_message_ids;
END
$$;
