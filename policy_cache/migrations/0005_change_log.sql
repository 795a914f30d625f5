-- 0005: the change sequence the policy cache syncs from, and the cache's read-all access.
--
-- change_log: one row per committed change of a routing-relevant row (subscriber, household, device,
-- binding, consent, policy), written by AFTER ROW triggers in the changing transaction, with every
-- subscriber whose routing the change affects, plus pg_notify('iim_policy', seq) (delivered on commit).
-- The cache resyncs with `seq > last_seen`, never by wall-clock time.
--
-- Commit order vs seq order: a sequence hands out numbers at INSERT time, so a transaction holding seq 10
-- can commit after one holding seq 11; a reader that saw 11 and moved its watermark past 10 would lose 10.
-- Fix: writers hold advisory lock (1229540685, 1) in SHARE mode from their first change to commit (writers
-- do not block each other); a reader first takes it EXCLUSIVE (iim.change_barrier() or changes_since),
-- which waits for every in-flight writer, so everything <= max(seq) it then reads is committed or gone
-- for good, and later writers only get larger numbers.

SET LOCAL ROLE iim_owner;

CREATE TABLE iim.change_log (
    tenant_id       uuid        NOT NULL,
    seq             bigint      GENERATED ALWAYS AS IDENTITY,
    entity          text        NOT NULL,
    entity_id       uuid        NOT NULL,
    op              text        NOT NULL CHECK (op IN ('INSERT', 'UPDATE', 'DELETE')),
    subscriber_ids  uuid[]      NOT NULL DEFAULT '{}',
    txid            xid8        NOT NULL DEFAULT pg_current_xact_id(),
    changed_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, seq)
);
CREATE INDEX change_log_seq_idx ON iim.change_log (seq);

-- Retention: rows up to pruned_through were deleted; a cache whose watermark is older must reload fully.
CREATE TABLE iim.change_log_state (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    pruned_through  bigint  NOT NULL DEFAULT 0
);
INSERT INTO iim.change_log_state DEFAULT VALUES;

ALTER TABLE iim.change_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE iim.change_log FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON iim.change_log
    USING (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid);
REVOKE ALL ON iim.change_log, iim.change_log_state FROM PUBLIC;

-- Subscribers whose routing depends on a household (all its bindings) or on one of its devices
-- (bindings covering the whole household, plus those bound to that very device).
CREATE FUNCTION iim.household_subscribers(p_tenant uuid, p_household uuid) RETURNS uuid[]
    LANGUAGE sql STABLE
    SET search_path = pg_catalog
    AS $$
    SELECT coalesce(array_agg(DISTINCT b.subscriber_id), '{}')
    FROM iim.binding b WHERE b.tenant_id = p_tenant AND b.household_id = p_household
$$;

CREATE FUNCTION iim.device_subscribers(p_tenant uuid, p_household uuid, p_device uuid) RETURNS uuid[]
    LANGUAGE sql STABLE
    SET search_path = pg_catalog
    AS $$
    SELECT coalesce(array_agg(DISTINCT b.subscriber_id), '{}')
    FROM iim.binding b
    WHERE b.tenant_id = p_tenant AND b.household_id = p_household
      AND (b.device_id IS NULL OR b.device_id = p_device)
$$;

-- One trigger function for the six tables. SECURITY DEFINER so the app cannot forge change_log rows
-- (it has no grant on the table). It runs as iim_owner, which RLS filters too (FORCE), so for its own
-- reads/writes it scopes app.tenant to the changed row's tenant - a row the caller was just allowed to write
-- (for the app role that is already the transaction's tenant) - and restores the caller's value after.
-- This also records maintenance writes made by a superuser without a tenant.
CREATE FUNCTION iim.tg_record_change() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
DECLARE
    v_tenant uuid;
    v_id uuid;
    v_subs uuid[];
    v_seq bigint;
    v_caller_tenant text := current_setting('app.tenant', true);
BEGIN
    IF TG_OP = 'UPDATE' AND OLD IS NOT DISTINCT FROM NEW THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        v_tenant := OLD.tenant_id;
        v_id := OLD.id;
    ELSE
        v_tenant := NEW.tenant_id;
        v_id := NEW.id;
    END IF;
    PERFORM set_config('app.tenant', v_tenant::text, true);

    IF TG_TABLE_NAME = 'subscriber' THEN
        v_subs := ARRAY[v_id];
    ELSIF TG_TABLE_NAME = 'consent' THEN
        v_subs := CASE TG_OP WHEN 'DELETE' THEN ARRAY[OLD.subscriber_id] ELSE ARRAY[NEW.subscriber_id] END;
        IF TG_OP = 'UPDATE' THEN v_subs := v_subs || OLD.subscriber_id; END IF;
    ELSIF TG_TABLE_NAME = 'household' THEN
        v_subs := iim.household_subscribers(v_tenant, v_id);
    ELSIF TG_TABLE_NAME = 'device' THEN
        IF TG_OP <> 'DELETE' THEN
            v_subs := iim.device_subscribers(v_tenant, NEW.household_id, NEW.id);
        END IF;
        IF TG_OP <> 'INSERT' THEN
            v_subs := coalesce(v_subs, '{}') || iim.device_subscribers(v_tenant, OLD.household_id, OLD.id);
        END IF;
    ELSIF TG_TABLE_NAME = 'binding' THEN
        -- The subscriber itself, and the rest of the household (escalation contacts changed for them).
        IF TG_OP <> 'DELETE' THEN
            v_subs := NEW.subscriber_id || iim.household_subscribers(v_tenant, NEW.household_id);
        END IF;
        IF TG_OP <> 'INSERT' THEN
            v_subs := coalesce(v_subs, '{}') || OLD.subscriber_id
                      || iim.household_subscribers(v_tenant, OLD.household_id);
        END IF;
    ELSIF TG_TABLE_NAME = 'policy' THEN
        IF TG_OP <> 'DELETE' THEN
            v_subs := CASE WHEN NEW.subscriber_id IS NOT NULL THEN ARRAY[NEW.subscriber_id]
                           ELSE iim.household_subscribers(v_tenant, NEW.household_id) END;
        END IF;
        IF TG_OP <> 'INSERT' THEN
            v_subs := coalesce(v_subs, '{}')
                      || CASE WHEN OLD.subscriber_id IS NOT NULL THEN ARRAY[OLD.subscriber_id]
                              ELSE iim.household_subscribers(v_tenant, OLD.household_id) END;
        END IF;
    ELSE
        RAISE EXCEPTION 'tg_record_change: unexpected table %', TG_TABLE_NAME;
    END IF;

    SELECT coalesce(array_agg(DISTINCT s ORDER BY s), '{}') INTO v_subs FROM unnest(v_subs) AS s WHERE s IS NOT NULL;

    PERFORM pg_advisory_xact_lock_shared(1229540685, 1);
    INSERT INTO iim.change_log (tenant_id, entity, entity_id, op, subscriber_ids)
    VALUES (v_tenant, TG_TABLE_NAME, v_id, TG_OP, v_subs)
    RETURNING seq INTO v_seq;
    PERFORM pg_notify('iim_policy', v_seq::text);
    PERFORM set_config('app.tenant', coalesce(v_caller_tenant, ''), true);
    RETURN NULL;
END
$$;

DO $triggers$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['subscriber', 'household', 'device', 'binding', 'consent', 'policy']
    LOOP
        EXECUTE format('CREATE TRIGGER zz_change_log AFTER INSERT OR UPDATE OR DELETE ON iim.%I
                        FOR EACH ROW EXECUTE FUNCTION iim.tg_record_change()', t);
    END LOOP;
END
$triggers$;

-- Barrier for a full load: waits for in-flight writers, returns the highest committed seq. A snapshot
-- taken after this returns contains every change <= that seq (and maybe some later ones, which the next
-- changes_since re-delivers; reloading a subscriber twice is harmless).
-- Runs with the caller's rights (the cache role reads change_log through its policy).
CREATE FUNCTION iim.change_barrier() RETURNS bigint
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog
    AS $$
DECLARE
    v_max bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(1229540685, 1);
    SELECT coalesce(max(seq), (SELECT pruned_through FROM iim.change_log_state)) INTO v_max FROM iim.change_log;
    RETURN v_max;
END
$$;

-- Retention (run by the owner/maintenance job): delete rows older than p_keep, remember the watermark.
CREATE FUNCTION iim.prune_change_log(p_keep interval) RETURNS bigint
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog
    AS $$
DECLARE
    v_through bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(1229540685, 1);
    SELECT max(seq) INTO v_through FROM iim.change_log WHERE changed_at < now() - p_keep;
    IF v_through IS NULL THEN
        RETURN 0;
    END IF;
    DELETE FROM iim.change_log WHERE seq <= v_through;
    UPDATE iim.change_log_state SET pruned_through = greatest(pruned_through, v_through);
    RETURN v_through;
END
$$;

-- iim_cache: reads the routing tables of every tenant. It is an ordinary role (NOBYPASSRLS) that is
-- granted SELECT on exactly these tables and a SELECT-only permissive policy on each; it cannot write
-- anything and cannot see credential_ref, scenario or audit_log. (A BYPASSRLS role would bypass RLS on
-- every table it is ever granted, and SECURITY DEFINER set-returning functions would materialise 1M rows
-- in a tuplestore instead of streaming them through a cursor.)
DO $cache$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['tenant', 'household', 'subscriber', 'device', 'binding', 'consent', 'policy',
                             'change_log']
    LOOP
        EXECUTE format('CREATE POLICY cache_read_all ON iim.%I AS PERMISSIVE FOR SELECT TO iim_cache USING (true)', t);
    END LOOP;
END
$cache$;
GRANT SELECT ON iim.tenant, iim.household, iim.subscriber, iim.device, iim.binding, iim.policy, iim.change_log,
    iim.change_log_state TO iim_cache;
-- Consent evidence is personal data the cache has no use for: column-level grant without it.
GRANT SELECT (tenant_id, id, subscriber_id, purpose, scope, granted_at, expires_at, revoked_at)
    ON iim.consent TO iim_cache;
GRANT EXECUTE ON FUNCTION iim.change_barrier() TO iim_cache;

-- Row shapes for the cache's set-based load (decoded by asyncpg as nested records).
CREATE TYPE iim.routing_device AS (
    id                 uuid,
    household_id       uuid,
    type               iim.device_type,
    vendor             text,
    capabilities       iim.device_capability[],
    sip_uri            text,
    connector          text,
    connector_ref      text,
    status             iim.device_status,
    status_changed_at  timestamptz
);
CREATE TYPE iim.routing_household AS (
    id                   uuid,
    role                 iim.binding_role,
    priority             smallint,
    time_zone            text,
    presence             iim.presence_state,
    presence_changed_at  timestamptz,
    devices              iim.routing_device[]
);
CREATE TYPE iim.routing_consent AS (
    purpose     iim.consent_purpose,
    scope       jsonb,
    expires_at  timestamptz
);
CREATE TYPE iim.routing_policy AS (
    id                      uuid,
    scope                   text,
    ring_mode               iim.ring_mode,
    phone_timeout_s         smallint,
    home_timeout_s          smallint,
    quiet_start             time without time zone,
    quiet_end               time without time zone,
    dnd                     boolean,
    allowed_callers         text[],
    blocked_callers         text[],
    home_only_when_present  boolean,
    fallback                iim.fallback_action,
    version                 integer
);
