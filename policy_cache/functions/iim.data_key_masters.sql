-- iim.data_key_masters: its current definition, last set by migration 0028_sealed_fields.sql.
--
-- The master keys every tenant's data keys are wrapped by (fingerprints and counts only): at start a service
-- refuses a master configuration that cannot unwrap them (an extra instance given another key), instead of
-- failing each SMS it claims.
CREATE OR REPLACE FUNCTION iim.data_key_masters() RETURNS TABLE (master_key_id text, keys bigint)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
AS $fn$
    SELECT k.master_key_id, count(*) FROM iim.tenant_data_key k GROUP BY 1 ORDER BY 1
$fn$;
