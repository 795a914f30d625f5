-- iim.link_secrets_legacy: its current definition, last set by migration 0039_link_tokens_envelope.sql.
--
-- Tenants whose link tokens (links) or started linkings (states) are still sealed in the old format, with
-- IIM_LINK_TOKEN_KEY_REF rather than the tenant's data key (counts only): the service converts them at start,
-- or refuses to start without the old key.
CREATE OR REPLACE FUNCTION iim.link_secrets_legacy()
    RETURNS TABLE (tenant_id uuid, links bigint, states bigint)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
    SELECT x.tenant_id, count(*) FILTER (WHERE x.kind = 'link'), count(*) FILTER (WHERE x.kind = 'state')
    FROM (SELECT l.tenant_id, 'link' AS kind FROM iim.account_link l
           WHERE (l.access_token_sealed IS NOT NULL AND l.access_token_key IS NULL)
              OR (l.refresh_token_sealed IS NOT NULL AND l.refresh_token_key IS NULL)
          UNION ALL
          SELECT s.tenant_id, 'state' FROM iim.link_state s WHERE s.verifier_key IS NULL) x
    GROUP BY x.tenant_id ORDER BY x.tenant_id
$$;
