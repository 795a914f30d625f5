-- iim.tg_bump_version: its current definition, last set by migration 0002_registry.sql.
CREATE OR REPLACE FUNCTION iim.tg_bump_version() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF NEW IS DISTINCT FROM OLD THEN
        NEW.version := OLD.version + 1;
    END IF;
    RETURN NEW;
END
$$;
