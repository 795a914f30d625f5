-- iim.credential_ref_schemes: its current definition, last set by migration 0028_sealed_fields.sql.
--
-- The schemes of every tenant's credential references (no reference itself): at start the service refuses a
-- scheme it has no resolver for (vault:, kms: ... are plug-ins), instead of failing when one is first needed.
CREATE OR REPLACE FUNCTION iim.credential_ref_schemes() RETURNS TABLE (scheme text, refs bigint)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
AS $fn$
    SELECT split_part(c.ref, ':', 1), count(*) FROM iim.credential_ref c GROUP BY 1 ORDER BY 1
$fn$;
