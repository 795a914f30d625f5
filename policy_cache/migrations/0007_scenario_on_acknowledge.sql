-- 0007: what a scenario does once a person acknowledges the alarm (notifications and SMS, all at once),
-- stored beside its steps. The meaning of the JSON is scenarios.model (AckStep).

SET LOCAL ROLE iim_owner;

ALTER TABLE iim.scenario
    ADD COLUMN on_acknowledge jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(on_acknowledge) = 'array');
