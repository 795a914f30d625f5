-- iim.sms_queue_depth: its current definition, last set by migration 0008_sms_delivery.sql.
--
-- Queued + sending rows of every tenant, for the iim_sms_queue_depth gauge.
CREATE OR REPLACE FUNCTION iim.sms_queue_depth() RETURNS bigint
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$ SELECT count(*) FROM iim.sms_outbox o WHERE o.status IN ('queued', 'sending') $$;
