-- 0031: SIA DC-09 alarm-receiver accounts. A professional alarm panel or a telecare unit reports to IIM's
-- receiver under an account number; the account says which registry device (and so household) it speaks for,
-- which receiver/line prefix it must use (when set) and, by reference (env:/file:), the AES key its messages
-- are encrypted with (none: plain messages only, an encrypted one is refused, and the reverse).
--
-- A registry table like the others (tenant first in every key, row-level security). The receiver learns the
-- tenant from the account itself, so its lookup (iim.sia_account_lookup) is SECURITY DEFINER, owned by
-- iim_owner with a read policy on this table only, EXECUTE for iim_app only; it returns every tenant's match
-- and the receiver refuses an account number two tenants both hold (no guessing, no existence oracle in a
-- duplicate-key error across tenants).
SET LOCAL ROLE iim_owner;

CREATE TABLE iim.sia_account (
    tenant_id    uuid        NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    id           uuid        NOT NULL DEFAULT gen_random_uuid(),
    account      text        NOT NULL CHECK (account ~ '^[0-9A-F]{3,16}$'),
    receiver     text        CHECK (receiver ~ '^[0-9A-F]{1,6}$'),
    line         text        CHECK (line ~ '^[0-9A-F]{1,6}$'),
    device_id    uuid        NOT NULL,
    key_ref      text        CHECK (key_ref ~ '^(env:[A-Za-z_][A-Za-z0-9_]*|file:/\S+)$'),
    enabled      boolean     NOT NULL DEFAULT true,
    description  text        CHECK (length(description) <= 500),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT sia_account_id_key UNIQUE (id),
    CONSTRAINT sia_account_account_key UNIQUE (tenant_id, account),
    FOREIGN KEY (tenant_id, device_id) REFERENCES iim.device (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX sia_account_by_account ON iim.sia_account (account);
ALTER TABLE iim.sia_account ENABLE ROW LEVEL SECURITY;
ALTER TABLE iim.sia_account FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON iim.sia_account
    USING (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid);
CREATE POLICY sia_receiver_lookup ON iim.sia_account AS PERMISSIVE FOR SELECT TO iim_owner USING (true);
GRANT SELECT, INSERT, UPDATE, DELETE ON iim.sia_account TO iim_app;
CREATE TRIGGER z_touch BEFORE UPDATE ON iim.sia_account FOR EACH ROW EXECUTE FUNCTION iim.tg_touch();

CREATE OR REPLACE FUNCTION iim.sia_account_lookup(p_account text)
    RETURNS TABLE (tenant_id uuid, receiver text, line text, key_ref text, enabled boolean, device_id uuid,
                   household_id uuid, external_id text, type text, device_enabled boolean)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    caller_scope text := coalesce(current_setting('app.tenant', true), '');
    found record;
BEGIN
    FOR found IN SELECT a.tenant_id, a.receiver, a.line, a.key_ref, a.enabled, a.device_id
                   FROM iim.sia_account a WHERE a.account = p_account LOOP
        -- The device is read in the account's own tenant (its row-level security, no wider policy).
        PERFORM set_config('app.tenant', found.tenant_id::text, true);
        tenant_id := found.tenant_id;
        receiver := found.receiver;
        line := found.line;
        key_ref := found.key_ref;
        enabled := found.enabled;
        device_id := found.device_id;
        SELECT d.household_id, d.external_id, d.type::text, d.enabled
          INTO household_id, external_id, type, device_enabled
          FROM iim.device d WHERE d.tenant_id = found.tenant_id AND d.id = found.device_id;
        RETURN NEXT;
    END LOOP;
    PERFORM set_config('app.tenant', caller_scope, true);
END
$fn$;
REVOKE ALL ON FUNCTION iim.sia_account_lookup(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.sia_account_lookup(text) TO iim_app;

-- Events the receiver takes are recorded with channel 'sia' (beside 'device' and 'webhook:<source>').
ALTER TABLE iim.device_event DROP CONSTRAINT device_event_channel_check;
ALTER TABLE iim.device_event ADD CONSTRAINT device_event_channel_check
    CHECK (channel ~ '^(device|sia|webhook:[A-Za-z0-9_.:-]{1,128})$') NOT VALID;
ALTER TABLE iim.device_event VALIDATE CONSTRAINT device_event_channel_check;
