"""Device supervision: a device silent past its heartbeat interval is itself an incident.

* ``watchdog`` - ``DeviceWatchdog``: a supervised task that finds silent devices (one indexed query per scan,
  every tenant, under a deadline) and opens each one's "offline" incident through the scenario engine's path.
* ``store``    - its statements (migration 0025: ``iim.silent_devices``, ``iim.device_silent``).

Being heard again, a low battery and a failed self-test are the bridge's part (``iot_bridge.intake``: every
accepted event marks its device heard, ``iim.device_heard``); the incidents run the ``device_health`` template.
"""
