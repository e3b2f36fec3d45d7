//! Parsing Canonical Form of an Avro schema and its CRC-64-AVRO fingerprint, exactly as the Avro
//! specification ("Parsing Canonical Form for Schemas", "Schema Fingerprints") and its reference
//! implementation (Java `org.apache.avro.SchemaNormalization`) define them; Python's fastavro
//! computes the same.
//!
//! Why not `apache_avro::Schema::canonical_form`: apache-avro 0.21/0.22 keeps a logical type's
//! underlying type as an object (`{"type":"long"}` for `timestamp-millis`) where the
//! specification reduces it to the primitive name (`"long"`), so every schema with a logical
//! type got a fingerprint no other language computes (issue 14; the crate's defect, to be
//! reported upstream). The form is built here from the schema's JSON text instead, applying the
//! specification's transformations:
//!
//! * [PRIMITIVES] `{"type":"long", ...}` → `"long"` (whatever other attributes it has, such as
//!   `logicalType`);
//! * [FULLNAMES] named types and references by their full name (`namespace.name`, the
//!   enclosing namespace inherited as the specification says);
//! * [STRIP] only `name`, `type`, `fields`, `symbols`, `items`, `values`, `size` are kept (no
//!   `doc`, `aliases`, `default`, `order`, `logicalType`, `namespace`, ...);
//! * [ORDER] attributes in that order; [WHITESPACE] none outside strings; `"error"` is written as
//!   `"record"` (as Java does);
//! * a named type is written in full at its first occurrence and by its full name afterwards.
//!
//! The schema is expected to be valid Avro (the codec parses it with apache-avro first); the
//! errors here only name what this walk cannot make sense of.

use std::collections::HashSet;

use apache_avro::rabin::Rabin;
use serde_json::Value as Json;

/// The primitive type names of the specification.
const PRIMITIVES: [&str; 8] = ["null", "boolean", "int", "long", "float", "double", "bytes", "string"];

/// The Parsing Canonical Form of the schema whose JSON text is `schema_json`.
///
/// Errors: the text is not JSON, or a schema node has no usable `type` / `name` / `size`
/// (message names the node).
pub fn parsing_canonical_form(schema_json: &str) -> Result<String, String> {
    let json: Json = serde_json::from_str(schema_json).map_err(|e| format!("not JSON: {e}"))?;
    let mut out = String::with_capacity(schema_json.len());
    Walk { defined: HashSet::new() }.schema(&json, "", &mut out)?;
    Ok(out)
}

/// CRC-64-AVRO (Rabin) of `canonical_form`, as the `u64` whose little-endian bytes go into bytes
/// 2..10 of an Avro single-object header (specification, "Single-object encoding").
pub fn crc64_avro(canonical_form: &str) -> u64 {
    use digest::Digest;
    let bytes = Rabin::digest(canonical_form.as_bytes());
    u64::from_le_bytes(bytes.as_slice().try_into().expect("CRC-64-AVRO is 8 bytes"))
}

/// [`crc64_avro`] of [`parsing_canonical_form`]: the spec-exact fingerprint of `schema_json`.
///
/// Errors: as [`parsing_canonical_form`].
pub fn fingerprint(schema_json: &str) -> Result<u64, String> {
    parsing_canonical_form(schema_json).map(|pcf| crc64_avro(&pcf))
}

/// The walk's memory: full names already written in full.
struct Walk {
    defined: HashSet<String>,
}

/// The full name of `name` declared (or referenced) in namespace `namespace` (`""`: none).
fn full_name(name: &str, namespace: &str) -> String {
    if name.contains('.') || namespace.is_empty() {
        name.to_string()
    } else {
        format!("{namespace}.{name}")
    }
}

/// The namespace part of a full name (`""` when it has none).
fn namespace_of(full: &str) -> &str {
    full.rsplit_once('.').map(|(ns, _)| ns).unwrap_or("")
}

impl Walk {
    /// Writes schema `node`, met in namespace `namespace`, in canonical form.
    fn schema(&mut self, node: &Json, namespace: &str, out: &mut String) -> Result<(), String> {
        match node {
            Json::String(name) => {
                self.reference(name, namespace, out);
                Ok(())
            }
            Json::Array(branches) => {
                out.push('[');
                for (i, branch) in branches.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    self.schema(branch, namespace, out)?;
                }
                out.push(']');
                Ok(())
            }
            Json::Object(attrs) => match attrs.get("type") {
                Some(Json::String(t)) => self.complex(t, attrs, namespace, out),
                // `{"type": {...}}` / `{"type": [...]}`: the inner schema is the schema.
                Some(inner @ (Json::Object(_) | Json::Array(_))) => self.schema(inner, namespace, out),
                _ => Err(format!("schema object without a string \"type\": {node}")),
            },
            other => Err(format!("not a schema: {other}")),
        }
    }

    /// A type named by a string: a primitive, or a reference to a named type.
    fn reference(&self, name: &str, namespace: &str, out: &mut String) {
        out.push('"');
        if PRIMITIVES.contains(&name) {
            out.push_str(name);
        } else {
            out.push_str(&full_name(name, namespace));
        }
        out.push('"');
    }

    /// A schema object of type `t`.
    fn complex(&mut self, t: &str, attrs: &serde_json::Map<String, Json>, namespace: &str, out: &mut String) -> Result<(), String> {
        match t {
            "array" => {
                out.push_str(r#"{"type":"array","items":"#);
                self.schema(attrs.get("items").ok_or("array without \"items\"")?, namespace, out)?;
                out.push('}');
            }
            "map" => {
                out.push_str(r#"{"type":"map","values":"#);
                self.schema(attrs.get("values").ok_or("map without \"values\"")?, namespace, out)?;
                out.push('}');
            }
            "record" | "error" | "enum" | "fixed" => {
                let name = attrs.get("name").and_then(Json::as_str).ok_or_else(|| format!("{t} without a \"name\""))?;
                let declared_ns = match attrs.get("namespace") {
                    Some(Json::String(ns)) => ns.as_str(),
                    Some(Json::Null) => "",
                    _ => namespace,
                };
                let full = full_name(name, declared_ns);
                if !self.defined.insert(full.clone()) {
                    out.push_str(&format!("\"{full}\""));
                    return Ok(());
                }
                let kind = if t == "error" { "record" } else { t };
                out.push_str(&format!(r#"{{"name":"{full}","type":"{kind}""#));
                match kind {
                    "record" => {
                        let fields =
                            attrs.get("fields").and_then(Json::as_array).ok_or_else(|| format!("record {full} without \"fields\""))?;
                        out.push_str(r#","fields":["#);
                        for (i, field) in fields.iter().enumerate() {
                            if i > 0 {
                                out.push(',');
                            }
                            let field_name =
                                field.get("name").and_then(Json::as_str).ok_or_else(|| format!("a field of {full} without a \"name\""))?;
                            let field_type = field.get("type").ok_or_else(|| format!("field {full}.{field_name} without a \"type\""))?;
                            out.push_str(&format!(r#"{{"name":"{field_name}","type":"#));
                            self.schema(field_type, namespace_of(&full), out)?;
                            out.push('}');
                        }
                        out.push(']');
                    }
                    "enum" => {
                        let symbols =
                            attrs.get("symbols").and_then(Json::as_array).ok_or_else(|| format!("enum {full} without \"symbols\""))?;
                        let symbols: Vec<String> = symbols
                            .iter()
                            .map(|s| {
                                s.as_str().map(|s| format!("\"{s}\"")).ok_or_else(|| format!("enum {full}: symbol {s} is not a string"))
                            })
                            .collect::<Result<_, _>>()?;
                        out.push_str(&format!(r#","symbols":[{}]"#, symbols.join(",")));
                    }
                    _ => {
                        let size =
                            attrs.get("size").and_then(Json::as_u64).ok_or_else(|| format!("fixed {full} without an integer \"size\""))?;
                        out.push_str(&format!(r#","size":{size}"#));
                    }
                }
                out.push('}');
            }
            // A primitive (with or without a logical type), or a reference in object form.
            other => self.reference(other, namespace, out),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The specification's test vectors (`share/test/data/schema-tests.txt` of the Avro
    /// repository) that exercise each rule, with the canonical forms and fingerprints given there.
    #[test]
    fn specification_vectors() {
        let cases = [
            (r#""int""#, r#""int""#, Some(0x7275d51a3f395c8fu64)),
            (r#"{"type":"int"}"#, r#""int""#, Some(0x7275d51a3f395c8f)),
            (r#"{"type":"long","logicalType":"timestamp-millis"}"#, r#""long""#, None),
            (r#"[ "int"  ]"#, r#"["int"]"#, None),
            (r#"{"type":"fixed","name":"foo","size":15}"#, r#"{"name":"foo","type":"fixed","size":15}"#, None),
            (
                r#"{"type":"enum","name":"x.y.foo","namespace":"bar","symbols":["A1","A2"]}"#,
                r#"{"name":"x.y.foo","type":"enum","symbols":["A1","A2"]}"#,
                None,
            ),
            (r#"{"type":"array","items":"int"}"#, r#"{"type":"array","items":"int"}"#, None),
            (r#"{"type":"map","values":{"type":"int"}}"#, r#"{"type":"map","values":"int"}"#, None),
            (
                r#"{"type":"record","name":"foo","namespace":"x.y","doc":"d","fields":[{"name":"f1","type":"boolean","default":true}]}"#,
                r#"{"name":"x.y.foo","type":"record","fields":[{"name":"f1","type":"boolean"}]}"#,
                None,
            ),
            (
                r#"{"type":"error","name":"foo","fields":[{"name":"f1","type":{"type":"fixed","name":"bar","size":2}},{"name":"f2","type":"bar"}]}"#,
                r#"{"name":"foo","type":"record","fields":[{"name":"f1","type":{"name":"bar","type":"fixed","size":2}},{"name":"f2","type":"bar"}]}"#,
                None,
            ),
            (
                r#"{"type":"record","name":"a.R","fields":[{"name":"n","type":{"type":"record","name":"N","fields":[]}},{"name":"m","type":["null","N"]}]}"#,
                r#"{"name":"a.R","type":"record","fields":[{"name":"n","type":{"name":"a.N","type":"record","fields":[]}},{"name":"m","type":["null","a.N"]}]}"#,
                None,
            ),
        ];
        for (schema, expected, fp) in cases {
            let pcf = parsing_canonical_form(schema).unwrap();
            assert_eq!(pcf, expected, "{schema}");
            if let Some(fp) = fp {
                assert_eq!(crc64_avro(&pcf), fp, "{schema}");
            }
        }
    }

    #[test]
    fn rejects_what_is_not_a_schema() {
        assert!(parsing_canonical_form("{").is_err());
        assert!(parsing_canonical_form("3").is_err());
        assert!(parsing_canonical_form(r#"{"type":"record","fields":[]}"#).unwrap_err().contains("name"));
    }
}
