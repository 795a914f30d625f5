-- 0019: toll fraud denied by default; a tenant's caps, numbering plan and allow-list are registry rows.
--
-- Before, iim.originate_limit.allowed_prefixes restricted alert calls only when set (empty: any number),
-- '{+7}' admitted the premium +7809, and the row was settable only by SQL. Now a number is admitted when
-- it starts with one of the tenant's country codes (country_codes; NULL: the service's default plan) or
-- one of its allow-list entries (iim.originate_allow, one row per number or prefix), and never in a
-- special range (premium, satellite, ...: fs_app/outreach/special_ranges.tsv) unless an allow-list entry
-- lies inside it. Both tables get ids, so the registry's generic CRUD (and its audit) serves them.
SET LOCAL ROLE iim_owner;

ALTER TABLE iim.originate_limit
    ADD COLUMN id            uuid        NOT NULL DEFAULT gen_random_uuid(),
    ADD COLUMN country_codes text[]      CHECK (cardinality(country_codes) <= 20
                                                AND array_position(country_codes, NULL) IS NULL
                                                AND array_to_string(country_codes, ',')
                                                    ~ '^(\+[1-9][0-9]{0,5}(,\+[1-9][0-9]{0,5})*)?$'),
    ADD COLUMN created_at    timestamptz NOT NULL DEFAULT now(),
    ADD CONSTRAINT originate_limit_id_key UNIQUE (id);

CREATE TABLE iim.originate_allow (
    tenant_id   uuid        NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    id          uuid        NOT NULL DEFAULT gen_random_uuid(),
    prefix      text        NOT NULL CHECK (prefix ~ '^\+[0-9]{1,15}$'),
    note        text        CHECK (length(note) <= 500),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, prefix)
);
ALTER TABLE iim.originate_allow ENABLE ROW LEVEL SECURITY;
ALTER TABLE iim.originate_allow FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON iim.originate_allow
    USING (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE, DELETE ON iim.originate_allow TO iim_app;
CREATE TRIGGER z_touch BEFORE UPDATE ON iim.originate_limit FOR EACH ROW EXECUTE FUNCTION iim.tg_touch();
CREATE TRIGGER z_touch BEFORE UPDATE ON iim.originate_allow FOR EACH ROW EXECUTE FUNCTION iim.tg_touch();

-- The old restriction is kept, now narrower: its prefixes become the allow-list and the plan is empty
-- (special ranges inside them are no longer admitted). A row without prefixes (any number) gets the
-- service's default plan. As the superuser running the migration: row-level security hides every tenant
-- from iim_owner.
RESET ROLE;
INSERT INTO iim.originate_allow (tenant_id, prefix, note)
SELECT l.tenant_id, p, 'allowed_prefixes before migration 0019'
  FROM iim.originate_limit l, unnest(l.allowed_prefixes) AS p
 WHERE p ~ '^\+[0-9]{1,15}$'
ON CONFLICT DO NOTHING;
UPDATE iim.originate_limit SET country_codes = '{}' WHERE cardinality(allowed_prefixes) > 0;
SET LOCAL ROLE iim_owner;
ALTER TABLE iim.originate_limit DROP COLUMN allowed_prefixes;
