-- iim.is_iana_zone: its current definition, last set by migration 0001_roles_and_schema.sql.
--
-- IANA zone names only ("Europe/Moscow", "UTC"): no abbreviations ("MSK") or POSIX strings ("UTC+3"),
-- and the server's tz database must know the name.
CREATE OR REPLACE FUNCTION iim.is_iana_zone(tz text) RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
    AS $$
BEGIN
    IF tz !~ '^(UTC|[A-Z][A-Za-z_]+(/[A-Za-z0-9_+-]+)+)$' THEN
        RETURN false;
    END IF;
    PERFORM '2000-01-01 00:00:00+00'::timestamptz AT TIME ZONE tz;
    RETURN true;
EXCEPTION WHEN invalid_parameter_value THEN
    RETURN false;
END
$$;
