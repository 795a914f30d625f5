-- kamailio.location_notify: its current definition, last set by migration 0038_kamailio_location.sql.
--
-- Which AoR changed (both, should an UPDATE move a contact to another AoR). Invoker's rights: pg_notify needs none.
CREATE OR REPLACE FUNCTION kamailio.location_notify() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog
    AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM pg_notify('iim_registrar', OLD.username || '@' || coalesce(OLD.domain, ''));
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM pg_notify('iim_registrar', NEW.username || '@' || coalesce(NEW.domain, ''));
    END IF;
    RETURN NULL;
END
$$;
