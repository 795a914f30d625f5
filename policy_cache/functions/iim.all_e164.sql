-- iim.all_e164: its current definition, last set by migration 0001_roles_and_schema.sql.
--
-- plpgsql, not a SQL function over unnest(): that one cannot be inlined and costs ~5x more per row.
CREATE OR REPLACE FUNCTION iim.all_e164(ns text[]) RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    AS $$
DECLARE
    n text;
BEGIN
    FOREACH n IN ARRAY coalesce(ns, '{}') LOOP
        IF n IS NULL OR n !~ '^\+[1-9][0-9]{6,14}$' THEN
            RETURN false;
        END IF;
    END LOOP;
    RETURN true;
END
$$;
