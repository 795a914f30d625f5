-- 0039: account-link tokens under the per-tenant envelope.
--
-- The access and refresh tokens of iim.account_link and the PKCE code verifier of iim.link_state were sealed
-- with one process-wide key (IIM_LINK_TOKEN_KEY_REF). They are now sealed like every other secret at rest: with
-- the tenant's data key (iim.tenant_data_key, 0028), bound to tenant, table, row and column. Each sealed column
-- gets the id of the data key that sealed it beside it, as the SMS bodies have (body_key), so a key rotation
-- finds and re-seals them. A sealed value with a NULL key is still in the old format: a migration cannot open
-- it (the old key is not in the database), so the service re-seals such rows at start (or `iim keys rotate`
-- does) while IIM_LINK_TOKEN_KEY_REF is still given; iim.link_secrets_legacy says, across tenants, which
-- tenants still have any (counts only), so a service without the old key refuses to start rather than
-- breaking those links one by one.
SET LOCAL ROLE iim_owner;

ALTER TABLE iim.account_link
    ADD COLUMN access_token_key integer,
    ADD COLUMN refresh_token_key integer,
    ADD CONSTRAINT account_link_access_token_key_fkey
        FOREIGN KEY (tenant_id, access_token_key) REFERENCES iim.tenant_data_key (tenant_id, key_id),
    ADD CONSTRAINT account_link_refresh_token_key_fkey
        FOREIGN KEY (tenant_id, refresh_token_key) REFERENCES iim.tenant_data_key (tenant_id, key_id),
    -- A key id names the key of a value that is there (dropping a token drops its key id too).
    ADD CONSTRAINT account_link_token_keys_with_tokens CHECK (
        (access_token_key IS NULL OR access_token_sealed IS NOT NULL)
        AND (refresh_token_key IS NULL OR refresh_token_sealed IS NOT NULL));

ALTER TABLE iim.link_state
    ADD COLUMN verifier_key integer,
    ADD CONSTRAINT link_state_verifier_key_fkey
        FOREIGN KEY (tenant_id, verifier_key) REFERENCES iim.tenant_data_key (tenant_id, key_id);
-- A key rotation re-seals a started linking's verifier in place (nothing else of the row ever changes).
GRANT UPDATE (verifier_sealed, verifier_key) ON iim.link_state TO iim_app;

-- The callback takes its started linking across tenants: it needs the verifier's key id too.
DROP FUNCTION iim.link_state_take(bytea);
CREATE FUNCTION iim.link_state_take(p_digest bytea)
    RETURNS TABLE (tenant_id uuid, id uuid, household_id uuid, connector text, verifier_sealed text,
                   verifier_key integer, scopes text[], actor text, expired boolean)
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
    DELETE FROM iim.link_state s WHERE s.state_digest = p_digest
    RETURNING s.tenant_id, s.id, s.household_id, s.connector, s.verifier_sealed, s.verifier_key, s.scopes, s.actor,
              s.expires_at <= now()
$$;
REVOKE ALL ON FUNCTION iim.link_state_take(bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.link_state_take(bytea) TO iim_app;

-- Tenants whose link tokens (links) or started linkings (states) are still sealed in the old format (counts
-- only; read through the owner's policies of 0032).
CREATE FUNCTION iim.link_secrets_legacy()
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
REVOKE ALL ON FUNCTION iim.link_secrets_legacy() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.link_secrets_legacy() TO iim_app;
