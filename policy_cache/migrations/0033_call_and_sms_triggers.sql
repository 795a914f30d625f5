-- 0033: incidents started by an incoming call or SMS (spec 9.1.2: triggers call / sms / IoT event).
--
-- Such an incident has no device: device_id is NULL, hazard names the trigger ('incoming_call',
-- 'incoming_sms') and sender holds the caller or SMS sender in E.164 (what a "sender" condition matched). The
-- composite foreign key to iim.device is MATCH SIMPLE, so a NULL device_id is simply not checked; the live
-- incident index per device and hazard ignores these rows (NULLs are distinct). Two indexes of their own:
--   * one live incident per household, trigger and sender: a child who calls twice while the first
--     announcement runs joins it instead of announcing again;
--   * the trigger's own reference (call uuid, SMS id) once per tenant: a redelivered SMS or a repeated
--     offer of the same call opens nothing more.
-- The SMS text is never stored here: the scenario is chosen before the row is written.
SET LOCAL ROLE iim_owner;

ALTER TABLE iim.incident ALTER COLUMN device_id DROP NOT NULL,
    ADD COLUMN sender text CHECK (sender IS NULL OR iim.is_e164(sender)),
    -- the device key covered the household too; without a device it needs its own
    ADD CONSTRAINT incident_household_fk FOREIGN KEY (tenant_id, household_id)
        REFERENCES iim.household (tenant_id, id) ON DELETE CASCADE,
    ADD CONSTRAINT incident_device_or_sender CHECK (
        (device_id IS NOT NULL AND sender IS NULL)
        OR (device_id IS NULL AND sender IS NOT NULL AND hazard IN ('incoming_call', 'incoming_sms')));

CREATE UNIQUE INDEX incident_live_sender_uq ON iim.incident (tenant_id, household_id, hazard, sender)
    WHERE device_id IS NULL AND state IN ('open', 'notifying');
CREATE UNIQUE INDEX incident_trigger_ref_uq ON iim.incident (tenant_id, first_event_id)
    WHERE device_id IS NULL;
