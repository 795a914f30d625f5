-- iim.link_state_take: its current definition, last set by migration 0039_link_tokens_envelope.sql.
--
-- The started linking whose state has this SHA-256, taken (deleted: a state is used once) from any
-- tenant: the OAuth2 callback knows no tenant. expired: it was past its expiry when taken. verifier_key: the
-- tenant's data key that sealed the code verifier (NULL: the old format, IIM_LINK_TOKEN_KEY_REF).
CREATE OR REPLACE FUNCTION iim.link_state_take(p_digest bytea)
    RETURNS TABLE (tenant_id uuid, id uuid, household_id uuid, connector text, verifier_sealed text,
                   verifier_key integer, scopes text[], actor text, expired boolean)
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
    DELETE FROM iim.link_state s WHERE s.state_digest = p_digest
    RETURNING s.tenant_id, s.id, s.household_id, s.connector, s.verifier_sealed, s.verifier_key, s.scopes, s.actor,
              s.expires_at <= now()
$$;
