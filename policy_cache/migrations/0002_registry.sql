-- 0002: the registry (spec §6): tenant -> brand/region -> household -> subscriber/device, bindings, consent,
-- policy, scenario, credential_ref.
--
-- Multi-tenancy rule: tenant_id is the first column of EVERY primary/unique key and of EVERY foreign key,
-- so a row can only ever reference rows of its own tenant, and a key collision in another tenant is
-- impossible (no existence oracle through duplicate-key errors). tenant_id defaults to the transaction's
-- tenant (iim.current_tenant()); RLS (0003) refuses any other value.

SET LOCAL ROLE iim_owner;

CREATE TYPE iim.device_type       AS ENUM ('speaker', 'hub', 'sensor', 'wearable', 'doorphone');
CREATE TYPE iim.device_capability AS ENUM ('sip', 'webrtc', 'cloud_announce', 'tts', 'display');
CREATE TYPE iim.device_status     AS ENUM ('online', 'offline', 'unknown');
CREATE TYPE iim.presence_state    AS ENUM ('home', 'away', 'unknown');
CREATE TYPE iim.binding_role      AS ENUM ('owner', 'member', 'backup_contact', 'security_service');
CREATE TYPE iim.consent_purpose   AS ENUM ('announce_calls', 'read_sms', 'health_events', 'presence',
                                           'call_recording', 'emergency_escalation');
CREATE TYPE iim.ring_mode         AS ENUM ('phone_only', 'home_only', 'simultaneous', 'phone_then_home',
                                           'home_then_phone');
CREATE TYPE iim.fallback_action   AS ENUM ('voicemail', 'record_message', 'missed_call_sms', 'none');
CREATE TYPE iim.credential_kind   AS ENUM ('oauth_token', 'api_key', 'sip_password', 'webhook_secret',
                                           'client_certificate', 'signing_key', 'other');

CREATE TABLE iim.tenant (
    id          uuid        PRIMARY KEY DEFAULT iim.current_tenant(),
    name        text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE iim.brand (
    tenant_id   uuid        NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    id          uuid        NOT NULL DEFAULT gen_random_uuid(),
    name        text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, name)
);

CREATE TABLE iim.region (
    tenant_id   uuid        NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    id          uuid        NOT NULL DEFAULT gen_random_uuid(),
    name        text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, name)
);

CREATE TABLE iim.household (
    tenant_id           uuid               NOT NULL DEFAULT iim.current_tenant()
                                           REFERENCES iim.tenant (id) ON DELETE CASCADE,
    id                  uuid               NOT NULL DEFAULT gen_random_uuid(),
    name                text               NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    brand_id            uuid,
    region_id           uuid,
    time_zone           text               NOT NULL CHECK (iim.is_iana_zone(time_zone)),
    presence            iim.presence_state NOT NULL DEFAULT 'unknown',
    presence_changed_at timestamptz        NOT NULL DEFAULT now(),
    external_id         text,
    created_at          timestamptz        NOT NULL DEFAULT now(),
    updated_at          timestamptz        NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, external_id),
    FOREIGN KEY (tenant_id, brand_id) REFERENCES iim.brand (tenant_id, id) ON DELETE SET NULL (brand_id),
    FOREIGN KEY (tenant_id, region_id) REFERENCES iim.region (tenant_id, id) ON DELETE SET NULL (region_id)
);

CREATE TABLE iim.subscriber (
    tenant_id     uuid        NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    id            uuid        NOT NULL DEFAULT gen_random_uuid(),
    msisdn        text        NOT NULL CHECK (iim.is_e164(msisdn)),
    sip_aor       text        CHECK (iim.is_sip_uri(sip_aor)),
    internal_id   text        CHECK (length(internal_id) BETWEEN 1 AND 200),
    external_id   text        CHECK (length(external_id) BETWEEN 1 AND 200),
    display_name  text        CHECK (length(display_name) <= 200),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, msisdn),
    UNIQUE (tenant_id, sip_aor),
    UNIQUE (tenant_id, internal_id),
    UNIQUE (tenant_id, external_id)
);

CREATE TABLE iim.credential_ref (
    tenant_id   uuid                NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    id          uuid                NOT NULL DEFAULT gen_random_uuid(),
    name        text                NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$'),
    kind        iim.credential_kind NOT NULL,
    -- A reference into a secret store, never the secret: env:NAME, file:/path, vault:path[#field], kms:key-id.
    ref         text                NOT NULL CHECK (ref ~ '^(env:[A-Za-z_][A-Za-z0-9_]*|file:/\S+|vault:[A-Za-z0-9_./-]+(#[A-Za-z0-9_.-]+)?|kms:\S+)$'),
    description text                CHECK (length(description) <= 500),
    rotated_at  timestamptz,
    created_at  timestamptz         NOT NULL DEFAULT now(),
    updated_at  timestamptz         NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, name)
);

CREATE TABLE iim.device (
    tenant_id          uuid                    NOT NULL DEFAULT iim.current_tenant()
                                               REFERENCES iim.tenant (id) ON DELETE CASCADE,
    id                 uuid                    NOT NULL DEFAULT gen_random_uuid(),
    household_id       uuid                    NOT NULL,
    name               text                    NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    type               iim.device_type         NOT NULL,
    vendor             text                    CHECK (length(vendor) BETWEEN 1 AND 100),
    model              text                    CHECK (length(model) BETWEEN 1 AND 100),
    external_id        text                    CHECK (length(external_id) BETWEEN 1 AND 200),
    capabilities       iim.device_capability[] NOT NULL DEFAULT '{}'
                                               CHECK (array_position(capabilities, NULL) IS NULL),
    -- Endpoint: a SIP AoR/contact the switch can bridge to, and/or a connector reference (cloud-to-cloud).
    sip_uri            text                    CHECK (iim.is_sip_uri(sip_uri)),
    connector          text                    CHECK (connector ~ '^[a-z][a-z0-9_-]{0,63}$'),
    connector_ref      text                    CHECK (length(connector_ref) BETWEEN 1 AND 500),
    credential_ref_id  uuid,
    status             iim.device_status       NOT NULL DEFAULT 'unknown',
    status_changed_at  timestamptz             NOT NULL DEFAULT now(),
    enabled            boolean                 NOT NULL DEFAULT true,
    created_at         timestamptz             NOT NULL DEFAULT now(),
    updated_at         timestamptz             NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, household_id, id),   -- target of binding's (household, device) FK
    UNIQUE (tenant_id, sip_uri),
    UNIQUE (tenant_id, connector, connector_ref),
    CHECK ((connector IS NULL) = (connector_ref IS NULL)),
    FOREIGN KEY (tenant_id, household_id) REFERENCES iim.household (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, credential_ref_id) REFERENCES iim.credential_ref (tenant_id, id)
);
-- Lookups by household use the (tenant_id, household_id, id) unique index.

-- A subscriber's place in a household. device_id NULL: the binding covers every device of the household;
-- device_id set: only that device (which must belong to the same household, enforced by the FK).
-- priority orders escalation (lower rings first).
CREATE TABLE iim.binding (
    tenant_id      uuid             NOT NULL DEFAULT iim.current_tenant()
                                    REFERENCES iim.tenant (id) ON DELETE CASCADE,
    id             uuid             NOT NULL DEFAULT gen_random_uuid(),
    subscriber_id  uuid             NOT NULL,
    household_id   uuid             NOT NULL,
    device_id      uuid,
    role           iim.binding_role NOT NULL,
    priority       smallint         NOT NULL DEFAULT 100 CHECK (priority BETWEEN 0 AND 1000),
    created_at     timestamptz      NOT NULL DEFAULT now(),
    updated_at     timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    UNIQUE NULLS NOT DISTINCT (tenant_id, subscriber_id, household_id, device_id),
    FOREIGN KEY (tenant_id, subscriber_id) REFERENCES iim.subscriber (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, household_id) REFERENCES iim.household (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, household_id, device_id) REFERENCES iim.device (tenant_id, household_id, id)
        ON DELETE CASCADE
);
CREATE INDEX binding_household_idx ON iim.binding (tenant_id, household_id);
CREATE INDEX binding_device_idx ON iim.binding (tenant_id, device_id) WHERE device_id IS NOT NULL;

CREATE TABLE iim.consent (
    tenant_id      uuid                NOT NULL DEFAULT iim.current_tenant()
                                       REFERENCES iim.tenant (id) ON DELETE CASCADE,
    id             uuid                NOT NULL DEFAULT gen_random_uuid(),
    subscriber_id  uuid                NOT NULL,
    purpose        iim.consent_purpose NOT NULL,
    scope          jsonb               NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(scope) = 'object'),
    granted_at     timestamptz         NOT NULL DEFAULT now(),
    expires_at     timestamptz,
    revoked_at     timestamptz,
    evidence       jsonb               NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(evidence) = 'object'),
    created_at     timestamptz         NOT NULL DEFAULT now(),
    updated_at     timestamptz         NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CHECK (expires_at IS NULL OR expires_at > granted_at),
    CHECK (revoked_at IS NULL OR revoked_at >= granted_at),
    FOREIGN KEY (tenant_id, subscriber_id) REFERENCES iim.subscriber (tenant_id, id) ON DELETE CASCADE
);
-- At most one unrevoked consent per subscriber and purpose (expiry is time-based, so not indexable).
CREATE UNIQUE INDEX consent_active_uq ON iim.consent (tenant_id, subscriber_id, purpose) WHERE revoked_at IS NULL;
CREATE INDEX consent_subscriber_idx ON iim.consent (tenant_id, subscriber_id);

-- Routing policy of a subscriber (overrides) or of a household (default for its members).
CREATE TABLE iim.policy (
    tenant_id               uuid                NOT NULL DEFAULT iim.current_tenant()
                                                REFERENCES iim.tenant (id) ON DELETE CASCADE,
    id                      uuid                NOT NULL DEFAULT gen_random_uuid(),
    subscriber_id           uuid,
    household_id            uuid,
    ring_mode               iim.ring_mode       NOT NULL DEFAULT 'phone_only',
    phone_timeout_s         smallint            NOT NULL DEFAULT 20 CHECK (phone_timeout_s BETWEEN 1 AND 300),
    home_timeout_s          smallint            NOT NULL DEFAULT 20 CHECK (home_timeout_s BETWEEN 1 AND 300),
    -- Quiet hours in the household's local time zone; start > end wraps midnight (23:00-07:00).
    quiet_start             time without time zone,
    quiet_end               time without time zone,
    dnd                     boolean             NOT NULL DEFAULT false,
    allowed_callers         text[]              NOT NULL DEFAULT '{}' CHECK (iim.all_e164(allowed_callers)),
    blocked_callers         text[]              NOT NULL DEFAULT '{}' CHECK (iim.all_e164(blocked_callers)),
    home_only_when_present  boolean             NOT NULL DEFAULT false,
    fallback                iim.fallback_action NOT NULL DEFAULT 'voicemail',
    version                 integer             NOT NULL DEFAULT 1,
    created_at              timestamptz         NOT NULL DEFAULT now(),
    updated_at              timestamptz         NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CHECK (num_nonnulls(subscriber_id, household_id) = 1),
    CHECK ((quiet_start IS NULL) = (quiet_end IS NULL)),
    CHECK (quiet_start IS NULL OR quiet_start <> quiet_end),
    FOREIGN KEY (tenant_id, subscriber_id) REFERENCES iim.subscriber (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, household_id) REFERENCES iim.household (tenant_id, id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX policy_subscriber_uq ON iim.policy (tenant_id, subscriber_id) WHERE subscriber_id IS NOT NULL;
CREATE UNIQUE INDEX policy_household_uq ON iim.policy (tenant_id, household_id) WHERE household_id IS NOT NULL;

-- Scenarios (trigger -> conditions -> steps); the scenarios work fills in the semantics of the JSON.
CREATE TABLE iim.scenario (
    tenant_id      uuid        NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    id             uuid        NOT NULL DEFAULT gen_random_uuid(),
    name           text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    household_id   uuid,
    subscriber_id  uuid,
    trigger        jsonb       NOT NULL CHECK (jsonb_typeof(trigger) = 'object'),
    conditions     jsonb       NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(conditions) = 'array'),
    steps          jsonb       NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(steps) = 'array'),
    enabled        boolean     NOT NULL DEFAULT false,
    version        integer     NOT NULL DEFAULT 1,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, name),
    FOREIGN KEY (tenant_id, household_id) REFERENCES iim.household (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, subscriber_id) REFERENCES iim.subscriber (tenant_id, id) ON DELETE CASCADE
);

-- Derived timestamps and versions are maintained here, so every writer (app, admin, psql) gets them.
CREATE FUNCTION iim.tg_device_status() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status AND NEW.status_changed_at IS NOT DISTINCT FROM OLD.status_changed_at THEN
        NEW.status_changed_at := now();
    END IF;
    RETURN NEW;
END
$$;

CREATE FUNCTION iim.tg_household_presence() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF NEW.presence IS DISTINCT FROM OLD.presence
       AND NEW.presence_changed_at IS NOT DISTINCT FROM OLD.presence_changed_at THEN
        NEW.presence_changed_at := now();
    END IF;
    RETURN NEW;
END
$$;

CREATE FUNCTION iim.tg_bump_version() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF NEW IS DISTINCT FROM OLD THEN
        NEW.version := OLD.version + 1;
    END IF;
    RETURN NEW;
END
$$;

-- BEFORE triggers fire in name order: a_* derive fields, then b_version, then z_touch sets updated_at.
CREATE TRIGGER a_status BEFORE UPDATE ON iim.device FOR EACH ROW EXECUTE FUNCTION iim.tg_device_status();
CREATE TRIGGER a_presence BEFORE UPDATE ON iim.household FOR EACH ROW EXECUTE FUNCTION iim.tg_household_presence();
CREATE TRIGGER b_version BEFORE UPDATE ON iim.policy FOR EACH ROW EXECUTE FUNCTION iim.tg_bump_version();
CREATE TRIGGER b_version BEFORE UPDATE ON iim.scenario FOR EACH ROW EXECUTE FUNCTION iim.tg_bump_version();

DO $touch$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['tenant', 'brand', 'region', 'household', 'subscriber', 'credential_ref', 'device',
                             'binding', 'consent', 'policy', 'scenario']
    LOOP
        EXECUTE format('CREATE TRIGGER z_touch BEFORE UPDATE ON iim.%I FOR EACH ROW EXECUTE FUNCTION iim.tg_touch()', t);
    END LOOP;
END
$touch$;
