-- iim.audit_canonical_v2: its current definition, last set by migration 0025_privacy_retention_and_erasure.sql.
CREATE OR REPLACE FUNCTION iim.audit_canonical_v2(p_tenant uuid, p_id bigint, p_at timestamp with time zone, p_actor text, p_action text, p_entity text, p_entity_id text, p_detail_digest bytea, p_correlation jsonb)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
 SET search_path TO 'pg_catalog'
AS $function$
    SELECT '{"action":' || to_json(p_action)::text
        || ',"actor":' || to_json(p_actor)::text
        || ',"at":' || to_json(to_char(p_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))::text
        || ',"correlation":' || p_correlation::text
        || ',"detail_sha256":' || to_json(encode(p_detail_digest, 'hex'))::text
        || ',"entity":' || to_json(p_entity)::text
        || ',"entity_id":' || coalesce(to_json(p_entity_id)::text, 'null')
        || ',"id":' || p_id::text
        || ',"tenant_id":' || to_json(p_tenant::text)::text
        || '}'
$function$
