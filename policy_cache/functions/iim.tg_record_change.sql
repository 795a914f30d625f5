-- iim.tg_record_change: its current definition, last set by migration 0026_live_presence.sql.
--
-- One trigger function for the six routing tables, the numbering plans (0024: a plan change changes no
-- snapshot; it is recorded with no subscribers and the cache re-reads the plans) and the live presence claims
-- (0026: every member of the claim's household). SECURITY DEFINER so the
-- app cannot forge change_log rows (it has no grant on the table). It runs as iim_owner, which RLS filters too (FORCE), so for its own
-- reads/writes it scopes app.tenant to the changed row's tenant - a row the caller was just allowed to write
-- (for the app role that is already the transaction's tenant) - and restores the caller's value after.
-- This also records maintenance writes made by a superuser without a tenant.
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
