//! The producers' partitioner: which partition a key goes to, computed here so a reader can go
//! straight to it (`orderflow trace` reads only the partitions an order's records can be on) and
//! so a worker can tell a record an outside producer put elsewhere ([`crate::routing`]), with the
//! partitioner that likely did ([`consistent`], librdkafka's default).

/// Kafka's murmur2 hash of `data` (the Java client's `Utils.murmur2`, librdkafka's
/// `rd_murmur2`): seed `0x9747b28c`, as a signed 32-bit integer.
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of `key` in a topic of `partitions` partitions, as the producers choose it:
/// librdkafka's `murmur2_random` partitioner (the runtime's default, see
/// `orderflow_runtime::kafka::client_config`), equal to the Java client's default for non-null
/// keys: `(murmur2(key) & 0x7fffffff) % partitions`. `partitions` must be positive.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    assert!(partitions > 0, "a topic has at least one partition");
    (murmur2(key) & 0x7fff_ffff) % partitions
}

/// The partition librdkafka's `consistent` / `consistent_random` partitioner (the default of
/// every librdkafka-based client: Python, Go, .NET, Node, C/C++) gives a non-empty `key`:
/// `crc32(key) % partitions` (`rd_kafka_msg_partitioner_consistent`, IEEE CRC-32 as zlib's).
/// `partitions` must be positive.
pub fn consistent(key: &[u8], partitions: i32) -> i32 {
    assert!(partitions > 0, "a topic has at least one partition");
    (crc32fast::hash(key) % partitions as u32) as i32
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // Kafka's clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java, testMurmur2.
        for (key, hash) in [
            (&b"21"[..], -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
            (b"abc", 479470107),
        ] {
            assert_eq!(murmur2(key), hash, "murmur2({:?})", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn partition_is_the_positive_hash_modulo_the_partitions() {
        // -973932308 & 0x7fffffff = 1173551340; % 6 = 0, % 4 = 0, % 7 = 1.
        assert_eq!(partition_for(b"21", 6), 1173551340 % 6);
        assert_eq!(partition_for(b"21", 7), 1173551340 % 7);
        assert_eq!(partition_for(b"abc", 6), 479470107 % 6);
        assert_eq!(partition_for(b"anything", 1), 0);
        for n in 1..20 {
            for k in ["", "O-1", "HQ-A:ST-B", "P-000123", "é"] {
                assert!((0..n).contains(&partition_for(k.as_bytes(), n)));
            }
        }
        // Every tail length (0..=3 bytes after the 4-byte blocks) is hashed.
        let hashes: BTreeSet<i32> = ["abcd", "abcde", "abcdef", "abcdefg"].iter().map(|k| murmur2(k.as_bytes())).collect();
        assert_eq!(hashes.len(), 4);
    }

    #[test]
    fn consistent_is_crc32_modulo_the_partitions() {
        // crc32("123456789") = 0xCBF43926 (the CRC-32 check value) = 3421780262; % 6 = 2.
        assert_eq!(consistent(b"123456789", 6), (3_421_780_262u32 % 6) as i32);
        assert_eq!(consistent(b"123456789", 1), 0);
    }
}
