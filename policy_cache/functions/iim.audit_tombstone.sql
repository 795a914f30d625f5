-- iim.audit_tombstone: its current definition, last set by migration 0025_privacy_retention_and_erasure.sql.
CREATE OR REPLACE FUNCTION iim.audit_tombstone(p_tenant uuid, p_ids bigint[], p_reason text)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog'
AS $function$
DECLARE
    v_count integer;
BEGIN
    IF p_tenant IS NULL OR p_tenant IS DISTINCT FROM NULLIF(current_setting('app.tenant', true), '')::uuid THEN
        RAISE EXCEPTION 'audit_tombstone: tenant % is not the transaction''s tenant', p_tenant
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF p_reason IS NULL OR p_reason !~ '^[a-z_]{1,32}$' THEN
        RAISE EXCEPTION 'audit_tombstone: reason must be a short word' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cardinality(p_ids) > 100000 THEN
        RAISE EXCEPTION 'audit_tombstone: at most 100000 ids' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE iim.audit_log a
       SET detail = jsonb_build_object('tombstone', jsonb_build_object('reason', p_reason, 'at', now())),
           detail_salt = NULL
     WHERE a.tenant_id = p_tenant AND a.id = ANY (p_ids) AND a.detail_salt IS NOT NULL;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$function$
