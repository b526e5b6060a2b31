#!/usr/bin/env python3
"""An independent Kafka client for lapse, written with the standard Python tools
only: confluent-kafka (librdkafka, and its Schema Registry Avro serializer) and
fastavro. Nothing here comes from lapse, so it shows how a Python team feeds
lapse and reads what it emits; lapse's interop tests (tests/interop.rs) drive it.

Two subcommands:

  produce  Encode input events and produce them to lapse's input topics.
           Events come from a JSON file: a list of
             {"kind": "send|open|click|reply|visit|feedback", "key": "TENANT/CUSTOMER",
              "value": {...Avro record as JSON: enums as strings, nulls as null,
                        timestamps as epoch milliseconds...},
              "corrupt": null | "garbage" | "empty" | "unknown_schema",
              "writer": null | "older" | "newer"}
           `writer` encodes a good record with another version of the schema
           file (schema evolution): "older" without the file's optional
           (null-defaulted) fields, "newer" with one more optional field,
           `survey_id`; the record's value must match that version.
           `corrupt` makes a deliberately bad record (for the dead-letter topic):
           "garbage" is bytes that are not Avro in any framing, "empty" an empty
           value, "unknown_schema" a valid record written with a schema lapse
           cannot know (single-object: a newer writer schema whose fingerprint is
           not in lapse's schemas directory; Confluent: a schema id the registry
           never issued).
           --framing single-object: Avro single-object encoding, C3 01 + the
             8-byte little-endian CRC-64-AVRO fingerprint of the schema's Parsing
             Canonical Form + the Avro binary body (no registry needed).
           --framing confluent: Confluent Schema Registry framing (00 + 4-byte
             schema id + body) by confluent_kafka's AvroSerializer, which
             registers the schema under the subject `<topic>-value`.
           Prints a JSON summary: where every record went (topic, partition,
           offset) and the schema ids or fingerprints used.

  consume  Read topics from the beginning to their current end and decode every
           record by its framing: single-object records by matching the
           fingerprint against the schemas directory (fastavro), Confluent records
           (first byte 0) with confluent_kafka's AvroDeserializer and the
           registry. Dead-letter topics (--dlq) are not decoded: their headers
           say why and where each record came from. Prints a JSON summary:
           the records per topic and every record that could not be decoded, with
           the reason.

Exit status: 0 when everything was produced (produce) or read (consume); records
that fail to decode are reported in the summary, not by the exit status.
"""

import argparse
import datetime
import io
import json
import pathlib
import sys
import time
import uuid

import fastavro
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

# lapse's default topics (`lapse check-config` prints the effective ones) and the
# schema file of each input kind.
INPUT_TOPICS = {
    "send": "engagement.sends",
    "open": "engagement.opens",
    "click": "engagement.clicks",
    "reply": "engagement.replies",
    "visit": "clinic.visits",
    "feedback": "clinic.feedback",
}
SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = 0
# A schema id no registry issued in these tests (for the "unknown_schema" record).
UNKNOWN_SCHEMA_ID = 999_999


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# --- Avro helpers (fastavro) -------------------------------------------------


def load_schema_file(path):
    """(schema as JSON text, parsed schema) of an .avsc file."""
    text = pathlib.Path(path).read_text(encoding="utf-8")
    return text, fastavro.parse_schema(json.loads(text))


def single_object_fingerprint(schema):
    """The 8 bytes after C3 01: CRC-64-AVRO of the Parsing Canonical Form.

    fastavro returns the fingerprint as hex of the little-endian bytes, which is
    the byte order the Avro specification (and Java's SchemaNormalization) puts
    on the wire.
    """
    canonical = fastavro.schema.to_parsing_canonical_form(schema)
    return bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))


def avro_body(parsed_schema, record):
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed_schema, record)
    return buf.getvalue()


def single_object(parsed_schema, fingerprint, record):
    return SINGLE_OBJECT_MAGIC + fingerprint + avro_body(parsed_schema, record)


def newer_writer_schema(schema_json):
    """The schema with one more optional field: what a producer that upgraded
    its schema without telling the consumer would write."""
    schema = json.loads(schema_json)
    schema["fields"].append({"name": "utm_source", "type": ["null", "string"], "default": None})
    return schema


def older_writer_schema(schema_json):
    """The schema without its optional (null-defaulted) fields: a producer
    still on a version from before they were added."""
    schema = json.loads(schema_json)
    schema["fields"] = [f for f in schema["fields"] if not ("default" in f and f["default"] is None)]
    return schema


def writer_version(schema, writer):
    """The schema entry (text, parsed, fingerprint) of writer version `writer`."""
    if writer is None:
        return schema
    if writer == "older":
        doc = older_writer_schema(schema["text"])
    elif writer == "newer":
        doc = json.loads(schema["text"])
        doc["fields"].append({"name": "survey_id", "type": ["null", "string"], "default": None})
    else:
        sys.exit(f"unknown writer version {writer!r}")
    parsed = fastavro.parse_schema(doc)
    return {"text": json.dumps(doc), "parsed": parsed, "fingerprint": single_object_fingerprint(parsed)}


def to_json(value):
    """JSON for decoded Avro values (fastavro returns timestamp-millis as datetime)."""
    if isinstance(value, datetime.datetime):
        epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
        return (value - epoch) // datetime.timedelta(milliseconds=1)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


# --- produce -----------------------------------------------------------------


def encode(event, framing, schemas, serializers):
    """(value bytes, framing used) of one event from the events file."""
    kind, record, corrupt = event["kind"], event.get("value"), event.get("corrupt")
    writer = event.get("writer")
    schema = writer_version(schemas[kind], writer)
    if corrupt is None and framing == "single-object":
        return single_object(schema["parsed"], schema["fingerprint"], record), framing
    if corrupt is None:
        # AvroSerializer: 00 + schema id (registered under `<topic>-value`) + body.
        ctx = SerializationContext(INPUT_TOPICS[kind], MessageField.VALUE)
        if (kind, writer) not in serializers:
            serializers[(kind, writer)] = AvroSerializer(serializers["registry"], schema["text"])
        return serializers[(kind, writer)](record, ctx), framing
    if corrupt == "garbage":
        return "not Avro in any framing".encode(), "none"
    if corrupt == "empty":
        return b"", "none"
    if corrupt == "unknown_schema" and framing == "single-object":
        newer = fastavro.parse_schema(newer_writer_schema(schema["text"]))
        record = dict(record, utm_source="wechat-moments")
        return single_object(newer, single_object_fingerprint(newer), record), framing
    if corrupt == "unknown_schema":
        body = avro_body(schema["parsed"], record)
        return bytes([CONFLUENT_MAGIC]) + UNKNOWN_SCHEMA_ID.to_bytes(4, "big") + body, framing
    sys.exit(f"unknown corrupt kind {corrupt!r}")


def produce(args):
    schemas = {}
    for kind in INPUT_TOPICS:
        text, parsed = load_schema_file(pathlib.Path(args.schemas) / f"{kind}.avsc")
        schemas[kind] = {"text": text, "parsed": parsed, "fingerprint": single_object_fingerprint(parsed)}

    serializers = {}
    if args.framing == "confluent":
        if not args.registry:
            sys.exit("--framing confluent needs --registry")
        registry = SchemaRegistryClient({"url": args.registry})
        serializers["registry"] = registry
        for kind, s in schemas.items():
            # Registers the schema under `<topic>-value` (TopicNameStrategy) on first use.
            serializers[(kind, None)] = AvroSerializer(registry, s["text"])

    events = json.loads(pathlib.Path(args.events).read_text(encoding="utf-8"))
    config = {"bootstrap.servers": args.bootstrap, "linger.ms": 5, "message.timeout.ms": 30000}
    for prop in args.producer_property:
        key, sep, value = prop.partition("=")
        if not sep:
            sys.exit(f"--producer-property {prop!r}: expected KEY=VALUE")
        config[key] = value
    producer = Producer(config)
    produced = [None] * len(events)

    def delivered(index, topic, framing, event, payload):
        def callback(err, msg):
            produced[index] = {
                "index": index,
                "topic": topic,
                "key": event["key"],
                "event_id": (event.get("value") or {}).get("event_id"),
                "framing": framing,
                "corrupt": event.get("corrupt"),
                "payload_hex": payload.hex(),
                "schema_id": int.from_bytes(payload[1:5], "big") if framing == "confluent" else None,
                "partition": None if err else msg.partition(),
                "offset": None if err else msg.offset(),
                "error": str(err) if err else None,
            }

        return callback

    for index, event in enumerate(events):
        topic = INPUT_TOPICS[event["kind"]]
        payload, framing = encode(event, args.framing, schemas, serializers)
        while True:
            try:
                producer.produce(
                    topic,
                    key=event["key"].encode("utf-8"),
                    value=payload,
                    on_delivery=delivered(index, topic, framing, event, payload),
                )
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    left = producer.flush(60)
    if left:
        sys.exit(f"{left} records not delivered within 60 s")
    failed = [p for p in produced if p is None or p["error"]]
    if failed:
        sys.exit(f"delivery failed: {json.dumps(failed)}")

    summary = {
        "framing": args.framing,
        "produced": produced,
        "fingerprints": {s["parsed"]["name"]: s["fingerprint"].hex() for s in schemas.values()},
    }
    json.dump(summary, sys.stdout, ensure_ascii=False, default=to_json)
    print()


# --- consume -----------------------------------------------------------------


class Decoder:
    """Decodes a record value by its framing."""

    def __init__(self, schemas_dir, registry_url):
        self.by_fingerprint = {}
        for path in sorted(pathlib.Path(schemas_dir).glob("*.avsc")):
            _, parsed = load_schema_file(path)
            self.by_fingerprint[single_object_fingerprint(parsed)] = parsed
        self.registry = SchemaRegistryClient({"url": registry_url}) if registry_url else None
        self.deserializer = AvroDeserializer(self.registry) if self.registry else None

    def decode(self, topic, value, headers):
        """(framing, schema name, schema id or fingerprint, record); raises ValueError."""
        if not value:
            raise ValueError("empty value")
        if value[:2] == SINGLE_OBJECT_MAGIC:
            if len(value) < 10:
                raise ValueError(f"single-object record of {len(value)} bytes is shorter than its header")
            fingerprint = value[2:10]
            schema = self.by_fingerprint.get(fingerprint)
            if schema is None:
                known = ", ".join(f"{s['name']}={f.hex()}" for f, s in self.by_fingerprint.items())
                raise ValueError(f"single-object fingerprint {fingerprint.hex()} matches no schema file ({known})")
            body = io.BytesIO(value[10:])
            record = fastavro.schemaless_reader(body, schema, None)
            if body.tell() != len(value) - 10:
                raise ValueError(f"{len(value) - 10 - body.tell()} bytes left after the Avro body")
            return "single_object", schema["name"], fingerprint.hex(), record
        if value[0] == CONFLUENT_MAGIC:
            if self.deserializer is None:
                raise ValueError("Confluent-framed record but no --registry given")
            schema_id = int.from_bytes(value[1:5], "big")
            ctx = SerializationContext(topic, MessageField.VALUE, headers)
            record = self.deserializer(value, ctx)
            writer = fastavro.parse_schema(json.loads(self.registry.get_schema(schema_id).schema_str))
            return "confluent", writer["name"], schema_id, record
        raise ValueError(f"unknown framing: first bytes {value[:4].hex()}")


def read_topics(bootstrap, topics, timeout_s, idle_s):
    """Every record of `topics`, from the beginning to the end each partition had
    when called: {topic: [message, ...]} in (partition, offset) order.

    The end is the partition's high watermark; after reaching every end, reading
    goes on until nothing arrives for `idle_s` seconds, so records the broker
    handed out in the same batch are kept too (some Kafka-compatible brokers
    report a high watermark that does not count every record of the last batch).
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            # Only assign() is used (no group join, nothing committed); the group id is required anyway.
            "group.id": f"interop-reader-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 100,
        }
    )
    try:
        ends = {}
        for topic in topics:
            meta = consumer.list_topics(topic, timeout=10).topics[topic]
            if meta.error is not None:
                raise KafkaException(meta.error)
            for p in meta.partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                if high > low:
                    ends[(topic, p)] = high
        records = {topic: [] for topic in topics}
        if ends:
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for topic, p in ends])
        pending, deadline = dict(ends), time.monotonic() + timeout_s
        while ends and time.monotonic() < deadline:
            msg = consumer.poll(0.5 if pending else idle_s)
            if msg is None:
                if not pending:
                    break
                continue
            if msg.error():
                raise KafkaException(msg.error())
            records[msg.topic()].append(msg)
            tp = (msg.topic(), msg.partition())
            if tp in pending and msg.offset() + 1 >= pending[tp]:
                del pending[tp]
        if pending:
            raise TimeoutError(f"not read to their end within {timeout_s} s: {sorted(pending)}")
        return {t: sorted(msgs, key=lambda m: (m.partition(), m.offset())) for t, msgs in records.items()}
    finally:
        consumer.close()


def header_dict(msg):
    return {k: (v.decode("utf-8", "replace") if v is not None else None) for k, v in (msg.headers() or [])}


def consume(args):
    decoder = Decoder(args.schemas, args.registry)
    summary = {"topics": {}, "dlq": {}, "failures": []}
    read = read_topics(args.bootstrap, args.topic + args.dlq, args.timeout, args.idle)
    for topic in args.topic:
        out = []
        for msg in read[topic]:
            entry = {
                "partition": msg.partition(),
                "offset": msg.offset(),
                "key": msg.key().decode("utf-8", "replace") if msg.key() is not None else None,
                "headers": header_dict(msg),
            }
            try:
                framing, schema, schema_ref, record = decoder.decode(topic, msg.value(), msg.headers())
            except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the run
                error = f"{type(e).__name__}: {e}"
                value_hex = (msg.value() or b"")[:64].hex()
                summary["failures"].append(dict(entry, topic=topic, error=error, value_hex=value_hex))
                continue
            out.append(dict(entry, framing=framing, schema=schema, schema_ref=schema_ref, value=record))
        summary["topics"][topic] = {"count": len(out), "records": out}
    for topic in args.dlq:
        out = [
            {
                "partition": msg.partition(),
                "offset": msg.offset(),
                "key": msg.key().decode("utf-8", "replace") if msg.key() is not None else None,
                "headers": header_dict(msg),
                "payload_hex": msg.value().hex() if msg.value() is not None else None,
            }
            for msg in read[topic]
        ]
        summary["dlq"][topic] = {"count": len(out), "records": out}
    json.dump(summary, sys.stdout, ensure_ascii=False, default=to_json)
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("produce", help="encode and produce input events")
    p.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers, HOST:PORT")
    p.add_argument("--schemas", required=True, help="directory of lapse's .avsc files")
    p.add_argument("--framing", choices=["single-object", "confluent"], required=True)
    p.add_argument("--registry", help="Schema Registry URL (needed for --framing confluent)")
    p.add_argument("--events", required=True, help="JSON file: a list of events (see above)")
    p.add_argument(
        "--producer-property",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra librdkafka producer setting (repeatable), e.g. linger.ms=20",
    )
    p.set_defaults(run=produce)

    c = sub.add_parser("consume", help="read and decode lapse's output topics")
    c.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers, HOST:PORT")
    c.add_argument("--schemas", required=True, help="directory of lapse's .avsc files")
    c.add_argument("--registry", help="Schema Registry URL (for Confluent-framed records)")
    c.add_argument("--topic", action="append", default=[], help="a topic of Avro records (repeatable)")
    c.add_argument("--dlq", action="append", default=[], help="a dead-letter topic (repeatable)")
    c.add_argument("--timeout", type=float, default=30.0, help="seconds to read the topics to their end")
    c.add_argument("--idle", type=float, default=0.5, help="seconds without a record that mean the end was read")
    c.set_defaults(run=consume)

    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
