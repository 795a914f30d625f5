-- 0028: sensitive fields sealed with a data key per tenant (envelope encryption).
--
-- SMS bodies (iim.sms_outbox.body, iim.sms_inbound.body) are stored sealed: AES-256-GCM under the tenant's data
-- key, base64 text in the same column, bound to tenant, table, row key and column (so a ciphertext moved to
-- another row or tenant does not open). body_key names the data key that sealed the row (NULL: a row written
-- before this migration, still in clear until `iim keys rotate --tenant` seals it), so during a rotation old
-- and new keys are both readable. Data keys are stored only wrapped by the master key, which is never stored
-- (IIM_MASTER_KEY_REF); master_key_id is its fingerprint, so a master rotation re-wraps without downtime.
SET LOCAL ROLE iim_owner;

CREATE TABLE iim.tenant_data_key (
    tenant_id     uuid        NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    key_id        integer     NOT NULL CHECK (key_id BETWEEN 1 AND 1000000),
    wrapped       bytea       NOT NULL CHECK (length(wrapped) = 60),  -- nonce 12 + key 32 + tag 16
    master_key_id text        NOT NULL CHECK (master_key_id ~ '^[0-9a-f]{16}$'),
    created_at    timestamptz NOT NULL DEFAULT now(),
    rewrapped_at  timestamptz,
    PRIMARY KEY (tenant_id, key_id)
);
ALTER TABLE iim.tenant_data_key ENABLE ROW LEVEL SECURITY;
ALTER TABLE iim.tenant_data_key FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON iim.tenant_data_key
    USING (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid);
-- Keys are added and re-wrapped, never deleted by the service (a row may still name one).
GRANT SELECT, INSERT ON iim.tenant_data_key TO iim_app;
GRANT UPDATE (wrapped, master_key_id, rewrapped_at) ON iim.tenant_data_key TO iim_app;

ALTER TABLE iim.sms_outbox ADD COLUMN body_key integer;
ALTER TABLE iim.sms_outbox DROP CONSTRAINT sms_outbox_body_check;
-- 1600 characters of up to 4 bytes each, sealed (+28 bytes) and in base64.
ALTER TABLE iim.sms_outbox ADD CONSTRAINT sms_outbox_body_check
    CHECK (CASE WHEN body_key IS NULL THEN length(body) BETWEEN 1 AND 1600 ELSE length(body) BETWEEN 40 AND 8600 END);
ALTER TABLE iim.sms_outbox ADD CONSTRAINT sms_outbox_body_key_fkey
    FOREIGN KEY (tenant_id, body_key) REFERENCES iim.tenant_data_key (tenant_id, key_id);

ALTER TABLE iim.sms_inbound ADD COLUMN body_key integer;
ALTER TABLE iim.sms_inbound DROP CONSTRAINT sms_inbound_body_check;
ALTER TABLE iim.sms_inbound ADD CONSTRAINT sms_inbound_body_check
    CHECK (CASE WHEN body_key IS NULL THEN length(body) <= 40000 ELSE length(body) <= 215000 END);
ALTER TABLE iim.sms_inbound ADD CONSTRAINT sms_inbound_body_key_fkey
    FOREIGN KEY (tenant_id, body_key) REFERENCES iim.tenant_data_key (tenant_id, key_id);

-- The sender opens what it claims: the key id comes with the sealed body.
DROP FUNCTION iim.sms_claim(integer, interval);
CREATE FUNCTION iim.sms_claim(p_limit integer, p_lease interval)
    RETURNS TABLE (tenant_id uuid, id uuid, key text, msisdn text, body text, body_key integer, flash boolean,
                   source text, attempts integer, smsc_message_ids text[])
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 10000 THEN
        RAISE EXCEPTION 'sms_claim: limit must be 1..10000' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_lease IS NULL OR p_lease < interval '1 second' OR p_lease > interval '1 hour' THEN
        RAISE EXCEPTION 'sms_claim: lease must be 1 s..1 h' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH due AS (
        SELECT o.tenant_id, o.id FROM iim.sms_outbox o
        WHERE o.status IN ('queued', 'sending') AND o.next_attempt_at <= now()
        ORDER BY o.next_attempt_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE iim.sms_outbox o
       SET status = 'sending', attempts = o.attempts + 1, next_attempt_at = now() + p_lease, updated_at = now()
      FROM due
     WHERE o.tenant_id = due.tenant_id AND o.id = due.id
    RETURNING o.tenant_id, o.id, o.key, o.msisdn, o.body, o.body_key, o.flash, o.source, o.attempts,
              o.smsc_message_ids;
END
$$;
REVOKE ALL ON FUNCTION iim.sms_claim(integer, interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.sms_claim(integer, interval) TO iim_app;

-- A decision's SMS come sealed (body_key set) from the worker; the clear-text form is still accepted (left
-- as it was) for a caller without a key.
CREATE OR REPLACE FUNCTION iim.write_action(a jsonb, p_dispatched boolean) RETURNS boolean
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_incident uuid := (a->>'incident_id')::uuid;
    k text;
BEGIN
    INSERT INTO iim.incident_action AS t (key, incident_id, step, kind, destination, spec, call_uuid, outcome, detail,
                                          finished_at, dispatched_at)
    VALUES (a->>'key', v_incident, (a->>'step')::integer, a->>'kind', a->>'destination', a->'spec',
            (a->>'call_uuid')::uuid, a->>'outcome', left(coalesce(a->>'detail', ''), 500),
            CASE WHEN a->>'outcome' IS NOT NULL THEN now() END, CASE WHEN p_dispatched THEN now() END)
    ON CONFLICT (tenant_id, key) DO NOTHING
    RETURNING t.key INTO k;
    IF k IS NULL THEN
        RETURN false;
    END IF;
    IF jsonb_array_length(coalesce(a->'sms', '[]')) > 0 THEN
        INSERT INTO iim.sms_outbox (key, msisdn, body, body_key, incident_id)
        SELECT s.key, s.msisdn, CASE WHEN s.body_key IS NULL THEN left(s.body, 1600) ELSE s.body END, s.body_key,
               v_incident
          FROM jsonb_to_recordset(a->'sms') AS s(key text, msisdn text, body text, body_key integer)
        ON CONFLICT (tenant_id, key) DO NOTHING;
    END IF;
    PERFORM iim.stage_audit(a->'audit');
    RETURN true;
END
$fn$;

-- The schemes of every tenant's credential references (no reference itself): at start the service refuses a
-- scheme it has no resolver for (vault:, kms: ... are plug-ins), instead of failing when one is first needed.
CREATE POLICY credential_ref_schemes_read ON iim.credential_ref AS PERMISSIVE FOR SELECT TO iim_owner USING (true);
CREATE FUNCTION iim.credential_ref_schemes() RETURNS TABLE (scheme text, refs bigint)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
AS $fn$
    SELECT split_part(c.ref, ':', 1), count(*) FROM iim.credential_ref c GROUP BY 1 ORDER BY 1
$fn$;
REVOKE ALL ON FUNCTION iim.credential_ref_schemes() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.credential_ref_schemes() TO iim_app;

-- The master keys every tenant's data keys are wrapped by (fingerprints and counts only): at start a service
-- refuses a master configuration that cannot unwrap them (an extra instance given another key), instead of
-- failing each SMS it claims.
CREATE POLICY data_key_masters_read ON iim.tenant_data_key AS PERMISSIVE FOR SELECT TO iim_owner USING (true);
CREATE FUNCTION iim.data_key_masters() RETURNS TABLE (master_key_id text, keys bigint)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
AS $fn$
    SELECT k.master_key_id, count(*) FROM iim.tenant_data_key k GROUP BY 1 ORDER BY 1
$fn$;
REVOKE ALL ON FUNCTION iim.data_key_masters() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.data_key_masters() TO iim_app;
