-- 0041: the service's own audit chain, under the nil tenant id.
--
-- Privileged events that belong to no tenant (the admin token table reloaded or refused) are audited in one
-- more hash chain of iim.audit_log, written through iim.audit_append like every other, under the tenant id
-- 00000000-0000-0000-0000-000000000000 (policy_cache.audit.SYSTEM_CHAIN): verified, head-signed and listed the
-- same way (`iim audit list|verify --tenant 00000000-0000-0000-0000-000000000000`). No tenant may ever take
-- that id, so no tenant's chain and the service's can mix.
SET LOCAL ROLE iim_owner;

ALTER TABLE iim.tenant ADD CONSTRAINT tenant_id_not_the_system_chain
    CHECK (id <> '00000000-0000-0000-0000-000000000000'::uuid);
