-- 0035: commands an operator sends to a local hub over MQTT (arm, disarm, silence, test, reboot), and the hub's
-- acknowledgement of each.
--
-- One row per command, keyed by the id the client chose (per hub): a repeat of the id is answered from this row
-- and publishes nothing new. The row is written in the transaction that publishes the command (QoS 1, the
-- broker's PUBACK awaited), so a command the broker did not take leaves no row and its id stays free for the
-- retry. The hub's acknowledgement ('{prefix}/{tenant}/{hub}/cmd-ack') moves state from 'sent' to 'accepted'
-- and then to one final state (done, failed, rejected), never back. Arguments are the validated, allow-listed
-- ones (no free text, no secrets). A registry table like the others: tenant first in every key, row-level
-- security; the hub's deletion takes its commands with it (the audit log keeps them).
SET LOCAL ROLE iim_owner;

CREATE TABLE iim.hub_command (
    tenant_id   uuid        NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    device_id   uuid        NOT NULL,
    command_id  text        NOT NULL CHECK (command_id ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$'),
    name        text        NOT NULL CHECK (name IN ('arm', 'disarm', 'silence', 'test', 'reboot')),
    arguments   jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(arguments) = 'object'
                                                        AND length(arguments::text) <= 2048),
    state       text        NOT NULL DEFAULT 'sent'
                            CHECK (state IN ('sent', 'accepted', 'done', 'failed', 'rejected')),
    actor       text        NOT NULL CHECK (length(actor) BETWEEN 1 AND 200),
    sent_at     timestamptz NOT NULL DEFAULT now(),
    acked_at    timestamptz,
    ack_detail  text        CHECK (length(ack_detail) <= 500),
    PRIMARY KEY (tenant_id, device_id, command_id),
    FOREIGN KEY (tenant_id, device_id) REFERENCES iim.device (tenant_id, id) ON DELETE CASCADE
);
ALTER TABLE iim.hub_command ENABLE ROW LEVEL SECURITY;
ALTER TABLE iim.hub_command FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON iim.hub_command
    USING (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE ON iim.hub_command TO iim_app;
