#!/usr/bin/env python3
"""Records as independent producers write them, for tests/codec_interop.rs.

Every case is a writer schema the way a Python, Java or Go producer might
declare it (its own namespace or none, another union order, finer timestamps,
decimals, enum symbols lapse does not know, ...) and one record written with
it by fastavro. Nothing here uses lapse's code or schema files: the schemas are
the producer's own.

Prints one JSON object, case name -> {
    "kind":          lapse input kind (send, reply, visit),
    "key":           the Kafka key,
    "schema":        the writer schema as JSON text (as registered / filed),
    "body":          hex of the Avro datum (fastavro.schemaless_writer),
    "single_object": hex of C3 01 + CRC-64-AVRO fingerprint (little-endian) of
                     the Parsing Canonical Form (both computed by fastavro) + body,
    "references":    (optional) Confluent schema references of the schema,
}

Usage: encode_cases.py   (needs fastavro; run with the interop venv's python)
"""

import datetime
import decimal
import io
import json
import sys
import uuid

from fastavro import parse_schema, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

# The Rust test decodes with now = 1_750_000_000_000 ms; events are a minute older.
OCCURRED_AT_MS = 1_750_000_000_000 - 60_000
UTC = datetime.timezone.utc
OCCURRED_AT = datetime.datetime.fromtimestamp(OCCURRED_AT_MS // 1000, tz=UTC)

CHANNELS = ["WECHAT", "SMS", "PHONE", "EMAIL", "SOCIAL"]
NS = "com.clinic.events"

TS_MILLIS = {"type": "long", "logicalType": "timestamp-millis"}
TS_MICROS = {"type": "long", "logicalType": "timestamp-micros"}
TS_NANOS = {"type": "long", "logicalType": "timestamp-nanos"}
LOCAL_TS_MILLIS = {"type": "long", "logicalType": "local-timestamp-millis"}


def channel(symbols=None):
    return {"type": "enum", "name": "Channel", "symbols": symbols or CHANNELS}


def record(name, fields, namespace=NS):
    schema = {"type": "record", "name": name, "fields": fields}
    if namespace is not None:
        schema["namespace"] = namespace
    return schema


def field(name, ty, **extra):
    return {"name": name, "type": ty, **extra}


def send_fields(**types):
    """The fields of a send; `name=type` replaces a type, `name=None` drops it."""
    base = [
        ("event_id", "string"),
        ("tenant_id", "string"),
        ("customer_id", "string"),
        ("occurred_at", TS_MILLIS),
        ("channel", channel()),
        ("message_id", "string"),
        ("campaign_id", ["null", "string"]),
        ("purpose", {"type": "enum", "name": "Purpose", "symbols": ["MARKETING", "SERVICE"]}),
        ("cost", ["null", "long"]),
    ]
    out = []
    for name, ty in base:
        ty = types.get(name, ty)
        if ty is None:
            continue
        f = field(name, ty)
        if isinstance(ty, list) and ty[0] == "null":
            f["default"] = None
        out.append(f)
    return out


def send_value(**values):
    v = {
        "event_id": "evt-interop-1",
        "tenant_id": "glow",
        "customer_id": "cust-42",
        "occurred_at": OCCURRED_AT,
        "channel": "WECHAT",
        "message_id": "m1",
        "campaign_id": "spring",
        "purpose": "MARKETING",
        "cost": 12,
    }
    v.update(values)
    return v


def visit_schema(amount="long", visit_types=None, event_id="string"):
    return record(
        "Visit",
        [
            field("event_id", event_id),
            field("tenant_id", "string"),
            field("customer_id", "string"),
            field("occurred_at", TS_MILLIS),
            field(
                "visit_type",
                {
                    "type": "enum",
                    "name": "VisitType",
                    "symbols": visit_types or ["CONSULTATION", "TREATMENT", "FOLLOW_UP"],
                },
            ),
            field("treatment", ["null", "string"], default=None),
            field("amount", amount),
            field("currency", "string"),
        ],
    )


def visit_value(**values):
    v = {
        "event_id": "evt-interop-2",
        "tenant_id": "glow",
        "customer_id": "cust-42",
        "occurred_at": OCCURRED_AT,
        "visit_type": "TREATMENT",
        "treatment": "BOTOX",
        "amount": 380_000,
        "currency": "CNY",
    }
    v.update(values)
    return v


def decimal_bytes(precision, scale):
    return {"type": "bytes", "logicalType": "decimal", "precision": precision, "scale": scale}


def encode(kind, schema, value, named_schemas=None, references=None):
    named = {} if named_schemas is None else named_schemas
    parsed = parse_schema(schema, named_schemas=named)
    body = io.BytesIO()
    schemaless_writer(body, parsed, value)
    body = body.getvalue()
    case = {
        "kind": kind,
        "key": f"{value['tenant_id']}/{value['customer_id']}",
        "schema": json.dumps(schema),
        "body": body.hex(),
    }
    if references is None:
        canonical = to_parsing_canonical_form(schema)
        fp = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
        case["single_object"] = (b"\xc3\x01" + fp + body).hex()
    else:
        case["references"] = references
    return case


def cases():
    c = {}

    # 1. Timestamps in other units.
    c["timestamp_micros"] = encode(
        "send",
        record("Send", send_fields(occurred_at=TS_MICROS)),
        # 999 µs past the millisecond: lapse must floor, not round.
        send_value(occurred_at=OCCURRED_AT + datetime.timedelta(microseconds=999)),
    )
    c["timestamp_nanos"] = encode(
        "send",
        record("Send", send_fields(occurred_at=TS_NANOS)),
        send_value(occurred_at=OCCURRED_AT_MS * 1_000_000 + 999_999),
    )
    c["timestamp_plain_long"] = encode(
        "send",
        record("Send", send_fields(occurred_at="long")),
        send_value(occurred_at=OCCURRED_AT_MS),
    )
    c["local_timestamp_millis"] = encode(
        "send",
        record("Send", send_fields(occurred_at=LOCAL_TS_MILLIS)),
        send_value(occurred_at=OCCURRED_AT_MS),
    )

    # 2. Names: no namespace, another one, a renamed record.
    c["no_namespace"] = encode("send", record("Send", send_fields(), namespace=None), send_value())
    c["other_namespace"] = encode("send", record("Send", send_fields()), send_value())
    c["renamed"] = encode("send", record("MessageSent", send_fields()), send_value())

    # 3. Enum symbols lapse does not know.
    c["unknown_channel"] = encode(
        "send",
        record("Send", send_fields(channel=channel(CHANNELS + ["DOUYIN"]))),
        send_value(channel="DOUYIN"),
    )
    c["unknown_visit_type"] = encode(
        "visit",
        visit_schema(visit_types=["CONSULTATION", "TREATMENT", "FOLLOW_UP", "CHECKUP"]),
        visit_value(visit_type="CHECKUP"),
    )

    # 4. Unions in another order (no null default possible then).
    c["union_order"] = encode(
        "send",
        record("Send", send_fields(campaign_id=["string", "null"], cost=["long", "null"])),
        send_value(),
    )
    c["union_order_nulls"] = encode(
        "send",
        record("Send", send_fields(campaign_id=["string", "null"], cost=["long", "null"])),
        send_value(campaign_id=None, cost=None),
    )
    c["reply_union_order"] = encode(
        "reply",
        record(
            "Reply",
            [
                field("event_id", "string"),
                field("tenant_id", "string"),
                field("customer_id", "string"),
                field("occurred_at", TS_MILLIS),
                field("channel", channel()),
                field("message_id", ["string", "null"]),
                field("text", "string"),
            ],
        ),
        {
            "event_id": "evt-interop-3",
            "tenant_id": "glow",
            "customer_id": "cust-42",
            "occurred_at": OCCURRED_AT,
            "channel": "SMS",
            "message_id": "m2",
            "text": "退订",
        },
    )

    # 5. Amounts as a CRM exports them: decimals in major units, or text.
    c["amount_decimal_bytes"] = encode(
        "visit",
        visit_schema(amount=decimal_bytes(12, 2)),
        visit_value(amount=decimal.Decimal("3800.00")),
    )
    c["amount_decimal_fixed"] = encode(
        "visit",
        visit_schema(
            amount={
                "type": "fixed",
                "name": "Money",
                "size": 8,
                "logicalType": "decimal",
                "precision": 18,
                "scale": 2,
            }
        ),
        visit_value(amount=decimal.Decimal("1280.50")),
    )
    c["amount_decimal_jpy"] = encode(
        "visit",
        visit_schema(amount=decimal_bytes(12, 2)),
        visit_value(amount=decimal.Decimal("15000.00"), currency="JPY"),
    )
    c["amount_decimal_fraction"] = encode(
        "visit",
        visit_schema(amount=decimal_bytes(12, 4)),
        visit_value(amount=decimal.Decimal("12.3456")),
    )
    c["amount_string"] = encode(
        "visit",
        visit_schema(amount="string"),
        visit_value(amount="3800.00"),
    )

    # 6. A schema with Confluent references (the enum registered on its own).
    channel_schema = {"type": "enum", "name": "Channel", "namespace": NS, "symbols": CHANNELS}
    named = {}
    parse_schema(channel_schema, named_schemas=named)
    c["references"] = encode(
        "send",
        record("Send", send_fields(channel=f"{NS}.Channel")),
        send_value(),
        named_schemas=named,
        references=[{"name": f"{NS}.Channel", "subject": "channel", "version": 1}],
    )

    # Promotions and evolution: int -> long, uuid / bytes -> string, extra,
    # missing optional and reordered fields.
    c["visit_promotions"] = encode(
        "visit",
        visit_schema(amount="int", event_id={"type": "string", "logicalType": "uuid"}),
        visit_value(amount=380_000, event_id=uuid.UUID("0f8fad5b-d9cb-469f-a165-70867728950e")),
    )
    c["reply_bytes"] = encode(
        "reply",
        record(
            "Reply",
            [
                field("event_id", "string"),
                field("tenant_id", "string"),
                field("customer_id", "string"),
                field("occurred_at", TS_MILLIS),
                field("channel", channel()),
                field("message_id", ["null", "bytes"], default=None),
                field("text", "bytes"),
            ],
        ),
        {
            "event_id": "evt-interop-4",
            "tenant_id": "glow",
            "customer_id": "cust-42",
            "occurred_at": OCCURRED_AT,
            "channel": "SMS",
            "message_id": b"m2",
            "text": "退订".encode("utf-8"),
        },
    )
    fields = send_fields(campaign_id=None, cost=None)
    fields.reverse()
    fields.append(field("locale", "string"))
    fields.append(field("template_id", ["null", "string"], default=None))
    c["extra_and_missing_fields"] = encode(
        "send",
        record("Send", fields),
        send_value(locale="zh-CN", template_id="tpl-9"),
    )
    return c


if __name__ == "__main__":
    json.dump(cases(), sys.stdout, ensure_ascii=False, indent=1, sort_keys=True)
    sys.stdout.write("\n")
