"""Operator tools on incidents and alert paths: list and inspect incidents, acknowledge, close and reopen them,
and test calls and notifications (spec 9.1.6).

* ``models``   -- the request and response shapes (pydantic), shared by the admin API and its OpenAPI;
* ``store``    -- the SQL that reads incidents and their timeline, and counts test calls under the caps;
* ``timeline`` -- pure: one time-ordered list from the incident's events, actions, SMS and audit lines;
* ``desk``     -- :class:`~iim.scenarios.operator.desk.OperatorDesk`, the executor: reads, the operator's
  decisions (through the scenario worker, so a decision stops the escalation exactly as a key press does),
  test calls (guard, caps, originate, IVR) and test notifications.
"""
