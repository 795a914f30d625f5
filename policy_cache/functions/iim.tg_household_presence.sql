-- iim.tg_household_presence: its current definition, last set by migration 0002_registry.sql.
CREATE OR REPLACE FUNCTION iim.tg_household_presence() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF NEW.presence IS DISTINCT FROM OLD.presence
       AND NEW.presence_changed_at IS NOT DISTINCT FROM OLD.presence_changed_at THEN
        NEW.presence_changed_at := now();
    END IF;
    RETURN NEW;
END
$$;
