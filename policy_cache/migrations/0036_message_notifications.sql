-- 0036: a recorded message is announced through the household's cloud connectors too, beside its SMS.
--
-- One row per (message, connector): the first write claims the notification (state 'sending'), the send's outcome
-- settles it ('sent' or 'failed'). A retried announcement finds the row and sends nothing again, as the SMS
-- outbox's unique key does for the SMS; only a 'failed' row may be claimed again (a bounded number of attempts).
-- A 'sending' row left by a crash stays unsent: at most once, like the SMS read-aloud's claim. The rows go with
-- their message (retention, erasure).
SET LOCAL ROLE iim_owner;

CREATE TABLE iim.message_notification (
    tenant_id   uuid        NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    message_id  uuid        NOT NULL,
    connector   text        NOT NULL CHECK (connector ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    device_id   uuid        NOT NULL,
    state       text        NOT NULL CHECK (state IN ('sending', 'sent', 'failed')),
    attempts    integer     NOT NULL DEFAULT 1 CHECK (attempts >= 1),
    result      text        CHECK (length(result) <= 40),
    vendor_ref  text        CHECK (length(vendor_ref) <= 200),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, message_id, connector),
    FOREIGN KEY (tenant_id, message_id) REFERENCES iim.recorded_message (tenant_id, id) ON DELETE CASCADE
);
ALTER TABLE iim.message_notification ENABLE ROW LEVEL SECURITY;
ALTER TABLE iim.message_notification FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON iim.message_notification
    USING (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE, DELETE ON iim.message_notification TO iim_app;
