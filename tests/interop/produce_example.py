"""README's Python example ("Producing to lapse"): one marketing send in Avro
single-object encoding with fastavro and confluent-kafka, no lapse code.
tests/interop.rs runs it against a broker and checks lapse applied the send.

    python produce_example.py BROKERS SCHEMAS_DIR OCCURRED_AT_MS
"""
# README-BEGIN
import io, json, sys
from confluent_kafka import Producer
from fastavro import parse_schema, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

brokers, schemas_dir, occurred_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
schema = json.load(open(f"{schemas_dir}/send.avsc"))
# Single-object header: C3 01 + CRC-64-AVRO of the Parsing Canonical Form (8 bytes, little-endian).
header = b"\xc3\x01" + bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))
parsed = parse_schema(schema)

def send(producer, topic, event):
    body = io.BytesIO()
    schemaless_writer(body, parsed, event)
    key = f"{event['tenant_id']}/{event['customer_id']}"  # lapse requires exactly tenant/customer
    producer.produce(topic, key=key, value=header + body.getvalue())

producer = Producer({"bootstrap.servers": brokers, "enable.idempotence": True})
send(producer, "engagement.sends", {
    "event_id": "crm-send-000042", "tenant_id": "glow-clinics", "customer_id": "c-0001",
    "occurred_at": occurred_at, "channel": "WECHAT", "message_id": "msg-42",
    "campaign_id": "spring-botox", "purpose": "MARKETING", "cost": None})
assert producer.flush(30) == 0, "not every record was delivered"
# README-END
