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
