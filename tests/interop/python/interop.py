#!/usr/bin/env python3
"""orderflow interop client in Python: reads and writes orderflow's Kafka records with fastavro and
confluent-kafka only (no orderflow code). Same command line as the Java client
(tests/interop/java); see tests/interop/README.md.

  interop.py fingerprints --avro-dir DIR
  interop.py consume --bootstrap HOST:PORT --topic T --framing single-object|confluent
                     [--registry URL] --avro-dir DIR --count N --timeout-secs S [--group G]
  interop.py produce --bootstrap HOST:PORT --topic T --framing single-object|confluent
                     [--registry URL] --avro-dir DIR [--timeout-secs S]     (JSON lines on stdin)

Exit status: 0 done, 1 failure, 2 consume timed out before N records, 64 bad command line.
"""

import argparse
import datetime
import io
import json
import logging
import os
import struct
import sys
import time
import uuid

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

EXIT_FAILURE = 1
EXIT_TIMEOUT = 2
EXIT_USAGE = 64

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


class Failure(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


# --- schemas -------------------------------------------------------------------------------------


class SchemaFile:
    """One .avsc file, parsed by fastavro with its own table of named types."""

    def __init__(self, rel, text, current):
        self.rel = rel  # file name relative to the avro dir: X.avsc or history/X.avsc
        self.text = text  # the file as written
        self.current = current
        raw = json.loads(text)
        self.names = {}  # full name -> parsed named type, for references such as "orderflow.events.StockLevel"
        self.parsed = parse_schema(raw, named_schemas=self.names)
        self.full_name = self.parsed["name"]  # fastavro keeps full names
        self.pcf = to_parsing_canonical_form(raw)
        # fastavro's CRC-64-AVRO fingerprint is the hex of the 8 bytes in little-endian order,
        # i.e. the bytes as they appear in a single-object header; the unsigned 64-bit value
        # (Java's SchemaNormalization.parsingFingerprint64) is those bytes read little-endian.
        self.fp_bytes = bytes.fromhex(fingerprint(self.pcf, "CRC-64-AVRO"))
        self.fp = int.from_bytes(self.fp_bytes, "little")


class Catalog:
    """Every schema of DIR (current) and DIR/history (older writer schemas)."""

    def __init__(self, avro_dir):
        if not os.path.isdir(avro_dir):
            raise Failure(EXIT_FAILURE, f"--avro-dir {avro_dir} is not a directory")
        self.files = []
        self.current_by_full_name = {}
        self.current_by_any_name = {}
        self.by_fp = {}
        self._add_all(avro_dir, "", True)
        history = os.path.join(avro_dir, "history")
        if os.path.isdir(history):
            self._add_all(history, "history/", False)

    def _add_all(self, directory, prefix, current):
        names = sorted(
            n for n in os.listdir(directory)
            if n.endswith(".avsc") and os.path.isfile(os.path.join(directory, n))
        )
        for name in names:
            path = os.path.join(directory, name)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            try:
                sf = SchemaFile(prefix + name, text, current)
            except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
                raise Failure(EXIT_FAILURE, f"{path}: not a valid Avro schema: {e}") from e
            self.files.append(sf)
            self.by_fp.setdefault(sf.fp, sf)
            if current:
                if sf.full_name in self.current_by_full_name:
                    raise Failure(EXIT_FAILURE, f"two files in {directory} define {sf.full_name}")
                self.current_by_full_name[sf.full_name] = sf
                self.current_by_any_name[sf.full_name] = sf
                self.current_by_any_name[sf.full_name.rsplit(".", 1)[-1]] = sf
                self.current_by_any_name[name[: -len(".avsc")]] = sf

    def current(self, name):
        sf = self.current_by_any_name.get(name)
        if sf is None:
            raise ValueError(f"no schema '{name}' in the avro dir")
        return sf


# --- plain JSON <-> datum ------------------------------------------------------------------------
# The "plain" form (not Avro's JSON encoding): a record is an object with the Avro field names, a
# union is null or the plain value of its branch (no type wrapper), a timestamp-millis long is its
# integer milliseconds, an enum or string is a string, an array is an array, a map is an object,
# bytes and fixed are strings of ISO-8859-1 code points (as in Avro default values).


def _resolve(schema, names):
    if isinstance(schema, str) and schema not in _PRIMITIVES:
        return names[schema]
    return schema


def _type_of(schema):
    if isinstance(schema, str):
        return schema
    if isinstance(schema, list):
        return "union"
    return schema["type"]


def _to_millis(value, unit):
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return (value - _EPOCH) // datetime.timedelta(**{unit: 1})
    return value


def _branch_matches(schema, datum, names):
    """Whether a decoded datum belongs to a union branch (fastavro returns no branch index)."""
    t = _type_of(schema)
    if t == "null":
        return datum is None
    if t == "boolean":
        return isinstance(datum, bool)
    if t in ("int", "long"):
        return (isinstance(datum, int) and not isinstance(datum, bool)) or isinstance(
            datum, (datetime.datetime, datetime.date, datetime.time)
        )
    if t in ("float", "double"):
        return isinstance(datum, (float, int)) and not isinstance(datum, bool)
    if t in ("string", "enum"):
        return isinstance(datum, str)
    if t in ("bytes", "fixed"):
        return isinstance(datum, (bytes, bytearray))
    if t == "array":
        return isinstance(datum, list)
    if t in ("record", "error", "map"):
        return isinstance(datum, dict)
    return t in names and _branch_matches(names[t], datum, names)


def to_plain(schema, datum, names):
    """A datum as fastavro decodes it to the plain JSON form."""
    schema = _resolve(schema, names)
    t = _type_of(schema)
    if t == "union":
        for branch in schema:
            if _branch_matches(_resolve(branch, names), datum, names):
                return to_plain(branch, datum, names)
        raise ValueError(f"decoded value {datum!r} matches no branch of {schema}")
    if t in ("record", "error"):
        return {f["name"]: to_plain(f["type"], datum[f["name"]], names) for f in schema["fields"]}
    if t == "array":
        return [to_plain(schema["items"], item, names) for item in datum]
    if t == "map":
        return {k: to_plain(schema["values"], v, names) for k, v in datum.items()}
    if t in ("bytes", "fixed"):
        return bytes(datum).decode("latin-1")
    logical = schema.get("logicalType") if isinstance(schema, dict) else None
    if logical in ("timestamp-millis", "local-timestamp-millis"):
        return _to_millis(datum, "milliseconds")
    if logical in ("timestamp-micros", "local-timestamp-micros"):
        return _to_millis(datum, "microseconds")
    if logical == "date" and isinstance(datum, datetime.date):
        return (datum - datetime.date(1970, 1, 1)).days
    if isinstance(datum, uuid.UUID):
        return str(datum)
    return datum


def _mismatch(path, expected, value):
    return ValueError(f"{path}: expected {expected}, got {json.dumps(value)}")


def from_plain(schema, value, names, path):
    """The plain JSON form to a datum fastavro writes: a union takes null (when it has a null
    branch) or the first other branch the value converts to; a missing record field takes its
    default; an unknown field is an error."""
    schema = _resolve(schema, names)
    t = _type_of(schema)
    if t == "null":
        if value is None:
            return None
        raise _mismatch(path, "null", value)
    if t == "boolean":
        if isinstance(value, bool):
            return value
        raise _mismatch(path, "a boolean", value)
    if t in ("int", "long"):
        bits = 32 if t == "int" else 64
        if isinstance(value, int) and not isinstance(value, bool):
            if -(1 << (bits - 1)) <= value < (1 << (bits - 1)):
                return value
        raise _mismatch(path, f"a {bits}-bit integer", value)
    if t in ("float", "double"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _mismatch(path, "a number", value)
    if t == "string":
        if isinstance(value, str):
            return value
        raise _mismatch(path, "a string", value)
    if t == "enum":
        if isinstance(value, str) and value in schema["symbols"]:
            return value
        raise _mismatch(path, f"one of {schema['symbols']}", value)
    if t in ("bytes", "fixed"):
        if isinstance(value, str):
            try:
                b = value.encode("latin-1")
            except UnicodeEncodeError:
                raise ValueError(f"{path}: a bytes string may only hold U+0000..U+00FF") from None
            if t == "bytes" or len(b) == schema["size"]:
                return b
        raise _mismatch(path, "a string of bytes", value)
    if t == "array":
        if isinstance(value, list):
            return [from_plain(schema["items"], v, names, f"{path}[{i}]") for i, v in enumerate(value)]
        raise _mismatch(path, "an array", value)
    if t == "map":
        if isinstance(value, dict):
            return {k: from_plain(schema["values"], v, names, f"{path}.{k}") for k, v in value.items()}
        raise _mismatch(path, "an object (map)", value)
    if t == "union":
        failures = []
        for branch in schema:
            if _type_of(branch) == "null":
                if value is None:
                    return None
                continue
            if value is None:
                continue
            try:
                return from_plain(branch, value, names, path)
            except ValueError as e:
                failures.append(str(e))
        raise ValueError(f"{path}: no branch of union {json.dumps(schema)} accepts {json.dumps(value)} {failures}")
    if t in ("record", "error"):
        if not isinstance(value, dict):
            raise _mismatch(path, f"an object (record {schema['name']})", value)
        out = {}
        known = set()
        for field in schema["fields"]:
            name = field["name"]
            known.add(name)
            if name in value:
                out[name] = from_plain(field["type"], value[name], names, f"{path}.{name}")
            elif "default" in field:
                out[name] = from_plain(field["type"], field["default"], names, f"{path}.{name}")
            else:
                raise ValueError(f"{path}.{name}: missing, and the field has no default")
        for name in value:
            if name not in known:
                raise ValueError(f"{path}.{name}: no such field in {schema['name']}")
        return out
    raise ValueError(f"{path}: unsupported Avro type {t}")


# --- schema registry -----------------------------------------------------------------------------


class Registry:
    """Confluent-compatible schema registry (e.g. Apicurio's ccompat API), through
    confluent_kafka.schema_registry."""

    def __init__(self, url):
        from confluent_kafka.schema_registry import SchemaRegistryClient

        self.client = SchemaRegistryClient({"url": url.rstrip("/")})
        self._writers = {}  # schema id -> (parsed writer schema, its named types)
        self._serializers = {}

    def writer(self, schema_id):
        """The writer schema of an id: GET /schemas/ids/{id}."""
        if schema_id not in self._writers:
            schema = self.client.get_schema(schema_id)
            names = {}
            parsed = parse_schema(json.loads(schema.schema_str), named_schemas=names)
            self._writers[schema_id] = (parsed, names)
        return self._writers[schema_id]

    def serializer(self, sf):
        """confluent-kafka's AvroSerializer for a current schema: registers the schema file's text
        under <topic>-<record full name> (TopicRecordNameStrategy) on first use."""
        from confluent_kafka.schema_registry import topic_record_subject_name_strategy
        from confluent_kafka.schema_registry.avro import AvroSerializer

        if sf.full_name not in self._serializers:
            self._serializers[sf.full_name] = AvroSerializer(
                self.client,
                sf.text,
                conf={
                    "auto.register.schemas": True,
                    "subject.name.strategy": topic_record_subject_name_strategy,
                },
            )
        return self._serializers[sf.full_name]


# --- consume -------------------------------------------------------------------------------------


class ValueDecoder:
    def __init__(self, catalog, framing, registry_url):
        self.catalog = catalog
        self.registry = Registry(registry_url) if framing == "confluent" else None

    def decode(self, value):
        """(reader SchemaFile, decoded datum) of a record value."""
        if value is None:
            raise ValueError("the record has no value (tombstone)")
        if self.registry is None:
            return self._single_object(value)
        return self._confluent(value)

    def _single_object(self, value):
        if len(value) < 10 or value[:2] != SINGLE_OBJECT_MAGIC:
            raise ValueError(f"not Avro single-object encoded (no C3 01 header): {value[:10].hex() or '(empty)'}")
        fp = int.from_bytes(value[2:10], "little")
        writer = self.catalog.by_fp.get(fp)
        if writer is None:
            raise ValueError(f"unknown schema fingerprint {fp:016x} (not in the avro dir)")
        reader = self.catalog.current_by_full_name.get(writer.full_name)
        if reader is None:
            raise ValueError(f"no current schema for {writer.full_name} (only a history one)")
        datum = fastavro.schemaless_reader(io.BytesIO(value[10:]), writer.parsed, reader.parsed)
        return reader, datum

    def _confluent(self, value):
        if len(value) < 5 or value[:1] != CONFLUENT_MAGIC:
            raise ValueError(f"not Confluent framed (no magic byte 0 and schema id): {value[:10].hex() or '(empty)'}")
        (schema_id,) = struct.unpack(">i", value[1:5])
        writer, _ = self.registry.writer(schema_id)
        reader = self.catalog.current_by_full_name.get(writer["name"])
        if reader is None:
            raise ValueError(f"schema id {schema_id} is {writer['name']}, which the avro dir does not have")
        datum = fastavro.schemaless_reader(io.BytesIO(value[5:]), writer, reader.parsed)
        return reader, datum


def _describe(e):
    name = type(e).__name__
    text = str(e)
    return f"{name}: {text}" if text else name


def _utf8(b):
    return None if b is None else bytes(b).decode("utf-8", errors="replace")


def record_line(msg, decoder):
    line = {"partition": msg.partition(), "offset": msg.offset()}
    try:
        reader, datum = decoder.decode(msg.value())
        plain = to_plain(reader.parsed, datum, reader.names)
    except Exception as e:  # noqa: BLE001 - every undecodable record is reported and skipped
        line["error"] = _describe(e)
        return line
    line["key"] = _utf8(msg.key())
    line["schema"] = reader.full_name
    line["value"] = plain
    line["headers"] = {k: _utf8(v) for k, v in (msg.headers() or [])}
    return line


def _dump(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def consume(args):
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

    catalog = Catalog(args.avro_dir)
    decoder = ValueDecoder(catalog, args.framing, args.registry)
    deadline = time.monotonic() + args.timeout_secs
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": args.group or f"orderflow-interop-{uuid.uuid4()}",
            "client.id": "orderflow-interop-python",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "logger": _librdkafka_logger(),
        }
    )
    read = 0
    try:
        partitions = None
        while partitions is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Failure(
                    EXIT_TIMEOUT,
                    f"read 0 of {args.count} records: topic {args.topic} did not appear within {args.timeout_secs} s",
                )
            try:
                md = consumer.list_topics(args.topic, timeout=min(remaining, 5))
                t = md.topics.get(args.topic)
                if t is not None and t.error is None and t.partitions:
                    partitions = sorted(t.partitions)
                    break
            except KafkaException:
                pass
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        # All partitions from the beginning, whatever the group committed before.
        consumer.assign([TopicPartition(args.topic, p, OFFSET_BEGINNING) for p in partitions])
        processed = {}
        while read < args.count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            msg = consumer.poll(min(remaining, 0.5))
            if msg is None:
                continue
            if msg.error():
                print(f"interop: consumer: {msg.error()}", file=sys.stderr)
                continue
            print(_dump(record_line(msg, decoder)), flush=True)
            read += 1
            processed[msg.partition()] = msg.offset() + 1
        if args.group and processed:
            consumer.commit(
                offsets=[TopicPartition(args.topic, p, o) for p, o in processed.items()], asynchronous=False
            )
    finally:
        consumer.close()
    if read < args.count:
        raise Failure(
            EXIT_TIMEOUT,
            f"timed out: read {read} of {args.count} records from {args.topic} within {args.timeout_secs} s",
        )
    return 0


class _OncePerMessage(logging.Filter):
    """librdkafka repeats e.g. "Connection refused" on every reconnect: print each line once."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record):
        text = record.getMessage()
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


def _librdkafka_logger():
    """librdkafka's own log lines go to stderr, warnings and worse only."""
    logger = logging.getLogger("orderflow-interop.librdkafka")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("interop: librdkafka: %(message)s"))
        handler.addFilter(_OncePerMessage())
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False
    return logger


# --- produce -------------------------------------------------------------------------------------


def encode(line, topic, catalog, registry):
    """(key bytes, value bytes, headers) of one JSON input line."""
    from confluent_kafka.serialization import MessageField, SerializationContext

    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if not isinstance(obj.get("schema"), str):
        raise ValueError('"schema" must be a string')
    sf = catalog.current(obj["schema"])
    if "value" not in obj:
        raise ValueError('no "value"')
    datum = from_plain(sf.parsed, obj["value"], sf.names, "value")
    if registry is None:
        buf = io.BytesIO()
        buf.write(SINGLE_OBJECT_MAGIC)
        buf.write(sf.fp_bytes)
        fastavro.schemaless_writer(buf, sf.parsed, datum)
        value = buf.getvalue()
    else:
        ctx = SerializationContext(topic, MessageField.VALUE)
        value = registry.serializer(sf)(datum, ctx)

    key = obj.get("key")
    if key is not None and not isinstance(key, str):
        raise ValueError('"key" must be a string or null')
    headers = []
    h = obj.get("headers")
    if h is not None:
        if not isinstance(h, dict):
            raise ValueError('"headers" must be an object of strings')
        for k, v in h.items():
            if v is not None and not isinstance(v, str):
                raise ValueError(f"header {k} must be a string or null")
            headers.append((k, None if v is None else v.encode("utf-8")))
    return (None if key is None else key.encode("utf-8")), value, headers


def produce(args):
    from confluent_kafka import KafkaException, Producer

    catalog = Catalog(args.avro_dir)
    registry = Registry(args.registry) if args.framing == "confluent" else None
    # Encode every line first: a bad line fails the run before anything is sent.
    records = []
    for n, line in enumerate(sys.stdin.buffer.read().decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(encode(line, args.topic, catalog, registry))
        except Failure:
            raise
        except Exception as e:  # noqa: BLE001
            raise Failure(EXIT_FAILURE, f"stdin line {n}: {_describe(e)}") from e

    timeout_ms = max(1000, args.timeout_secs * 1000)
    producer = Producer(
        {
            "bootstrap.servers": args.bootstrap,
            "client.id": "orderflow-interop-python",
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            "message.timeout.ms": timeout_ms,
            "logger": _librdkafka_logger(),
        }
    )
    # Fail with the reason when the topic does not exist (auto-creation is off on orderflow's
    # brokers) rather than with librdkafka's "Message timed out".
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        remaining = deadline - time.monotonic()
        problem = None
        try:
            t = producer.list_topics(args.topic, timeout=max(0.1, min(remaining, 5))).topics.get(args.topic)
            if t is not None and t.error is None and t.partitions:
                break
            problem = f"topic {args.topic} does not exist" + (f" ({t.error})" if t is not None and t.error else "")
        except KafkaException as e:
            problem = f"no metadata for topic {args.topic}: {e}"
        if deadline - time.monotonic() <= 0:
            raise Failure(EXIT_FAILURE, f"{problem}; nothing produced")
        time.sleep(0.2)

    errors = []

    def delivered(err, msg):
        if err is not None:
            errors.append(f"record to {msg.topic()} not produced: {err}")

    for key, value, headers in records:
        while True:
            try:
                producer.produce(args.topic, value=value, key=key, headers=headers, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    remaining = producer.flush(timeout_ms / 1000 + 5)
    if remaining:
        raise Failure(EXIT_FAILURE, f"{remaining} of {len(records)} records still undelivered to {args.topic}")
    if errors:
        raise Failure(EXIT_FAILURE, f"{len(errors)} of {len(records)} records failed: {errors[0]}")
    print(f"produced {len(records)}", file=sys.stderr)
    return 0


# --- fingerprints ----------------------------------------------------------------------------------


def fingerprints(args):
    catalog = Catalog(args.avro_dir)
    for sf in catalog.files:
        print(f"{sf.rel} {sf.fp:016x} {sf.pcf}")
    return 0


# --- command line ----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"interop: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _non_negative(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, not '{text}'") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, not '{text}'")
    return n


def main(argv=None):
    parser = _Parser(prog="interop.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("fingerprints")
    p.add_argument("--avro-dir", required=True)

    def kafka_args(p):
        p.add_argument("--bootstrap", required=True)
        p.add_argument("--topic", required=True)
        p.add_argument("--framing", required=True, choices=["single-object", "confluent"])
        p.add_argument("--registry")
        p.add_argument("--avro-dir", required=True)

    p = sub.add_parser("consume")
    kafka_args(p)
    p.add_argument("--count", required=True, type=_non_negative)
    p.add_argument("--timeout-secs", required=True, type=_non_negative)
    p.add_argument("--group")

    p = sub.add_parser("produce")
    kafka_args(p)
    p.add_argument("--timeout-secs", type=_non_negative, default=30)

    args = parser.parse_args(argv)
    if getattr(args, "framing", None) == "confluent" and not args.registry:
        parser.error("--framing confluent needs --registry URL")

    sys.stdout.reconfigure(encoding="utf-8")
    try:
        return {"fingerprints": fingerprints, "consume": consume, "produce": produce}[args.command](args)
    except Failure as f:
        print(f"interop: {f}", file=sys.stderr)
        return f.code
    except Exception as e:  # noqa: BLE001
        print(f"interop: error: {_describe(e)}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
