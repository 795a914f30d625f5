-- 0026: live presence. Sources other than an admin PATCH say who is home, each with an expiry.
--
-- A claim is one source's word about one subject of a household: a device registration (the AoR), a connector
-- (the vendor's home/away for one of its devices), the operator's app (a geofence enter/leave for a person).
-- One row per (household, source, subject), replaced by the next word; expires_at is required, so a source that
-- falls silent stops counting by itself. The household's presence column stays the baseline (policy_cache.presence
-- resolves both at call time). Claims are routing data: a change reaches every member's snapshot by the change
-- feed, like any other routing table.
SET LOCAL ROLE iim_owner;

CREATE TYPE iim.presence_source AS ENUM ('registration', 'connector', 'app');

CREATE TABLE iim.presence_claim (
    tenant_id     uuid                NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    id            uuid                NOT NULL DEFAULT gen_random_uuid(),
    household_id  uuid                NOT NULL,
    source        iim.presence_source NOT NULL,
    subject       text                NOT NULL CHECK (length(subject) BETWEEN 1 AND 200),
    state         iim.presence_state  NOT NULL CHECK (state <> 'unknown'),
    observed_at   timestamptz         NOT NULL DEFAULT now(),
    expires_at    timestamptz         NOT NULL,
    actor         text                NOT NULL CHECK (length(actor) BETWEEN 1 AND 200),
    CONSTRAINT presence_claim_expires_after_observed CHECK (expires_at > observed_at),
    PRIMARY KEY (tenant_id, household_id, source, subject),
    CONSTRAINT presence_claim_id_key UNIQUE (id),
    FOREIGN KEY (tenant_id, household_id) REFERENCES iim.household (tenant_id, id) ON DELETE CASCADE
);
ALTER TABLE iim.presence_claim ENABLE ROW LEVEL SECURITY;
ALTER TABLE iim.presence_claim FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON iim.presence_claim
    USING (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid);
CREATE POLICY cache_read_all ON iim.presence_claim AS PERMISSIVE FOR SELECT TO iim_cache USING (true);
GRANT SELECT, INSERT, UPDATE, DELETE ON iim.presence_claim TO iim_app;
GRANT SELECT ON iim.presence_claim TO iim_cache;

CREATE OR REPLACE FUNCTION iim.tg_record_change() RETURNS trigger
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
    ELSIF TG_TABLE_NAME = 'numbering_plan' THEN
        v_subs := '{}';
    ELSIF TG_TABLE_NAME = 'presence_claim' THEN
        -- Every member of the household: presence is the household's.
        v_subs := iim.household_subscribers(v_tenant, CASE TG_OP WHEN 'DELETE' THEN OLD.household_id
                                                                 ELSE NEW.household_id END);
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

CREATE TRIGGER zz_change_log AFTER INSERT OR UPDATE OR DELETE ON iim.presence_claim
    FOR EACH ROW EXECUTE FUNCTION iim.tg_record_change();
