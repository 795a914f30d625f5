-- iim.is_e164: its current definition, last set by migration 0001_roles_and_schema.sql.
CREATE OR REPLACE FUNCTION iim.is_e164(n text) RETURNS boolean
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT n ~ '^\+[1-9][0-9]{6,14}$' $$;
