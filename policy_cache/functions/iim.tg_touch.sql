-- iim.tg_touch: its current definition, last set by migration 0001_roles_and_schema.sql.
--
-- BEFORE UPDATE helper: bump updated_at only when something else changed (a no-op UPDATE stays a no-op,
-- so it records no change_log row either).
CREATE OR REPLACE FUNCTION iim.tg_touch() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF NEW IS DISTINCT FROM OLD THEN
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;
