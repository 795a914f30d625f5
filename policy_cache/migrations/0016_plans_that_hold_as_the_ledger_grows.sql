-- 0016: the alarm path's lookups by key use their primary keys even when planned on an empty table.
--
-- Each pooled connection plans a statement once and keeps the plan (plpgsql, the foreign-key checks).
-- On a table that has not been analyzed yet (a new deployment, a fresh database) every index whose first
-- column is tenant_id costs the same as the primary key, and the planner took a secondary one for:
--   * the foreign-key check of every action, outbox and ledger row on iim.incident (incident_state_idx),
--   * the intake's replay check on iim.device_event by event_id (device_event_incident_idx),
--   * iim.incident_action by key: recording an outcome, claiming a call (incident_action_incident_idx),
-- with tenant_id its only index condition: each lookup read every row of the tenant, and kept doing so as
-- the tables grew, until an ANALYZE replaced the plans. benchmarks.event_to_originate measured ~1,700
-- index entries read per alarm on iim.incident alone, after 2,000 alarms.
-- incident_state_idx served no query; the other two now lead with incident_id (a uuid: as selective, and
-- row-level security still filters the tenant), which keeps them for listing an incident's events and
-- actions and for the ON DELETE CASCADE of their foreign keys, without competing for lookups by key.
-- On a large ledger the two CREATE INDEX statements block writes to their tables while they build.

SET LOCAL ROLE iim_owner;

DROP INDEX iim.incident_state_idx;

DROP INDEX iim.device_event_incident_idx;
CREATE INDEX device_event_incident_idx ON iim.device_event (incident_id);

DROP INDEX iim.incident_action_incident_idx;
CREATE INDEX incident_action_incident_idx ON iim.incident_action (incident_id, step);
