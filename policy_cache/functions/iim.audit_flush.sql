-- iim.audit_flush: its current definition, last set by migration 0025_privacy_retention_and_erasure.sql.
CREATE OR REPLACE FUNCTION iim.audit_flush(p_limit integer)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog'
AS $function$
DECLARE
    r record;
    v_tenant uuid := NULL;
    v_prev bytea;
    v_id bigint;
    v_salt bytea;
    v_digest bytea;
    tenants uuid[] := '{}';
    ids bigint[] := '{}';
    ats timestamptz[] := '{}';
    actors text[] := '{}';
    actions text[] := '{}';
    entities text[] := '{}';
    entity_ids text[] := '{}';
    details jsonb[] := '{}';
    correlations jsonb[] := '{}';
    prevs bytea[] := '{}';
    hashes bytea[] := '{}';
    salts bytea[] := '{}';
    digests bytea[] := '{}';
BEGIN
    -- Lock order as iim.audit_append: the change sequence (shared), then tenant chains (ascending tenant).
    PERFORM pg_advisory_xact_lock_shared(1229540685, 1);
    FOR r IN
        WITH moved AS (
            DELETE FROM iim.audit_pending p
             WHERE p.id IN (SELECT q.id FROM iim.audit_pending q ORDER BY q.id
                             LIMIT least(greatest(p_limit, 1), 10000) FOR UPDATE SKIP LOCKED)
            RETURNING p.*)
        SELECT * FROM moved ORDER BY tenant_id, id
    LOOP
        IF v_tenant IS DISTINCT FROM r.tenant_id THEN
            v_tenant := r.tenant_id;
            PERFORM pg_advisory_xact_lock(1229540685, hashtext(v_tenant::text));
            SELECT a.row_hash INTO v_prev FROM iim.audit_log a WHERE a.tenant_id = v_tenant ORDER BY a.id DESC LIMIT 1;
            v_prev := coalesce(v_prev, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
        END IF;
        v_id := nextval('iim.audit_log_id_seq'::regclass);
        v_salt := uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid());
        v_digest := sha256(v_salt || convert_to(r.detail::text, 'UTF8'));
        tenants := tenants || r.tenant_id;
        ids := ids || v_id;
        ats := ats || r.at;
        actors := actors || r.actor;
        actions := actions || r.action;
        entities := entities || r.entity;
        entity_ids := entity_ids || r.entity_id;
        details := details || r.detail;
        correlations := correlations || r.correlation;
        prevs := prevs || v_prev;
        salts := salts || v_salt;
        digests := digests || v_digest;
        v_prev := sha256(v_prev || convert_to(iim.audit_canonical_v2(r.tenant_id, v_id, r.at, r.actor, r.action,
                                                                     r.entity, r.entity_id, v_digest,
                                                                     r.correlation), 'UTF8'));
        hashes := hashes || v_prev;
    END LOOP;
    IF cardinality(ids) > 0 THEN
        INSERT INTO iim.audit_log (tenant_id, id, at, actor, action, entity, entity_id, detail, correlation,
                                   prev_hash, row_hash, detail_salt, detail_digest)
        OVERRIDING SYSTEM VALUE
        SELECT * FROM unnest(tenants, ids, ats, actors, actions, entities, entity_ids, details, correlations,
                             prevs, hashes, salts, digests);
    END IF;
    RETURN cardinality(ids);
END
$function$
