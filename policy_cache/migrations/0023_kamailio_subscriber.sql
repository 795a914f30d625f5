-- 0023: SIP credentials for speakers, read by the Kamailio edge (kamailio/) through one read-only view.
--
-- A device gets sip_ha1 = md5(user:domain:password) in hex, user and domain being those of its sip_uri (the
-- digest realm is the domain). The clear password is never stored; HA1 is still password-equivalent for that
-- realm, so iim_cache (which reads devices for routing) loses sight of the column; the API, the CLI and the
-- audit never show it (the record model excludes it from output).
--
-- iim_kamailio: a login role that can read the view kamailio.subscriber (username, domain, ha1: the columns
-- Kamailio's auth_db expects) and nothing else that matters. The view is security_invoker, so the role's own
-- SELECT-only policy on iim.device applies (iim_owner is subject to the tenants' RLS and would see nothing).
-- A username@domain claimed by devices of two tenants is left out of the view: no tenant can take over
-- another's identity by registering the same sip_uri. The role's password is the operator's
-- (ALTER ROLE iim_kamailio PASSWORD ...), never a migration's.

DO $role$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'iim_kamailio') THEN
        CREATE ROLE iim_kamailio LOGIN;
    END IF;
    ALTER ROLE iim_kamailio LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO iim_kamailio', current_database());
END
$role$;
-- auth_db names its table without a schema: "subscriber" resolves to the view.
ALTER ROLE iim_kamailio SET search_path = kamailio;
ALTER ROLE iim_kamailio SET default_transaction_read_only = on;

CREATE SCHEMA kamailio AUTHORIZATION iim_owner;
REVOKE ALL ON SCHEMA kamailio FROM PUBLIC;

SET LOCAL ROLE iim_owner;

ALTER TABLE iim.device ADD COLUMN sip_ha1 text CHECK (sip_ha1 ~ '^[0-9a-f]{32}$');
ALTER TABLE iim.device ADD CONSTRAINT device_sip_ha1_needs_sip_uri CHECK (sip_ha1 IS NULL OR sip_uri IS NOT NULL);

-- The cache reads every device column but the secret.
REVOKE SELECT ON iim.device FROM iim_cache;
GRANT SELECT (tenant_id, id, household_id, name, type, vendor, model, external_id, capabilities, sip_uri,
              connector, connector_ref, credential_ref_id, status, status_changed_at, enabled, created_at,
              updated_at)
    ON iim.device TO iim_cache;

GRANT USAGE ON SCHEMA iim, kamailio TO iim_kamailio;
GRANT SELECT (tenant_id, id, sip_uri, sip_ha1, enabled) ON iim.device TO iim_kamailio;
CREATE POLICY kamailio_read ON iim.device AS PERMISSIVE FOR SELECT TO iim_kamailio
    USING (enabled AND sip_ha1 IS NOT NULL);

-- Kamailio asks for one username@domain per authentication: an index on the same expressions.
CREATE INDEX device_sip_identity ON iim.device
    (substring(sip_uri FROM '^sips?:([^@;?]+)@'), lower(substring(sip_uri FROM '^sips?:[^@]+@([^;:?>]+)')))
    WHERE sip_ha1 IS NOT NULL;

CREATE VIEW kamailio.subscriber WITH (security_invoker = true) AS
SELECT substring(d.sip_uri FROM '^sips?:([^@;?]+)@') AS username,
       lower(substring(d.sip_uri FROM '^sips?:[^@]+@([^;:?>]+)')) AS domain,
       d.sip_ha1 AS ha1
FROM iim.device d
WHERE d.enabled AND d.sip_ha1 IS NOT NULL
  AND NOT EXISTS (
      SELECT 1 FROM iim.device o
      WHERE o.enabled AND o.sip_ha1 IS NOT NULL AND (o.tenant_id, o.id) <> (d.tenant_id, d.id)
        AND substring(o.sip_uri FROM '^sips?:([^@;?]+)@') = substring(d.sip_uri FROM '^sips?:([^@;?]+)@')
        AND lower(substring(o.sip_uri FROM '^sips?:[^@]+@([^;:?>]+)'))
            = lower(substring(d.sip_uri FROM '^sips?:[^@]+@([^;:?>]+)')));
GRANT SELECT ON kamailio.subscriber TO iim_kamailio;
