-- 0013: a device is found by its external id through an index, and that id names one device per tenant.
--
-- The bridge identifies every signed event's device by (tenant, external_id) (iim.event_device, the hub
-- lookup of a gateway certificate). Households and subscribers have had UNIQUE (tenant_id, external_id)
-- since 0002; devices did not, so each lookup read every device of the tenant: measured in
-- benchmarks.event_to_originate at 1,800 devices, 0.47 ms of the 0.67 ms the lookup took, growing with the
-- tenant. Two devices with one external id were also ambiguous: the bridge could not tell whose key signs.
-- Duplicates already present stop the migration with the ids named, so an operator resolves them first.

-- As the superuser running the migration: the table's row-level security hides every tenant from iim_owner.
DO $$
DECLARE
    dup record;
BEGIN
    SELECT d.tenant_id, d.external_id, count(*) AS n INTO dup
      FROM iim.device d
     WHERE d.external_id IS NOT NULL
     GROUP BY d.tenant_id, d.external_id
    HAVING count(*) > 1
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'tenant % has % devices with external_id %', dup.tenant_id, dup.n, dup.external_id
            USING ERRCODE = 'unique_violation',
                  HINT = 'give each device its own external_id (or clear it), then migrate again';
    END IF;
END
$$;

SET LOCAL ROLE iim_owner;
ALTER TABLE iim.device ADD CONSTRAINT device_tenant_id_external_id_key UNIQUE (tenant_id, external_id);
