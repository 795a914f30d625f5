-- iim.audit_heads: its current definition, last set by migration 0020_audit_heads_and_bounded_writers.sql.
--
-- The last (id, row_hash) of every tenant's audit chain, to be signed and published outside the database.
CREATE OR REPLACE FUNCTION iim.audit_heads() RETURNS TABLE (tenant_id uuid, id bigint, row_hash bytea)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
        -- A skip scan of the primary key (tenant_id, id): one probe per tenant, however long the chains.
        WITH RECURSIVE t (tenant_id) AS (
            (SELECT a.tenant_id FROM iim.audit_log a ORDER BY a.tenant_id LIMIT 1)
            UNION ALL
            SELECT (SELECT a.tenant_id FROM iim.audit_log a WHERE a.tenant_id > t.tenant_id
                     ORDER BY a.tenant_id LIMIT 1)
              FROM t WHERE t.tenant_id IS NOT NULL)
        SELECT t.tenant_id, h.id, h.row_hash
          FROM t CROSS JOIN LATERAL (SELECT a.id, a.row_hash FROM iim.audit_log a WHERE a.tenant_id = t.tenant_id
                                      ORDER BY a.id DESC LIMIT 1) h
         WHERE t.tenant_id IS NOT NULL
    $$;
