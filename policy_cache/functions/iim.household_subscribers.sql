-- iim.household_subscribers: its current definition, last set by migration 0005_change_log.sql.
--
-- Subscribers whose routing depends on a household (all its bindings) or on one of its devices
-- (bindings covering the whole household, plus those bound to that very device).
CREATE OR REPLACE FUNCTION iim.household_subscribers(p_tenant uuid, p_household uuid) RETURNS uuid[]
    LANGUAGE sql STABLE
    SET search_path = pg_catalog
    AS $$
    SELECT coalesce(array_agg(DISTINCT b.subscriber_id), '{}')
    FROM iim.binding b WHERE b.tenant_id = p_tenant AND b.household_id = p_household
$$;
