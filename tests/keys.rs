//! The key encoding is part of the stability promise: these golden vectors must never change.
//! If one fails, the change would orphan every record stored by earlier releases.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use idem::Key;
use idem::key::canonical_bytes;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

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
    "d9de9c80a1d77321d51cd356828cd44f3e0e9ee0ea552a12b8c86fc62631cf49",
    "a4148b0a42749b07265f394386445ebac23817cc1bc1a1e02020743f487f6fdb",
    "83d350c3c1cf3b19d5cf4cb4911383ad9ed80d4d8718d0e19c44d41f971288fe",
    "34f8c2b04bcc3e11ace81443659901de6b9165af18a733d7af89200262d9d302",
    "fb8d13a8d233ea5a785c0b6c312143b91c4c7cbf3a32fc907e65c43e03dd7f54",
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
