-- 0025: privacy as data: retention per tenant, erasure of a subscriber's content, audit details that can be
-- tombstoned without breaking the hash chain.
--
--  * iim.retention_policy: one row per tenant (a registry table), how long incoming SMS bodies, device-event
--    payloads and audit details are kept; a NULL column (or no row) is the service's default.
--  * Device-event payloads can be purged (payload '{}' and payload_purged_at); the app role may do that in its
--    tenant (erasure), the retention purge does it across tenants (iim.privacy_purge, owned by iim_sweeper).
--  * iim.sms_inbound rows of a deleted subscriber were kept (ON DELETE SET NULL): they now go with it.
--  * The audit chain, from this migration on, commits to a row's detail through a salted digest:
--    row_hash = sha256(prev_hash || canonical_v2(row)), where canonical_v2 holds
--    "detail_sha256": hex(sha256(detail_salt || detail::text)) in place of the detail itself. A detail can
--    then be replaced by a tombstone ({"tombstone": {...}}) and its salt dropped: the row still verifies from
--    the stored digest, every other column is still covered, and the digest alone (salt gone) gives nothing
--    back by brute force. The trigger lets exactly that change through (and nothing else); only iim_sweeper
--    may issue it, through iim.audit_tombstone (a tenant's rows, for erasure) and iim.privacy_purge
--    (retention). Rows chained before 0025 (detail_digest NULL) keep the first form and cannot be tombstoned.

SET LOCAL ROLE iim_owner;

-- -- retention settings ------------------------------------------------------------------------------------
CREATE TABLE iim.retention_policy (
    tenant_id         uuid        NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    id                uuid        NOT NULL DEFAULT gen_random_uuid(),
    sms_body_s        integer     CHECK (sms_body_s BETWEEN 0 AND 315360000),
    event_payload_s   integer     CHECK (event_payload_s BETWEEN 0 AND 315360000),
    audit_detail_s    integer     CHECK (audit_detail_s BETWEEN 86400 AND 315360000),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id),
    CONSTRAINT retention_policy_id_key UNIQUE (id)
);
ALTER TABLE iim.retention_policy ENABLE ROW LEVEL SECURITY;
ALTER TABLE iim.retention_policy FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON iim.retention_policy
    USING (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE, DELETE ON iim.retention_policy TO iim_app;
CREATE TRIGGER z_touch BEFORE UPDATE ON iim.retention_policy FOR EACH ROW EXECUTE FUNCTION iim.tg_touch();

-- -- device-event payloads -----------------------------------------------------------------------------------
ALTER TABLE iim.device_event ADD COLUMN payload_purged_at timestamptz;
CREATE INDEX device_event_payload_kept_idx ON iim.device_event (received_at) WHERE payload_purged_at IS NULL;
GRANT UPDATE (payload, payload_purged_at) ON iim.device_event TO iim_app;

-- -- incoming SMS of a deleted subscriber go with it ---------------------------------------------------------
ALTER TABLE iim.sms_inbound DROP CONSTRAINT sms_inbound_tenant_id_subscriber_id_fkey;
ALTER TABLE iim.sms_inbound ADD CONSTRAINT sms_inbound_tenant_id_subscriber_id_fkey
    FOREIGN KEY (tenant_id, subscriber_id) REFERENCES iim.subscriber (tenant_id, id) ON DELETE CASCADE;
CREATE INDEX sms_inbound_subscriber_idx ON iim.sms_inbound (tenant_id, subscriber_id);
GRANT DELETE ON iim.sms_inbound TO iim_app;

-- -- the audit chain's second form --------------------------------------------------------------------------
ALTER TABLE iim.audit_log ADD COLUMN detail_salt bytea, ADD COLUMN detail_digest bytea;
ALTER TABLE iim.audit_log ADD CONSTRAINT audit_log_detail_commitment
    CHECK ((detail_digest IS NULL AND detail_salt IS NULL)
           OR (length(detail_digest) = 32 AND (detail_salt IS NULL OR length(detail_salt) = 32)));

CREATE FUNCTION iim.audit_canonical_v2(
    p_tenant uuid, p_id bigint, p_at timestamptz, p_actor text, p_action text, p_entity text,
    p_entity_id text, p_detail_digest bytea, p_correlation jsonb
) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    SET search_path = pg_catalog
    AS $$
    SELECT '{"action":' || to_json(p_action)::text
        || ',"actor":' || to_json(p_actor)::text
        || ',"at":' || to_json(to_char(p_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))::text
        || ',"correlation":' || p_correlation::text
        || ',"detail_sha256":' || to_json(encode(p_detail_digest, 'hex'))::text
        || ',"entity":' || to_json(p_entity)::text
        || ',"entity_id":' || coalesce(to_json(p_entity_id)::text, 'null')
        || ',"id":' || p_id::text
        || ',"tenant_id":' || to_json(p_tenant::text)::text
        || '}'
$$;

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
$$;

RESET ROLE;
CREATE OR REPLACE FUNCTION iim.audit_flush(p_limit integer) RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
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
$$;

-- The one change a chained row may undergo: its detail replaced by a tombstone and its salt dropped, every
-- other column as it was, on a row of the second form.
CREATE OR REPLACE FUNCTION iim.tg_audit_immutable() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
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
$$;

GRANT EXECUTE ON FUNCTION iim.audit_canonical_v2(uuid, bigint, timestamptz, text, text, text, text, bytea, jsonb)
    TO iim_sweeper, iim_app;
GRANT UPDATE (detail, detail_salt) ON iim.audit_log TO iim_sweeper;
GRANT SELECT ON iim.retention_policy TO iim_sweeper;
CREATE POLICY sweeper_read ON iim.retention_policy AS PERMISSIVE FOR SELECT TO iim_sweeper USING (true);
GRANT SELECT, UPDATE (payload, payload_purged_at) ON iim.device_event TO iim_sweeper;
CREATE POLICY sweeper_purge ON iim.device_event AS PERMISSIVE FOR ALL TO iim_sweeper USING (true) WITH CHECK (true);
SET LOCAL ROLE iim_owner;

-- Tombstone these rows of the transaction's tenant (erasure); rows of the first form or already tombstoned
-- are left as they are. Returns how many became tombstones.
CREATE FUNCTION iim.audit_tombstone(p_tenant uuid, p_ids bigint[], p_reason text) RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
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
$$;

-- One round of the retention purge for every tenant: SMS bodies, device-event payloads and audit details
-- older than the tenant's retention (its iim.retention_policy column, else the default given) are purged, at
-- most p_limit rows of each kind. Returns one row per tenant and kind with the number purged.
CREATE FUNCTION iim.privacy_purge(p_sms_body interval, p_event_payload interval, p_audit_detail interval,
                                  p_limit integer)
    RETURNS TABLE (tenant_id uuid, kind text, purged integer)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
DECLARE
    v_limit integer := least(greatest(p_limit, 1), 10000);
BEGIN
    IF p_audit_detail IS NULL OR p_audit_detail < interval '1 day' THEN
        RAISE EXCEPTION 'privacy_purge: audit details are kept at least a day' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH gone AS (
        UPDATE iim.sms_inbound s SET body = NULL, content_hash = NULL, body_purged_at = coalesce(s.body_purged_at, now())
         WHERE (s.tenant_id, s.id) IN (
               SELECT q.tenant_id, q.id FROM iim.sms_inbound q
                 LEFT JOIN iim.retention_policy r ON r.tenant_id = q.tenant_id
                WHERE (q.body IS NOT NULL OR q.content_hash IS NOT NULL)
                  AND q.received_at < now() - coalesce(make_interval(secs => r.sms_body_s), greatest(p_sms_body, interval '0'))
                LIMIT v_limit FOR UPDATE OF q SKIP LOCKED)
        RETURNING s.tenant_id)
    SELECT g.tenant_id, 'sms_body'::text, count(*)::integer FROM gone g GROUP BY g.tenant_id;
    RETURN QUERY
    WITH gone AS (
        UPDATE iim.device_event e SET payload = '{}'::jsonb, payload_purged_at = now()
         WHERE (e.tenant_id, e.event_id) IN (
               SELECT q.tenant_id, q.event_id FROM iim.device_event q
                 LEFT JOIN iim.retention_policy r ON r.tenant_id = q.tenant_id
                WHERE q.payload_purged_at IS NULL
                  AND q.received_at < now() - coalesce(make_interval(secs => r.event_payload_s),
                                                       greatest(p_event_payload, interval '0'))
                LIMIT v_limit FOR UPDATE OF q SKIP LOCKED)
        RETURNING e.tenant_id)
    SELECT g.tenant_id, 'event_payload'::text, count(*)::integer FROM gone g GROUP BY g.tenant_id;
    RETURN QUERY
    WITH gone AS (
        UPDATE iim.audit_log a
           SET detail = jsonb_build_object('tombstone', jsonb_build_object('reason', 'retention', 'at', now())),
               detail_salt = NULL
         WHERE (a.tenant_id, a.id) IN (
               SELECT q.tenant_id, q.id FROM iim.audit_log q
                 LEFT JOIN iim.retention_policy r ON r.tenant_id = q.tenant_id
                WHERE q.detail_salt IS NOT NULL
                  AND q.at < now() - coalesce(make_interval(secs => r.audit_detail_s), p_audit_detail)
                LIMIT v_limit FOR UPDATE OF q SKIP LOCKED)
        RETURNING a.tenant_id)
    SELECT g.tenant_id, 'audit_detail'::text, count(*)::integer FROM gone g GROUP BY g.tenant_id;
END
$$;

REVOKE ALL ON FUNCTION iim.audit_tombstone(uuid, bigint[], text),
    iim.privacy_purge(interval, interval, interval, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.audit_tombstone(uuid, bigint[], text),
    iim.privacy_purge(interval, interval, interval, integer) TO iim_app;

RESET ROLE;
ALTER FUNCTION iim.audit_tombstone(uuid, bigint[], text) OWNER TO iim_sweeper;
ALTER FUNCTION iim.privacy_purge(interval, interval, interval, integer) OWNER TO iim_sweeper;
GRANT SELECT, UPDATE (body, content_hash, body_purged_at) ON iim.sms_inbound TO iim_sweeper;
SET LOCAL ROLE iim_owner;
