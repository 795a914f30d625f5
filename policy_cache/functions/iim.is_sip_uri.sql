-- iim.is_sip_uri: its current definition, last set by migration 0001_roles_and_schema.sql.
CREATE OR REPLACE FUNCTION iim.is_sip_uri(u text) RETURNS boolean
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT u ~ '^sips?:[^@\s:;]+@[A-Za-z0-9.-]+(:[0-9]{1,5})?(;[^\s]*)?$' $$;
