-- iim.audit_append: its current definition, last set by migration 0025_privacy_retention_and_erasure.sql.
CREATE OR REPLACE FUNCTION iim.audit_append(p_tenant uuid, p_actor text, p_action text, p_entity text, p_entity_id text, p_detail jsonb DEFAULT '{}'::jsonb, p_correlation jsonb DEFAULT '{}'::jsonb)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog'
AS $function$
DECLARE
    v_prev bytea;
    v_id bigint;
    v_at timestamptz := now();
    v_detail jsonb := coalesce(p_detail, '{}'::jsonb);
    v_corr jsonb := coalesce(p_correlation, '{}'::jsonb);
    v_salt bytea := uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid());
    v_digest bytea;
BEGIN
    IF p_tenant IS NULL OR p_tenant IS DISTINCT FROM NULLIF(current_setting('app.tenant', true), '')::uuid THEN
        RAISE EXCEPTION 'audit_append: tenant % is not the transaction''s tenant', p_tenant
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF p_actor IS NULL OR p_actor ~ '[[:cntrl:]]' OR p_actor <> btrim(p_actor) THEN
        RAISE EXCEPTION 'audit_append: malformed actor (control characters or surrounding blanks)'
            USING ERRCODE = 'check_violation';
    END IF;
    v_digest := sha256(v_salt || convert_to(v_detail::text, 'UTF8'));
    -- Same lock order as the change-log triggers (change sequence first, then the tenant chain): no deadlock.
    PERFORM pg_advisory_xact_lock_shared(1229540685, 1);
    PERFORM pg_advisory_xact_lock(1229540685, hashtext(p_tenant::text));
    SELECT a.row_hash INTO v_prev FROM iim.audit_log a WHERE a.tenant_id = p_tenant ORDER BY a.id DESC LIMIT 1;
    v_prev := coalesce(v_prev, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
    v_id := nextval(pg_get_serial_sequence('iim.audit_log', 'id'));
    INSERT INTO iim.audit_log (tenant_id, id, at, actor, action, entity, entity_id, detail, correlation,
                               prev_hash, row_hash, detail_salt, detail_digest)
    OVERRIDING SYSTEM VALUE
    VALUES (p_tenant, v_id, v_at, p_actor, p_action, p_entity, p_entity_id, v_detail, v_corr, v_prev,
            sha256(v_prev || convert_to(iim.audit_canonical_v2(p_tenant, v_id, v_at, p_actor, p_action, p_entity,
                                                               p_entity_id, v_digest, v_corr), 'UTF8')),
            v_salt, v_digest);
    RETURN v_id;
END
$function$
