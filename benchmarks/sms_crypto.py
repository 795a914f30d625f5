"""The cost sealing adds to the SMS path, in process (no database, no peers).

    python -m benchmarks.sms_crypto [--messages 20000]

Per message the hot path seals (queueing an MT, storing an MO) or opens (sending a claimed MT) one body with
a data key already unwrapped in the keyring's memory; a cache miss adds one unwrap (and a key row read, not
timed here). The last line is one JSON object: ``seal_us_160``/``open_us_160`` and ``seal_us_1600``/
``open_us_1600`` (medians in µs for a 160- and a 1600-character body), ``unwrap_us`` (a cache miss's crypto).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from uuid import uuid4

from iim.core.envelope import MasterKey, new_data_key_bytes


def _median_us(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e6, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    args = parser.parse_args()
    tenant = uuid4()
    master = MasterKey.from_bytes(new_data_key_bytes())
    wrapped = master.wrap(tenant, 1, new_data_key_bytes())
    key = master.unwrap(tenant, 1, wrapped)
    report: dict[str, object] = {"messages": args.messages}
    for label, body in (("160", "Пожар на кухне! " * 10), ("1600", "x" * 1600)):
        seal: list[float] = []
        opened: list[float] = []
        for n in range(args.messages):
            row = f"incident/{n}/sms/0"
            t0 = time.perf_counter()
            sealed = key.seal("sms_outbox", row, "body", body)
            t1 = time.perf_counter()
            assert key.open("sms_outbox", row, "body", sealed) == body
            t2 = time.perf_counter()
            seal.append(t1 - t0)
            opened.append(t2 - t1)
        report[f"seal_us_{label}"] = _median_us(seal)
        report[f"open_us_{label}"] = _median_us(opened)
    unwrap = []
    for _ in range(min(args.messages, 2000)):
        t0 = time.perf_counter()
        master.unwrap(tenant, 1, wrapped)
        unwrap.append(time.perf_counter() - t0)
    report["unwrap_us"] = _median_us(unwrap)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
