-- 0038: the Kamailio edge's registrations in PostgreSQL (usrloc db_mode 1, write-through), and a word to IIM on
-- every change.
--
-- kamailio.location is usrloc's table as Kamailio 5.6 creates it (/usr/share/kamailio/postgres/usrloc-create.sql,
-- table version 9), in the edge's schema; kamailio.version holds the row usrloc checks at start. The edge writes
-- its registrations there as it takes them and reloads them when it starts: a restarted edge no longer forgets
-- every speaker until it re-registers.
--
-- iim_registrar: the login role usrloc writes with (the edge's UL_DB_URL). It may read, insert, update and delete
-- location rows and read the version table, nothing else; the auth role iim_kamailio stays read-only. Its
-- password is the operator's (ALTER ROLE iim_registrar PASSWORD ...), never a migration's.
--
-- A trigger notifies 'iim_registrar' with the AoR (username@domain) of every row written or deleted; IIM
-- (policy_cache/registrar_presence.py, as iim_cache: username, domain and expires only) re-reads that AoR and
-- turns "a live contact" into a registration presence claim. The trigger says which AoR, never what: a
-- notification lost while IIM was away is caught up by its reconcile from the table.

DO $role$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'iim_registrar') THEN
        CREATE ROLE iim_registrar LOGIN;
    END IF;
    ALTER ROLE iim_registrar LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO iim_registrar', current_database());
END
$role$;
-- usrloc names its tables without a schema: "location" and "version" resolve in kamailio.
ALTER ROLE iim_registrar SET search_path = kamailio;

SET LOCAL ROLE iim_owner;

CREATE TABLE kamailio.version (
    id SERIAL PRIMARY KEY NOT NULL,
    table_name VARCHAR(32) NOT NULL,
    table_version INTEGER DEFAULT 0 NOT NULL,
    CONSTRAINT version_table_name_idx UNIQUE (table_name)
);
INSERT INTO kamailio.version (table_name, table_version) VALUES ('version', 1), ('location', 9);

CREATE TABLE kamailio.location (
    id SERIAL PRIMARY KEY NOT NULL,
    ruid VARCHAR(64) DEFAULT '' NOT NULL,
    username VARCHAR(64) DEFAULT '' NOT NULL,
    domain VARCHAR(64) DEFAULT NULL,
    contact VARCHAR(512) DEFAULT '' NOT NULL,
    received VARCHAR(128) DEFAULT NULL,
    path VARCHAR(512) DEFAULT NULL,
    expires TIMESTAMP WITHOUT TIME ZONE DEFAULT '2030-05-28 21:32:15' NOT NULL,
    q REAL DEFAULT 1.0 NOT NULL,
    callid VARCHAR(255) DEFAULT 'Default-Call-ID' NOT NULL,
    cseq INTEGER DEFAULT 1 NOT NULL,
    last_modified TIMESTAMP WITHOUT TIME ZONE DEFAULT '2000-01-01 00:00:01' NOT NULL,
    flags INTEGER DEFAULT 0 NOT NULL,
    cflags INTEGER DEFAULT 0 NOT NULL,
    user_agent VARCHAR(255) DEFAULT '' NOT NULL,
    socket VARCHAR(64) DEFAULT NULL,
    methods INTEGER DEFAULT NULL,
    instance VARCHAR(255) DEFAULT NULL,
    reg_id INTEGER DEFAULT 0 NOT NULL,
    server_id INTEGER DEFAULT 0 NOT NULL,
    connection_id INTEGER DEFAULT 0 NOT NULL,
    keepalive INTEGER DEFAULT 0 NOT NULL,
    partition INTEGER DEFAULT 0 NOT NULL,
    CONSTRAINT location_ruid_idx UNIQUE (ruid)
);
CREATE INDEX location_account_contact_idx ON kamailio.location (username, domain, contact);
CREATE INDEX location_expires_idx ON kamailio.location (expires);
CREATE INDEX location_tcpcon_idx ON kamailio.location (connection_id);
CREATE INDEX location_connection_idx ON kamailio.location (server_id, connection_id);

-- Which AoR changed (both, should an UPDATE move a contact to another AoR). Invoker's rights: pg_notify needs none.
CREATE FUNCTION kamailio.location_notify() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog
    AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM pg_notify('iim_registrar', OLD.username || '@' || coalesce(OLD.domain, ''));
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM pg_notify('iim_registrar', NEW.username || '@' || coalesce(NEW.domain, ''));
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION kamailio.location_notify() FROM PUBLIC;
CREATE TRIGGER location_notify AFTER INSERT OR UPDATE OR DELETE ON kamailio.location
    FOR EACH ROW EXECUTE FUNCTION kamailio.location_notify();

GRANT USAGE ON SCHEMA kamailio TO iim_registrar;
GRANT SELECT, INSERT, UPDATE, DELETE ON kamailio.location TO iim_registrar;
GRANT USAGE ON SEQUENCE kamailio.location_id_seq TO iim_registrar;
GRANT SELECT ON kamailio.version TO iim_registrar;

-- IIM reads who is registered and until when; contacts, addresses and user agents stay the edge's.
GRANT USAGE ON SCHEMA kamailio TO iim_cache;
GRANT SELECT (username, domain, expires) ON kamailio.location TO iim_cache;
