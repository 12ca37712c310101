//! The key encoding is part of the stability promise: these golden vectors must never change.
//! If one fails, the change would orphan every record stored by earlier releases.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use idem::Key;
use idem::key::canonical_bytes;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// `Key::with_type_args` is deprecated (the attribute no longer adds type arguments), but the
// records it addressed must stay addressable: its vector stays pinned.
#[allow(deprecated)]
#[test]
fn golden_digests() {
    let cases: &[(Key, &str)] = &[
        (Key::new("", &()), GOLDEN[0]),
        (Key::new("payments.charge.v1", &42u64), GOLDEN[1]),
        (
            Key::new("payments.charge.v1", &("order", 42u64, -7i32)),
            GOLDEN[2],
        ),
        (
            Key::new("orders", &(Some("ü"), None::<u8>, vec![1u8, 2], 'x', true)),
            GOLDEN[3],
        ),
        (Key::with_type_args("generic", &["u8"], &1u8), GOLDEN[4]),
    ];
    for (i, (key, expected)) in cases.iter().enumerate() {
        assert_eq!(key.to_hex(), *expected, "golden vector {i} changed");
    }
}

const GOLDEN: [&str; 5] = [
    "74a4cc37162da3169c7c6b524e8bfc72ca183b4c5aedac707c8910b54182973a",
    "09eac351bf7e9e0b0ae7b807a06265549e3eecb32eac5fc9434ab8ec35160090",
    "328598ca38509372e1c0cd3a27343c15030f872ca251797ed9389b02868ccce7",
    "a9238ab332321abae0d221a2872793d9115264ba8714168b547a968ac4615225",
    "9a0341b4b1405b5de4c27edab2adf47d1232f8a4c2fa24722d728d7f03dc0deb",
];

#[test]
fn golden_encoding() {
    assert_eq!(
        hex(&canonical_bytes(&("id", 1u8))),
        "09020000000000000005020000000000000069640200000000000000000000000000000001"
    );
}

#[test]
fn maps_and_sets_encode_the_same_whatever_their_order() {
    let mut a = HashMap::new();
    let mut b = HashMap::new();
    for i in 0..100u32 {
        a.insert(i, format!("v{i}"));
    }
    for i in (0..100u32).rev() {
        b.insert(i, format!("v{i}"));
    }
    let tree: BTreeMap<u32, String> = a.clone().into_iter().collect();
    assert_eq!(Key::new("m", &a), Key::new("m", &b));
    assert_eq!(Key::new("m", &a), Key::new("m", &tree));

    let set: HashSet<&str> = ["x", "y", "z"].into_iter().collect();
    let tree_set: BTreeSet<&str> = ["z", "y", "x"].into_iter().collect();
    assert_eq!(Key::new("s", &set), Key::new("s", &tree_set));
}

#[allow(deprecated)]
#[test]
fn namespaces_and_type_arguments_separate_keys() {
    assert_ne!(Key::new("a", &1u8), Key::new("b", &1u8));
    assert_ne!(
        Key::with_type_args("f", &["u8"], &1u8),
        Key::with_type_args("f", &["u16"], &1u8)
    );
    // Namespace and value are length-prefixed, so they cannot bleed into each other.
    assert_ne!(Key::new("ab", &"c"), Key::new("a", &"bc"));
}

// ---------------------------------------------------------------------------------------------
// `#[derive(KeyPart)]`: a struct is the tuple of its fields, an enum variant the tuple of its
// name and fields (issue 17).

mod derived {
    use std::collections::BTreeSet;

    use idem::key::canonical_bytes;
    use idem::{Key, KeyPart};

    #[derive(KeyPart)]
    struct Order {
        id: u64,
        customer: String,
        #[key(skip)]
        #[allow(dead_code)]
        note: String,
    }

    #[derive(KeyPart)]
    #[allow(dead_code)]
    struct Pair<A, B>(A, #[key(skip)] f64, B)
    where
        B: Clone;

    #[derive(KeyPart)]
    struct Marker;

    #[derive(KeyPart)]
    struct Nested<'a> {
        order: &'a Order,
        tags: BTreeSet<&'static str>,
    }

    #[derive(KeyPart)]
    enum Event {
        Created { order: u64, at: u32 },
        Paid(u64),
        Cancelled,
    }

    #[derive(KeyPart)]
    enum Never {}

    /// Thirteen fields: more than the tuple impls go up to; the derive has no such limit.
    #[derive(KeyPart)]
    struct Wide(u8, u8, u8, u8, u8, u8, u8, u8, u8, u8, u8, u8, u8);

    fn order() -> Order {
        Order {
            id: 42,
            customer: "ada".into(),
            note: "leave at the door".into(),
        }
    }

    #[test]
    fn a_struct_is_the_tuple_of_its_kept_fields() {
        assert_eq!(canonical_bytes(&order()), canonical_bytes(&(42u64, "ada")));
        let other_note = Order {
            note: "ring twice".into(),
            ..order()
        };
        assert_eq!(
            Key::new("orders", &order()),
            Key::new("orders", &other_note),
            "a skipped field does not change the key"
        );
        assert_eq!(
            canonical_bytes(&Pair(1u8, 0.5, "b".to_owned())),
            canonical_bytes(&(1u8, "b"))
        );
        assert_eq!(canonical_bytes(&Marker), canonical_bytes(&()));
        let nested = Nested {
            order: &order(),
            tags: ["b", "a"].into_iter().collect(),
        };
        assert_eq!(
            canonical_bytes(&nested),
            canonical_bytes(&(
                (42u64, "ada"),
                ["a", "b"].into_iter().collect::<BTreeSet<_>>()
            ))
        );
        // By hand, as a user would write it for a tuple of 13.
        struct ByHand([u8; 13]);
        impl KeyPart for ByHand {
            fn encode(&self, enc: &mut idem::key::Encoder<'_>) {
                enc.write_tuple_header(13);
                for part in &self.0 {
                    part.encode(enc);
                }
            }
        }
        let wide = Wide(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13);
        let by_hand = ByHand([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]);
        assert_eq!(canonical_bytes(&wide), canonical_bytes(&by_hand));
    }

    #[test]
    fn an_enum_variant_is_the_tuple_of_its_name_and_fields() {
        assert_eq!(
            canonical_bytes(&Event::Created { order: 7, at: 9 }),
            canonical_bytes(&("Created", 7u64, 9u32))
        );
        assert_eq!(
            canonical_bytes(&Event::Paid(7)),
            canonical_bytes(&("Paid", 7u64))
        );
        assert_eq!(
            canonical_bytes(&Event::Cancelled),
            canonical_bytes(&("Cancelled",))
        );
        let _ = |never: &Never| canonical_bytes(never);
    }

    /// Pinned: a derived type's key must never change, or its records would be orphaned.
    #[test]
    fn derived_golden_digests() {
        assert_eq!(
            Key::new("orders", &order()).to_hex(),
            "84ad1f892f27fde343441562eba099b3eab95b411404cf1f697115bb5659c56f"
        );
        assert_eq!(
            Key::new("events", &Event::Created { order: 7, at: 9 }).to_hex(),
            "28708cfbd251df977a48c7c66c3cdee9def7810102aacb265571c0280a0ba23f"
        );
    }

    #[derive(Debug, thiserror::Error)]
    #[error(transparent)]
    struct AppError(#[from] idem::Error);

    #[idem::idempotent(name = "keys.derived.ship", store = idem::MemoryStore::new())]
    async fn ship(order: &Order) -> Result<u64, AppError> {
        Ok(order.id)
    }

    /// A derived type is a default-key argument, with the key `Key::new(name, &order)`.
    #[tokio::test]
    async fn a_derived_type_is_a_default_key_argument() {
        assert_eq!(ship(&order()).await.unwrap(), 42);
    }
}
