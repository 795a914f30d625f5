-- iim.subscriber_tenant: its current definition, last set by migration 0008_sms_delivery.sql.
--
-- The tenant of the subscriber with this number; NULL when unknown or when several tenants have it.
CREATE OR REPLACE FUNCTION iim.subscriber_tenant(p_msisdn text) RETURNS uuid
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
    SELECT CASE WHEN count(*) = 1 THEN (array_agg(s.tenant_id))[1] END
    FROM iim.subscriber s WHERE s.msisdn = p_msisdn
$$;
