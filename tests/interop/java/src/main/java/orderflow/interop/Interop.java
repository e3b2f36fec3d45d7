package orderflow.interop;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.BufferedReader;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.net.URI;
import java.net.URLEncoder;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.UUID;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.Future;
import java.util.stream.Collectors;
import java.util.stream.Stream;
import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericDatumReader;
import org.apache.avro.generic.GenericDatumWriter;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.BinaryEncoder;
import org.apache.avro.io.EncoderFactory;
import org.apache.avro.io.DecoderFactory;
import org.apache.avro.message.BinaryMessageDecoder;
import org.apache.avro.message.BinaryMessageEncoder;
import org.apache.avro.message.SchemaStore;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.ConsumerRecords;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.header.internals.RecordHeader;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;

/**
 * orderflow interop client in Java: reads and writes orderflow's Kafka records with Apache Avro's
 * Java library and Apache Kafka's Java client only (no orderflow code). Same command line as
 * tests/interop/python/interop.py; see tests/interop/README.md.
 */
public final class Interop {
  static final int EXIT_TIMEOUT = 2;
  static final int EXIT_USAGE = 64;

  private static final ObjectMapper JSON = new ObjectMapper();
  private static final PrintStream OUT =
      new PrintStream(new FileOutputStream(FileDescriptor.out), true, StandardCharsets.UTF_8);

  private static final String USAGE =
      String.join(
          "\n",
          "usage: java -jar orderflow-interop.jar COMMAND [OPTIONS]",
          "  fingerprints --avro-dir DIR",
          "  consume --bootstrap HOST:PORT --topic T --framing single-object|confluent [--registry URL]",
          "          --avro-dir DIR --count N --timeout-secs S [--group G]",
          "  produce --bootstrap HOST:PORT --topic T --framing single-object|confluent [--registry URL]",
          "          --avro-dir DIR [--timeout-secs S]   (JSON lines on stdin)");

  /** A failure with the exit code and message the program ends with. */
  static final class Failure extends RuntimeException {
    final int code;

    Failure(int code, String message) {
      super(message);
      this.code = code;
    }
  }

  public static void main(String[] argv) {
    int code;
    try {
      code = run(argv);
    } catch (Failure f) {
      System.err.println("interop: " + f.getMessage());
      if (f.code == EXIT_USAGE) {
        System.err.println(USAGE);
      }
      code = f.code;
    } catch (Exception e) {
      System.err.println("interop: error: " + describe(e));
      code = 1;
    }
    OUT.flush();
    System.err.flush();
    // Exit explicitly: Kafka's client threads must not keep the JVM alive.
    System.exit(code);
  }

  static int run(String[] argv) throws Exception {
    if (argv.length == 0) {
      throw new Failure(EXIT_USAGE, "no command");
    }
    String command = argv[0];
    Map<String, String> opts = parseOptions(argv, command);
    switch (command) {
      case "fingerprints":
        return fingerprints(opts);
      case "consume":
        return consume(opts);
      case "produce":
        return produce(opts);
      default:
        throw new Failure(EXIT_USAGE, "unknown command '" + command + "'");
    }
  }

  // --- command line ----------------------------------------------------------------------------

  private static Map<String, String> parseOptions(String[] argv, String command) {
    Set<String> allowed;
    switch (command) {
      case "fingerprints":
        allowed = Set.of("avro-dir");
        break;
      case "consume":
        allowed =
            Set.of(
                "bootstrap", "topic", "framing", "registry", "avro-dir", "count", "timeout-secs",
                "group");
        break;
      case "produce":
        allowed = Set.of("bootstrap", "topic", "framing", "registry", "avro-dir", "timeout-secs");
        break;
      default:
        throw new Failure(EXIT_USAGE, "unknown command '" + command + "'");
    }
    Map<String, String> opts = new HashMap<>();
    for (int i = 1; i < argv.length; i++) {
      String arg = argv[i];
      if (!arg.startsWith("--")) {
        throw new Failure(EXIT_USAGE, "unexpected argument '" + arg + "'");
      }
      String name = arg.substring(2);
      String value;
      int eq = name.indexOf('=');
      if (eq >= 0) {
        value = name.substring(eq + 1);
        name = name.substring(0, eq);
      } else {
        if (i + 1 >= argv.length) {
          throw new Failure(EXIT_USAGE, "--" + name + " needs a value");
        }
        value = argv[++i];
      }
      if (!allowed.contains(name)) {
        throw new Failure(EXIT_USAGE, "unknown option --" + name + " for " + command);
      }
      opts.put(name, value);
    }
    return opts;
  }

  private static String required(Map<String, String> opts, String name) {
    String v = opts.get(name);
    if (v == null || v.isEmpty()) {
      throw new Failure(EXIT_USAGE, "--" + name + " is required");
    }
    return v;
  }

  private static long number(Map<String, String> opts, String name, Long dflt) {
    String v = opts.get(name);
    if (v == null) {
      if (dflt == null) {
        throw new Failure(EXIT_USAGE, "--" + name + " is required");
      }
      return dflt;
    }
    try {
      long n = Long.parseLong(v);
      if (n < 0) {
        throw new NumberFormatException();
      }
      return n;
    } catch (NumberFormatException e) {
      throw new Failure(EXIT_USAGE, "--" + name + " must be a non-negative integer, not '" + v + "'");
    }
  }

  private static String framing(Map<String, String> opts) {
    String f = required(opts, "framing");
    if (!f.equals("single-object") && !f.equals("confluent")) {
      throw new Failure(EXIT_USAGE, "--framing must be single-object or confluent, not '" + f + "'");
    }
    if (f.equals("confluent")) {
      required(opts, "registry");
    }
    return f;
  }

  // --- schemas ---------------------------------------------------------------------------------

  /** One .avsc file. */
  static final class SchemaFile {
    final String rel; // file name relative to the avro dir: X.avsc or history/X.avsc
    final String text; // the file as written
    final Schema schema;
    final long fingerprint; // CRC-64-AVRO of the Parsing Canonical Form
    final boolean current;

    SchemaFile(String rel, String text, Schema schema, boolean current) {
      this.rel = rel;
      this.text = text;
      this.schema = schema;
      this.fingerprint = SchemaNormalization.parsingFingerprint64(schema);
      this.current = current;
    }
  }

  /** Every schema of DIR (current) and DIR/history (older writer schemas). */
  static final class Catalog {
    final List<SchemaFile> files = new ArrayList<>();
    final Map<String, SchemaFile> currentByFullName = new LinkedHashMap<>();
    /** Current schemas by file stem, short name and full name (for produce's "schema"). */
    final Map<String, SchemaFile> currentByAnyName = new HashMap<>();
    /** Every schema, current and history, by fingerprint. */
    final SchemaStore.Cache store = new SchemaStore.Cache();

    static Catalog load(String dir) throws IOException {
      Path root = Path.of(dir);
      if (!Files.isDirectory(root)) {
        throw new Failure(1, "--avro-dir " + dir + " is not a directory");
      }
      Catalog c = new Catalog();
      c.addAll(root, "", true);
      Path history = root.resolve("history");
      if (Files.isDirectory(history)) {
        c.addAll(history, "history/", false);
      }
      return c;
    }

    private void addAll(Path dir, String prefix, boolean current) throws IOException {
      List<Path> paths;
      try (Stream<Path> s = Files.list(dir)) {
        paths =
            s.filter(p -> p.getFileName().toString().endsWith(".avsc") && Files.isRegularFile(p))
                .sorted((a, b) -> a.getFileName().toString().compareTo(b.getFileName().toString()))
                .collect(Collectors.toList());
      }
      for (Path p : paths) {
        String name = p.getFileName().toString();
        String text = Files.readString(p, StandardCharsets.UTF_8);
        Schema schema;
        try {
          // A parser per file: history files redefine the current files' names.
          schema = new Schema.Parser().parse(text);
        } catch (RuntimeException e) {
          throw new Failure(1, p + ": not a valid Avro schema: " + e.getMessage());
        }
        SchemaFile f = new SchemaFile(prefix + name, text, schema, current);
        files.add(f);
        store.addSchema(schema);
        if (current) {
          if (currentByFullName.put(schema.getFullName(), f) != null) {
            throw new Failure(1, "two files in " + dir + " define " + schema.getFullName());
          }
          currentByAnyName.put(schema.getFullName(), f);
          currentByAnyName.put(schema.getName(), f);
          currentByAnyName.put(name.substring(0, name.length() - ".avsc".length()), f);
        }
      }
    }

    /** The current schema of a produce line's "schema": OrderCreated or orderflow.events.OrderCreated. */
    SchemaFile current(String name) {
      SchemaFile f = currentByAnyName.get(name);
      if (f == null) {
        throw new IllegalArgumentException("no schema '" + name + "' in the avro dir");
      }
      return f;
    }
  }

  private static int fingerprints(Map<String, String> opts) throws IOException {
    Catalog catalog = Catalog.load(required(opts, "avro-dir"));
    for (SchemaFile f : catalog.files) {
      OUT.println(
          f.rel
              + " "
              + String.format("%016x", f.fingerprint)
              + " "
              + SchemaNormalization.toParsingForm(f.schema));
    }
    return 0;
  }

  // --- schema registry (Confluent REST API, e.g. Apicurio's ccompat) ---------------------------

  static final class Registry {
    private final String base;
    private final HttpClient http = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(10)).build();
    private final Map<Integer, Schema> byId = new HashMap<>();
    private final Map<String, Integer> idBySubject = new HashMap<>();

    Registry(String url) {
      this.base = url.endsWith("/") ? url.substring(0, url.length() - 1) : url;
    }

    /** The writer schema of a schema id: GET /schemas/ids/{id}. */
    Schema schema(int id) throws IOException, InterruptedException {
      Schema s = byId.get(id);
      if (s == null) {
        JsonNode body = call(HttpRequest.newBuilder(URI.create(base + "/schemas/ids/" + id)).GET());
        JsonNode text = body.get("schema");
        if (text == null || !text.isTextual()) {
          throw new IOException("schema id " + id + ": the registry answered no schema: " + body);
        }
        s = new Schema.Parser().parse(text.textValue());
        byId.put(id, s);
      }
      return s;
    }

    /** Registers schema text under a subject (POST /subjects/{subject}/versions); its id. */
    int register(String subject, String schemaText) throws IOException, InterruptedException {
      Integer id = idBySubject.get(subject);
      if (id == null) {
        ObjectNode req = JSON.createObjectNode();
        req.put("schema", schemaText);
        String url = base + "/subjects/" + URLEncoder.encode(subject, StandardCharsets.UTF_8) + "/versions";
        JsonNode body =
            call(
                HttpRequest.newBuilder(URI.create(url))
                    .header("Content-Type", "application/vnd.schemaregistry.v1+json")
                    .POST(HttpRequest.BodyPublishers.ofString(JSON.writeValueAsString(req))));
        JsonNode idNode = body.get("id");
        if (idNode == null || !idNode.canConvertToInt()) {
          throw new IOException("registering subject " + subject + ": no id in the answer: " + body);
        }
        id = idNode.intValue();
        idBySubject.put(subject, id);
      }
      return id;
    }

    private JsonNode call(HttpRequest.Builder req) throws IOException, InterruptedException {
      HttpRequest r =
          req.header("Accept", "application/vnd.schemaregistry.v1+json, application/json")
              .timeout(Duration.ofSeconds(30))
              .build();
      HttpResponse<String> resp = http.send(r, HttpResponse.BodyHandlers.ofString(StandardCharsets.UTF_8));
      if (resp.statusCode() / 100 != 2) {
        throw new IOException(r.method() + " " + r.uri() + ": HTTP " + resp.statusCode() + ": " + resp.body());
      }
      return JSON.readTree(resp.body());
    }
  }

  // --- consume ---------------------------------------------------------------------------------

  /** Decodes record values into (writer full name, datum of the current schema of that name). */
  static final class ValueDecoder {
    private final Catalog catalog;
    private final boolean confluent;
    private final Registry registry;
    /** Single-object: one decoder per current schema, all sharing the catalog's SchemaStore. */
    private final Map<String, BinaryMessageDecoder<GenericRecord>> decoders = new HashMap<>();

    ValueDecoder(Catalog catalog, String framing, String registryUrl) {
      this.catalog = catalog;
      this.confluent = framing.equals("confluent");
      this.registry = confluent ? new Registry(registryUrl) : null;
      for (SchemaFile f : catalog.currentByFullName.values()) {
        BinaryMessageDecoder<GenericRecord> d =
            new BinaryMessageDecoder<>(GenericData.get(), f.schema, catalog.store);
        decoders.put(f.schema.getFullName(), d);
      }
    }

    GenericRecord decode(byte[] value) throws Exception {
      if (value == null) {
        throw new IllegalArgumentException("the record has no value (tombstone)");
      }
      return confluent ? decodeConfluent(value) : decodeSingleObject(value);
    }

    private GenericRecord decodeSingleObject(byte[] value) throws IOException {
      if (value.length < 10 || value[0] != (byte) 0xC3 || value[1] != (byte) 0x01) {
        throw new IllegalArgumentException(
            "not Avro single-object encoded (no C3 01 header): " + hexPrefix(value));
      }
      long fp = ByteBuffer.wrap(value, 2, 8).order(ByteOrder.LITTLE_ENDIAN).getLong();
      Schema writer = catalog.store.findByFingerprint(fp);
      if (writer == null) {
        throw new IllegalArgumentException(
            String.format("unknown schema fingerprint %016x (not in the avro dir)", fp));
      }
      BinaryMessageDecoder<GenericRecord> d = decoders.get(writer.getFullName());
      if (d == null) {
        throw new IllegalArgumentException(
            "no current schema for " + writer.getFullName() + " (only a history one)");
      }
      return d.decode(value);
    }

    private GenericRecord decodeConfluent(byte[] value) throws Exception {
      if (value.length < 5 || value[0] != 0) {
        throw new IllegalArgumentException(
            "not Confluent framed (no magic byte 0 and schema id): " + hexPrefix(value));
      }
      int id = ByteBuffer.wrap(value, 1, 4).order(ByteOrder.BIG_ENDIAN).getInt();
      Schema writer = registry.schema(id);
      SchemaFile reader = catalog.currentByFullName.get(writer.getFullName());
      if (reader == null) {
        throw new IllegalArgumentException(
            "schema id " + id + " is " + writer.getFullName() + ", which the avro dir does not have");
      }
      GenericDatumReader<GenericRecord> r = new GenericDatumReader<>(writer, reader.schema, GenericData.get());
      return r.read(null, DecoderFactory.get().binaryDecoder(value, 5, value.length - 5, null));
    }
  }

  private static String hexPrefix(byte[] b) {
    StringBuilder sb = new StringBuilder();
    for (int i = 0; i < Math.min(b.length, 10); i++) {
      sb.append(String.format("%02x", b[i] & 0xff));
    }
    return sb.length() == 0 ? "(empty)" : sb.toString();
  }

  private static int consume(Map<String, String> opts) throws Exception {
    String bootstrap = required(opts, "bootstrap");
    String topic = required(opts, "topic");
    String framing = framing(opts);
    Catalog catalog = Catalog.load(required(opts, "avro-dir"));
    long count = number(opts, "count", null);
    long timeoutMs = number(opts, "timeout-secs", null) * 1000;
    String group = opts.get("group");
    long deadline = System.nanoTime() + timeoutMs * 1_000_000;
    ValueDecoder decoder = new ValueDecoder(catalog, framing, opts.get("registry"));

    Properties p = new Properties();
    p.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    p.put(ConsumerConfig.GROUP_ID_CONFIG, group != null ? group : "orderflow-interop-" + UUID.randomUUID());
    p.put(ConsumerConfig.CLIENT_ID_CONFIG, "orderflow-interop-java");
    p.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, "read_committed");
    p.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
    p.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
    p.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
    p.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());

    long read = 0;
    try (KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(p)) {
      List<TopicPartition> partitions = waitForPartitions(consumer, topic, deadline);
      if (partitions == null) {
        throw new Failure(
            EXIT_TIMEOUT,
            "read 0 of " + count + " records: topic " + topic + " did not appear within "
                + timeoutMs / 1000 + " s");
      }
      // All partitions from the beginning, whatever the group committed before.
      consumer.assign(partitions);
      consumer.seekToBeginning(partitions);
      Map<TopicPartition, OffsetAndMetadata> processed = new HashMap<>();
      while (read < count) {
        long remainingMs = (deadline - System.nanoTime()) / 1_000_000;
        if (remainingMs <= 0) {
          break;
        }
        ConsumerRecords<byte[], byte[]> records = consumer.poll(Duration.ofMillis(Math.min(remainingMs, 500)));
        for (ConsumerRecord<byte[], byte[]> rec : records) {
          if (read >= count) {
            break;
          }
          OUT.println(JSON.writeValueAsString(recordLine(rec, decoder)));
          read++;
          processed.put(
              new TopicPartition(rec.topic(), rec.partition()), new OffsetAndMetadata(rec.offset() + 1));
        }
      }
      if (group != null && !processed.isEmpty()) {
        consumer.commitSync(processed);
      }
    }
    if (read < count) {
      throw new Failure(
          EXIT_TIMEOUT,
          "timed out: read " + read + " of " + count + " records from " + topic + " within "
              + timeoutMs / 1000 + " s");
    }
    return 0;
  }

  private static List<TopicPartition> waitForPartitions(
      KafkaConsumer<byte[], byte[]> consumer, String topic, long deadline) throws InterruptedException {
    while (true) {
      long remainingMs = (deadline - System.nanoTime()) / 1_000_000;
      if (remainingMs <= 0) {
        return null;
      }
      try {
        List<PartitionInfo> infos = consumer.partitionsFor(topic, Duration.ofMillis(Math.min(remainingMs, 5000)));
        if (infos != null && !infos.isEmpty()) {
          List<TopicPartition> tps = new ArrayList<>();
          for (PartitionInfo i : infos) {
            tps.add(new TopicPartition(topic, i.partition()));
          }
          tps.sort((a, b) -> Integer.compare(a.partition(), b.partition()));
          return tps;
        }
      } catch (org.apache.kafka.common.errors.TimeoutException
          | org.apache.kafka.common.errors.UnknownTopicOrPartitionException e) {
        // not there yet
      }
      Thread.sleep(Math.min(200, Math.max(1, remainingMs)));
    }
  }

  private static ObjectNode recordLine(ConsumerRecord<byte[], byte[]> rec, ValueDecoder decoder) {
    ObjectNode line = JSON.createObjectNode();
    line.put("partition", rec.partition());
    line.put("offset", rec.offset());
    GenericRecord datum;
    try {
      datum = decoder.decode(rec.value());
    } catch (Exception e) {
      line.put("error", describe(e));
      return line;
    }
    if (rec.key() == null) {
      line.putNull("key");
    } else {
      line.put("key", new String(rec.key(), StandardCharsets.UTF_8));
    }
    line.put("schema", datum.getSchema().getFullName());
    line.set("value", PlainJson.toPlain(datum.getSchema(), datum));
    ObjectNode headers = line.putObject("headers");
    for (Header h : rec.headers()) {
      if (h.value() == null) {
        headers.putNull(h.key());
      } else {
        headers.put(h.key(), new String(h.value(), StandardCharsets.UTF_8));
      }
    }
    return line;
  }

  // --- produce ---------------------------------------------------------------------------------

  private static int produce(Map<String, String> opts) throws Exception {
    String bootstrap = required(opts, "bootstrap");
    String topic = required(opts, "topic");
    String framing = framing(opts);
    Catalog catalog = Catalog.load(required(opts, "avro-dir"));
    long timeoutMs = number(opts, "timeout-secs", 30L) * 1000;
    Registry registry = framing.equals("confluent") ? new Registry(opts.get("registry")) : null;

    // Encode every line first: a bad line fails the run before anything is sent.
    List<ProducerRecord<byte[], byte[]>> records = new ArrayList<>();
    Map<String, BinaryMessageEncoder<GenericRecord>> encoders = new HashMap<>();
    BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
    String text;
    int lineNo = 0;
    while ((text = in.readLine()) != null) {
      lineNo++;
      if (text.isBlank()) {
        continue;
      }
      try {
        records.add(toProducerRecord(text, topic, catalog, registry, encoders));
      } catch (Exception e) {
        throw new Failure(1, "stdin line " + lineNo + ": " + describe(e));
      }
    }

    Properties p = new Properties();
    p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    p.put(ProducerConfig.CLIENT_ID_CONFIG, "orderflow-interop-java");
    p.put(ProducerConfig.ACKS_CONFIG, "all");
    p.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
    p.put(ProducerConfig.LINGER_MS_CONFIG, "5");
    int requestTimeout = (int) Math.max(1000, Math.min(30_000, timeoutMs));
    p.put(ProducerConfig.REQUEST_TIMEOUT_MS_CONFIG, Integer.toString(requestTimeout));
    p.put(ProducerConfig.DELIVERY_TIMEOUT_MS_CONFIG, Long.toString(Math.max(timeoutMs, requestTimeout + 5)));
    p.put(ProducerConfig.MAX_BLOCK_MS_CONFIG, Long.toString(Math.max(timeoutMs, 1000)));
    p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
    p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
    try (KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(p)) {
      List<Future<RecordMetadata>> sent = new ArrayList<>();
      for (ProducerRecord<byte[], byte[]> r : records) {
        sent.add(producer.send(r));
      }
      producer.flush();
      for (int i = 0; i < sent.size(); i++) {
        try {
          sent.get(i).get();
        } catch (ExecutionException e) {
          throw new Failure(1, "record " + (i + 1) + " was not produced to " + topic + ": " + describe(e.getCause()));
        }
      }
    }
    System.err.println("produced " + records.size());
    return 0;
  }

  private static ProducerRecord<byte[], byte[]> toProducerRecord(
      String text,
      String topic,
      Catalog catalog,
      Registry registry,
      Map<String, BinaryMessageEncoder<GenericRecord>> encoders)
      throws Exception {
    JsonNode line = JSON.readTree(text);
    if (line == null || !line.isObject()) {
      throw new IllegalArgumentException("not a JSON object");
    }
    JsonNode schemaName = line.get("schema");
    if (schemaName == null || !schemaName.isTextual()) {
      throw new IllegalArgumentException("\"schema\" must be a string");
    }
    SchemaFile f = catalog.current(schemaName.textValue());
    if (!line.has("value")) {
      throw new IllegalArgumentException("no \"value\"");
    }
    GenericRecord datum = (GenericRecord) PlainJson.fromPlain(f.schema, line.get("value"), "value");

    byte[] value;
    if (registry == null) {
      BinaryMessageEncoder<GenericRecord> enc =
          encoders.computeIfAbsent(
              f.schema.getFullName(), n -> new BinaryMessageEncoder<>(GenericData.get(), f.schema));
      ByteBuffer buf = enc.encode(datum);
      value = new byte[buf.remaining()];
      buf.get(value);
    } else {
      // TopicRecordNameStrategy: <topic>-<record full name>.
      // The file's text, stripped of surrounding white space as confluent-kafka's AvroSerializer
      // sends it: the same text gets the same id from a registry that compares texts.
      int id = registry.register(topic + "-" + f.schema.getFullName(), f.text.strip());
      java.io.ByteArrayOutputStream out = new java.io.ByteArrayOutputStream();
      out.write(0);
      out.write(ByteBuffer.allocate(4).order(ByteOrder.BIG_ENDIAN).putInt(id).array());
      BinaryEncoder e = EncoderFactory.get().binaryEncoder(out, null);
      new GenericDatumWriter<GenericRecord>(f.schema, GenericData.get()).write(datum, e);
      e.flush();
      value = out.toByteArray();
    }

    byte[] key = null;
    JsonNode k = line.get("key");
    if (k != null && !k.isNull()) {
      if (!k.isTextual()) {
        throw new IllegalArgumentException("\"key\" must be a string or null");
      }
      key = k.textValue().getBytes(StandardCharsets.UTF_8);
    }
    List<Header> headers = new ArrayList<>();
    JsonNode h = line.get("headers");
    if (h != null && !h.isNull()) {
      if (!h.isObject()) {
        throw new IllegalArgumentException("\"headers\" must be an object of strings");
      }
      for (Map.Entry<String, JsonNode> e : h.properties()) {
        JsonNode v = e.getValue();
        if (v.isNull()) {
          headers.add(new RecordHeader(e.getKey(), null));
        } else if (v.isTextual()) {
          headers.add(new RecordHeader(e.getKey(), v.textValue().getBytes(StandardCharsets.UTF_8)));
        } else {
          throw new IllegalArgumentException("header " + e.getKey() + " must be a string or null");
        }
      }
    }
    return new ProducerRecord<>(topic, null, null, key, value, headers);
  }

  private static String describe(Throwable e) {
    String msg = e.getMessage();
    String s = e.getClass().getSimpleName() + (msg != null ? ": " + msg : "");
    Throwable cause = e.getCause();
    if (cause != null && cause != e && (cause.getMessage() == null || msg == null || !msg.contains(cause.getMessage()))) {
      s += " (" + describe(cause) + ")";
    }
    return s;
  }
}
