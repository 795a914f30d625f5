-- 0022: alert calls record when the switch accepted them; ended incidents are found by device and hazard.
--
-- A call is claimed (dispatched_at, committed) before its originate is sent, so nobody is dialled twice. A
-- process killed between the two left the call claimed and never placed: the owner was skipped and the
-- escalation moved on at the group's deadline. iim.incident_action.sent_at is now set once the switch accepted
-- the originate; a claimed call of a live incident with no sent_at and no outcome, claimed a while ago, is
-- taken over by any worker (iim.unsent_calls, cross-tenant, owned by iim_sweeper like iim.due_incidents),
-- which adopts it when the switch has it (the origination_uuid is the key) and else places it.
--
-- The re-arm rule (iim/scenarios/engine.py) reads the last ended incident of a device and hazard: indexed.

ALTER TABLE iim.incident_action ADD COLUMN sent_at timestamptz;
CREATE INDEX incident_action_unsent_idx ON iim.incident_action (dispatched_at)
    WHERE kind IN ('call', 'record') AND dispatched_at IS NOT NULL AND sent_at IS NULL AND finished_at IS NULL;
CREATE INDEX incident_device_hazard_ended_idx ON iim.incident (tenant_id, device_id, hazard, closed_at DESC)
    WHERE closed_at IS NOT NULL;

CREATE FUNCTION iim.unsent_calls(p_older interval, p_limit integer)
    RETURNS TABLE (tenant_id uuid, incident_id uuid, key text)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
AS $fn$
    SELECT a.tenant_id, a.incident_id, a.key FROM iim.incident_action a
      JOIN iim.incident i ON i.tenant_id = a.tenant_id AND i.id = a.incident_id
     WHERE a.kind IN ('call', 'record') AND a.dispatched_at IS NOT NULL AND a.sent_at IS NULL
       AND a.finished_at IS NULL AND a.dispatched_at < now() - p_older AND i.state = 'notifying'
     ORDER BY a.dispatched_at
     LIMIT least(greatest(p_limit, 1), 10000)
$fn$;
REVOKE ALL ON FUNCTION iim.unsent_calls(interval, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.unsent_calls(interval, integer) TO iim_app;

RESET ROLE;
GRANT SELECT ON iim.incident_action TO iim_sweeper;
CREATE POLICY sweeper_read ON iim.incident_action AS PERMISSIVE FOR SELECT TO iim_sweeper USING (true);
ALTER FUNCTION iim.unsent_calls(interval, integer) OWNER TO iim_sweeper;
SET LOCAL ROLE iim_owner;

-- ... and whether the device reported "cleared" since (the rule's other half).
CREATE INDEX device_event_cleared_idx ON iim.device_event (tenant_id, device_id, received_at) WHERE type = 'cleared';
