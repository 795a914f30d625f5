-- iim.tg_device_status: its current definition, last set by migration 0002_registry.sql.
--
-- Derived timestamps and versions are maintained here, so every writer (app, admin, psql) gets them.
CREATE OR REPLACE FUNCTION iim.tg_device_status() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status AND NEW.status_changed_at IS NOT DISTINCT FROM OLD.status_changed_at THEN
        NEW.status_changed_at := now();
    END IF;
    RETURN NEW;
END
$$;
