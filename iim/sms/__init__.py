"""SMS over SMPP (aiosmpplib) and an HTTP SMSC API: a PostgreSQL outbox, MO and delivery receipts.

* ``segments``  - GSM 03.38 / UCS-2 encoding, concatenation UDH, flash (pure).
* ``transport`` - the ``SmsTransport`` protocol, its typed failures, ``MoSms`` and ``Receipt``.
* ``smpp``      - the SMPP transceiver transport on aiosmpplib.
* ``http_smsc`` - the HTTP SMSC transport (signed JSON both ways).
* ``store``     - every statement on the SMS tables: ``enqueue_sms`` (the outbox's one writer), the sender's.
* ``outbox``    - ``SmsSender``: claim, submit, retry, receipts, MO, metrics.
* ``smsc_sim``  - an SMSC simulator on smpp34 for tests and benchmarks (not on the production path).
"""
