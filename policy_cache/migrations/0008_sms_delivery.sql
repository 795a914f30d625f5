-- 0008: SMS delivery: what the sender needs on the outbox (parts, SMSC ids, retry schedule, receipts), the
-- inbound (MO) table, and the few cross-tenant entry points the sender must have.
--
-- The service role sees one tenant per transaction (RLS). The sender is one loop for every tenant, so three
-- SECURITY DEFINER functions (owned by iim_owner, EXECUTE for iim_app only) do the cross-tenant parts and
-- nothing else: claim due outbox rows, find the row of an SMSC message id (receipts), find the tenant of
-- a subscriber's number (MO). Everything that writes a row afterwards goes through tenant_tx as usual.
-- For them iim_owner (NOLOGIN; used by migrations and these functions only) gets permissive policies on
-- sms_outbox (SELECT, UPDATE) and subscriber (SELECT); FORCE RLS stays on.

SET LOCAL ROLE iim_owner;

ALTER TABLE iim.sms_outbox
    ADD COLUMN flash            boolean     NOT NULL DEFAULT false,
    -- Sender address for this message (E.164, short code or alphanumeric); NULL: the transport's default.
    ADD COLUMN source           text        CHECK (source ~ '^(\+?[0-9]{1,15}|[A-Za-z0-9 ._-]{1,11})$'),
    -- Which transport sent it: receipts are matched by (transport, SMSC message id).
    ADD COLUMN transport        text        CHECK (length(transport) BETWEEN 1 AND 64),
    -- One SMSC message id per part, in part order; NULL elements are parts not yet accepted (a retry sends
    -- only those, with the same concatenation reference).
    ADD COLUMN smsc_message_ids text[]      NOT NULL DEFAULT '{}',
    -- Parts whose receipt said delivered.
    ADD COLUMN delivered_ids    text[]      NOT NULL DEFAULT '{}',
    ADD COLUMN segments         integer     CHECK (segments BETWEEN 1 AND 255),
    -- queued: due time; sending: lease expiry (a sender that died mid-submit leaves the row to be claimed again).
    ADD COLUMN next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN sent_at          timestamptz,
    ADD COLUMN delivered_at     timestamptz,
    ADD COLUMN receipt_state    text        CHECK (receipt_state ~ '^[a-z_]{1,32}$'),
    ADD COLUMN receipt_error    text        CHECK (length(receipt_error) <= 200);

DROP INDEX iim.sms_outbox_status_idx;
CREATE INDEX sms_outbox_due_idx ON iim.sms_outbox (next_attempt_at) WHERE status IN ('queued', 'sending');
-- fastupdate off: a receipt looks its id up right after the insert; with the pending list on, every lookup
-- scans the whole list of not-yet-merged entries (milliseconds each under load).
CREATE INDEX sms_outbox_smsc_ids_idx ON iim.sms_outbox USING gin (smsc_message_ids) WITH (fastupdate = off);

-- Mobile-originated SMS, stored before the SMSC is acknowledged. sms_id: the SMSC's id for the message when
-- it sends one ("<transport>:<id>"), else "h:<content hash>:<ms>" (redeliveries within a window are
-- recognised by content_hash).
CREATE TABLE iim.sms_inbound (
    tenant_id     uuid        NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    id            uuid        NOT NULL DEFAULT gen_random_uuid(),
    sms_id        text        NOT NULL CHECK (length(sms_id) BETWEEN 1 AND 200),
    content_hash  text        NOT NULL CHECK (content_hash ~ '^[0-9a-f]{64}$'),
    transport     text        NOT NULL CHECK (length(transport) BETWEEN 1 AND 64),
    source        text        NOT NULL CHECK (length(source) BETWEEN 1 AND 32),
    destination   text        NOT NULL CHECK (iim.is_e164(destination)),
    subscriber_id uuid,
    body          text        NOT NULL CHECK (length(body) <= 40000),
    received_at   timestamptz NOT NULL DEFAULT now(),
    -- Set by whoever acted on it (e.g. the read-aloud policy); NULL rows are still to be handled.
    handled_at    timestamptz,
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, sms_id),
    FOREIGN KEY (tenant_id, subscriber_id) REFERENCES iim.subscriber (tenant_id, id) ON DELETE SET NULL (subscriber_id)
);
CREATE INDEX sms_inbound_hash_idx ON iim.sms_inbound (tenant_id, content_hash, received_at);
CREATE INDEX sms_inbound_unhandled_idx ON iim.sms_inbound (tenant_id, received_at) WHERE handled_at IS NULL;

ALTER TABLE iim.sms_inbound ENABLE ROW LEVEL SECURITY;
ALTER TABLE iim.sms_inbound FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON iim.sms_inbound
    USING (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE ON iim.sms_inbound TO iim_app;

-- MO lookups go by number across tenants.
CREATE INDEX subscriber_msisdn_idx ON iim.subscriber (msisdn);

CREATE POLICY sms_sender_read ON iim.sms_outbox AS PERMISSIVE FOR SELECT TO iim_owner USING (true);
CREATE POLICY sms_sender_claim ON iim.sms_outbox AS PERMISSIVE FOR UPDATE TO iim_owner USING (true) WITH CHECK (true);
CREATE POLICY sms_mo_lookup ON iim.subscriber AS PERMISSIVE FOR SELECT TO iim_owner USING (true);

-- Claim up to p_limit due rows of any tenant: queued rows whose time has come and sending rows whose lease
-- expired (their sender died between claim and update). Each claim is an attempt. SKIP LOCKED: several
-- senders share the work without waiting on each other.
CREATE FUNCTION iim.sms_claim(p_limit integer, p_lease interval)
    RETURNS TABLE (tenant_id uuid, id uuid, key text, msisdn text, body text, flash boolean, source text,
                   attempts integer, smsc_message_ids text[])
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
    RETURNING o.tenant_id, o.id, o.key, o.msisdn, o.body, o.flash, o.source, o.attempts, o.smsc_message_ids;
END
$$;

-- The outbox rows (any tenant) holding these SMSC message ids of one transport: receipts carry no tenant.
-- An id reused by the SMSC over time matches the most recently sent row.
CREATE FUNCTION iim.sms_find_by_smsc_id(p_transport text, p_ids text[])
    RETURNS TABLE (tenant_id uuid, id uuid, smsc_id text)
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
BEGIN
    IF cardinality(p_ids) > 10000 THEN
        RAISE EXCEPTION 'sms_find_by_smsc_id: at most 10000 ids' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    SELECT m.tenant_id, m.id, x.mid
    FROM unnest(p_ids) AS x(mid)
    CROSS JOIN LATERAL (
        SELECT o.tenant_id, o.id FROM iim.sms_outbox o
        WHERE o.smsc_message_ids @> ARRAY[x.mid] AND o.transport = p_transport
        ORDER BY o.sent_at DESC NULLS LAST
        LIMIT 1
    ) m;
END
$$;

-- The tenant of the subscriber with this number; NULL when unknown or when several tenants have it.
CREATE FUNCTION iim.subscriber_tenant(p_msisdn text) RETURNS uuid
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
    SELECT CASE WHEN count(*) = 1 THEN (array_agg(s.tenant_id))[1] END
    FROM iim.subscriber s WHERE s.msisdn = p_msisdn
$$;

-- Queued + sending rows of every tenant, for the iim_sms_queue_depth gauge.
CREATE FUNCTION iim.sms_queue_depth() RETURNS bigint
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$ SELECT count(*) FROM iim.sms_outbox o WHERE o.status IN ('queued', 'sending') $$;

-- Explicit REVOKE: 0001's per-schema ALTER DEFAULT PRIVILEGES cannot take away the global default (EXECUTE
-- for PUBLIC), so without it every role with USAGE on the schema (iim_cache too) could call these.
REVOKE ALL ON FUNCTION iim.sms_claim(integer, interval), iim.sms_find_by_smsc_id(text, text[]),
    iim.subscriber_tenant(text), iim.sms_queue_depth() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.sms_claim(integer, interval), iim.sms_find_by_smsc_id(text, text[]),
    iim.subscriber_tenant(text), iim.sms_queue_depth() TO iim_app;
