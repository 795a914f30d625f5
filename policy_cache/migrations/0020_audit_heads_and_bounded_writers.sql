-- 0020: audit chain heads for publishing outside the database; what the app role may write is narrowed.
--
--  * iim.audit_heads(): the last (id, row_hash) of every tenant's chain. The service signs them with a key
--    the database never sees and publishes them (heads file, log line, admin API); `iim audit verify --heads`
--    checks that each published head is still on its chain, so a re-hash from row N by someone who can
--    disable the triggers (a superuser) shows. Cross-tenant, so a definer function owned by iim_sweeper.
--  * The app role staged audit lines with a plain INSERT on iim.audit_pending, every column included: it
--    could back-date a line (`at`) that the flush then chained as genuine. It now has INSERT on the
--    caller-given columns only (actor, action, entity, entity_id, detail, correlation); `at` is the
--    database's clock and tenant_id the transaction's tenant (default and row-level security).
--  * Actors must be well-formed (no control characters, no surrounding blanks) in both ways in:
--    iim.audit_append refuses, iim.audit_pending has a CHECK.
-- With one app role the database cannot tell a person from the service: the actor stays the service's
-- claim (the admin API's token, or the component's name). What the app role cannot do is write outside
-- these two doors, choose time, tenant, id or hash, or change a row once it is chained.

SET LOCAL ROLE iim_owner;

REVOKE INSERT ON iim.audit_pending FROM iim_app;
GRANT INSERT (actor, action, entity, entity_id, detail, correlation) ON iim.audit_pending TO iim_app;
ALTER TABLE iim.audit_pending ADD CONSTRAINT audit_pending_actor_format
    CHECK (actor !~ '[[:cntrl:]]' AND actor = btrim(actor));

CREATE OR REPLACE FUNCTION iim.audit_append(
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
    IF p_actor IS NULL OR p_actor ~ '[[:cntrl:]]' OR p_actor <> btrim(p_actor) THEN
        RAISE EXCEPTION 'audit_append: malformed actor (control characters or surrounding blanks)'
            USING ERRCODE = 'check_violation';
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

CREATE FUNCTION iim.audit_heads() RETURNS TABLE (tenant_id uuid, id bigint, row_hash bytea)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
        -- A skip scan of the primary key (tenant_id, id): one probe per tenant, however long the chains.
        WITH RECURSIVE t (tenant_id) AS (
            (SELECT a.tenant_id FROM iim.audit_log a ORDER BY a.tenant_id LIMIT 1)
            UNION ALL
            SELECT (SELECT a.tenant_id FROM iim.audit_log a WHERE a.tenant_id > t.tenant_id
                     ORDER BY a.tenant_id LIMIT 1)
              FROM t WHERE t.tenant_id IS NOT NULL)
        SELECT t.tenant_id, h.id, h.row_hash
          FROM t CROSS JOIN LATERAL (SELECT a.id, a.row_hash FROM iim.audit_log a WHERE a.tenant_id = t.tenant_id
                                      ORDER BY a.id DESC LIMIT 1) h
         WHERE t.tenant_id IS NOT NULL
    $$;
REVOKE ALL ON FUNCTION iim.audit_heads() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.audit_heads() TO iim_app;

RESET ROLE;
ALTER FUNCTION iim.audit_heads() OWNER TO iim_sweeper;
SET LOCAL ROLE iim_owner;
