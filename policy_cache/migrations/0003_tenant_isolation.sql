-- 0003: tenant isolation with row-level security, and the app role's grants.
--
-- Every tenant table gets ENABLE + FORCE ROW LEVEL SECURITY (FORCE: the owner is filtered too) and one
-- policy comparing tenant_id with the transaction's tenant:
--     tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid
-- No tenant set -> NULL -> no row is visible and no row can be written (WITH CHECK defaults to USING).
-- The policy applies TO PUBLIC, so any role added later is tenant-scoped by default.
-- Referential-integrity checks bypass RLS; that is harmless here because every FK and unique key starts
-- with tenant_id (a probe can only ever hit the prober's own tenant).

SET LOCAL ROLE iim_owner;

ALTER TABLE iim.tenant ENABLE ROW LEVEL SECURITY;
ALTER TABLE iim.tenant FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON iim.tenant
    USING (id = NULLIF(current_setting('app.tenant', true), '')::uuid)
    WITH CHECK (id = NULLIF(current_setting('app.tenant', true), '')::uuid);

DO $rls$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['brand', 'region', 'household', 'subscriber', 'credential_ref', 'device', 'binding',
                             'consent', 'policy', 'scenario']
    LOOP
        EXECUTE format('ALTER TABLE iim.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE iim.%I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format($p$CREATE POLICY tenant_isolation ON iim.%I
                USING (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid)
                WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid)$p$, t);
    END LOOP;
END
$rls$;

-- iim_app: data manipulation on the registry, nothing else (no DDL, no TRUNCATE, no REFERENCES/TRIGGER).
GRANT SELECT, INSERT, UPDATE, DELETE ON
    iim.tenant, iim.brand, iim.region, iim.household, iim.subscriber, iim.credential_ref, iim.device,
    iim.binding, iim.policy, iim.scenario
    TO iim_app;
-- Consents are evidence: they are revoked (revoked_at), never deleted by the service.
GRANT SELECT, INSERT, UPDATE ON iim.consent TO iim_app;
