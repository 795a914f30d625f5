-- iim.sia_account_lookup: its current definition, last set by migration 0031_sia_accounts.sql.
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
