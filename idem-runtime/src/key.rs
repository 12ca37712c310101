//! Idempotency keys: the canonical encoding of a key value and its digest.
//!
//! A [`Key`] is the BLAKE3 digest of `(namespace, canonical encoding of the value)`. The encoding is part of this crate's stability promise: it does not depend on the
//! process, the machine, the platform's endianness or word size, the Rust version or the release
//! of this crate, and golden vectors in the tests pin it. Two values that are equal as keys encode
//! the same:
//!
//! - integers encode by value, whatever their width or signedness (`5u8`, `5i64` and `5u128`
//!   are one key), so widening a key type does not orphan stored records;
//! - `String`, `&str`, `Box<str>` and `Cow<str>` are one key; so are `Vec<T>`, `[T; N]` and `&[T]`;
//! - maps and sets encode their entries sorted by their encoding, so a `HashMap` encodes the
//!   same whatever its insertion order, and the same as a `BTreeMap` with the same entries.
//!
//! Encoding integers, strings, UUIDs, options and tuples of them streams straight into the
//! hasher and allocates nothing; only maps and sets buffer their entries to sort them.
//!
//! Stores only ever see the 32-byte digest, so a client-chosen key cannot be crafted to collide
//! with another's and read its result.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::rc::Rc;
use std::sync::{Arc, LazyLock};

/// BLAKE3 key-derivation context for keys. Changing it changes every key: never do.
const KEY_CONTEXT: &str = "idem 2026-11-23 idempotency key v1";
/// BLAKE3 key-derivation context for fingerprints. Changing it changes every fingerprint.
const FINGERPRINT_CONTEXT: &str = "idem 2026-11-23 request fingerprint v1";

// Keys and fingerprints are BLAKE3 keyed hashes under keys derived once from the contexts above,
// which separates the two domains without deriving a key on every call.
static KEY_HASH_KEY: LazyLock<[u8; 32]> = LazyLock::new(|| blake3::derive_key(KEY_CONTEXT, &[]));
static FINGERPRINT_HASH_KEY: LazyLock<[u8; 32]> =
    LazyLock::new(|| blake3::derive_key(FINGERPRINT_CONTEXT, &[]));

// One tag byte per kind of value keeps the encoding self-delimiting and unambiguous.
const TAG_FALSE: u8 = 0x00;
const TAG_TRUE: u8 = 0x01;
const TAG_UINT: u8 = 0x02;
const TAG_NEG_INT: u8 = 0x03;
const TAG_CHAR: u8 = 0x04;
const TAG_STR: u8 = 0x05;
const TAG_BYTES: u8 = 0x06;
const TAG_NONE: u8 = 0x07;
const TAG_SOME: u8 = 0x08;
const TAG_TUPLE: u8 = 0x09;
const TAG_SEQ: u8 = 0x0a;
const TAG_SET: u8 = 0x0b;
const TAG_MAP: u8 = 0x0c;

/// The identity of one idempotent operation: a 32-byte digest of its namespace and key value.
///
/// A `Key` can only be made by the canonical encoder ([`Key::new`]), so two keys are equal
/// exactly when their namespaces and key values are.
///
/// ```
/// use idem_runtime::Key;
///
/// let a = Key::new("payments.charge.v1", &("order", 42u64));
/// let b = Key::new("payments.charge.v1", &("order", 42u32));
/// assert_eq!(a, b); // integers are keys by value
/// assert_ne!(a, Key::new("payments.refund.v1", &("order", 42u64)));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key([u8; 32]);

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // The digest is uniformly distributed: eight of its bytes are as good as all 32 to a
        // (seeded) hasher, at a quarter of the cost.
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(prefix));
    }
}

impl Key {
    /// The key of `value` in `namespace`.
    ///
    /// `#[idempotent(name = "payments.charge.v1", key = id)]` stores under exactly
    /// `Key::new("payments.charge.v1", &id)`, so another process or an operator can compute it.
    pub fn new<V: KeyPart + ?Sized>(namespace: &str, value: &V) -> Key {
        Key::derive(namespace, &[], value)
    }

    /// The key of `value` in `namespace` specialised by type arguments.
    ///
    /// `#[idempotent]` no longer uses it: a function's default namespace names its type
    /// arguments itself, and `name = ...` is the namespace exactly as written ([`Key::new`]). It
    /// remains so that records written by generic functions with `name = ...` under the first
    /// 0.1 builds (which added the `core::any::type_name` of each type parameter) can still be
    /// addressed, for instance to remove them.
    #[deprecated(
        since = "0.1.0",
        note = "`#[idempotent]` keys are `Key::new(namespace, &key)`; this is only for records written by earlier builds"
    )]
    pub fn with_type_args<V: KeyPart + ?Sized>(
        namespace: &str,
        type_args: &[&str],
        value: &V,
    ) -> Key {
        Key::derive(namespace, type_args, value)
    }

    /// The digest of `(namespace, type arguments, value)`: the encoding the golden vectors pin
    /// (a key without type arguments encodes an empty list of them).
    fn derive<V: KeyPart + ?Sized>(namespace: &str, type_args: &[&str], value: &V) -> Key {
        let mut enc = Encoder::hashing(&KEY_HASH_KEY);
        enc.write_str(namespace);
        type_args.encode(&mut enc);
        value.encode(&mut enc);
        Key(enc.digest(&KEY_HASH_KEY))
    }

    /// [`Key::new`] in two steps, for the executor: `then` gets the key's canonical encoding,
    /// whose exact bytes the in-memory store finds records by, and takes the digest only if it
    /// needs it, so a replay found by its exact bytes hashes nothing with BLAKE3.
    ///
    /// The encoding lives on this call's stack (it is large: it can spill into the streaming
    /// hasher), so it is handed to a closure rather than returned.
    #[inline]
    pub(crate) fn encode_then<V: KeyPart + ?Sized, R>(
        namespace: &str,
        value: &V,
        then: impl FnOnce(&mut KeyEncoding<'_, '_>) -> R,
    ) -> R {
        let mut enc = Encoder::hashing(&KEY_HASH_KEY);
        enc.write_str(namespace);
        <[&str]>::encode(&[], &mut enc);
        value.encode(&mut enc);
        then(&mut KeyEncoding {
            enc: &mut enc,
            digest: None,
        })
    }

    /// The digest's 32 bytes; what remote stores use as the record's name.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Rebuilds a key from digest bytes read back from a store.
    pub fn from_digest(bytes: [u8; 32]) -> Key {
        Key(bytes)
    }

    /// The digest as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.to_string()
    }
}

/// A key's canonical encoding (what [`Key::new`] hashes), before its digest is taken; see
/// [`Key::encode_then`].
pub(crate) struct KeyEncoding<'e, 'a> {
    /// Borrowed, never moved: it is a few hundred bytes, and up to 2 KiB with its hasher.
    enc: &'e mut Encoder<'a>,
    /// The digest, once taken (the streaming hasher cannot finish twice).
    digest: Option<Key>,
}

impl KeyEncoding<'_, '_> {
    /// The exact bytes that the key's digest is taken of, when they fit on the stack: equal
    /// bytes are an equal key, and distinct bytes a distinct one (the encoding is injective).
    /// `None` for a long key, whose bytes went on into the streaming hasher.
    #[inline]
    pub(crate) fn exact(&self) -> Option<&[u8]> {
        match &self.enc.sink {
            Sink::Hash {
                stack,
                len,
                spill: None,
                ..
            } => stack.get(..*len),
            _ => None,
        }
    }

    /// The key: the digest of the encoding, exactly [`Key::new`]'s.
    pub(crate) fn digest(&mut self) -> Key {
        let enc = &mut self.enc;
        *self
            .digest
            .get_or_insert_with(|| Key(enc.digest(&KEY_HASH_KEY)))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({self})")
    }
}

/// A digest of the part of a request that must match on replay (see `fingerprint = ...`).
///
/// A completed record remembers the fingerprint of the call that made it; a later call with the
/// same key and another fingerprint fails with [`Error::KeyReused`](crate::Error::KeyReused)
/// instead of receiving a result that was computed for a different request.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

/// The replay rule: a call that gives a fingerprint may only replay a record (or inherit steps)
/// made with the same one; a call that gives none replays any.
pub(crate) fn fingerprint_matches(call: Option<Fingerprint>, stored: Option<Fingerprint>) -> bool {
    call.is_none() || stored == call
}

impl Fingerprint {
    /// The fingerprint of `value`, canonically encoded like a key.
    pub fn of<V: KeyPart + ?Sized>(value: &V) -> Fingerprint {
        let mut enc = Encoder::hashing(&FINGERPRINT_HASH_KEY);
        value.encode(&mut enc);
        Fingerprint(enc.digest(&FINGERPRINT_HASH_KEY))
    }

    /// The digest's 32 bytes, as stores keep them.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Rebuilds a fingerprint from bytes read back from a store.
    pub fn from_digest(bytes: [u8; 32]) -> Fingerprint {
        Fingerprint(bytes)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprint(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…)")
    }
}

/// How many bytes of a key's encoding are gathered on the stack before they go to the hasher.
/// Keys of integers, short strings and tuples of them fit, and are hashed in one call.
const STACK_BYTES: usize = 192;

/// Where a canonical encoding goes: a hasher, or a buffer (to sort map entries, and for tests).
// The large variant stays inline (no heap allocation, even for long keys); an `Encoder` is built in
// place and only ever borrowed, so its size is never copied.
#[allow(clippy::large_enum_variant)]
enum Sink<'a> {
    /// Bytes gather on the stack; only an encoding longer than [`STACK_BYTES`] starts the
    /// streaming hasher (about 2 KiB of state, initialised only then).
    Hash {
        key: &'a [u8; 32],
        stack: [u8; STACK_BYTES],
        len: usize,
        spill: Option<blake3::Hasher>,
    },
    Buf(&'a mut Vec<u8>),
}

/// The canonical encoder that [`KeyPart`] implementations write to.
///
/// Implement [`KeyPart`] for a type of your own by encoding the fields that identify it, usually
/// as a tuple; the encoder's primitives are there for byte strings and for custom containers.
pub struct Encoder<'a> {
    sink: Sink<'a>,
}

impl<'a> Encoder<'a> {
    #[inline(always)]
    fn hashing(key: &'a [u8; 32]) -> Encoder<'a> {
        Encoder {
            sink: Sink::Hash {
                key,
                stack: [0; STACK_BYTES],
                len: 0,
                spill: None,
            },
        }
    }

    /// The keyed digest of everything written: one call to BLAKE3 when the encoding fit on the
    /// stack, the streaming hasher (keyed with the same key) when it did not.
    fn digest(&mut self, key: &[u8; 32]) -> [u8; 32] {
        match &mut self.sink {
            Sink::Hash {
                stack,
                len,
                spill: Some(hasher),
                ..
            } => {
                hasher.update(&stack[..*len]);
                *hasher.finalize().as_bytes()
            }
            Sink::Hash {
                stack,
                len,
                spill: None,
                ..
            } => *blake3::keyed_hash(key, &stack[..*len]).as_bytes(),
            // Not reached: digests are only taken of hashing encoders.
            Sink::Buf(buf) => *blake3::keyed_hash(key, buf).as_bytes(),
        }
    }

    fn buffer(buf: &'a mut Vec<u8>) -> Encoder<'a> {
        Encoder {
            sink: Sink::Buf(buf),
        }
    }

    #[inline]
    fn raw(&mut self, bytes: &[u8]) {
        match &mut self.sink {
            Sink::Hash {
                key,
                stack,
                len,
                spill,
            } => {
                if let Some(room) = stack.get_mut(*len..*len + bytes.len()) {
                    room.copy_from_slice(bytes);
                    *len += bytes.len();
                } else {
                    // A long key (a long string, a large collection): stream it.
                    let hasher = spill.get_or_insert_with(|| blake3::Hasher::new_keyed(key));
                    hasher.update(&stack[..*len]);
                    hasher.update(bytes);
                    *len = 0;
                }
            }
            Sink::Buf(buf) => buf.extend_from_slice(bytes),
        }
    }

    fn len(&mut self, len: usize) {
        // usize → u64 is lossless on every platform Rust supports.
        self.raw(&(len as u64).to_le_bytes());
    }

    /// Writes an unsigned integer; equal values of any width encode the same.
    pub fn write_u128(&mut self, v: u128) {
        self.raw(&[TAG_UINT]);
        self.raw(&v.to_be_bytes());
    }

    /// Writes a signed integer; a non-negative one encodes as the unsigned of the same value.
    pub fn write_i128(&mut self, v: i128) {
        if v >= 0 {
            self.write_u128(v as u128);
        } else {
            self.raw(&[TAG_NEG_INT]);
            self.raw(&v.to_be_bytes());
        }
    }

    /// Writes a string (UTF-8).
    pub fn write_str(&mut self, s: &str) {
        self.raw(&[TAG_STR]);
        self.len(s.len());
        self.raw(s.as_bytes());
    }

    /// Writes a byte string. Byte strings and strings with the same bytes are different keys.
    pub fn write_bytes(&mut self, b: &[u8]) {
        self.raw(&[TAG_BYTES]);
        self.len(b.len());
        self.raw(b);
    }

    /// Writes a tuple of `len` parts; encode the parts right after.
    pub fn write_tuple_header(&mut self, len: usize) {
        self.raw(&[TAG_TUPLE]);
        self.len(len);
    }

    /// Writes a sequence of `len` elements; encode the elements right after.
    pub fn write_seq_header(&mut self, len: usize) {
        self.raw(&[TAG_SEQ]);
        self.len(len);
    }

    fn write_sorted(&mut self, tag: u8, mut entries: Vec<Vec<u8>>) {
        entries.sort_unstable();
        self.raw(&[tag]);
        self.len(entries.len());
        for entry in &entries {
            self.raw(entry);
        }
    }
}

/// The canonical encoding of `value`, as bytes: what [`Key`] hashes after the namespace.
///
/// Exposed for golden tests and for debugging; stores never see it.
pub fn canonical_bytes<V: KeyPart + ?Sized>(value: &V) -> Vec<u8> {
    let mut buf = Vec::new();
    value.encode(&mut Encoder::buffer(&mut buf));
    buf
}

/// A value that can be part of an idempotency key (or of a fingerprint).
///
/// Implemented for integers, `bool`, `char`, strings, byte arrays, options, tuples (up to 12),
/// sequences, sets and maps of key parts, smart pointers to them, and UUIDs (feature `uuid`).
/// Floating-point numbers are deliberately not key parts: `0.1 + 0.2 != 0.3` and `NaN != NaN`
/// would make equal-looking requests different keys.
///
/// For a type of your own, derive it with the `idem` crate's `#[derive(KeyPart)]`: a struct
/// encodes as the tuple of its fields in declaration order (`Order { id, customer }` is the key
/// `(id, customer)`, so another program computes it as `Key::new(name, &(id, customer))`), an
/// enum variant as the tuple of its name and fields (`Event::Paid(7)` is `("Paid", 7)`, a unit
/// variant `("Cancelled",)`), and a field marked `#[key(skip)]` is left out. Every field's type
/// must be a key part (reported at the field), type parameters are bounded by `KeyPart`, unions
/// are refused, and `#[key(crate = "path::to::idem")]` on the type serves re-exporters. Renaming
/// a variant or reordering fields changes the key.
///
/// Or encode what identifies it by hand:
///
/// ```
/// use idem_runtime::key::{Encoder, KeyPart};
///
/// struct Order { id: u64, customer: String, note: String }
///
/// impl KeyPart for Order {
///     fn encode(&self, enc: &mut Encoder<'_>) {
///         // The note does not make an order a different order.
///         (self.id, &self.customer).encode(enc)
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be part of an idempotency key",
    label = "`{Self}` does not implement `idem::KeyPart`",
    note = "leave it out of the key (`skip(...)` for an argument of an `#[idempotent]` function, `#[key(skip)]` for a field of a `#[derive(KeyPart)]` type), give the key explicitly with `key = ...`, or implement `idem::KeyPart` for the type (`#[derive(KeyPart)]`)"
)]
pub trait KeyPart {
    /// Writes the canonical encoding of `self`.
    fn encode(&self, enc: &mut Encoder<'_>);
}

macro_rules! unsigned {
    ($($t:ty)*) => {$(
        impl KeyPart for $t {
            fn encode(&self, enc: &mut Encoder<'_>) {
                enc.write_u128(*self as u128);
            }
        }
    )*};
}
unsigned!(u8 u16 u32 u64 u128 usize);

macro_rules! signed {
    ($($t:ty)*) => {$(
        impl KeyPart for $t {
            fn encode(&self, enc: &mut Encoder<'_>) {
                enc.write_i128(*self as i128);
            }
        }
    )*};
}
signed!(i8 i16 i32 i64 i128 isize);

impl KeyPart for bool {
    fn encode(&self, enc: &mut Encoder<'_>) {
        enc.raw(&[if *self { TAG_TRUE } else { TAG_FALSE }]);
    }
}

impl KeyPart for char {
    fn encode(&self, enc: &mut Encoder<'_>) {
        enc.raw(&[TAG_CHAR]);
        enc.raw(&u32::from(*self).to_be_bytes());
    }
}

impl KeyPart for str {
    fn encode(&self, enc: &mut Encoder<'_>) {
        enc.write_str(self);
    }
}

impl KeyPart for String {
    fn encode(&self, enc: &mut Encoder<'_>) {
        enc.write_str(self);
    }
}

impl KeyPart for () {
    fn encode(&self, enc: &mut Encoder<'_>) {
        enc.write_tuple_header(0);
    }
}

impl<T: KeyPart + ?Sized> KeyPart for &T {
    fn encode(&self, enc: &mut Encoder<'_>) {
        (**self).encode(enc);
    }
}

impl<T: KeyPart + ?Sized> KeyPart for &mut T {
    fn encode(&self, enc: &mut Encoder<'_>) {
        (**self).encode(enc);
    }
}

impl<T: KeyPart + ?Sized> KeyPart for Box<T> {
    fn encode(&self, enc: &mut Encoder<'_>) {
        (**self).encode(enc);
    }
}

impl<T: KeyPart + ?Sized> KeyPart for Arc<T> {
    fn encode(&self, enc: &mut Encoder<'_>) {
        (**self).encode(enc);
    }
}

impl<T: KeyPart + ?Sized> KeyPart for Rc<T> {
    fn encode(&self, enc: &mut Encoder<'_>) {
        (**self).encode(enc);
    }
}

impl<T: KeyPart + ToOwned + ?Sized> KeyPart for Cow<'_, T> {
    fn encode(&self, enc: &mut Encoder<'_>) {
        (**self).encode(enc);
    }
}

impl<T: KeyPart> KeyPart for Option<T> {
    fn encode(&self, enc: &mut Encoder<'_>) {
        match self {
            None => enc.raw(&[TAG_NONE]),
            Some(v) => {
                enc.raw(&[TAG_SOME]);
                v.encode(enc);
            }
        }
    }
}

impl<T: KeyPart> KeyPart for [T] {
    fn encode(&self, enc: &mut Encoder<'_>) {
        enc.write_seq_header(self.len());
        for v in self {
            v.encode(enc);
        }
    }
}

impl<T: KeyPart, const N: usize> KeyPart for [T; N] {
    fn encode(&self, enc: &mut Encoder<'_>) {
        self.as_slice().encode(enc);
    }
}

impl<T: KeyPart> KeyPart for Vec<T> {
    fn encode(&self, enc: &mut Encoder<'_>) {
        self.as_slice().encode(enc);
    }
}

impl<T: KeyPart> KeyPart for VecDeque<T> {
    fn encode(&self, enc: &mut Encoder<'_>) {
        enc.write_seq_header(self.len());
        for v in self {
            v.encode(enc);
        }
    }
}

fn encode_set<'a, T: KeyPart + 'a>(
    enc: &mut Encoder<'_>,
    items: impl ExactSizeIterator<Item = &'a T>,
) {
    let entries = items.map(canonical_bytes).collect();
    enc.write_sorted(TAG_SET, entries);
}

fn encode_map<'a, K: KeyPart + 'a, V: KeyPart + 'a>(
    enc: &mut Encoder<'_>,
    items: impl ExactSizeIterator<Item = (&'a K, &'a V)>,
) {
    let entries = items.map(|(k, v)| canonical_bytes(&(k, v))).collect();
    enc.write_sorted(TAG_MAP, entries);
}

impl<T: KeyPart, S> KeyPart for HashSet<T, S> {
    fn encode(&self, enc: &mut Encoder<'_>) {
        encode_set(enc, self.iter());
    }
}

impl<T: KeyPart> KeyPart for BTreeSet<T> {
    fn encode(&self, enc: &mut Encoder<'_>) {
        encode_set(enc, self.iter());
    }
}

impl<K: KeyPart, V: KeyPart, S> KeyPart for HashMap<K, V, S> {
    fn encode(&self, enc: &mut Encoder<'_>) {
        encode_map(enc, self.iter());
    }
}

impl<K: KeyPart, V: KeyPart> KeyPart for BTreeMap<K, V> {
    fn encode(&self, enc: &mut Encoder<'_>) {
        encode_map(enc, self.iter());
    }
}

macro_rules! tuples {
    ($($len:literal => ($($name:ident)+))+) => {$(
        impl<$($name: KeyPart),+> KeyPart for ($($name,)+) {
            #[allow(non_snake_case)]
            fn encode(&self, enc: &mut Encoder<'_>) {
                let ($($name,)+) = self;
                enc.write_tuple_header($len);
                $($name.encode(enc);)+
            }
        }
    )+};
}
tuples! {
    1 => (A)
    2 => (A B)
    3 => (A B C)
    4 => (A B C D)
    5 => (A B C D E)
    6 => (A B C D E F)
    7 => (A B C D E F G)
    8 => (A B C D E F G H)
    9 => (A B C D E F G H I)
    10 => (A B C D E F G H I J)
    11 => (A B C D E F G H I J K)
    12 => (A B C D E F G H I J K L)
}

/// A UUID is a key part by its 16 bytes (needs the `uuid` feature).
#[cfg(feature = "uuid")]
#[cfg_attr(docsrs, doc(cfg(feature = "uuid")))]
impl KeyPart for uuid::Uuid {
    fn encode(&self, enc: &mut Encoder<'_>) {
        enc.write_bytes(self.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn integers_are_keys_by_value() {
        assert_eq!(canonical_bytes(&5u8), canonical_bytes(&5i64));
        assert_eq!(canonical_bytes(&5u128), canonical_bytes(&5usize));
        assert_ne!(canonical_bytes(&-5i8), canonical_bytes(&5i8));
        assert_ne!(canonical_bytes(&-1i64), canonical_bytes(&u128::MAX));
    }

    #[test]
    fn string_forms_are_one_key() {
        let owned = String::from("abc");
        assert_eq!(canonical_bytes("abc"), canonical_bytes(&owned));
        assert_eq!(
            canonical_bytes(&Cow::Borrowed("abc")),
            canonical_bytes(&Box::<str>::from("abc"))
        );
        assert_ne!(canonical_bytes("abc"), canonical_bytes(&b"abc"[..]));
    }

    #[test]
    fn encoding_is_unambiguous_across_boundaries() {
        assert_ne!(canonical_bytes(&("ab", "c")), canonical_bytes(&("a", "bc")));
        assert_ne!(canonical_bytes(&(1u8, 2u8)), canonical_bytes(&vec![1u8, 2]));
        assert_ne!(canonical_bytes(&Some(())), canonical_bytes(&()));
    }

    #[test]
    fn long_keys_hash_the_same_as_if_they_fit_on_the_stack() {
        // The one-shot and the streaming paths must agree, or long keys would change digest.
        let long = "x".repeat(10 * STACK_BYTES);
        let mut expected = blake3::Hasher::new_keyed(&KEY_HASH_KEY);
        let mut bytes = Vec::new();
        {
            let mut enc = Encoder::buffer(&mut bytes);
            enc.write_str("ns");
            (&[] as &[&str]).encode(&mut enc);
            long.encode(&mut enc);
        }
        expected.update(&bytes);
        assert_eq!(
            Key::new("ns", &long).as_bytes(),
            expected.finalize().as_bytes()
        );
        let short = "y";
        let mut bytes = Vec::new();
        {
            let mut enc = Encoder::buffer(&mut bytes);
            enc.write_str("ns");
            (&[] as &[&str]).encode(&mut enc);
            short.encode(&mut enc);
        }
        assert_eq!(
            Key::new("ns", &short).as_bytes(),
            blake3::keyed_hash(&KEY_HASH_KEY, &bytes).as_bytes()
        );
    }

    #[test]
    fn golden_bytes() {
        assert_eq!(
            hex(&canonical_bytes(&(42u64, "ab", true, None::<u8>))),
            concat!(
                "09",
                "0400000000000000", // tuple of 4
                "02",
                "0000000000000000000000000000002a", // 42
                "05",
                "0200000000000000",
                "6162", // "ab"
                "01",   // true
                "07",   // None
            )
        );
    }
}
