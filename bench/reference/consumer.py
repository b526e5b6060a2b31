#!/usr/bin/env python3
"""REFERENCE, NOT LAPSE: the straightforward Python consumer of issue 18.

What a team would write in an afternoon instead of lapse, kept as the yardstick
for lapse's throughput (`scripts/bench reference` runs both on the same events
and prints the ratio). It does much less than lapse: no decisions, no outputs,
no caps, no compact state; per event one idempotent Lua script (an unbounded
set of seen event ids and a hash of counts and latest times per customer),
pipelined per batch, offsets committed after the batch's writes.

    consumer.py --brokers HOST:PORT --redis redis://HOST:PORT/ --group G \
                --expect N [--schemas DIR] [--batch 5000]

Prints one JSON line: records, seconds (first record to last commit),
events_per_second, cpu_seconds (this process).
"""

import argparse
import glob
import io
import json
import os
import struct
import sys
import time

import fastavro
import redis
from confluent_kafka import Consumer, KafkaError

TOPICS = [
    "engagement.sends",
    "engagement.opens",
    "engagement.clicks",
    "engagement.replies",
    "clinic.visits",
]

# Applies one event once: the event id is remembered per customer; a repeat
# changes nothing.
APPLY = """
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[2] .. ':count', 1)
local last = tonumber(redis.call('HGET', KEYS[1], ARGV[2] .. ':last') or '0')
if tonumber(ARGV[3]) > last then redis.call('HSET', KEYS[1], ARGV[2] .. ':last', ARGV[3]) end
return 1
"""

# CRC-64-AVRO (Rabin), exactly as the Avro specification gives it.
EMPTY = 0xC15D213AA4D7A795
TABLE = []
for i in range(256):
    fp = i
    for _ in range(8):
        fp = (fp >> 1) ^ (EMPTY & -(fp & 1))
    TABLE.append(fp)


def rabin(data: bytes) -> int:
    fp = EMPTY
    for b in data:
        fp = (fp >> 8) ^ TABLE[(fp ^ b) & 0xFF]
    return fp


def schemas_by_fingerprint(directory):
    """Single-object header (C3 01 + fingerprint, little-endian) -> parsed schema."""
    out = {}
    for path in glob.glob(os.path.join(directory, "*.avsc")):
        with open(path, encoding="utf-8") as f:
            parsed = fastavro.parse_schema(json.load(f))
        canonical = fastavro.schema.to_parsing_canonical_form(parsed)
        header = b"\xc3\x01" + struct.pack("<Q", rabin(canonical.encode("utf-8")))
        out[header] = parsed
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--redis", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--expect", type=int, required=True)
    ap.add_argument("--schemas", default=os.path.join(os.path.dirname(__file__), "../../schemas"))
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()

    schemas = schemas_by_fingerprint(args.schemas)
    r = redis.Redis.from_url(args.redis)
    apply = r.register_script(APPLY)
    consumer = Consumer(
        {
            "bootstrap.servers": args.brokers,
            "group.id": args.group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe(TOPICS)
    seen, undecodable, first = 0, 0, None
    deadline = time.monotonic() + args.timeout
    cpu_start = None
    while seen < args.expect:
        if time.monotonic() > deadline:
            sys.exit(f"reference: {seen} of {args.expect} records in {args.timeout} s")
        msgs = consumer.consume(num_messages=args.batch, timeout=0.1)
        if not msgs:
            continue
        if first is None:
            first, cpu_start = time.monotonic(), time.process_time()
        pipe = r.pipeline(transaction=False)
        for m in msgs:
            if m.error():
                if m.error().code() != KafkaError._PARTITION_EOF:
                    sys.exit(f"reference: {m.error()}")
                continue
            seen += 1
            value = m.value()
            schema = schemas.get(value[:10])
            if schema is None:
                undecodable += 1
                continue
            ev = fastavro.schemaless_reader(io.BytesIO(value[10:]), schema, None)
            customer = f"{ev['tenant_id']}/{ev['customer_id']}"
            occurred = ev["occurred_at"]
            millis = occurred if isinstance(occurred, int) else int(occurred.timestamp() * 1000)
            apply(
                keys=[f"ref:{{{customer}}}:state", f"ref:{{{customer}}}:seen"],
                args=[ev["event_id"], m.topic(), millis],
                client=pipe,
            )
        pipe.execute()
        consumer.commit(asynchronous=False)
    seconds = time.monotonic() - first
    consumer.close()
    print(
        json.dumps(
            {
                "records": seen,
                "undecodable": undecodable,
                "seconds": seconds,
                "events_per_second": seen / seconds,
                "cpu_seconds": time.process_time() - cpu_start,
            }
        )
    )
    if undecodable:
        sys.exit(f"reference: {undecodable} records not decodable (unknown schema fingerprint)")


if __name__ == "__main__":
    main()
