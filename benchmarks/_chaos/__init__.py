"""The alarm-path fault-injection harness behind ``python -m benchmarks.alarm_chaos`` (Jepsen-style).

Real processes (one embedded PostgreSQL, two ``iim serve`` sharing it), real peers (the FreeSWITCH
emulator's inbound ESL, the SMSC simulator, a webhook vendor cloud) behind TCP fault proxies, a seeded
fault schedule, a client that records every request as invoke/ok/fail/info, and a checker that reads
that history, the database and the switch's call log. ``history`` and ``checker`` are pure (unit-tested
on hand-written histories); the rest drives processes.
"""
