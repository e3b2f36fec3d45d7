//! Records from outside producers (issue 19): is a record of an external topic keyed and
//! partitioned as orderflow's partitioner would have done it?
//!
//! orderflow's workers keep one state per input partition, so a join by order only works when
//! every record of an order is on the same partition number. orderflow's producers use the Java
//! client's partitioner (`murmur2_random`, [`partitioner::partition_for`]); an outside producer
//! on a librdkafka client keeps its default (`consistent_random`, CRC32, [`partitioner::consistent`])
//! and puts 5 keys in 6 elsewhere (6 partitions). So no joining worker reads an external topic
//! (`topology check` refuses it): the deduplicator, which keeps no per-key state, re-keys every
//! external record from the event's own fields into internal repartition topics
//! (`stock.commands` by store, `order.created.repartition` and `order.cancelled.repartition` by
//! order). A misrouted record is therefore handled, never mis-joined; this module tells it
//! apart so the producer gets fixed: [`Routes::check`] names what is wrong with a record
//! ([`Misroute`]) and the producer's likely partitioner; the worker counts it in
//! `orderflow_misrouted_records_total{worker,topic,reason}` and logs the first of each topic
//! and reason; `orderflow doctor` samples the external topics of a live broker with the same
//! check.

use std::borrow::Cow;
use std::collections::BTreeMap;

use orderflow_api::Event;

use crate::partitioner;
use crate::topology::Loaded;

/// What is wrong with an external record's routing, checked in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Misroute {
    /// The record has no key (a librdkafka producer then picks a random partition).
    NoKey,
    /// The key is not the event's own key field (e.g. not its `orderId`).
    KeyMismatch,
    /// The key is right but the partition is not the one orderflow's partitioner gives it.
    Partition,
}

impl Misroute {
    /// The `reason` label: `no_key`, `key_mismatch` or `partition`.
    pub fn as_str(self) -> &'static str {
        match self {
            Misroute::NoKey => "no_key",
            Misroute::KeyMismatch => "key_mismatch",
            Misroute::Partition => "partition",
        }
    }
}

/// One misrouted record: why, the key it should have had and the partition that key maps to,
/// and the producer's likely partitioner (for [`Misroute::Partition`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub reason: Misroute,
    /// The event's own key (`orderId`, or `hqId:storeId`).
    pub expected_key: String,
    /// The partition of `expected_key` under orderflow's partitioner.
    pub expected_partition: i32,
    /// e.g. `consistent_random (librdkafka's default, CRC32)`.
    pub likely_partitioner: &'static str,
}

/// Which field of the event a topic is keyed by (`key` of `[topics.X]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyOf {
    /// `orderId`.
    Order,
    /// `hqId:storeId`.
    Store,
}

impl KeyOf {
    fn parse(key: &str) -> Option<KeyOf> {
        match key {
            "orderId" => Some(KeyOf::Order),
            "hqId:storeId" => Some(KeyOf::Store),
            _ => None,
        }
    }

    /// The event's key field: borrowed for `orderId`, so a well-routed order record (the hot
    /// path) allocates nothing.
    fn of(self, event: &Event) -> Option<Cow<'_, str>> {
        match self {
            KeyOf::Order => event.order_id().map(Cow::Borrowed),
            KeyOf::Store => Some(Cow::Owned(event.store_key())),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Route {
    key: KeyOf,
    partitions: i32,
}

/// The routing rules of a worker's external inputs: each one's key field and partition count.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    by_topic: BTreeMap<String, Route>,
}

impl Routes {
    /// The routes of the topics among `inputs` that `loaded` marks `external` and keys by
    /// `orderId` or `hqId:storeId`, with their declared partition counts.
    pub fn of(loaded: &Loaded, inputs: &[String]) -> Routes {
        let t = &loaded.topology;
        let by_topic = inputs
            .iter()
            .filter_map(|i| {
                let spec = t.topics.get(i).filter(|s| s.external.is_some())?;
                Some((i.clone(), Route { key: KeyOf::parse(&spec.key)?, partitions: spec.partitions.max(1) }))
            })
            .collect();
        Routes { by_topic }
    }

    /// The external topics checked.
    pub fn topics(&self) -> impl Iterator<Item = &str> {
        self.by_topic.keys().map(String::as_str)
    }

    /// Uses the broker's partition count of `topic` (its producers partition by it) instead of
    /// the declared one. Ignored for a topic not routed or a count below 1.
    pub fn set_partitions(&mut self, topic: &str, partitions: i32) {
        if let Some(r) = self.by_topic.get_mut(topic).filter(|_| partitions > 0) {
            r.partitions = partitions;
        }
    }

    /// What is wrong with `event`'s record (read from `topic`, `partition`, with record key
    /// `key`), or `None` when it is where orderflow would have put it, or `topic` is not routed,
    /// or the event has no key field of that kind.
    pub fn check(&self, topic: &str, partition: i32, key: Option<&[u8]>, event: &Event) -> Option<Finding> {
        let route = self.by_topic.get(topic)?;
        let expected_key = route.key.of(event)?;
        let expected_partition = partitioner::partition_for(expected_key.as_bytes(), route.partitions);
        let finding = |reason, likely| {
            Some(Finding { reason, expected_key: expected_key.to_string(), expected_partition, likely_partitioner: likely })
        };
        match key {
            None => finding(Misroute::NoKey, "none (a record without a key goes to a random or sticky partition)"),
            Some(k) if k != expected_key.as_bytes() => finding(Misroute::KeyMismatch, "unknown (the key is not the event's)"),
            Some(_) if partition == expected_partition => None,
            Some(k) => finding(Misroute::Partition, likely_partitioner(k, partition, route.partitions)),
        }
    }
}

/// The partitioner that likely put `key` on `partition` of a topic of `partitions` partitions,
/// when orderflow's (`murmur2_random`) did not.
pub fn likely_partitioner(key: &[u8], partition: i32, partitions: i32) -> &'static str {
    if partitioner::consistent(key, partitions) == partition {
        "consistent_random (librdkafka's default, CRC32: Python, Go, .NET, Node, C/C++ clients); set partitioner=murmur2_random"
    } else {
        "unknown (random, round-robin or a custom partitioner)"
    }
}

#[cfg(test)]
mod tests {
    use orderflow_api::fixtures::order_created;

    use super::*;

    fn routes() -> Routes {
        let mut by_topic = BTreeMap::new();
        by_topic.insert("order.created".to_string(), Route { key: KeyOf::Order, partitions: 6 });
        by_topic.insert("inventory.adjusted".to_string(), Route { key: KeyOf::Store, partitions: 6 });
        Routes { by_topic }
    }

    /// A key whose murmur2 and CRC32 partitions differ (of 6).
    fn split_key() -> String {
        (0..)
            .map(|i| format!("O-{i}"))
            .find(|k| partitioner::partition_for(k.as_bytes(), 6) != partitioner::consistent(k.as_bytes(), 6))
            .expect("some key")
    }

    #[test]
    fn a_record_where_orderflow_would_put_it_passes() {
        let e = Event::OrderCreated(order_created("e1", "O-7", 0, &[("P-1", 1)]));
        let p = partitioner::partition_for(b"O-7", 6);
        assert_eq!(routes().check("order.created", p, Some(b"O-7"), &e), None);
        assert_eq!(routes().check("stock.reserved", (p + 1) % 6, Some(b"O-7"), &e), None, "internal topics are not checked");
    }

    #[test]
    fn a_crc32_partitioned_record_is_a_partition_misroute_named_consistent_random() {
        let k = split_key();
        let e = Event::OrderCreated(order_created("e1", &k, 0, &[("P-1", 1)]));
        let f = routes().check("order.created", partitioner::consistent(k.as_bytes(), 6), Some(k.as_bytes()), &e).expect("misrouted");
        assert_eq!(f.reason, Misroute::Partition);
        assert_eq!(f.expected_partition, partitioner::partition_for(k.as_bytes(), 6));
        assert!(f.likely_partitioner.starts_with("consistent_random"), "{}", f.likely_partitioner);
    }

    #[test]
    fn missing_and_foreign_keys_are_named_before_the_partition() {
        let e = Event::OrderCreated(order_created("e1", "O-7", 0, &[("P-1", 1)]));
        let p = partitioner::partition_for(b"O-7", 6);
        assert_eq!(routes().check("order.created", p, None, &e).map(|f| f.reason), Some(Misroute::NoKey));
        assert_eq!(routes().check("order.created", p, Some(b"C-7"), &e).map(|f| f.reason), Some(Misroute::KeyMismatch));
    }

    #[test]
    fn the_broker_partition_count_wins_over_the_declared_one() {
        let mut r = routes();
        r.set_partitions("order.created", 3);
        let e = Event::OrderCreated(order_created("e1", "O-7", 0, &[("P-1", 1)]));
        assert_eq!(r.check("order.created", partitioner::partition_for(b"O-7", 3), Some(b"O-7"), &e), None);
    }
}
