-- iim.tg_audit_immutable: its current definition, last set by migration 0025_privacy_retention_and_erasure.sql.
CREATE OR REPLACE FUNCTION iim.tg_audit_immutable()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.detail_digest IS NOT NULL AND NEW.detail_salt IS NULL
       AND jsonb_typeof(NEW.detail -> 'tombstone') = 'object' AND NEW.detail - 'tombstone' = '{}'::jsonb
       AND (NEW.tenant_id, NEW.id, NEW.at, NEW.actor, NEW.action, NEW.entity, NEW.entity_id, NEW.correlation,
            NEW.prev_hash, NEW.row_hash, NEW.detail_digest)
           IS NOT DISTINCT FROM
           (OLD.tenant_id, OLD.id, OLD.at, OLD.actor, OLD.action, OLD.entity, OLD.entity_id, OLD.correlation,
            OLD.prev_hash, OLD.row_hash, OLD.detail_digest) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'iim.audit_log is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'audit rows are written by iim.audit_append() only; a detail may only become a tombstone';
END
$function$
