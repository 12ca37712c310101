//! Hostile input (issue 6): keys of 0 bytes and 1 MiB, invalid UTF-8, every byte value; values at
//! and over the limits; corrupted records; a record of another type under the same key. Every
//! one must give a value or one of `idem::Error`'s variants: never a panic, a wrong value, or a
//! change to another key's record.
//!
//! The fuzz targets: cargo-fuzz needs a nightly toolchain, which this project's machines cannot
//! fetch, so the key encoding and the record decoding are fuzzed by bounded proptest runs instead
//! (`canonical_bytes_is_injective_*`, `any_stored_bytes_decode_or_give_a_codec_error`). Each runs
//! for `IDEM_FUZZ_SECS` seconds (default 2) of fresh random batches; CI runs the default, set it
//! higher for a long run.
//!
//! The Redis and PostgreSQL parts run under their features, against servers the harnesses start.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use idem::key::{Encoder, KeyPart, canonical_bytes};
use idem::store::{Bytes, Claim};
use idem::{Error, Idempotent, Key, MemoryStore, Status, Store, idempotent};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde::{Deserialize, Serialize};
use support::chaos;

/// A byte string key part (what a UUID or a raw binary id encodes as).
#[derive(Clone, Debug)]
struct RawBytes(Vec<u8>);

impl KeyPart for RawBytes {
    fn encode(&self, enc: &mut Encoder<'_>) {
        enc.write_bytes(&self.0);
    }
}

/// A key given as a `dyn KeyPart`, so keys of many types fit in one list.
struct AnyKey(Box<dyn KeyPartDyn>);

trait KeyPartDyn {
    fn encode_dyn(&self, enc: &mut Encoder<'_>);
}

impl<T: KeyPart> KeyPartDyn for T {
    fn encode_dyn(&self, enc: &mut Encoder<'_>) {
        self.encode(enc);
    }
}

impl KeyPart for AnyKey {
    fn encode(&self, enc: &mut Encoder<'_>) {
        self.0.encode_dyn(enc);
    }
}

fn any_key<T: KeyPart + 'static>(t: T) -> AnyKey {
    AnyKey(Box::new(t))
}

/// The hostile keys: empty ones, huge ones, invalid UTF-8, every single byte value, and
/// namespaces that are empty, contain NUL or are long. Each (namespace, key) is distinct.
fn hostile_keys() -> Vec<(String, AnyKey)> {
    let mib = 1 << 20;
    let mut keys: Vec<(String, AnyKey)> = vec![
        (String::new(), any_key(RawBytes(Vec::new()))),
        (String::new(), any_key(String::new())),
        (String::new(), any_key(Vec::<u8>::new())),
        (String::new(), any_key(())),
        ("ns".into(), any_key(RawBytes(Vec::new()))),
        ("\0".into(), any_key(RawBytes(Vec::new()))),
        ("ns\0x".into(), any_key(String::new())),
        ("n".repeat(64 * 1024), any_key(String::new())),
        (String::new(), any_key(RawBytes(vec![0xab; mib]))),
        (String::new(), any_key(RawBytes(vec![0xab; mib - 1]))),
        (String::new(), any_key("x".repeat(mib))),
        (String::new(), any_key(vec![7u8; mib / 16])),
        // Invalid UTF-8: an overlong NUL, a surrogate, 0xff (and, below, every lone byte).
        (String::new(), any_key(RawBytes(vec![0xc0, 0x80]))),
        (String::new(), any_key(RawBytes(vec![0xed, 0xa0, 0x80]))),
        (String::new(), any_key(RawBytes(vec![0xff, 0xfe, 0xfd]))),
        (String::new(), any_key(RawBytes((0..=255u8).collect()))),
        (String::new(), any_key((0..=255u8).collect::<Vec<u8>>())),
        (
            String::new(),
            any_key(RawBytes((0..=255u8).rev().collect())),
        ),
        (String::new(), any_key("\0")),
        (String::new(), any_key("\u{10ffff}\u{feff}\u{202e}")),
    ];
    for b in 0..=255u8 {
        keys.push((String::new(), any_key(RawBytes(vec![b]))));
        keys.push(("bytes-as-seq".into(), any_key(vec![b])));
    }
    keys
}

fn key_bytes(ns: &str, key: &AnyKey) -> Vec<u8> {
    let mut bytes = canonical_bytes(ns);
    bytes.extend(canonical_bytes(key));
    bytes
}

/// Every hostile key through the executor on `store`: each runs once, each replays its own
/// value (no two of them share a record), and nothing panics. Returns how many keys were tried.
async fn hostile_keys_on(store: &dyn Store, label: &str) -> u64 {
    let keys = hostile_keys();
    let distinct: HashSet<Vec<u8>> = keys.iter().map(|(ns, k)| key_bytes(ns, k)).collect();
    assert_eq!(
        distinct.len(),
        keys.len(),
        "the hostile keys are distinct keys"
    );
    let runs = AtomicUsize::new(0);
    let prefix = format!(
        "hostile.{label}.{}.",
        idem::store::Token::generate().as_u128()
    );
    for round in 0..2 {
        for (i, (ns, key)) in keys.iter().enumerate() {
            let name = format!("{prefix}{ns}");
            let out = Idempotent::new(store, key)
                .name(name)
                .run_with_outcome(|| async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(i)
                })
                .await
                .unwrap_or_else(|e| panic!("{label}: hostile key {i}, round {round}: {e}"));
            assert_eq!(
                out.value, i,
                "{label}: hostile key {i} got another key's value"
            );
            let expected = if round == 0 {
                Status::Executed
            } else {
                Status::Replayed
            };
            assert_eq!(out.status, expected, "{label}: hostile key {i}");
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), keys.len());
    keys.len() as u64
}

/// Values that are hard to store: empty, 1 MiB, every byte, every kind of character.
async fn hostile_values_on(store: &dyn Store, label: &str) -> u64 {
    let mib = 1 << 20;
    let every_char: String = (0..0x11000u32)
        .filter_map(char::from_u32)
        .step_by(7)
        .collect();
    let strings: Vec<String> = vec![
        String::new(),
        "\0".into(),
        "\"\\\u{7f}\u{1}".into(),
        "v".repeat(mib),
        every_char,
    ];
    let bytes: Vec<Vec<u8>> = vec![Vec::new(), (0..=255u8).collect(), vec![0; mib / 4]];
    let ns = format!(
        "hostile-values.{label}.{}",
        idem::store::Token::generate().as_u128()
    );
    let mut tried = 0;
    for (i, v) in strings.iter().enumerate() {
        for round in 0..2 {
            let got = Idempotent::new(store, ("s", i))
                .name(ns.clone())
                .run(|| async { Ok::<_, Error>(v.clone()) })
                .await
                .unwrap_or_else(|e| panic!("{label}: string value {i} round {round}: {e}"));
            assert!(got == *v, "{label}: string value {i} changed in the store");
        }
        tried += 1;
    }
    for (i, v) in bytes.iter().enumerate() {
        for _ in 0..2 {
            let got = Idempotent::new(store, ("b", i))
                .name(ns.clone())
                .run(|| async { Ok::<_, Error>(v.clone()) })
                .await
                .unwrap_or_else(|e| panic!("{label}: byte value {i}: {e}"));
            assert!(got == *v, "{label}: byte value {i} changed in the store");
        }
        tried += 1;
    }
    tried
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Receipt {
    id: u64,
    cents: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Refund {
    reason: String,
}

/// Writes `written` under a key through the executor, then reads the key as `R`: must be
/// `Error::Codec`, and the record must still replay the first value afterwards.
async fn confused<W, R>(store: &dyn Store, label: &str, ns: &str, written: W)
where
    W: Serialize
        + serde::de::DeserializeOwned
        + Send
        + Clone
        + PartialEq
        + std::fmt::Debug
        + 'static,
    R: Serialize + serde::de::DeserializeOwned + Send + std::fmt::Debug + 'static,
{
    let what = format!(
        "{label}: a {} record read as {}",
        std::any::type_name::<W>(),
        std::any::type_name::<R>()
    );
    let first = Idempotent::new(store, "confused")
        .name(ns.to_owned())
        .run(|| async { Ok::<W, Error>(written.clone()) })
        .await
        .unwrap();
    assert_eq!(first, written);
    let ran = AtomicUsize::new(0);
    let read = Idempotent::new(store, "confused")
        .name(ns.to_owned())
        .run(|| async {
            ran.fetch_add(1, Ordering::SeqCst);
            Err::<R, Error>(Error::InProgress {
                retry_after: Duration::ZERO,
            })
        })
        .await;
    assert!(matches!(read, Err(Error::Codec(_))), "{what}: {read:?}");
    assert_eq!(ran.load(Ordering::SeqCst), 0, "{what}: the body ran");
    let again = Idempotent::new(store, "confused")
        .name(ns.to_owned())
        .run(|| async { Err::<W, Error>(Error::KeyReused) })
        .await;
    assert_eq!(again.ok(), Some(written), "{what}: the record changed");
}

/// Records of one type read as another: `Error::Codec` every time. Returns the cases tried.
async fn type_confusion_on(store: &dyn Store, label: &str) -> u64 {
    let base = format!(
        "confusion.{label}.{}",
        idem::store::Token::generate().as_u128()
    );
    let ns = |i: u32| format!("{base}.{i}");
    confused::<u64, String>(store, label, &ns(0), 5).await;
    confused::<String, u64>(store, label, &ns(1), "5x".into()).await;
    confused::<i64, u64>(store, label, &ns(2), -1).await;
    confused::<u64, u8>(store, label, &ns(3), 300).await;
    confused::<Vec<u8>, String>(store, label, &ns(4), vec![1, 2, 3]).await;
    confused::<bool, u64>(store, label, &ns(5), true).await;
    confused::<Receipt, Refund>(store, label, &ns(6), Receipt { id: 1, cents: 2 }).await;
    confused::<Refund, Receipt>(store, label, &ns(7), Refund { reason: "r".into() }).await;
    confused::<Option<u64>, u64>(store, label, &ns(8), None).await;
    confused::<String, char>(store, label, &ns(9), "two".into()).await;
    confused::<(u8, u8), (u8, u8, u8)>(store, label, &ns(10), (1, 2)).await;
    11
}

/// Completes a record with arbitrary bytes through the store, then reads it through the
/// executor as `T`: the result must be exactly what the record decoder (`idem::codec`) makes of
/// the bytes, a value or `Error::Codec`, and never a panic.
async fn decode_as<T>(store: &dyn Store, key: Key, bytes: &[u8]) -> Result<(), String>
where
    T: Serialize + serde::de::DeserializeOwned + Send + PartialEq + std::fmt::Debug + 'static,
{
    let expected = idem::codec::from_slice::<T>(bytes).ok();
    let got = Idempotent::new(store, key.to_hex())
        .name("decode")
        .run(|| async { Err::<T, Error>(Error::KeyReused) })
        .await;
    match (got, expected) {
        (Ok(v), Some(e)) if v == e => Ok(()),
        (Err(Error::Codec(_)), None) => Ok(()),
        (got, expected) => Err(format!(
            "bytes {bytes:?} as {}: got {got:?}, the decoder says {expected:?}",
            std::any::type_name::<T>()
        )),
    }
}

/// Seconds each bounded fuzz run takes (`IDEM_FUZZ_SECS`, default 2).
fn fuzz_budget() -> Duration {
    Duration::from_secs(chaos::env_u64("IDEM_FUZZ_SECS", 2))
}

/// Runs batches of `strategy` cases, each batch with a fresh random seed, until the budget is
/// spent; returns how many cases ran.
fn fuzz<S: Strategy>(strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) -> u64 {
    let started = Instant::now();
    let cases = std::cell::Cell::new(0u64);
    while started.elapsed() < fuzz_budget() || cases.get() == 0 {
        let mut runner = chaos::runner(64, 1_000);
        let result = runner.run(&strategy, |v| {
            cases.set(cases.get() + 1);
            test(v)
        });
        if let Err(err) = result {
            panic!("fuzz case failed: {err}");
        }
    }
    cases.get()
}

/// Stored bytes a decoder might meet: random ones, mutations of valid records, and idem 0.1's
/// JSON records.
fn stored_bytes() -> impl Strategy<Value = Vec<u8>> {
    let record = |v: &dyn Fn() -> Result<Vec<u8>, Error>| v().unwrap_or_default();
    let valid = prop_oneof![
        Just(record(&|| idem::codec::to_vec(&5u64))),
        Just(record(&|| idem::codec::to_vec(&"text".to_owned()))),
        Just(record(&|| idem::codec::to_vec(&vec![1u32, 2, 3]))),
        Just(record(&|| idem::codec::to_vec(&Receipt {
            id: 1,
            cents: 2
        }))),
        Just(record(&|| idem::codec::to_vec(&None::<bool>))),
        Just(record(&|| idem::codec::to_vec(&Some(true)))),
        Just(record(&|| idem::codec::to_vec(&-1i8))),
        Just(record(&|| idem::codec::to_vec(&u128::MAX))),
        Just(b"{\"id\":1,\"cents\":2}".to_vec()),
        Just(b"5".to_vec()),
    ];
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        (valid, any::<usize>(), any::<u8>(), any::<bool>()).prop_map(|(mut j, at, b, cut)| {
            let at = at % (j.len() + 1);
            if cut {
                j.truncate(at);
            } else {
                j.insert(at, b);
            }
            j
        }),
        "\\PC{0,16}".prop_map(|s| idem::codec::to_vec(&s).unwrap_or_default()),
    ]
}

/// Fuzz stand-in for the record decoder: any bytes in a completed record give the value the
/// record decoder reads from them or `Error::Codec`, for several result types, on the in-memory
/// store.
#[test]
fn any_stored_bytes_decode_or_give_a_codec_error() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = MemoryStore::new();
    let cases = fuzz(stored_bytes(), |bytes| {
        runtime.block_on(async {
            let check = |r: Result<(), String>| r.map_err(TestCaseError::fail);
            // One record per type: the executor key is derived from the record key's hex.
            for ty in 0..6u8 {
                let raw = Key::new("raw", &(ty, idem::store::Token::generate().as_u128()));
                let key = Key::new("decode", &raw.to_hex());
                let token = match store.claim(key, None, Duration::from_secs(60)).await {
                    Ok(Claim::Acquired(t)) => t,
                    other => return Err(TestCaseError::fail(format!("{other:?}"))),
                };
                store
                    .complete(
                        key,
                        token,
                        None,
                        Bytes::from(bytes.clone()),
                        Duration::from_secs(60),
                    )
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                match ty {
                    0 => check(decode_as::<u64>(&store, raw, &bytes).await)?,
                    1 => check(decode_as::<String>(&store, raw, &bytes).await)?,
                    2 => check(decode_as::<Vec<u32>>(&store, raw, &bytes).await)?,
                    3 => check(decode_as::<Option<bool>>(&store, raw, &bytes).await)?,
                    4 => check(decode_as::<Receipt>(&store, raw, &bytes).await)?,
                    _ => check(decode_as::<i8>(&store, raw, &bytes).await)?,
                }
                store.remove(key).await.unwrap();
            }
            Ok(())
        })
    });
    chaos::report(
        "fuzz_record_decoding",
        &[("cases", cases), ("decodes", cases * 6)],
    );
}

/// A key value of any shape, for the encoding fuzz.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Val {
    U(u128),
    I(i128),
    Bool(bool),
    Char(char),
    Str(String),
    Bytes(Vec<u8>),
    Opt(Option<Box<Val>>),
    Tuple(Vec<Val>),
    Seq(Vec<Val>),
    Set(BTreeSet<Val>),
    Map(BTreeMap<Val, Val>),
    /// Only in [`Val::normal`]'s output: a set or map as the multiset of its normalised entries.
    NormalSet(Vec<Val>),
    NormalMap(Vec<(Val, Val)>),
}

impl KeyPart for Val {
    fn encode(&self, enc: &mut Encoder<'_>) {
        match self {
            Val::U(v) => v.encode(enc),
            Val::I(v) => v.encode(enc),
            Val::Bool(v) => v.encode(enc),
            Val::Char(v) => v.encode(enc),
            Val::Str(v) => v.encode(enc),
            Val::Bytes(v) => enc.write_bytes(v),
            Val::Opt(v) => v.as_deref().encode(enc),
            Val::Tuple(parts) => {
                enc.write_tuple_header(parts.len());
                for p in parts {
                    p.encode(enc);
                }
            }
            Val::Seq(items) => items.encode(enc),
            // Through a HashSet / HashMap, whose iteration order is random: the encoding must
            // not depend on it.
            Val::Set(items) => items.iter().cloned().collect::<HashSet<Val>>().encode(enc),
            Val::Map(items) => items
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<HashMap<Val, Val>>()
                .encode(enc),
            Val::NormalSet(_) | Val::NormalMap(_) => unreachable!("never encoded"),
        }
    }
}

impl Val {
    /// The value as a key: integers are keys by value whatever their type, so a non-negative
    /// `I` is the `U` of the same value. Sets and maps are already ordered.
    fn normal(&self) -> Val {
        match self {
            Val::I(v) if *v >= 0 => Val::U(*v as u128),
            Val::Opt(v) => Val::Opt(v.as_ref().map(|b| Box::new(b.normal()))),
            Val::Tuple(p) => Val::Tuple(p.iter().map(Val::normal).collect()),
            Val::Seq(p) => Val::Seq(p.iter().map(Val::normal).collect()),
            Val::Set(s) => {
                let mut items: Vec<Val> = s.iter().map(Val::normal).collect();
                items.sort();
                Val::NormalSet(items)
            }
            Val::Map(m) => {
                let mut items: Vec<(Val, Val)> =
                    m.iter().map(|(k, v)| (k.normal(), v.normal())).collect();
                items.sort();
                Val::NormalMap(items)
            }
            other => other.clone(),
        }
    }
}

fn val() -> impl Strategy<Value = Val> {
    let leaf = prop_oneof![
        prop_oneof![
            Just(0u128),
            Just(1),
            Just(u128::MAX),
            any::<u128>(),
            0..300u128
        ]
        .prop_map(Val::U),
        prop_oneof![
            Just(-1i128),
            Just(i128::MIN),
            Just(0),
            any::<i128>(),
            -300..300i128
        ]
        .prop_map(Val::I),
        any::<bool>().prop_map(Val::Bool),
        any::<char>().prop_map(Val::Char),
        "\\PC{0,6}".prop_map(Val::Str),
        proptest::collection::vec(any::<u8>(), 0..6).prop_map(Val::Bytes),
        Just(Val::Opt(None)),
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            inner.clone().prop_map(|v| Val::Opt(Some(Box::new(v)))),
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Val::Tuple),
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Val::Seq),
            proptest::collection::btree_set(inner.clone(), 0..4).prop_map(Val::Set),
            proptest::collection::btree_map(inner.clone(), inner, 0..4).prop_map(Val::Map),
        ]
    })
}

/// Fuzz stand-in for the key encoder: two values that differ as keys never encode the same (and
/// never get the same `Key`); two that are the same key (integers of different types, maps and
/// sets built in any order) always do.
#[test]
fn canonical_bytes_is_injective_on_random_values() {
    let cases = fuzz((val(), val()), |(a, b)| {
        let (ea, eb) = (canonical_bytes(&a), canonical_bytes(&b));
        prop_assert_eq!(&ea, &canonical_bytes(&a), "encoding is deterministic");
        let same_key = a.normal() == b.normal();
        prop_assert_eq!(
            ea == eb,
            same_key,
            "{:?} and {:?}: same key {} but encodings equal {}",
            a,
            b,
            same_key,
            ea == eb
        );
        prop_assert_eq!(Key::new("ns", &a) == Key::new("ns", &b), same_key);
        // A value next to a near copy of itself: a tuple around it, a sequence of it.
        prop_assert_ne!(canonical_bytes(&(&a,)), canonical_bytes(&vec![a.clone()]));
        prop_assert_ne!(canonical_bytes(&(&a, &b)), canonical_bytes(&(&b, &a, ())));
        Ok(())
    });
    chaos::report("fuzz_key_encoding", &[("pairs", cases)]);
}

/// Maps and sets with the same contents encode the same whatever their insertion order and
/// their hasher, and the same as the ordered (`BTree`) ones.
#[test]
fn canonical_bytes_is_injective_and_order_free_for_maps() {
    let entries = proptest::collection::vec((val(), val()), 0..12);
    let cases = fuzz((entries, any::<u64>()), |(entries, seed)| {
        let mut forward = HashMap::new();
        for (k, v) in &entries {
            forward.insert(k.clone(), v.clone());
        }
        let ordered: BTreeMap<Val, Val> = forward.clone().into_iter().collect();
        let mut shuffled: Vec<(Val, Val)> = ordered.clone().into_iter().collect();
        // A deterministic shuffle from the seed.
        let mut s = seed | 1;
        for i in (1..shuffled.len()).rev() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            shuffled.swap(i, (s % (i as u64 + 1)) as usize);
        }
        let mut backward = HashMap::new();
        for (k, v) in shuffled.iter().rev() {
            backward.insert(k.clone(), v.clone());
        }
        let expected = canonical_bytes(&ordered);
        prop_assert_eq!(&canonical_bytes(&forward), &expected);
        prop_assert_eq!(&canonical_bytes(&backward), &expected);
        let keys: HashSet<Val> = shuffled.iter().map(|(k, _)| k.clone()).collect();
        let btree_keys: BTreeSet<Val> = ordered.keys().cloned().collect();
        prop_assert_eq!(canonical_bytes(&keys), canonical_bytes(&btree_keys));
        // One entry changed is another key.
        if let Some((k, v)) = ordered.iter().next() {
            let mut changed = ordered.clone();
            changed.insert(k.clone(), Val::Opt(Some(Box::new(v.clone()))));
            prop_assert_ne!(canonical_bytes(&changed), expected.clone());
            let mut fewer = ordered.clone();
            fewer.remove(&k.clone());
            prop_assert_ne!(canonical_bytes(&fewer), expected);
        }
        Ok(())
    });
    chaos::report("fuzz_map_encoding", &[("maps", cases)]);
}

#[test]
fn hostile_input_on_the_memory_store() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = MemoryStore::new();
    let (keys, values, confusion) = runtime.block_on(async {
        (
            hostile_keys_on(&store, "memory").await,
            hostile_values_on(&store, "memory").await,
            type_confusion_on(&store, "memory").await,
        )
    });
    let typed = runtime.block_on(typed_confusion());
    let bound = runtime.block_on(entries_bound());
    chaos::report(
        "hostile_memory",
        &[
            ("keys", keys),
            ("values", values),
            ("type_confusions", confusion + typed),
            ("at_the_entries_bound", bound),
        ],
    );
}

#[idempotent(store = store, key = id, name = "tests.hostile.shared-name")]
async fn charge(store: &MemoryStore, id: u64) -> Result<Receipt, Error> {
    Ok(Receipt { id, cents: 100 })
}

#[idempotent(store = store, key = id, name = "tests.hostile.shared-name")]
async fn refund(store: &MemoryStore, id: u64) -> Result<Refund, Error> {
    Ok(Refund {
        reason: format!("{id}"),
    })
}

#[idempotent(store = store, key = id, name = "tests.hostile.shared-name")]
async fn charge_cents(store: &MemoryStore, id: u64) -> Result<u64, Error> {
    Ok(id)
}

/// Two functions that share a name (a copy-paste, or a type changed between deployments): the
/// in-memory store keeps `charge`'s result typed, and `refund` reading it gets `Error::Codec`,
/// not a value of the wrong type; `charge` still replays its own.
async fn typed_confusion() -> u64 {
    let store = MemoryStore::new();
    let first = charge(&store, 9).await.unwrap();
    assert_eq!(first, Receipt { id: 9, cents: 100 });
    let other = refund(&store, 9).await;
    assert!(matches!(other, Err(Error::Codec(_))), "{other:?}");
    let other = charge_cents(&store, 9).await;
    assert!(matches!(other, Err(Error::Codec(_))), "{other:?}");
    assert_eq!(charge(&store, 9).await.unwrap(), first);
    // The other way round, on another key.
    assert_eq!(refund(&store, 10).await.unwrap().reason, "10");
    assert!(matches!(charge(&store, 10).await, Err(Error::Codec(_))));
    4
}

/// The in-memory store's documented limit is its number of entries: at the bound a new key gets
/// `Error::StoreFull` (no live record is evicted), keys in the store are still served, and once the
/// records expire a sweep makes room again.
async fn entries_bound() -> u64 {
    tokio::time::pause();
    let store = MemoryStore::with_max_entries(100);
    let ttl = Duration::from_secs(5);
    for k in 0..100u32 {
        Idempotent::new(&store, k)
            .name("test")
            .ttl(ttl)
            .run(|| async move { Ok::<_, Error>(k) })
            .await
            .unwrap();
    }
    assert_eq!(store.len(), 100);
    let ran = AtomicUsize::new(0);
    let full = Idempotent::new(&store, 100u32)
        .name("test")
        .run(|| async {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(100u32)
        })
        .await;
    assert!(matches!(full, Err(Error::StoreFull(_))), "{full:?}");
    assert_eq!(
        ran.load(Ordering::SeqCst),
        0,
        "no body runs without a record"
    );
    for k in 0..100u32 {
        let v = Idempotent::new(&store, k)
            .name("test")
            .run(|| async { Ok::<_, Error>(u32::MAX) })
            .await
            .unwrap();
        assert_eq!(v, k, "records in a full store are still replayed");
    }
    assert!(store.len() <= store.max_entries());
    tokio::time::advance(ttl + Duration::from_secs(2)).await;
    let v = Idempotent::new(&store, 100u32)
        .name("test")
        .run(|| async { Ok::<_, Error>(100u32) })
        .await
        .expect("expired records are swept to make room");
    assert_eq!(v, 100);
    assert!(store.len() <= store.max_entries());
    tokio::time::resume();
    102
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use support::redis::{RedisServer, Resp};

    async fn store_on(url: &str, test: &str) -> idem::RedisStore {
        idem::RedisStore::builder()
            .prefix(format!(
                "hostile:{test}:{}:",
                idem::store::Token::generate().as_u128()
            ))
            .connect(url)
            .await
            .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hostile_input_on_the_redis_store() {
        let server = RedisServer::shared();
        let store = store_on(&server.url(), "input").await;
        let keys = hostile_keys_on(&store, "redis").await;
        let values = hostile_values_on(&store, "redis").await;
        let confusion = type_confusion_on(&store, "redis").await;
        chaos::report(
            "hostile_redis",
            &[
                ("keys", keys),
                ("values", values),
                ("type_confusions", confusion),
            ],
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn durations_up_to_a_century_on_the_redis_store() {
        let store = store_on(&RedisServer::shared().url(), "durations").await;
        check_extreme_durations(Arc::new(store), "redis", &EXTREME[..3]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn extreme_durations_on_the_redis_store() {
        let store = store_on(&RedisServer::shared().url(), "durations").await;
        check_extreme_durations(Arc::new(store), "redis", &EXTREME).await;
    }

    /// Redis refuses a bulk argument longer than `proto-max-bulk-len` (1 MiB here, its
    /// smallest setting): a result of exactly that size is stored and replayed; one byte more
    /// is `Error::Store` from the store and, through the executor, the value for the first
    /// caller and `Error::Codec` ("could not be stored") for later ones: the body never runs
    /// again. Other records are untouched and the store keeps working.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn values_at_and_over_the_servers_limit() {
        let server = RedisServer::start();
        assert_eq!(
            server.cmd(&["CONFIG", "SET", "proto-max-bulk-len", "1048576"]),
            Resp::Simple("OK".into())
        );
        let store = store_on(&server.url(), "limit").await;
        let limit = 1 << 20;
        let neighbour = Idempotent::new(&store, "neighbour")
            .name("test")
            .run(|| async { Ok::<_, Error>(7u8) })
            .await
            .unwrap();
        assert_eq!(neighbour, 7);

        // The record of a string is the string and a few bytes of framing: size it exactly.
        let framing = idem::codec::to_vec(&"a".repeat(limit)).unwrap().len() - limit;
        let at = "a".repeat(limit - framing);
        assert_eq!(idem::codec::to_vec(&at).unwrap().len(), limit);
        let got = Idempotent::new(&store, "at")
            .name("test")
            .run_with_outcome(|| async { Ok::<_, Error>(at.clone()) })
            .await
            .unwrap();
        assert_eq!((got.value.len(), got.status), (at.len(), Status::Executed));
        assert!(got.expires_in.is_some(), "a value at the limit is stored");
        let again = Idempotent::new(&store, "at")
            .name("test")
            .run_with_outcome(|| async { Ok::<_, Error>(String::new()) })
            .await
            .unwrap();
        assert!(again.value == at && again.status == Status::Replayed);

        let over = "b".repeat(limit - framing + 1);
        let started = Instant::now();
        let got = Idempotent::new(&store, "over")
            .name("test")
            .lease(Duration::from_millis(500))
            .run_with_outcome(|| async { Ok::<_, Error>(over.clone()) })
            .await
            .expect("the body ran: its value is returned even though it could not be stored");
        assert!(got.value == over);
        assert_eq!(got.expires_in, None, "nothing was stored");
        assert!(started.elapsed() < store.timeout() * 3 + Duration::from_secs(5));

        let key = Key::new("", "over directly");
        let token = match store.claim(key, None, Duration::from_secs(5)).await {
            Ok(Claim::Acquired(t)) => t,
            other => panic!("{other:?}"),
        };
        let direct = store
            .complete(
                key,
                token,
                None,
                Bytes::from(vec![b'x'; limit + 1]),
                Duration::from_secs(60),
            )
            .await;
        assert!(matches!(direct, Err(Error::Store(_))), "{direct:?}");
        // The claim is still the caller's: a value within the limit completes it.
        let done = store
            .complete(
                key,
                token,
                None,
                Bytes::from_static(b"1"),
                Duration::from_secs(60),
            )
            .await
            .expect("the store works after refusing a value");
        assert_eq!(done, idem::store::Completion::Stored);

        // The neighbour is untouched; the oversized key never runs its body again, even after
        // its lease: the executor recorded that its result could not be stored.
        let n = Idempotent::new(&store, "neighbour")
            .name("test")
            .run(|| async { Ok::<_, Error>(0u8) })
            .await
            .unwrap();
        assert_eq!(n, 7);
        tokio::time::sleep(Duration::from_millis(600)).await;
        let again = Idempotent::new(&store, "over")
            .name("test")
            .run(|| async { Ok::<_, Error>("small".to_owned()) })
            .await;
        assert!(
            matches!(&again, Err(Error::Codec(e)) if e.to_string().contains("could not be stored")),
            "{again:?}"
        );
        chaos::report(
            "hostile_redis_limits",
            &[("values_at_limit", 1), ("values_over_limit", 2)],
        );
    }

    #[derive(Clone, Debug)]
    enum Field {
        Missing,
        Valid,
        Garbage(Vec<u8>),
    }

    fn field() -> impl Strategy<Value = Field> {
        prop_oneof![
            1 => Just(Field::Missing),
            3 => Just(Field::Valid),
            2 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Field::Garbage),
        ]
    }

    /// Hash records written by hand with every field valid, missing or garbage, with or without
    /// an expiry: every store operation answers a result or `Error::Store` (never a panic), a
    /// record that is not a well-formed idem record is left byte for byte as it was, and a
    /// well-formed one is read as what it says.
    #[test]
    fn corrupted_records_are_errors_and_left_alone() {
        let server = RedisServer::shared();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let store = runtime.block_on(store_on(&server.url(), "corrupt"));
        let state = prop_oneof![
            Just(b"running".to_vec()),
            Just(b"done".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..8)
        ];
        let strategy = (
            field(),
            state,
            field(),
            field(),
            field(),
            field(),
            any::<bool>(),
        );
        let cases = fuzz(
            strategy,
            |(marker, state, state_field, token, fp, value, expiry)| {
                let id = idem::store::Token::generate().as_u128();
                let key = Key::new("corrupt", &id);
                let name = store.record_name(&key);
                let mut hset: Vec<Vec<u8>> = vec![b"HSET".to_vec(), name.clone().into_bytes()];
                let mut put = |f: &str, field: &Field, valid: &[u8]| match field {
                    Field::Missing => {}
                    Field::Valid => hset.extend([f.as_bytes().to_vec(), valid.to_vec()]),
                    Field::Garbage(g) => hset.extend([f.as_bytes().to_vec(), g.clone()]),
                };
                put("idem", &marker, b"1");
                put("state", &state_field, &state);
                put("token", &token, b"0123456789abcdef0123456789abcdef");
                put("fp", &fp, &[7u8; 32]);
                put("value", &value, b"\"v\"");
                if hset.len() == 2 {
                    hset.extend([b"other".to_vec(), b"x".to_vec()]);
                }
                let args: Vec<&[u8]> = hset.iter().map(Vec::as_slice).collect();
                server.cmd_bytes(&args);
                if expiry {
                    server.cmd(&["PEXPIRE", &name, "60000"]);
                }
                let snapshot = server.cmd(&["DUMP", &name]);
                let get = |f: &str| match server.cmd(&["HGET", &name, f]) {
                    Resp::Bulk(b) => b,
                    other => panic!("HGET: {other:?}"),
                };
                let state_now = get("state");
                let well_formed = get("idem").as_deref() == Some(b"1")
                    && expiry
                    && matches!(state_now.as_deref(), Some(b"running") | Some(b"done"))
                    && get("token").is_some_and(|t| t.len() == 32)
                    && get("fp").is_none_or(|f| f.len() == 32)
                    && (state_now.as_deref() != Some(b"done") || get("value").is_some());
                let token = idem::store::Token::generate();
                let lease = Duration::from_secs(5);
                let (claim, complete, renew, release, call) = runtime.block_on(async {
                    let claim = store.claim(key, None, lease).await;
                    let complete = store
                        .complete(key, token, None, Bytes::from_static(b"1"), lease)
                        .await
                        .map(|_| ());
                    let renew = store.renew(key, token, lease).await.map(|_| ());
                    let release = store.release(key, token).await.map(|_| ());
                    let call = Idempotent::new(&store, id)
                        .name("corrupt")
                        .on_conflict(idem::OnConflict::Reject)
                        .run(|| async { Ok::<String, Error>("ran".into()) })
                        .await;
                    (claim, complete, renew, release, call)
                });
                let others = [
                    ("complete", &complete),
                    ("renew", &renew),
                    ("release", &release),
                ];
                if well_formed {
                    match (state_now.as_deref(), &claim) {
                        (Some(b"running"), Ok(Claim::Busy { .. })) => {
                            prop_assert!(
                                matches!(call, Err(Error::InProgress { .. })),
                                "{:?}",
                                call
                            );
                        }
                        (Some(b"done"), Ok(Claim::Completed(done))) => {
                            let stored = get("value");
                            prop_assert_eq!(Some(done.value.to_vec()), stored.clone());
                            let expected =
                                stored.and_then(|b| idem::codec::from_slice::<String>(&b).ok());
                            match (&call, expected) {
                                (Ok(v), Some(e)) => prop_assert_eq!(v, &e),
                                (Err(Error::Codec(_)), None) => {}
                                (call, e) => {
                                    return Err(TestCaseError::fail(format!(
                                        "{hset:?}: the call gave {call:?}, expected {e:?}"
                                    )));
                                }
                            }
                        }
                        _ => {
                            return Err(TestCaseError::fail(format!(
                                "a well-formed record {hset:?} gave {claim:?}"
                            )));
                        }
                    }
                    for (op, r) in others {
                        prop_assert!(r.is_ok(), "{} of {:?}: {:?}", op, hset, r);
                    }
                } else {
                    prop_assert!(
                        matches!(claim, Err(Error::Store(_))),
                        "claim of {:?}: {:?}",
                        hset,
                        claim
                    );
                    prop_assert!(
                        matches!(call, Err(Error::Store(_))),
                        "call on {:?}: {:?}",
                        hset,
                        call
                    );
                    for (op, r) in others {
                        prop_assert!(
                            matches!(r, Err(Error::Store(_))),
                            "{} of {:?}: {:?}",
                            op,
                            hset,
                            r
                        );
                    }
                    prop_assert_eq!(
                        server.cmd(&["DUMP", &name]),
                        snapshot,
                        "the record {:?} changed",
                        hset
                    );
                }
                server.cmd(&["DEL", &name]);
                Ok(())
            },
        );
        chaos::report("hostile_redis_corrupt_records", &[("records", cases)]);
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use idem::PostgresStore;
    use support::postgres::PgServer;

    async fn store() -> PostgresStore {
        let store = PostgresStore::connect(&PgServer::shared().url())
            .await
            .expect("store");
        store.migrate().await.expect("migrate");
        store
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hostile_input_on_the_postgres_store() {
        let store = store().await;
        let keys = hostile_keys_on(&store, "postgres").await;
        let values = hostile_values_on(&store, "postgres").await;
        let confusion = type_confusion_on(&store, "postgres").await;
        chaos::report(
            "hostile_postgres",
            &[
                ("keys", keys),
                ("values", values),
                ("type_confusions", confusion),
            ],
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn durations_up_to_a_century_on_the_postgres_store() {
        check_extreme_durations(Arc::new(store().await), "postgres", &EXTREME[..3]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn extreme_durations_on_the_postgres_store() {
        check_extreme_durations(Arc::new(store().await), "postgres", &EXTREME).await;
    }

    /// A store timeout of `Duration::MAX` ("no timeout", from configuration): operations run,
    /// they do not panic.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unbounded_store_timeout_does_not_panic() {
        let store = PostgresStore::builder()
            .timeout(Duration::MAX)
            .connect(&PgServer::shared().url())
            .await
            .expect("store");
        let task = tokio::spawn(async move {
            store.migrate().await.expect("migrate");
            Idempotent::new(&store, "unbounded timeout")
                .name("test")
                .run(|| async { Ok::<_, Error>(1u8) })
                .await
        });
        let result = task.await;
        assert!(
            matches!(result, Ok(Ok(1))),
            "{:?}",
            result.map_err(|e| e.is_panic())
        );
    }

    /// Rows written by hand with odd expiries (±infinity, the ends of PostgreSQL's timestamp
    /// range, past and future) and odd values (none, empty, garbage, JSON), with and without a
    /// fingerprint: every operation answers a result or an `idem::Error` (never a panic), a
    /// call never returns a value other than the stored one or its own body's (and its own
    /// only where the row had expired), and other rows are untouched.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn odd_rows_are_results_or_errors_never_panics() {
        let store = store().await;
        let table = format!("\"{}\".\"{}\"", store.schema(), store.table());
        let neighbour = Idempotent::new(&store, ("odd-rows", "neighbour"))
            .name("test")
            .run(|| async { Ok::<_, Error>("n".to_owned()) })
            .await
            .unwrap();
        let expiries: &[(&str, bool)] = &[
            ("'infinity'", false),
            ("'-infinity'", true),
            ("statement_timestamp() + interval '1 minute'", false),
            ("statement_timestamp() - interval '1 minute'", true),
            ("'294276-12-31 23:59:59+00'", false),
            ("'4713-01-01 00:00:00+00 BC'", true),
            ("'2000-01-01 00:00:00+00'", true),
        ];
        let values: &[Option<&[u8]>] = &[
            None,
            Some(b""),
            Some(b"\"v\""),
            Some(b"{garbage"),
            Some(&[0xff, 0x00, 0xfe]),
        ];
        let client = store.pool().get().await.expect("a connection");
        let mut tried = 0u64;
        for (expiry, expired) in expiries {
            for value in values {
                for fp in [None, Some(vec![9u8; 32])] {
                    tried += 1;
                    let id = idem::store::Token::generate().as_u128();
                    let key = Key::new("odd-rows", &id);
                    let token = idem::store::Token::generate()
                        .as_u128()
                        .to_be_bytes()
                        .to_vec();
                    let sql = format!(
                        "INSERT INTO {table} (key, token, fingerprint, value, expires_at) \
                         VALUES ($1, $2, $3, $4, {expiry})"
                    );
                    client
                        .execute(&sql, &[&&key.as_bytes()[..], &token, &fp, value])
                        .await
                        .unwrap_or_else(|e| panic!("insert {expiry} {value:?}: {e}"));
                    let what = format!("row expiring {expiry} with value {value:?}, fp {fp:?}");
                    let lease = Duration::from_secs(5);
                    let t = idem::store::Token::generate();
                    let _ = store.claim(key, None, lease).await;
                    let _ = store
                        .complete(key, t, None, Bytes::from_static(b"1"), lease)
                        .await;
                    let _ = store.renew(key, t, lease).await;
                    let _ = store.release(key, t).await;
                    let _ = store.wait(key, Duration::from_millis(30)).await;
                    let call = Idempotent::new(&store, id)
                        .name("odd-rows")
                        .on_conflict(idem::OnConflict::Reject)
                        .run(|| async { Ok::<String, Error>("ran".into()) })
                        .await;
                    match &call {
                        Ok(v) if v == "ran" => {
                            assert!(*expired, "{what}: the body ran although the row was live")
                        }
                        Ok(v) => assert!(
                            *value == Some(b"\"v\"") && v == "v" && !*expired,
                            "{what}: a wrong value {v:?}"
                        ),
                        Err(_) => {}
                    }
                    let _ = store.remove(key).await;
                }
            }
        }
        let again = Idempotent::new(&store, ("odd-rows", "neighbour"))
            .name("test")
            .run(|| async { Ok::<_, Error>("changed".to_owned()) })
            .await
            .unwrap();
        assert_eq!(again, neighbour, "a neighbouring record changed");
        chaos::report("hostile_postgres_odd_rows", &[("rows", tried)]);
    }
}

/// The durations at the ends of their range that a caller can hand in (a `Duration` expression
/// in `ttl = ...` or `lease = ...`, or a wait bound read from configuration).
const EXTREME: [Duration; 5] = [
    Duration::ZERO,
    Duration::from_nanos(1),
    Duration::from_secs(100 * 365 * 24 * 3600),
    Duration::from_secs(u64::MAX),
    Duration::MAX,
];

/// Every extreme duration as `ttl`, `lease` and `wait_timeout` of a call, and as the lease, ttl
/// and timeout of each store operation, each in a task of its own: returns the cases that
/// panicked (the contract: a value or an `idem::Error`, never a panic) and how many ran.
async fn extreme_durations_on(
    store: Arc<dyn Store>,
    label: &str,
    spans: &[Duration],
) -> (Vec<String>, u64) {
    let ns = format!(
        "durations.{label}.{}",
        idem::store::Token::generate().as_u128()
    );
    let mut cases: Vec<(String, tokio::task::JoinHandle<()>)> = Vec::new();
    for (i, span) in spans.iter().copied().enumerate() {
        for what in ["ttl", "lease", "wait_timeout"] {
            let (store, ns) = (store.clone(), ns.clone());
            let task = tokio::spawn(async move {
                let call = || {
                    let call = Idempotent::new(&*store, (what, i)).name(ns.clone());
                    match what {
                        "ttl" => call.ttl(span),
                        "lease" => call.lease(span),
                        _ => call.wait_timeout(span),
                    }
                };
                if what == "wait_timeout" {
                    // The wait bound only matters while another call holds the key.
                    let held = Key::new(&ns, &(what, i));
                    let _ = store.claim(held, None, Duration::from_millis(50)).await;
                }
                let first = call().run(|| async { Ok::<_, Error>(i) }).await;
                let held = what == "wait_timeout";
                assert!(
                    matches!(first, Ok(v) if v == i)
                        || matches!(first, Err(Error::Store(_)))
                        || (held && matches!(first, Err(Error::InProgress { .. }))),
                    "{what} = {span:?}: {first:?}"
                );
                let _ = call().run(|| async { Ok::<_, Error>(i) }).await;
            });
            cases.push((format!("Idempotent::{what}({span:?})"), task));
        }
        for op in ["claim", "renew", "complete", "wait"] {
            let (store, ns) = (store.clone(), ns.clone());
            let task = tokio::spawn(async move {
                let key = Key::new(&ns, &(op, i));
                let lease = if op == "claim" {
                    span
                } else {
                    Duration::from_secs(60)
                };
                let Ok(Claim::Acquired(token)) = store.claim(key, None, lease).await else {
                    return;
                };
                match op {
                    "renew" => drop(store.renew(key, token, span).await),
                    "complete" => drop(
                        store
                            .complete(key, token, None, Bytes::from_static(b"1"), span)
                            .await,
                    ),
                    "wait" => {
                        // Held for 50 ms more: the wait ends when the lease runs out.
                        let _ = store.renew(key, token, Duration::from_millis(50)).await;
                        drop(store.wait(key, span).await);
                    }
                    _ => {}
                }
                let _ = store.claim(key, None, Duration::from_secs(1)).await;
            });
            cases.push((format!("Store::{op} with {span:?}"), task));
        }
    }
    let ran = cases.len() as u64;
    let mut panicked = Vec::new();
    for (name, task) in cases {
        match tokio::time::timeout(Duration::from_secs(30), task).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) if err.is_panic() => {
                let payload = err.into_panic();
                let msg = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panicked.push(format!("{name}: {msg}"));
            }
            Ok(Err(err)) => panicked.push(format!("{name}: {err}")),
            Err(_) => panicked.push(format!("{name}: hung for 30 s")),
        }
    }
    (panicked, ran)
}

/// Runs [`extreme_durations_on`] and fails with every case that panicked.
async fn check_extreme_durations(store: Arc<dyn Store>, label: &str, spans: &[Duration]) {
    let (panicked, ran) = extreme_durations_on(store, label, spans).await;
    assert!(
        panicked.is_empty(),
        "{label}: {} of {ran} calls with extreme durations panicked:\n{}",
        panicked.len(),
        panicked.join("\n")
    );
    chaos::report(&format!("hostile_{label}_durations"), &[("durations", ran)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_durations_on_the_memory_store() {
    check_extreme_durations(Arc::new(MemoryStore::new()), "memory", &EXTREME).await;
}

/// Durations from zero to a century, which every store handles (`EXTREME` without the two
/// that overflow, see the ignored test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_up_to_a_century_on_the_memory_store() {
    check_extreme_durations(Arc::new(MemoryStore::new()), "memory", &EXTREME[..3]).await;
}
