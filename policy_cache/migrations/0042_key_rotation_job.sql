-- 0042: a tenant's data-key rotation job, kept in the database so that it survives a restart of the service
-- running it: the service resumes every job still 'running' at start (iim.keys_api.KeyRotations), and its state
-- and progress are readable by any instance (GET /v1/keys, iim keys status).
--
-- At most one running job per tenant (a second start answers the running one). from_key_id is the tenant's
-- active data key when the job started: a job resumed without a key_id knows from it whether its new key was
-- already created (then it only re-seals, never makes a second key). resealed counts rows by table, written after
-- each batch; runs counts the times a service took the job up (more than one: it was resumed). A tenant table like the others: tenant first in every key, row-level security; iim_cache reads
-- which jobs are running, across tenants, to resume them (ids and state only).
SET LOCAL ROLE iim_owner;

CREATE TABLE iim.key_rotation_job (
    tenant_id    uuid        NOT NULL DEFAULT iim.current_tenant() REFERENCES iim.tenant (id) ON DELETE CASCADE,
    id           uuid        NOT NULL DEFAULT gen_random_uuid(),
    state        text        NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'done', 'failed')),
    actor        text        NOT NULL CHECK (length(actor) BETWEEN 1 AND 200),
    finish       boolean     NOT NULL,
    batch        integer     NOT NULL CHECK (batch BETWEEN 1 AND 5000),
    from_key_id  integer     CHECK (from_key_id >= 1),
    key_id       integer     CHECK (key_id >= 1),
    resealed     jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(resealed) = 'object'),
    unreadable   integer     NOT NULL DEFAULT 0 CHECK (unreadable >= 0),
    runs         integer     NOT NULL DEFAULT 0 CHECK (runs >= 0),
    error        text        CHECK (length(error) <= 500),
    started_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    PRIMARY KEY (tenant_id, id),
    CHECK ((finished_at IS NULL) = (state = 'running'))
);
CREATE UNIQUE INDEX key_rotation_job_running_uq ON iim.key_rotation_job (tenant_id) WHERE state = 'running';
CREATE INDEX key_rotation_job_started_idx ON iim.key_rotation_job (tenant_id, started_at DESC);
ALTER TABLE iim.key_rotation_job ENABLE ROW LEVEL SECURITY;
ALTER TABLE iim.key_rotation_job FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON iim.key_rotation_job
    USING (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE ON iim.key_rotation_job TO iim_app;
GRANT SELECT (tenant_id, id, state) ON iim.key_rotation_job TO iim_cache;
CREATE POLICY cache_read_running ON iim.key_rotation_job AS PERMISSIVE FOR SELECT TO iim_cache USING (state = 'running');
