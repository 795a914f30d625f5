-- iim.current_tenant: its current definition, last set by migration 0001_roles_and_schema.sql.
--
-- The tenant of the current transaction (set by tenant_tx with set_config('app.tenant', ..., true)).
-- After a SET LOCAL ends the setting reads '' (not NULL), hence NULLIF: no tenant -> NULL -> no rows.
CREATE OR REPLACE FUNCTION iim.current_tenant() RETURNS uuid
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT NULLIF(pg_catalog.current_setting('app.tenant', true), '')::uuid $$;
