-- 0040: hub commands listed per hub (newest first, by state) and purged under the tenant's retention.
--
-- A command row (0035) is the record of what an operator made a hub do and the key that makes a repeated
-- request idempotent; it is not kept for ever. The tenant's retention gets a hub_command_s column (null or no
-- row: the service's default, IIM_RETENTION_HUB_COMMAND_S), at least a day so that a client's retry of a
-- command never finds its id free again and sends it twice. iim.hub_command_purge deletes, across tenants, at
-- most p_limit commands sent longer ago than that, whatever their state, and returns how many per tenant (the
-- purge audits each tenant's count; the audit log keeps every send and answer). The listing's index serves
-- "a hub's commands, newest first" with a keyset cursor (sent_at, command_id).
SET LOCAL ROLE iim_owner;

ALTER TABLE iim.retention_policy
    ADD COLUMN hub_command_s integer CHECK (hub_command_s BETWEEN 86400 AND 315360000);

CREATE INDEX hub_command_newest ON iim.hub_command (tenant_id, device_id, sent_at DESC, command_id DESC);
CREATE INDEX hub_command_sent ON iim.hub_command (sent_at);

CREATE FUNCTION iim.hub_command_purge(p_keep_s integer, p_limit integer)
    RETURNS TABLE (tenant_id uuid, purged integer)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog
    AS $$
BEGIN
    IF p_keep_s IS NULL OR p_keep_s < 86400 THEN
        RAISE EXCEPTION 'hub_command_purge: hub commands are kept at least a day' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH gone AS (
        DELETE FROM iim.hub_command c
         WHERE (c.tenant_id, c.device_id, c.command_id) IN (
               SELECT q.tenant_id, q.device_id, q.command_id FROM iim.hub_command q
                 LEFT JOIN iim.retention_policy r ON r.tenant_id = q.tenant_id
                WHERE q.sent_at < now() - make_interval(secs => coalesce(r.hub_command_s, p_keep_s))
                LIMIT least(greatest(p_limit, 1), 10000) FOR UPDATE OF q SKIP LOCKED)
        RETURNING c.tenant_id)
    SELECT g.tenant_id, count(*)::integer FROM gone g GROUP BY g.tenant_id;
END
$$;

REVOKE ALL ON FUNCTION iim.hub_command_purge(integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iim.hub_command_purge(integer, integer) TO iim_app;

RESET ROLE;
GRANT SELECT, DELETE, UPDATE (state) ON iim.hub_command TO iim_sweeper;  -- UPDATE: FOR UPDATE SKIP LOCKED
CREATE POLICY sweeper_purge ON iim.hub_command AS PERMISSIVE FOR ALL TO iim_sweeper USING (true) WITH CHECK (true);
ALTER FUNCTION iim.hub_command_purge(integer, integer) OWNER TO iim_sweeper;
SET LOCAL ROLE iim_owner;
