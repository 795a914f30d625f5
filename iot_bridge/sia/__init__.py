"""SIA DC-09 alarm-receiver input: a sans-I/O codec, the event-code map, the account lookup and the drivers."""
