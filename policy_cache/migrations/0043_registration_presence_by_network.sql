-- 0043: a registration says "home" only when it means someone is home.
--
-- A fixed device (a kitchen speaker, a hub) is registered all day whether anyone is in or not, so only personal
-- identities speak for presence: an owner's or member's own sip_aor and wearables. iim.device.presence_hint
-- overrides that per device (NULL: by type; true: this device says where its person is; false: it never does).
--
-- Reachability is not location: a phone registered from a café is registered too. iim.household.home_networks
-- lists the household's own networks (CIDRs); a personal registration from inside one says "home", from outside
-- "away"; a household without any says nothing (its registrations make no claim).
--
-- iim.presence_claim.basis keeps why a claim says what it says ("from home network 192.0.2.0/24"), for the
-- presence view and explain-call.
--
-- kamailio.location_source gives the cache role what presence needs of the edge's registrations and no more:
-- username, domain, expires and the source address (the NAT-received address usrloc stored, else the Contact's
-- host), as an IP literal or NULL; never the contact, the path or the user agent. The column grant of 0038 on the
-- table itself is withdrawn: the view is the cache role's only window.

SET LOCAL ROLE iim_owner;

ALTER TABLE iim.device ADD COLUMN presence_hint boolean;
GRANT SELECT (presence_hint) ON iim.device TO iim_cache;

ALTER TABLE iim.household ADD COLUMN home_networks cidr[] NOT NULL DEFAULT '{}'
    CONSTRAINT household_home_networks_check
        CHECK (cardinality(home_networks) <= 32 AND array_position(home_networks, NULL) IS NULL);

ALTER TABLE iim.presence_claim ADD COLUMN basis text CHECK (length(basis) <= 300);

-- The first IP literal of received (sip:203.0.113.7:5060;transport=tcp), else of the contact
-- (sip:anna@192.0.2.10:5062;ob, sip:x@[2001:db8::1]:5060); a host name or a WebSocket's *.invalid: NULL.
CREATE VIEW kamailio.location_source AS
SELECT username, domain, expires,
       substring(coalesce(nullif(received, ''), contact)
                 FROM '^<?sips?:(?:[^@;>]*@)?(\[[0-9A-Fa-f:.]+\]|[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+)(?:[:;>]|$)')
           AS source_ip
FROM kamailio.location;

REVOKE SELECT (username, domain, expires) ON kamailio.location FROM iim_cache;
GRANT SELECT ON kamailio.location_source TO iim_cache;
