-- 0004: the append-only, hash-chained audit log.
--
--  * row_hash = sha256(prev_hash || canonical JSON of the row), one chain per tenant; the first row of a
--    tenant chains from 32 zero bytes.
--  * Appends go through iim.audit_append() only (SECURITY DEFINER, owned by iim_owner): it serialises a
--    tenant's chain with pg_advisory_xact_lock(ns, hashtext(tenant)), so every writer chains the same way.
--    The lock is held to commit: call it last in a transaction.
--  * The app role has SELECT only (INSERT/UPDATE/DELETE/TRUNCATE revoked); a BEFORE UPDATE/DELETE row
--    trigger and a BEFORE TRUNCATE statement trigger refuse changes from everyone, the owner included.
--    A superuser can still disable the triggers and re-hash: publish/sign the chain head outside the DB.
--
-- Canonical JSON (also rebuilt by policy_cache.audit.verify_chain in Python): keys sorted, no spaces,
-- strings escaped as JSON, `at` as UTC 'YYYY-MM-DDTHH:MM:SS.ffffffZ', detail/correlation as jsonb text:
--  {"action":..,"actor":..,"at":..,"correlation":..,"detail":..,"entity":..,"entity_id":..,"id":..,"tenant_id":..}

SET LOCAL ROLE iim_owner;

CREATE TABLE iim.audit_log (
    tenant_id    uuid        NOT NULL,
    id           bigint      GENERATED ALWAYS AS IDENTITY,
    at           timestamptz NOT NULL,
    actor        text        NOT NULL CHECK (length(actor) BETWEEN 1 AND 200),
    action       text        NOT NULL CHECK (length(action) BETWEEN 1 AND 100),
    entity       text        NOT NULL CHECK (length(entity) BETWEEN 1 AND 100),
    entity_id    text        CHECK (length(entity_id) <= 200),
    detail       jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(detail) = 'object'),
    correlation  jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(correlation) = 'object'),
    prev_hash    bytea       NOT NULL CHECK (length(prev_hash) = 32),
    row_hash     bytea       NOT NULL CHECK (length(row_hash) = 32),
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX audit_log_entity_idx ON iim.audit_log (tenant_id, entity, entity_id);

ALTER TABLE iim.audit_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE iim.audit_log FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON iim.audit_log
    USING (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid);

REVOKE ALL ON iim.audit_log FROM PUBLIC;
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON iim.audit_log FROM iim_app, iim_cache;
GRANT SELECT ON iim.audit_log TO iim_app;

CREATE FUNCTION iim.audit_canonical(
    p_tenant uuid, p_id bigint, p_at timestamptz, p_actor text, p_action text, p_entity text,
    p_entity_id text, p_detail jsonb, p_correlation jsonb
) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    SET search_path = pg_catalog
    AS $$
    SELECT '{"action":' || to_json(p_action)::text
        || ',"actor":' || to_json(p_actor)::text
        || ',"at":' || to_json(to_char(p_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))::text
        || ',"correlation":' || p_correlation::text
        || ',"detail":' || p_detail::text
        || ',"entity":' || to_json(p_entity)::text
        || ',"entity_id":' || coalesce(to_json(p_entity_id)::text, 'null')
        || ',"id":' || p_id::text
        || ',"tenant_id":' || to_json(p_tenant::text)::text
        || '}'
$$;

CREATE FUNCTION iim.audit_append(
    p_tenant uuid, p_actor text, p_action text, p_entity text, p_entity_id text,
    p_detail jsonb DEFAULT '{}', p_correlation jsonb DEFAULT '{}'
) RETURNS bigint
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
DECLARE
    v_prev bytea;
    v_id bigint;
    v_at timestamptz := now();
    v_detail jsonb := coalesce(p_detail, '{}'::jsonb);
    v_corr jsonb := coalesce(p_correlation, '{}'::jsonb);
BEGIN
    IF p_tenant IS NULL OR p_tenant IS DISTINCT FROM NULLIF(current_setting('app.tenant', true), '')::uuid THEN
        RAISE EXCEPTION 'audit_append: tenant % is not the transaction''s tenant', p_tenant
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    -- Same lock order as the change-log triggers (change sequence first, then the tenant chain): no deadlock.
    PERFORM pg_advisory_xact_lock_shared(1229540685, 1);
    PERFORM pg_advisory_xact_lock(1229540685, hashtext(p_tenant::text));
    SELECT a.row_hash INTO v_prev FROM iim.audit_log a WHERE a.tenant_id = p_tenant ORDER BY a.id DESC LIMIT 1;
    v_prev := coalesce(v_prev, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
    v_id := nextval(pg_get_serial_sequence('iim.audit_log', 'id'));
    INSERT INTO iim.audit_log (tenant_id, id, at, actor, action, entity, entity_id, detail, correlation,
                               prev_hash, row_hash)
    OVERRIDING SYSTEM VALUE
    VALUES (p_tenant, v_id, v_at, p_actor, p_action, p_entity, p_entity_id, v_detail, v_corr, v_prev,
            sha256(v_prev || convert_to(iim.audit_canonical(p_tenant, v_id, v_at, p_actor, p_action, p_entity,
                                                            p_entity_id, v_detail, v_corr), 'UTF8')));
    RETURN v_id;
END
$$;
GRANT EXECUTE ON FUNCTION iim.audit_append(uuid, text, text, text, text, jsonb, jsonb) TO iim_app;
GRANT EXECUTE ON FUNCTION iim.audit_canonical(uuid, bigint, timestamptz, text, text, text, text, jsonb, jsonb)
    TO iim_app;

CREATE FUNCTION iim.tg_audit_immutable() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    RAISE EXCEPTION 'iim.audit_log is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege', HINT = 'audit rows are written by iim.audit_append() only';
END
$$;
CREATE TRIGGER audit_log_no_update_delete BEFORE UPDATE OR DELETE ON iim.audit_log
    FOR EACH ROW EXECUTE FUNCTION iim.tg_audit_immutable();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON iim.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION iim.tg_audit_immutable();
