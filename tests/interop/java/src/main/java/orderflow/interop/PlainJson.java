package orderflow.interop;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.node.ArrayNode;
import com.fasterxml.jackson.databind.node.JsonNodeFactory;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Collection;
import java.util.HashSet;
import java.util.Iterator;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericEnumSymbol;
import org.apache.avro.generic.GenericFixed;
import org.apache.avro.generic.GenericRecord;

/**
 * The "plain" JSON form of an Avro datum (not Avro's JSON encoding): a record is an object with
 * the Avro field names, a union is null or the plain value of its branch (no type wrapper), a
 * timestamp-millis long is its integer milliseconds, an enum or string is a string, an array is an
 * array, a map is an object, bytes and fixed are strings of ISO-8859-1 code points (as in Avro
 * default values).
 */
final class PlainJson {
  private static final JsonNodeFactory NODES = JsonNodeFactory.instance;
  private static final GenericData DATA = GenericData.get();

  private PlainJson() {}

  /** Generic datum (GenericData, no logical-type conversions) to plain JSON. */
  static JsonNode toPlain(Schema schema, Object datum) {
    switch (schema.getType()) {
      case NULL:
        return NODES.nullNode();
      case BOOLEAN:
        return NODES.booleanNode((Boolean) datum);
      case INT:
        return NODES.numberNode(((Number) datum).intValue());
      case LONG:
        return NODES.numberNode(((Number) datum).longValue());
      case FLOAT:
        return NODES.numberNode(((Number) datum).floatValue());
      case DOUBLE:
        return NODES.numberNode(((Number) datum).doubleValue());
      case STRING:
        return NODES.textNode(datum.toString());
      case ENUM:
        return NODES.textNode(((GenericEnumSymbol<?>) datum).toString());
      case BYTES: {
        ByteBuffer buf = ((ByteBuffer) datum).duplicate();
        byte[] bytes = new byte[buf.remaining()];
        buf.get(bytes);
        return NODES.textNode(new String(bytes, StandardCharsets.ISO_8859_1));
      }
      case FIXED:
        return NODES.textNode(new String(((GenericFixed) datum).bytes(), StandardCharsets.ISO_8859_1));
      case ARRAY: {
        ArrayNode out = NODES.arrayNode();
        for (Object item : (Collection<?>) datum) {
          out.add(toPlain(schema.getElementType(), item));
        }
        return out;
      }
      case MAP: {
        ObjectNode out = NODES.objectNode();
        for (Map.Entry<?, ?> e : ((Map<?, ?>) datum).entrySet()) {
          out.set(e.getKey().toString(), toPlain(schema.getValueType(), e.getValue()));
        }
        return out;
      }
      case UNION: {
        int branch = DATA.resolveUnion(schema, datum);
        return toPlain(schema.getTypes().get(branch), datum);
      }
      case RECORD: {
        GenericRecord record = (GenericRecord) datum;
        ObjectNode out = NODES.objectNode();
        for (Schema.Field field : schema.getFields()) {
          out.set(field.name(), toPlain(field.schema(), record.get(field.pos())));
        }
        return out;
      }
      default:
        throw new IllegalArgumentException("unsupported Avro type " + schema.getType());
    }
  }

  /**
   * Plain JSON to a generic datum of {@code schema}: a union takes null (when it has a null
   * branch) or the first other branch the value converts to; a missing record field takes its
   * default; an unknown field is an error.
   */
  static Object fromPlain(Schema schema, JsonNode node, String path) {
    switch (schema.getType()) {
      case NULL:
        if (node == null || node.isNull()) {
          return null;
        }
        throw mismatch(path, "null", node);
      case BOOLEAN:
        if (node.isBoolean()) {
          return node.booleanValue();
        }
        throw mismatch(path, "a boolean", node);
      case INT:
        if (node.isIntegralNumber() && node.canConvertToInt()) {
          return node.intValue();
        }
        throw mismatch(path, "a 32-bit integer", node);
      case LONG:
        if (node.isIntegralNumber() && node.canConvertToLong()) {
          return node.longValue();
        }
        throw mismatch(path, "a 64-bit integer", node);
      case FLOAT:
        if (node.isNumber()) {
          return node.floatValue();
        }
        throw mismatch(path, "a number", node);
      case DOUBLE:
        if (node.isNumber()) {
          return node.doubleValue();
        }
        throw mismatch(path, "a number", node);
      case STRING:
        if (node.isTextual()) {
          return node.textValue();
        }
        throw mismatch(path, "a string", node);
      case ENUM:
        if (node.isTextual() && schema.hasEnumSymbol(node.textValue())) {
          return new GenericData.EnumSymbol(schema, node.textValue());
        }
        throw mismatch(path, "one of " + schema.getEnumSymbols(), node);
      case BYTES:
        if (node.isTextual()) {
          return ByteBuffer.wrap(latin1(node.textValue(), path));
        }
        throw mismatch(path, "a string of bytes", node);
      case FIXED:
        if (node.isTextual()) {
          byte[] bytes = latin1(node.textValue(), path);
          if (bytes.length == schema.getFixedSize()) {
            return new GenericData.Fixed(schema, bytes);
          }
        }
        throw mismatch(path, schema.getFixedSize() + " bytes", node);
      case ARRAY: {
        if (!node.isArray()) {
          throw mismatch(path, "an array", node);
        }
        GenericData.Array<Object> out = new GenericData.Array<>(node.size(), schema);
        int i = 0;
        for (JsonNode item : node) {
          out.add(fromPlain(schema.getElementType(), item, path + "[" + i++ + "]"));
        }
        return out;
      }
      case MAP: {
        if (!node.isObject()) {
          throw mismatch(path, "an object (map)", node);
        }
        Map<String, Object> out = new LinkedHashMap<>();
        for (Iterator<Map.Entry<String, JsonNode>> it = node.fields(); it.hasNext(); ) {
          Map.Entry<String, JsonNode> e = it.next();
          out.put(e.getKey(), fromPlain(schema.getValueType(), e.getValue(), path + "." + e.getKey()));
        }
        return out;
      }
      case UNION: {
        List<String> failures = new ArrayList<>();
        for (Schema branch : schema.getTypes()) {
          if (branch.getType() == Schema.Type.NULL) {
            if (node == null || node.isNull()) {
              return null;
            }
            continue;
          }
          if (node == null || node.isNull()) {
            continue;
          }
          try {
            return fromPlain(branch, node, path);
          } catch (IllegalArgumentException e) {
            failures.add(e.getMessage());
          }
        }
        throw new IllegalArgumentException(
            path + ": no branch of union " + schema + " accepts " + node + " " + failures);
      }
      case RECORD: {
        if (node == null || !node.isObject()) {
          throw mismatch(path, "an object (record " + schema.getFullName() + ")", node);
        }
        Set<String> known = new HashSet<>();
        GenericData.Record out = new GenericData.Record(schema);
        for (Schema.Field field : schema.getFields()) {
          known.add(field.name());
          String fieldPath = path + "." + field.name();
          if (node.has(field.name())) {
            out.put(field.pos(), fromPlain(field.schema(), node.get(field.name()), fieldPath));
          } else if (field.hasDefaultValue()) {
            out.put(field.pos(), DATA.deepCopy(field.schema(), DATA.getDefaultValue(field)));
          } else {
            throw new IllegalArgumentException(fieldPath + ": missing, and the field has no default");
          }
        }
        for (Iterator<String> it = node.fieldNames(); it.hasNext(); ) {
          String name = it.next();
          if (!known.contains(name)) {
            throw new IllegalArgumentException(
                path + "." + name + ": no such field in " + schema.getFullName());
          }
        }
        return out;
      }
      default:
        throw new IllegalArgumentException(path + ": unsupported Avro type " + schema.getType());
    }
  }

  private static byte[] latin1(String s, String path) {
    for (int i = 0; i < s.length(); i++) {
      if (s.charAt(i) > 0xff) {
        throw new IllegalArgumentException(path + ": a bytes string may only hold U+0000..U+00FF");
      }
    }
    return s.getBytes(StandardCharsets.ISO_8859_1);
  }

  private static IllegalArgumentException mismatch(String path, String expected, JsonNode node) {
    return new IllegalArgumentException(path + ": expected " + expected + ", got " + node);
  }
}
