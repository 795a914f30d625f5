-- iim.stage_audit: its current definition, last set by migration 0012_alarm_writes_in_one_statement.sql.
--
-- Audit lines of a decision ({actor, action, entity, entity_id, detail, correlation}), staged for the chain.
CREATE OR REPLACE FUNCTION iim.stage_audit(p_lines jsonb) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF jsonb_array_length(coalesce(p_lines, '[]')) > 0 THEN
        INSERT INTO iim.audit_pending (actor, action, entity, entity_id, detail, correlation)
        SELECT l.actor, l.action, l.entity, l.entity_id, l.detail, l.correlation
          FROM jsonb_to_recordset(p_lines)
               AS l(actor text, action text, entity text, entity_id text, detail jsonb, correlation jsonb);
    END IF;
END
$fn$;
