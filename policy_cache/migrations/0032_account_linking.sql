-- 0032: account linking. A household links its vendor account to a cloud connector (OAuth2 authorization code
-- with PKCE, RFC 6749 + RFC 7636 S256).
--
-- iim.link_state holds a started linking until the vendor redirects back: the state is stored only as its
-- SHA-256 (a database reader cannot complete someone's linking), the PKCE code verifier only sealed (AES-GCM,
-- bound to the tenant and the row), and the row is taken (deleted) by the callback, so a state is single use;
-- it expires. The callback does not know the tenant, so it takes the row through iim.link_state_take (security
-- definer; the digest is the only key it accepts).
-- iim.account_link is one household's link to one connector: the scopes the vendor granted (IIM's names, never
-- wider than the three IIM asks for), the access and refresh tokens sealed, when the access token expires (the
-- refresher renews before that), and what became of it (active, broken by the vendor's invalid_grant, revoked).
SET LOCAL ROLE iim_owner;

CREATE TYPE iim.link_status AS ENUM ('active', 'broken', 'revoked');

CREATE TABLE iim.link_state (
    tenant_id        uuid        NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    id               uuid        NOT NULL DEFAULT gen_random_uuid(),
    household_id     uuid        NOT NULL,
    connector        text        NOT NULL CHECK (connector ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    state_digest     bytea       NOT NULL CHECK (length(state_digest) = 32),
    verifier_sealed  text        NOT NULL CHECK (length(verifier_sealed) BETWEEN 1 AND 1000),
    scopes           text[]      NOT NULL CHECK (cardinality(scopes) BETWEEN 1 AND 3
                                                 AND scopes <@ ARRAY['read_events', 'send_notifications',
                                                                     'voice_interaction']),
    actor            text        NOT NULL CHECK (length(actor) BETWEEN 1 AND 200),
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    CONSTRAINT link_state_expires_after_created CHECK (expires_at > created_at),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT link_state_id_key UNIQUE (id),
    CONSTRAINT link_state_state_digest_key UNIQUE (state_digest),
    FOREIGN KEY (tenant_id, household_id) REFERENCES iim.household (tenant_id, id) ON DELETE CASCADE
);
ALTER TABLE iim.link_state ENABLE ROW LEVEL SECURITY;
ALTER TABLE iim.link_state FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON iim.link_state
    USING (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid);
-- Only for iim.link_state_take (security definer, runs as the owner): the callback knows no tenant.
CREATE POLICY link_state_take ON iim.link_state AS PERMISSIVE FOR ALL TO iim_owner USING (true) WITH CHECK (true);
GRANT SELECT, INSERT, DELETE ON iim.link_state TO iim_app;

CREATE TABLE iim.account_link (
    tenant_id             uuid            NOT NULL DEFAULT iim.current_tenant()
                                          REFERENCES iim.tenant (id) ON DELETE CASCADE,
    id                    uuid            NOT NULL DEFAULT gen_random_uuid(),
    household_id          uuid            NOT NULL,
    connector             text            NOT NULL CHECK (connector ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    status                iim.link_status NOT NULL DEFAULT 'active',
    scopes                text[]          NOT NULL CHECK (scopes <@ ARRAY['read_events', 'send_notifications',
                                                                          'voice_interaction']),
    access_token_sealed   text            CHECK (length(access_token_sealed) <= 20000),
    refresh_token_sealed  text            CHECK (length(refresh_token_sealed) <= 20000),
    access_expires_at     timestamptz,
    linked_at             timestamptz     NOT NULL DEFAULT now(),
    refreshed_at          timestamptz,
    changed_at            timestamptz     NOT NULL DEFAULT now(),
    actor                 text            NOT NULL CHECK (length(actor) BETWEEN 1 AND 200),
    reason                text            CHECK (length(reason) <= 500),
    -- Tokens exist only while the link is active: a broken or revoked link keeps its history, not its keys.
    CONSTRAINT account_link_tokens_only_when_active CHECK (
        status = 'active' OR (access_token_sealed IS NULL AND refresh_token_sealed IS NULL)),
    CONSTRAINT account_link_active_has_token CHECK (
        status <> 'active' OR (access_token_sealed IS NOT NULL AND access_expires_at IS NOT NULL)),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT account_link_id_key UNIQUE (id),
    CONSTRAINT account_link_household_id_connector_key UNIQUE (tenant_id, household_id, connector),
    FOREIGN KEY (tenant_id, household_id) REFERENCES iim.household (tenant_id, id) ON DELETE CASCADE
);
-- The refresher's scan: active links by expiry, all tenants.
CREATE INDEX account_link_due ON iim.account_link (access_expires_at) WHERE status = 'active';
ALTER TABLE iim.account_link ENABLE ROW LEVEL SECURITY;
ALTER TABLE iim.account_link FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON iim.account_link
    USING (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid);
CREATE POLICY account_link_due_scan ON iim.account_link AS PERMISSIVE FOR SELECT TO iim_owner USING (true);
GRANT SELECT, INSERT, UPDATE ON iim.account_link TO iim_app;

CREATE FUNCTION iim.link_state_take(p_digest bytea)
    RETURNS TABLE (tenant_id uuid, id uuid, household_id uuid, connector text, verifier_sealed text,
                   scopes text[], actor text, expired boolean)
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
    DELETE FROM iim.link_state s WHERE s.state_digest = p_digest
    RETURNING s.tenant_id, s.id, s.household_id, s.connector, s.verifier_sealed, s.scopes, s.actor,
              s.expires_at <= now()
$$;

CREATE FUNCTION iim.account_links_due(p_within interval, p_limit integer)
    RETURNS TABLE (tenant_id uuid, id uuid)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
    SELECT l.tenant_id, l.id FROM iim.account_link l
    WHERE l.status = 'active' AND l.access_expires_at <= now() + p_within
    ORDER BY l.access_expires_at
    LIMIT least(greatest(p_limit, 1), 1000)
$$;

REVOKE ALL ON FUNCTION iim.link_state_take(bytea), iim.account_links_due(interval, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.link_state_take(bytea), iim.account_links_due(interval, integer) TO iim_app;
