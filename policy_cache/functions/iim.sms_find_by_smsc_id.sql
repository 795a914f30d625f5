-- iim.sms_find_by_smsc_id: its current definition, last set by migration 0008_sms_delivery.sql.
--
-- The outbox rows (any tenant) holding these SMSC message ids of one transport: receipts carry no tenant.
-- An id reused by the SMSC over time matches the most recently sent row.
CREATE OR REPLACE FUNCTION iim.sms_find_by_smsc_id(p_transport text, p_ids text[])
    RETURNS TABLE (tenant_id uuid, id uuid, smsc_id text)
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
BEGIN
    IF cardinality(p_ids) > 10000 THEN
        RAISE EXCEPTION 'sms_find_by_smsc_id: at most 10000 ids' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    SELECT m.tenant_id, m.id, x.mid
    FROM unnest(p_ids) AS x(mid)
    CROSS JOIN LATERAL (
        SELECT o.tenant_id, o.id FROM iim.sms_outbox o
        WHERE o.smsc_message_ids @> ARRAY[x.mid] AND o.transport = p_transport
        ORDER BY o.sent_at DESC NULLS LAST
        LIMIT 1
    ) m;
END
$$;
