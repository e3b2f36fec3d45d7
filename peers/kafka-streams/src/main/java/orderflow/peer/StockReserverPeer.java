package orderflow.peer;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.UUID;
import java.util.concurrent.CountDownLatch;
import java.util.stream.Stream;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.generic.GenericRecordBuilder;
import org.apache.avro.message.BinaryMessageDecoder;
import org.apache.avro.message.BinaryMessageEncoder;
import org.apache.avro.message.SchemaStore;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.Record;
import org.apache.kafka.streams.state.KeyValueStore;
import org.apache.kafka.streams.state.Stores;

/**
 * The stock reserver's business rules as a Kafka Streams 4.x application: the benchmark peer of
 * orderflow's stock reserver (issue 18). No orderflow code: it reads orderflow's input topic
 * {@code stock.commands} (Avro single-object encoding, the schemas of orderflow's {@code avro/}
 * folder, keyed {@code hqId:storeId}) and applies, per store and product, the same rules:
 *
 * <ul>
 *   <li>{@code InventoryAdjusted} RESTOCK at a store: on hand += delta;
 *   <li>{@code OrderCreated}: all or nothing, every line's quantity must be available (on hand -
 *       reserved) at the order's store, else {@code StockReservationFailed} INSUFFICIENT_STOCK
 *       naming the short lines; invalid content (no lines, a quantity outside 1..1,000,000, a
 *       product twice) fails with orderflow's reasons; otherwise the units are reserved and
 *       {@code StockReserved} answers (TTL 5 minutes, seed 004);
 *   <li>{@code OrderCancelled}: a live reservation is released ({@code StockReservationReleased});
 *   <li>{@code OrderCompleted}: a live reservation is settled, the sold units deducted from on hand
 *       and the unsold part freed ({@code OrderSettled} SOLD).
 * </ul>
 *
 * Idempotency by {@code eventId} (a store of the processed ones), state in three RocksDB stores
 * with changelog topics, {@code processing.guarantee=exactly_once_v2} and a 100 ms commit
 * interval by default. Outputs go to {@code <prefix>stock.reserved} and the like, keyed by
 * orderId, Avro single-object encoded with orderflow's schemas. The HQ protocol's records on the
 * same topic ({@code StockLedgerEntry}, {@code StockAllocation}) are not the peer's business and
 * are skipped, as is anything that does not decode (counted on stderr at exit).
 *
 * <p>Prints {@code peer: RUNNING <epoch ms>} on stdout each time the application reaches RUNNING.
 */
public final class StockReserverPeer {
  static final long TTL_MS = 5 * 60 * 1000L;
  static final int MAX_QUANTITY = 1_000_000;

  private StockReserverPeer() {}

  public static void main(String[] args) throws Exception {
    Map<String, String> o = options(args);
    if (o.containsKey("help")) {
      System.out.println(
          "java -jar orderflow-peer-kafka-streams.jar --bootstrap HOST:PORT --avro-dir DIR --state-dir DIR\n"
              + "  [--application-id peer-stock-reserver] [--input stock.commands] [--output-prefix peer.]\n"
              + "  [--guarantee exactly_once_v2|at_least_once] [--commit-interval-ms 100] [--threads 1]\n"
              + "  [--instance-id ID] (static membership, session timeout 30 s)");
      return;
    }
    String input = o.getOrDefault("input", "stock.commands");
    String prefix = o.getOrDefault("output-prefix", "peer.");
    Codec codec = Codec.load(Path.of(required(o, "avro-dir")));

    Properties p = new Properties();
    p.put(StreamsConfig.APPLICATION_ID_CONFIG, o.getOrDefault("application-id", "peer-stock-reserver"));
    p.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, required(o, "bootstrap"));
    p.put(StreamsConfig.STATE_DIR_CONFIG, required(o, "state-dir"));
    p.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, o.getOrDefault("guarantee", StreamsConfig.EXACTLY_ONCE_V2));
    p.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, o.getOrDefault("commit-interval-ms", "100"));
    p.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, o.getOrDefault("threads", "1"));
    p.put(StreamsConfig.DEFAULT_KEY_SERDE_CLASS_CONFIG, Serdes.StringSerde.class);
    p.put(StreamsConfig.DEFAULT_VALUE_SERDE_CLASS_CONFIG, Serdes.ByteArraySerde.class);
    if (o.containsKey("instance-id")) {
      // Static membership (KIP-345), as orderflow's workers use it: a restarted instance takes
      // its partitions back without waiting for the session timeout.
      p.put(StreamsConfig.consumerPrefix(ConsumerConfig.GROUP_INSTANCE_ID_CONFIG), o.get("instance-id"));
      p.put(StreamsConfig.consumerPrefix(ConsumerConfig.SESSION_TIMEOUT_MS_CONFIG), "30000");
    }

    KafkaStreams streams = new KafkaStreams(topology(input, prefix, codec), p);
    CountDownLatch stopped = new CountDownLatch(1);
    streams.setStateListener(
        (now, before) -> {
          if (now == KafkaStreams.State.RUNNING) {
            System.out.println("peer: RUNNING " + System.currentTimeMillis());
            System.out.flush();
          }
          if (now == KafkaStreams.State.ERROR || now == KafkaStreams.State.NOT_RUNNING) {
            stopped.countDown();
          }
        });
    streams.setUncaughtExceptionHandler(
        e -> {
          e.printStackTrace();
          return StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
        });
    Runtime.getRuntime()
        .addShutdownHook(
            new Thread(
                () -> {
                  streams.close(Duration.ofSeconds(30));
                  System.err.println("peer: skipped records " + Reserver.SKIPPED.get());
                }));
    streams.start();
    stopped.await();
  }

  /** Source → reserver (three stores) → four sinks. */
  static Topology topology(String input, String prefix, Codec codec) {
    Topology t = new Topology();
    t.addSource("commands", Serdes.String().deserializer(), Serdes.ByteArray().deserializer(), input);
    t.addProcessor("reserver", () -> new Reserver(codec), "commands");
    for (String store : List.of("stock", "reservations", "seen")) {
      t.addStateStore(
          Stores.keyValueStoreBuilder(Stores.persistentKeyValueStore(store), Serdes.String(), Serdes.ByteArray()),
          "reserver");
    }
    for (String[] sink :
        new String[][] {
          {"reserved", "stock.reserved"},
          {"failed", "stock.reservation.failed"},
          {"released", "stock.reservation.released"},
          {"settled", "order.settled"}
        }) {
      t.addSink(sink[0], prefix + sink[1], Serdes.String().serializer(), Serdes.ByteArray().serializer(), "reserver");
    }
    return t;
  }

  /** The per-record rules (class docs). */
  static final class Reserver implements Processor<String, byte[], String, byte[]> {
    static final java.util.concurrent.atomic.AtomicLong SKIPPED = new java.util.concurrent.atomic.AtomicLong();
    private static final byte[] SEEN = {1};
    private final Codec codec;
    private ProcessorContext<String, byte[]> ctx;
    private KeyValueStore<String, byte[]> stock;
    private KeyValueStore<String, byte[]> reservations;
    private KeyValueStore<String, byte[]> seen;

    Reserver(Codec codec) {
      this.codec = codec;
    }

    @Override
    public void init(ProcessorContext<String, byte[]> context) {
      ctx = context;
      stock = context.getStateStore("stock");
      reservations = context.getStateStore("reservations");
      seen = context.getStateStore("seen");
    }

    @Override
    public void process(Record<String, byte[]> r) {
      GenericRecord e;
      try {
        e = codec.decode(r.value());
      } catch (Exception x) {
        SKIPPED.incrementAndGet();
        return;
      }
      String eventId = str(e, "eventId");
      if (seen.get(eventId) != null) {
        return;
      }
      switch (e.getSchema().getName()) {
        case "InventoryAdjusted" -> restock(e);
        case "OrderCreated" -> reserve(e, r.timestamp());
        case "OrderCancelled" -> release(e, r.timestamp());
        case "OrderCompleted" -> settle(e, r.timestamp());
        default -> {
          return;
        }
      }
      seen.put(eventId, SEEN);
    }

    private void restock(GenericRecord e) {
      String store = str(e, "storeId");
      if (!"RESTOCK".equals(str(e, "adjustmentType")) || store.isEmpty()) {
        return;
      }
      for (GenericRecord item : items(e)) {
        String key = stockKey(str(e, "hqId"), store, str(item, "productId"));
        long[] f = figures(stock.get(key));
        f[0] += (Long) item.get("delta");
        stock.put(key, encode(f));
      }
    }

    private void reserve(GenericRecord e, long ts) {
      String orderId = str(e, "orderId");
      String hq = str(e, "hqId");
      String store = str(e, "storeId");
      if (reservations.get(orderId) != null) {
        return;
      }
      List<GenericRecord> lines = items(e);
      List<GenericRecord> bad = new ArrayList<>();
      String invalid = null;
      Set<String> products = new HashSet<>();
      for (GenericRecord line : lines) {
        int q = (Integer) line.get("quantity");
        String pid = str(line, "productId");
        if (q <= 0 || q > MAX_QUANTITY) {
          invalid = "INVALID_QUANTITY";
          bad.add(failedItem(pid, q, 0));
        } else if (!products.add(pid)) {
          invalid = invalid == null ? "DUPLICATE_PRODUCT" : invalid;
          bad.add(failedItem(pid, q, 0));
        }
      }
      if (lines.isEmpty()) {
        invalid = "EMPTY_ORDER";
      }
      long[][] figures = new long[lines.size()][];
      if (invalid == null) {
        for (int i = 0; i < lines.size(); i++) {
          GenericRecord line = lines.get(i);
          figures[i] = figures(stock.get(stockKey(hq, store, str(line, "productId"))));
          long available = figures[i][0] - figures[i][1];
          int q = (Integer) line.get("quantity");
          if (available < q) {
            bad.add(failedItem(str(line, "productId"), q, (int) Math.max(0, Math.min(Integer.MAX_VALUE, available))));
          }
        }
      }
      long at = (Long) e.get("occurredAt");
      if (invalid != null || !bad.isEmpty()) {
        reservations.put(orderId, ("FAILED|" + hq + "|" + store + "|").getBytes(StandardCharsets.UTF_8));
        GenericRecord failed =
            answer("StockReservationFailed", e, "failed", hq, store)
                .set("reason", invalid != null ? invalid : "INSUFFICIENT_STOCK")
                .set("items", bad)
                .build();
        ctx.forward(new Record<>(orderId, codec.encode(failed), ts), "failed");
        return;
      }
      StringBuilder held = new StringBuilder();
      List<GenericRecord> reserved = new ArrayList<>();
      Schema itemSchema = codec.schema("StockReserved").getField("items").schema().getElementType();
      for (int i = 0; i < lines.size(); i++) {
        GenericRecord line = lines.get(i);
        String pid = str(line, "productId");
        int q = (Integer) line.get("quantity");
        figures[i][1] += q;
        stock.put(stockKey(hq, store, pid), encode(figures[i]));
        held.append(held.length() == 0 ? "" : ",").append(pid).append('=').append(q);
        reserved.add(new GenericRecordBuilder(itemSchema).set("productId", pid).set("reserved", q).build());
      }
      String reservationId = derive(orderId, "reservation");
      reservations.put(orderId, ("LIVE|" + hq + "|" + store + "|" + reservationId + "|" + held).getBytes(StandardCharsets.UTF_8));
      GenericRecord answer =
          answer("StockReserved", e, "reserved", hq, store)
              .set("reservationId", reservationId)
              .set("expiresAt", at + TTL_MS)
              .set("items", reserved)
              .build();
      ctx.forward(new Record<>(orderId, codec.encode(answer), ts), "reserved");
    }

    /** A live reservation of {@code e}'s order: [hq, store, reservationId, held], or null. */
    private String[] live(GenericRecord e) {
      byte[] v = reservations.get(str(e, "orderId"));
      if (v == null) {
        return null;
      }
      String[] parts = new String(v, StandardCharsets.UTF_8).split("\\|", -1);
      return parts[0].equals("LIVE") ? new String[] {parts[1], parts[2], parts[3], parts[4]} : null;
    }

    private static Map<String, Integer> held(String held) {
      Map<String, Integer> out = new LinkedHashMap<>();
      for (String kv : held.split(",")) {
        int eq = kv.lastIndexOf('=');
        out.put(kv.substring(0, eq), Integer.parseInt(kv.substring(eq + 1)));
      }
      return out;
    }

    private void release(GenericRecord e, long ts) {
      String[] r = live(e);
      if (r == null) {
        return;
      }
      String orderId = str(e, "orderId");
      List<GenericRecord> released = new ArrayList<>();
      Schema itemSchema = codec.schema("StockReservationReleased").getField("items").schema().getElementType();
      for (Map.Entry<String, Integer> h : held(r[3]).entrySet()) {
        String key = stockKey(r[0], r[1], h.getKey());
        long[] f = figures(stock.get(key));
        f[1] -= h.getValue();
        stock.put(key, encode(f));
        released.add(new GenericRecordBuilder(itemSchema).set("productId", h.getKey()).set("released", h.getValue()).build());
      }
      reservations.put(orderId, ("RELEASED|" + r[0] + "|" + r[1] + "|").getBytes(StandardCharsets.UTF_8));
      GenericRecord out =
          answer("StockReservationReleased", e, "released", r[0], r[1])
              .set("reservationId", r[2])
              .set("reason", "CANCELLED")
              .set("items", released)
              .build();
      ctx.forward(new Record<>(orderId, codec.encode(out), ts), "released");
    }

    private void settle(GenericRecord e, long ts) {
      String[] r = live(e);
      if (r == null) {
        return;
      }
      String orderId = str(e, "orderId");
      Map<String, Integer> sold = new HashMap<>();
      for (GenericRecord item : items(e)) {
        sold.merge(str(item, "productId"), (Integer) item.get("quantity"), Integer::sum);
      }
      List<GenericRecord> settled = new ArrayList<>();
      Schema itemSchema = codec.schema("OrderSettled").getField("items").schema().getElementType();
      for (Map.Entry<String, Integer> h : held(r[3]).entrySet()) {
        String key = stockKey(r[0], r[1], h.getKey());
        long[] f = figures(stock.get(key));
        int n = Math.min(h.getValue(), sold.getOrDefault(h.getKey(), 0));
        f[0] -= n; // sold: off the shelf
        f[1] -= h.getValue(); // the whole hold ends; the unsold part is available again
        stock.put(key, encode(f));
        settled.add(new GenericRecordBuilder(itemSchema).set("productId", h.getKey()).set("quantity", n).build());
      }
      reservations.put(orderId, ("SOLD|" + r[0] + "|" + r[1] + "|").getBytes(StandardCharsets.UTF_8));
      GenericRecord out =
          answer("OrderSettled", e, "settled", r[0], r[1])
              .set("paymentEventId", str(e, "eventId"))
              .set("reservationId", r[2])
              .set("outcome", "SOLD")
              .set("late", false)
              .set("reason", null)
              .set("items", settled)
              .build();
      ctx.forward(new Record<>(orderId, codec.encode(out), ts), "settled");
    }

    /**
     * An answer to input {@code e} in schema {@code schema}: its eventId derived from e's and
     * {@code role}, e's occurredAt and orderId, the store; the caller sets the rest.
     */
    private GenericRecordBuilder answer(String schema, GenericRecord e, String role, String hq, String store) {
      return new GenericRecordBuilder(codec.schema(schema))
          .set("eventId", derive(str(e, "eventId"), role))
          .set("occurredAt", (Long) e.get("occurredAt"))
          .set("orderId", str(e, "orderId"))
          .set("hqId", hq)
          .set("storeId", store);
    }

    private GenericRecord failedItem(String productId, int requested, int available) {
      Schema s = codec.schema("StockReservationFailed").getField("items").schema().getElementType();
      return new GenericRecordBuilder(s).set("productId", productId).set("requested", requested).set("available", available).build();
    }

    @SuppressWarnings("unchecked")
    private static List<GenericRecord> items(GenericRecord e) {
      return (List<GenericRecord>) e.get("items");
    }

    private static String str(GenericRecord r, String field) {
      Object v = r.get(field);
      return v == null ? "" : v.toString();
    }

    private static String stockKey(String hq, String store, String product) {
      return hq + ":" + store + "|" + product;
    }

    /** [on hand, reserved] from a stored value (zeros when absent). */
    private static long[] figures(byte[] v) {
      if (v == null) {
        return new long[2];
      }
      ByteBuffer b = ByteBuffer.wrap(v);
      return new long[] {b.getLong(), b.getLong()};
    }

    private static byte[] encode(long[] f) {
      return ByteBuffer.allocate(16).putLong(f[0]).putLong(f[1]).array();
    }

    /** A deterministic output eventId from an input id and the output's role (name-based UUID). */
    private static String derive(String from, String role) {
      return UUID.nameUUIDFromBytes((from + "/" + role).getBytes(StandardCharsets.UTF_8)).toString();
    }
  }

  /** orderflow's schemas (the avro dir's current .avsc files) and their single-object codecs. */
  static final class Codec {
    private final SchemaStore.Cache store = new SchemaStore.Cache();
    private final Map<String, Schema> byName = new HashMap<>();
    private final Map<String, BinaryMessageDecoder<GenericRecord>> decoders = new HashMap<>();
    private final Map<String, BinaryMessageEncoder<GenericRecord>> encoders = new HashMap<>();

    static Codec load(Path dir) throws IOException {
      Codec c = new Codec();
      try (Stream<Path> files = Files.list(dir)) {
        for (Path f : files.filter(x -> x.toString().endsWith(".avsc")).sorted().toList()) {
          Schema s = new Schema.Parser().parse(f.toFile());
          c.store.addSchema(s);
          c.byName.put(s.getName(), s);
          c.decoders.put(s.getFullName(), new BinaryMessageDecoder<>(GenericData.get(), s, c.store));
          c.encoders.put(s.getName(), new BinaryMessageEncoder<>(GenericData.get(), s));
        }
      }
      if (c.byName.isEmpty()) {
        throw new IOException("no .avsc files in " + dir);
      }
      return c;
    }

    Schema schema(String name) {
      return byName.get(name);
    }

    GenericRecord decode(byte[] value) throws IOException {
      if (value == null || value.length < 10 || value[0] != (byte) 0xC3 || value[1] != (byte) 0x01) {
        throw new IOException("not Avro single-object encoded");
      }
      long fp = ByteBuffer.wrap(value, 2, 8).order(ByteOrder.LITTLE_ENDIAN).getLong();
      Schema writer = store.findByFingerprint(fp);
      if (writer == null) {
        throw new IOException("unknown schema fingerprint");
      }
      return decoders.get(writer.getFullName()).decode(value);
    }

    byte[] encode(GenericRecord r) {
      try {
        ByteBuffer b = encoders.get(r.getSchema().getName()).encode(r);
        byte[] out = new byte[b.remaining()];
        b.get(out);
        return out;
      } catch (IOException e) {
        throw new IllegalStateException(e);
      }
    }
  }

  private static Map<String, String> options(String[] args) {
    Map<String, String> o = new HashMap<>();
    for (int i = 0; i < args.length; i++) {
      if (!args[i].startsWith("--")) {
        throw new IllegalArgumentException("unexpected argument " + args[i]);
      }
      String k = args[i].substring(2);
      if (k.equals("help")) {
        o.put(k, "");
      } else if (i + 1 < args.length) {
        o.put(k, args[++i]);
      } else {
        throw new IllegalArgumentException("--" + k + " needs a value");
      }
    }
    return o;
  }

  private static String required(Map<String, String> o, String k) {
    String v = o.get(k);
    if (v == null) {
      throw new IllegalArgumentException("--" + k + " is required (--help)");
    }
    return v;
  }
}
