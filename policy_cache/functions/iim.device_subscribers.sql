-- iim.device_subscribers: its current definition, last set by migration 0005_change_log.sql.
CREATE OR REPLACE FUNCTION iim.device_subscribers(p_tenant uuid, p_household uuid, p_device uuid) RETURNS uuid[]
    LANGUAGE sql STABLE
    SET search_path = pg_catalog
    AS $$
    SELECT coalesce(array_agg(DISTINCT b.subscriber_id), '{}')
    FROM iim.binding b
    WHERE b.tenant_id = p_tenant AND b.household_id = p_household
      AND (b.device_id IS NULL OR b.device_id = p_device)
$$;
