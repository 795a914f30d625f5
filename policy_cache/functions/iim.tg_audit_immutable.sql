-- iim.tg_audit_immutable: its current definition, last set by migration 0004_audit_log.sql.
CREATE OR REPLACE FUNCTION iim.tg_audit_immutable() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    RAISE EXCEPTION 'iim.audit_log is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege', HINT = 'audit rows are written by iim.audit_append() only';
END
$$;
