-- 0001: roles, the iim schema, the schema_version table and the helper functions used by CHECKs and RLS.
--
-- Runs as a superuser (the bootstrap/owner URL). Roles are cluster-wide: they are created when missing and
-- their safety-relevant attributes are re-asserted every time, so a pre-existing role cannot smuggle in
-- SUPERUSER/BYPASSRLS. No password is set here (secrets never live in migrations): bootstrap sets SCRAM
-- verifiers from credential references or a generated 0600 file.

DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'iim_owner') THEN
        CREATE ROLE iim_owner NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'iim_app') THEN
        CREATE ROLE iim_app LOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'iim_cache') THEN
        CREATE ROLE iim_cache LOGIN;
    END IF;
END
$roles$;

-- iim_owner owns every object; nobody logs in as it (migrations SET ROLE to it).
ALTER ROLE iim_owner NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT;
-- iim_app: the service's tenant-scoped role. Never owner, never bypasses RLS.
ALTER ROLE iim_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT;
-- iim_cache: read-only loader of the routing tables across tenants (through explicit SELECT-only policies).
ALTER ROLE iim_cache LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT;

-- Neither login role may act as the owner (membership would let it SET ROLE iim_owner and own the tables).
DO $membership$
DECLARE
    m record;
BEGIN
    FOR m IN
        SELECT r.rolname AS member, g.rolname AS grp
        FROM pg_catalog.pg_auth_members am
        JOIN pg_catalog.pg_roles r ON r.oid = am.member
        JOIN pg_catalog.pg_roles g ON g.oid = am.roleid
        WHERE r.rolname IN ('iim_app', 'iim_cache') AND g.rolname IN ('iim_owner', 'iim_app', 'iim_cache')
    LOOP
        EXECUTE format('REVOKE %I FROM %I', m.grp, m.member);
    END LOOP;
END
$membership$;

DO $connect$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO iim_app, iim_cache', current_database());
END
$connect$;

CREATE SCHEMA iim AUTHORIZATION iim_owner;
REVOKE ALL ON SCHEMA iim FROM PUBLIC;
GRANT USAGE ON SCHEMA iim TO iim_app, iim_cache;

SET LOCAL ROLE iim_owner;

-- Functions are not executable by PUBLIC unless granted explicitly.
ALTER DEFAULT PRIVILEGES FOR ROLE iim_owner IN SCHEMA iim REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
ALTER DEFAULT PRIVILEGES FOR ROLE iim_owner IN SCHEMA iim REVOKE ALL ON TABLES FROM PUBLIC;

CREATE TABLE iim.schema_version (
    version     integer     PRIMARY KEY CHECK (version > 0),
    name        text        NOT NULL,
    checksum    text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    applied_by  text        NOT NULL DEFAULT session_user
);
GRANT SELECT ON iim.schema_version TO iim_app, iim_cache;

-- The tenant of the current transaction (set by tenant_tx with set_config('app.tenant', ..., true)).
-- After a SET LOCAL ends the setting reads '' (not NULL), hence NULLIF: no tenant -> NULL -> no rows.
CREATE FUNCTION iim.current_tenant() RETURNS uuid
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT NULLIF(pg_catalog.current_setting('app.tenant', true), '')::uuid $$;

-- IANA zone names only ("Europe/Moscow", "UTC"): no abbreviations ("MSK") or POSIX strings ("UTC+3"),
-- and the server's tz database must know the name.
CREATE FUNCTION iim.is_iana_zone(tz text) RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
    AS $$
BEGIN
    IF tz !~ '^(UTC|[A-Z][A-Za-z_]+(/[A-Za-z0-9_+-]+)+)$' THEN
        RETURN false;
    END IF;
    PERFORM '2000-01-01 00:00:00+00'::timestamptz AT TIME ZONE tz;
    RETURN true;
EXCEPTION WHEN invalid_parameter_value THEN
    RETURN false;
END
$$;

CREATE FUNCTION iim.is_e164(n text) RETURNS boolean
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT n ~ '^\+[1-9][0-9]{6,14}$' $$;

-- plpgsql, not a SQL function over unnest(): that one cannot be inlined and costs ~5x more per row.
CREATE FUNCTION iim.all_e164(ns text[]) RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    AS $$
DECLARE
    n text;
BEGIN
    FOREACH n IN ARRAY coalesce(ns, '{}') LOOP
        IF n IS NULL OR n !~ '^\+[1-9][0-9]{6,14}$' THEN
            RETURN false;
        END IF;
    END LOOP;
    RETURN true;
END
$$;

CREATE FUNCTION iim.is_sip_uri(u text) RETURNS boolean
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT u ~ '^sips?:[^@\s:;]+@[A-Za-z0-9.-]+(:[0-9]{1,5})?(;[^\s]*)?$' $$;

-- CHECK constraints and column defaults run with the caller's privileges (EXECUTE is checked).
GRANT EXECUTE ON FUNCTION iim.current_tenant(), iim.is_iana_zone(text), iim.is_e164(text),
    iim.all_e164(text[]), iim.is_sip_uri(text) TO iim_app, iim_cache;

-- BEFORE UPDATE helper: bump updated_at only when something else changed (a no-op UPDATE stays a no-op,
-- so it records no change_log row either).
CREATE FUNCTION iim.tg_touch() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF NEW IS DISTINCT FROM OLD THEN
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;
