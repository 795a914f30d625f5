-- 0024: a tenant's numbering plan, so national and international forms of a number mean one subscriber.
--
-- Numbers are stored in E.164. What people dial and type (8 900 123-45-67, 810..., 00..., 020 7946 0018) is
-- read under the tenant's plan by iim.core.numbering: country code, trunk (national) prefix, international
-- prefixes, lengths of a national significant number. One row per tenant; none: the service's default
-- (Russia: 7, trunk 8, international 810 and 00, 10 digits). The policy cache reads every tenant's plan, so
-- a change is recorded in change_log (no subscriber's snapshot changes: the cache re-reads the plans).
SET LOCAL ROLE iim_owner;

CREATE TABLE iim.numbering_plan (
    tenant_id               uuid        NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    id                      uuid        NOT NULL DEFAULT gen_random_uuid(),
    country_code            text        NOT NULL CHECK (country_code ~ '^[1-9][0-9]{0,2}$'),
    trunk_prefix            text        NOT NULL DEFAULT '' CHECK (trunk_prefix ~ '^[0-9]{0,3}$'),
    international_prefixes  text[]      NOT NULL DEFAULT '{00}'
                                        CHECK (cardinality(international_prefixes) BETWEEN 1 AND 4
                                               AND array_position(international_prefixes, NULL) IS NULL
                                               AND array_to_string(international_prefixes, ',')
                                                   ~ '^[0-9]{2,4}(,[0-9]{2,4})*$'),
    national_lengths        integer[]   NOT NULL DEFAULT '{10}'
                                        CHECK (cardinality(national_lengths) BETWEEN 1 AND 12
                                               AND array_position(national_lengths, NULL) IS NULL
                                               AND 6 <= ALL (national_lengths)),
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT numbering_plan_trunk_not_international CHECK (NOT trunk_prefix = ANY (international_prefixes)),
    CONSTRAINT numbering_plan_lengths_fit_e164 CHECK (15 - length(country_code) >= ALL (national_lengths)),
    PRIMARY KEY (tenant_id),
    CONSTRAINT numbering_plan_id_key UNIQUE (id)
);
ALTER TABLE iim.numbering_plan ENABLE ROW LEVEL SECURITY;
ALTER TABLE iim.numbering_plan FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON iim.numbering_plan
    USING (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid);
CREATE POLICY cache_read_all ON iim.numbering_plan AS PERMISSIVE FOR SELECT TO iim_cache USING (true);
GRANT SELECT, INSERT, UPDATE, DELETE ON iim.numbering_plan TO iim_app;
GRANT SELECT ON iim.numbering_plan TO iim_cache;
CREATE TRIGGER z_touch BEFORE UPDATE ON iim.numbering_plan FOR EACH ROW EXECUTE FUNCTION iim.tg_touch();

-- The change feed: a plan change reaches every policy cache (it re-reads the plans on any change).
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

CREATE TRIGGER zz_change_log AFTER INSERT OR UPDATE OR DELETE ON iim.numbering_plan
    FOR EACH ROW EXECUTE FUNCTION iim.tg_record_change();
