-- 0029: a device capability for doorphones that open on a DTMF key sent to their call.
--
-- A doorphone alarm bridges whoever answers to the door's SIP endpoint. The answerer's keys reach the door leg
-- (RFC 2833) only when its record says it opens that way ('dtmf_open'); otherwise they are filtered out of the
-- bridge (deny by default: a key pressed at a door that does not expect it is noise, or worse).
SET LOCAL ROLE iim_owner;

ALTER TYPE iim.device_capability ADD VALUE IF NOT EXISTS 'dtmf_open';
