-- iim.silent_devices: its current definition, last set by migration 0027_device_supervision.sql.
--
-- The scan: every tenant's silent devices (ids only), oldest first. RLS keeps the app role to one tenant per
-- transaction, so this narrow definer function (owned by iim_sweeper) answers just that question.
CREATE OR REPLACE FUNCTION iim.silent_devices(p_cutoff timestamptz, p_limit integer) RETURNS TABLE (tenant_id uuid, device_id uuid)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
AS $fn$
    SELECT h.tenant_id, h.device_id FROM iim.device_health h
     WHERE h.silent_after IS NOT NULL AND NOT (h.conditions ? 'offline') AND h.silent_after <= p_cutoff
     ORDER BY h.silent_after
     LIMIT least(greatest(p_limit, 1), 10000)
$fn$;
