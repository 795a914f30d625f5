-- 0030: messages callers left for a household (the record_message fallback), so they can be announced and
-- fetched through a signed, expiring link.
--
-- One row per call. The audio is a file in IIM's recordings directory (file_name, never a path from a
-- caller); a row is kept only under the subscriber's call_recording consent, and is served until expires_at
-- (the retention IIM was configured with when the message was left).
SET LOCAL ROLE iim_owner;

CREATE TABLE iim.recorded_message (
    tenant_id     uuid        NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    id            uuid        NOT NULL DEFAULT gen_random_uuid(),
    call_uuid     text        NOT NULL CHECK (length(call_uuid) BETWEEN 1 AND 64),
    subscriber_id uuid        NOT NULL,
    caller        text        CHECK (length(caller) <= 64),
    file_name     text        NOT NULL CHECK (file_name ~ '^iim-[A-Za-z0-9-]{1,64}\.wav$'),
    duration_ms   integer     CHECK (duration_ms >= 0),
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT recorded_message_call_key UNIQUE (tenant_id, call_uuid),
    FOREIGN KEY (tenant_id, subscriber_id) REFERENCES iim.subscriber (tenant_id, id) ON DELETE CASCADE
);
ALTER TABLE iim.recorded_message ENABLE ROW LEVEL SECURITY;
ALTER TABLE iim.recorded_message FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON iim.recorded_message
    USING (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE, DELETE ON iim.recorded_message TO iim_app;
CREATE INDEX recorded_message_expiry ON iim.recorded_message (expires_at);
