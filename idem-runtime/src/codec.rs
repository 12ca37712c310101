//! The result codec: how a function's result is stored, and how a replay reads it back.
//!
//! A replay returns a value equal to the first call's (DESIGN.md, "Results"). JSON cannot
//! promise that for serde types: it replays `Some(None)`, `Some(())` and `Some(NaN)` as `None`,
//! stores `±inf` and `NaN` as `null` and then fails to read them, and cannot write maps whose keys
//! are not strings. So results are stored in this format of idem's own, and `encode_checked`
//! refuses, when the result is stored, the values that serde itself cannot replay (the format is
//! exact; serde's buffering of untagged enums and `#[serde(flatten)]` is not).
//!
//! [`to_vec`] and [`from_slice`] are the public face of the format, for tools that read or seed
//! records through the [`Store`](crate::Store) trait; the executor uses the same functions.
//!
//! - `encode_checked` encodes a result after checking that it replays as itself.
//! - `decode` reads a record: a `Stored::Value`, or a `Stored::Unstorable` written by
//!   `unstorable` in place of a result that could not be stored, so that retries get an error
//!   and never run the body again.
//! - `encode` encodes without the check (tests and benchmarks).
//!
//! # The record format, version 1
//!
//! Stored records depend on this format, so it is specified here and pinned by golden vectors in
//! the tests: changing the bytes any value encodes to is a new format version (`VERSION`), never a
//! silent change.
//!
//! ```text
//! record     = 0xC1 0x01 0x01 value          a value; nothing may follow it
//!            | 0xC1 0x01 0x02 len utf8       unstorable: why the first call's result was not stored
//! ```
//!
//! The first byte, `MAGIC` `0xC1`, occurs in no UTF-8 text, so no JSON document (idem 0.1 stored
//! JSON, whose records start with an ASCII byte) and no other text format starts with it. The
//! second is the format version, the third the kind of record. A record with another first byte or
//! another version does not decode: `DecodeError` says it was written by another version of
//! idem's codec, and no value is ever guessed from it.
//!
//! A value is one tag byte, one per shape of the serde data model, then that shape's payload:
//!
//! | tag | shape | payload |
//! | --- | --- | --- |
//! | `0x00` | end | ends a sequence, tuple, map, struct or variant's elements; never a value |
//! | `0x01` | unit `()` | |
//! | `0x02` | none | |
//! | `0x03` | some | value |
//! | `0x04` `0x05` | `false` `true` | |
//! | `0x06` | i8 | 1 byte |
//! | `0x07` `0x08` `0x09` `0x0A` | i16 i32 i64 i128 | varint of the ZigZag form (`0→0, -1→1, 1→2, …`) |
//! | `0x0B` | u8 | 1 byte |
//! | `0x0C` `0x0D` `0x0E` `0x0F` | u16 u32 u64 u128 | varint |
//! | `0x10` `0x11` | f32 f64 | the IEEE 754 bits, little-endian: NaN payloads, `-0.0`, `±inf` kept |
//! | `0x12` | char | varint of the scalar value |
//! | `0x13` | str | varint length, UTF-8 bytes |
//! | `0x14` | bytes | varint length, bytes |
//! | `0x15` | unit struct | |
//! | `0x16` | newtype struct | value |
//! | `0x17` | seq | values, `0x00` |
//! | `0x18` | seq of u8, packed | varint count (≥ 1), one byte per element |
//! | `0x19` | tuple | values, `0x00` |
//! | `0x1A` | tuple of u8, packed | varint count (≥ 1), one byte per element |
//! | `0x1B` | tuple struct | values, `0x00` |
//! | `0x1C` | map | key value pairs, `0x00` |
//! | `0x1D` | struct | (field name, value) pairs, `0x00`; a field name is its length + 1 as a varint, then UTF-8 |
//! | `0x1E` | unit variant | name |
//! | `0x1F` | newtype variant | name, value |
//! | `0x20` | tuple variant | name, values, `0x00` |
//! | `0x21` | struct variant | name, (field name, value) pairs, `0x00` |
//!
//! - **Varints** are unsigned LEB128 (7 bits a byte, least significant first, high bit set on all
//!   bytes but the last), in their shortest form: a decoder refuses longer forms and values that
//!   overflow the type, so one number has one encoding. A name is a varint length and UTF-8.
//! - **Injective.** Distinct data-model values encode to distinct bytes: every shape has its own
//!   tag (`None` ≠ `Some(None)` ≠ `()` ≠ unit struct, `5u32` ≠ `5u64` ≠ `5.0`, seq ≠ tuple ≠
//!   tuple struct, map ≠ struct), and every encoding is self-delimiting. Field and variant names
//!   are stored, **type names are not**: renaming a struct or an enum keeps its records readable,
//!   renaming a field or a variant does not (as with JSON; `#[serde(alias)]` reads the old name).
//!   Variants are stored by name, not index, so reordering variants between deployments does not
//!   change what a record means.
//! - **End markers, not lengths**, close sequences, tuples, maps, structs and variants' elements.
//!   The encoder streams in one pass with nothing to back-patch, it needs no length up front
//!   (`#[serde(flatten)]` serializes maps of unknown length), and it never trusts the length a
//!   `Serialize` impl declares (JSON ignores it, so hand-written impls that get it wrong exist and
//!   must still store; the encoder only reserves that many bytes, at most 1 MiB). A decoder
//!   preallocates nothing from a count in the record, so a hostile count cannot make it
//!   allocate. Only strings, bytes and packed u8 runs carry a length, always
//!   checked against the bytes left before anything is read or allocated.
//! - **Packed u8 runs.** `Vec<u8>` and `[u8; N]` serialize as a seq or tuple of u8 (not as bytes),
//!   one element at a time; a non-empty seq or tuple whose elements are all u8 is written packed
//!   (tag `0x18`/`0x1A`, a count, the bytes), at one byte an element instead of two. It is the
//!   only encoding the encoder writes for such a value, so the encoding stays canonical, and it
//!   decodes as the same seq or tuple of u8.
//! - **Depth.** At most `MAX_DEPTH` values enclose any value (each some, newtype, sequence,
//!   tuple, map, struct and variant with data is one level). The encoder refuses deeper values
//!   and the decoder refuses deeper records, with the same count, so nothing is ever stored that
//!   cannot be read back, and no record can exhaust the stack.
//! - **Human-readable: yes.** [`is_human_readable`](serde::Serializer::is_human_readable) is
//!   `true` for this format, though it is binary. serde's buffer for untagged and internally
//!   tagged enums and `#[serde(flatten)]` always reads as human-readable: with `false`, a type that
//!   serializes differently by it (`IpAddr`, `SocketAddr`, and many crates' date and id types)
//!   would be written in its compact form and read back expecting its readable one, so it could
//!   not be replayed inside such an enum or a flattened struct. With `true` it is written and read
//!   in one form everywhere, as idem 0.1's JSON did. The cost is size (an `IpAddr` is a string).
//! - Strings are UTF-8, checked when read. Lone surrogates cannot occur: a Rust `String` or
//!   `char` cannot hold one, so there is nothing to encode.
//!
//! # Reading
//!
//! The decoder is a `serde::Deserializer` that serves both ways types read themselves.
//! `deserialize_any` calls the visitor method of exactly the stored shape (`visit_none`,
//! `visit_some`, `visit_unit`, `visit_u128`, `visit_f32`, `visit_newtype_struct`,
//! `visit_borrowed_str`, `visit_borrowed_bytes`, `visit_seq`, `visit_map` with field names as
//! borrowed string keys for a struct…), which is what serde's buffer (`Content`) needs: a unit
//! variant is visited as its name, a variant with data as a map of one entry from its name to its
//! data, as serde expects of self-describing formats; a packed u8 run is visited as a sequence
//! of `u8` with its exact length as size hint. Typed requests go through the same path, so
//! serde's usual conversions apply (a stored `u8` reads as a `u64`), except:
//! `deserialize_option` reads a stored value that is neither none nor some as `Some(value)`,
//! `deserialize_newtype_struct` reads a stored value that is not a newtype as the inner value (both
//! as JSON does, so wrapping a type between deployments keeps its records), `deserialize_enum`
//! reads variants (or a string, as a unit variant), and `deserialize_ignored_any` skips a value
//! without visiting it. A sequence or map with more elements than the type reads is an error,
//! not a silent truncation.
//!
//! **Newtype structs are transparent to typed requests**, the other way round: a stored newtype
//! struct read by any typed request but `deserialize_newtype_struct` (`deserialize_string`,
//! `deserialize_i64`, `deserialize_struct`, `deserialize_enum`, …) is read as the value inside
//! it, and by `deserialize_option` when that value is a none or a some. That is the validated
//! newtype: `#[derive(Serialize, Deserialize)] #[serde(try_from = "String")] struct
//! Email(String);` serializes as a newtype struct and deserializes a `String` (`from`, and
//! `try_from` of any type, alike), which JSON and every format without newtypes reads back. It is
//! the decoder's leniency, not an encoding: the record holds the newtype struct the `Serialize`
//! wrote. `deserialize_any` still visits a newtype struct as one (`visit_newtype_struct`), which
//! serde's buffer keeps as a newtype; serde reads none out of its buffer as its inner value, so a
//! validated newtype inside an untagged or internally tagged enum or a `#[serde(flatten)]` does
//! not decode and is refused when stored (`#[serde(try_from = "String", into = "String")]`
//! writes the string itself and replays there too).
//!
//! # The store-time check
//!
//! `encode_checked_replay(value, eq)` encodes the value, decodes that as its own type (the
//! replay: what a later call gets), and encodes the replay again. `eq` is the type's own
//! `PartialEq::eq`, which the executor passes when the attribute finds one. What decides whether
//! the value is stored:
//!
//! - **Always, the encodings**: they must be equal byte for byte (one `memcmp`, the common
//!   case), or else after sorting the elements of every sequence and map by their encoded bytes,
//!   recursively. That acceptance of other orders is needed for a `HashMap` or `HashSet`, which
//!   iterates its elements in another order in every instance. This catches a `Deserialize`
//!   that drops or changes data (a `skip_deserializing` field, a `deserialize_with` that
//!   lowercases, `-0.0` read back as `0.0`) whatever the type's `==` says: an entity whose `==`
//!   compares ids only, or a case-insensitive `==`, is still refused.
//! - **And with `eq`, for a value `eq` to itself**, the type's equality: the replay must also
//!   be `eq` to the value. This catches what no encoding can show, a `Serialize` that loses data
//!   before the format sees it (a `#[serde(skip)]` field, a lossy `with`, `into` or `from`,
//!   untagged variants of one shape, a `#[serde(flatten)]` `Option` whose `None` and `Some`
//!   serialize alike), and a `Deserialize` that reorders a `Vec`. A value that is not `eq` to
//!   itself (one holding a NaN: `NaN != NaN`) cannot be checked this way, and is checked by the
//!   encodings alone.
//! - **Without `eq`** (the function API, a generic function whose result type is a type
//!   parameter, a type without `PartialEq`), the encodings alone. The order-insensitive
//!   comparison is structural: serde serializes a `HashSet` and a `Vec` alike, so **without
//!   `eq`, a `Deserialize` that reorders a `Vec`'s elements passes** (it replays the same
//!   elements in its own order). Likewise a `Serialize` that loses data before the format sees
//!   it writes the value and its replay alike, so without `eq` nothing shows the loss. These are
//!   the check's documented limits; `PartialEq` on a concrete result type closes both.
//!
//! A replay that differs otherwise is refused with an `Unfaithful` that says where and how (a
//! path of `.field`, `.0`, `[index]` for sequence elements, compared by position, and `[key]` for
//! map entries, compared by key; values in Rust-like notation: "at `.lines[1]` it holds `3u32`,
//! but would replay as `3.0f64`"), or, with `eq`, that it is not `==`. serde itself loses two
//! kinds of value, in any format, which the check catches:
//!
//! - an untagged enum whose variants accept the same data replays as the first that accepts it
//!   (`enum E { F(f64), U(u32) }` replays `U(5)` as `F(5.0)`; an earlier `String` variant takes a
//!   unit variant's name, an earlier `Option` variant takes a unit struct as `None`): caught by
//!   the encodings where the variants' data differ in type, and only by `eq` where they are of
//!   one shape (`Cents(u64)` and `Points(u64)`, or unit variants, which untagged serialize as `()`);
//! - serde's buffer for `#[serde(flatten)]`, untagged and internally tagged enums has no `u128`
//!   or `i128`, so such a value there does not decode at all (nor does a validated newtype
//!   there: see Reading).
//!
//! A `Deserialize` impl that drops or changes data is refused the same way. A value that does
//! not decode back is refused with the decode error's own words (serde's, the type's, or the
//! decoder's, and where); serde's buffer is named only when the error is one of its known
//! limitations.

use std::fmt::{self, Write as _};

use serde::de::value::{BorrowedStrDeserializer, U8Deserializer};
use serde::de::{
    self, DeserializeOwned, DeserializeSeed, EnumAccess, MapAccess, SeqAccess, Unexpected,
    VariantAccess, Visitor,
};
use serde::ser::{self, Serialize};

/// The first byte of every record: never the first byte of UTF-8 text (so of no JSON record).
pub(crate) const MAGIC: u8 = 0xC1;
/// The format version this module writes and the only one it reads.
pub(crate) const VERSION: u8 = 1;
/// The record kind byte of a value record.
const KIND_VALUE: u8 = 0x01;
/// The record kind byte of an unstorable record.
const KIND_UNSTORABLE: u8 = 0x02;
/// The length of the envelope: magic, version, kind.
const HEADER: usize = 3;
/// How many values may enclose a value, at the most, when encoding and when decoding.
pub(crate) const MAX_DEPTH: usize = 128;
/// The initial capacity of an encoding: a small struct fits without growing.
const INITIAL_CAPACITY: usize = 128;

/// The tag bytes of the value encoding (see the module docs' table).
mod tag {
    /// Ends a sequence, tuple, map, struct or variant's elements; never starts a value.
    pub(super) const END: u8 = 0x00;
    /// `()`.
    pub(super) const UNIT: u8 = 0x01;
    /// `None`.
    pub(super) const NONE: u8 = 0x02;
    /// `Some`, followed by its value.
    pub(super) const SOME: u8 = 0x03;
    /// `false`.
    pub(super) const FALSE: u8 = 0x04;
    /// `true`.
    pub(super) const TRUE: u8 = 0x05;
    /// An `i8`: one byte.
    pub(super) const I8: u8 = 0x06;
    /// An `i16`: ZigZag varint.
    pub(super) const I16: u8 = 0x07;
    /// An `i32`: ZigZag varint.
    pub(super) const I32: u8 = 0x08;
    /// An `i64`: ZigZag varint.
    pub(super) const I64: u8 = 0x09;
    /// An `i128`: ZigZag varint.
    pub(super) const I128: u8 = 0x0A;
    /// A `u8`: one byte.
    pub(super) const U8: u8 = 0x0B;
    /// A `u16`: varint.
    pub(super) const U16: u8 = 0x0C;
    /// A `u32`: varint.
    pub(super) const U32: u8 = 0x0D;
    /// A `u64`: varint.
    pub(super) const U64: u8 = 0x0E;
    /// A `u128`: varint.
    pub(super) const U128: u8 = 0x0F;
    /// An `f32`: 4 bytes, little-endian bits.
    pub(super) const F32: u8 = 0x10;
    /// An `f64`: 8 bytes, little-endian bits.
    pub(super) const F64: u8 = 0x11;
    /// A `char`: varint scalar value.
    pub(super) const CHAR: u8 = 0x12;
    /// A string: varint length, UTF-8.
    pub(super) const STR: u8 = 0x13;
    /// Bytes: varint length, bytes.
    pub(super) const BYTES: u8 = 0x14;
    /// A unit struct.
    pub(super) const UNIT_STRUCT: u8 = 0x15;
    /// A newtype struct, followed by its value.
    pub(super) const NEWTYPE_STRUCT: u8 = 0x16;
    /// A sequence: values, then [`END`].
    pub(super) const SEQ: u8 = 0x17;
    /// A non-empty sequence of `u8`, packed: varint count, bytes.
    pub(super) const SEQ_U8: u8 = 0x18;
    /// A tuple: values, then [`END`].
    pub(super) const TUPLE: u8 = 0x19;
    /// A non-empty tuple of `u8`, packed: varint count, bytes.
    pub(super) const TUPLE_U8: u8 = 0x1A;
    /// A tuple struct: values, then [`END`].
    pub(super) const TUPLE_STRUCT: u8 = 0x1B;
    /// A map: keys and values, then [`END`].
    pub(super) const MAP: u8 = 0x1C;
    /// A struct: field names and values, then [`END`].
    pub(super) const STRUCT: u8 = 0x1D;
    /// A unit variant: its name.
    pub(super) const UNIT_VARIANT: u8 = 0x1E;
    /// A newtype variant: its name, its value.
    pub(super) const NEWTYPE_VARIANT: u8 = 0x1F;
    /// A tuple variant: its name, values, then [`END`].
    pub(super) const TUPLE_VARIANT: u8 = 0x20;
    /// A struct variant: its name, field names and values, then [`END`].
    pub(super) const STRUCT_VARIANT: u8 = 0x21;
}

// ---------------------------------------------------------------------------------------------
// API
// ---------------------------------------------------------------------------------------------

/// Encodes a result as idem stores it, after checking that it replays equal to itself: what
/// the executor writes, for tools that seed or copy records through the [`Store`](crate::Store)
/// trait.
///
/// Fails with [`Error::Codec`](crate::Error::Codec) when the value does not encode, or would not
/// decode back equal to itself (an ambiguous untagged enum, a `u128` under
/// `#[serde(flatten)]`, a lossy `Deserialize`); the message says where and how.
///
/// ```
/// let bytes = idem_runtime::codec::to_vec(&Some(None::<u32>))?;
/// let back: Option<Option<u32>> = idem_runtime::codec::from_slice(&bytes)?;
/// assert_eq!(back, Some(None));
/// # Ok::<(), idem_runtime::Error>(())
/// ```
pub fn to_vec<T: Serialize + DeserializeOwned>(value: &T) -> Result<Vec<u8>, crate::Error> {
    encode_checked(value).map_err(crate::Error::codec)
}

/// Decodes a stored result: what a replay returns, for tools that read records through the
/// [`Store`](crate::Store) trait.
///
/// Fails with [`Error::Codec`](crate::Error::Codec) when the bytes are not a record of this
/// format (another version of idem, garbage), hold another type, or record that the first
/// call's result could not be stored.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, crate::Error> {
    match decode(bytes) {
        Ok(Stored::Value(value)) => Ok(value),
        Ok(Stored::Unstorable(why)) => Err(crate::Error::codec(NotStored(why))),
        Err(err) => Err(crate::Error::codec(err)),
    }
}

/// What a later call gets for a key whose first call's result could not be stored.
#[derive(Debug)]
struct NotStored(String);

impl fmt::Display for NotStored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the first call with this key ran, but its result could not be stored ({}); the \
             body is not run again while the record lives",
            self.0
        )
    }
}

impl std::error::Error for NotStored {}

/// Encodes `value` for a store, after checking that it replays faithfully: encode, decode as `T`,
/// encode again, and the two encodings must be equal (exactly, or up to the order of the elements
/// of sequences and maps, which is how two `HashMap`s or `HashSet`s with the same elements
/// differ). `Err` says why not, in words a user can act on. With no `PartialEq` to check with,
/// it has the limits [`encode_checked_replay`] states for that case.
pub(crate) fn encode_checked<T: Serialize + DeserializeOwned>(
    value: &T,
) -> Result<Vec<u8>, Unfaithful> {
    encode_checked_replay(value, None).map(|(bytes, _)| bytes)
}

/// [`encode_checked`], also handing back the decoded value (what a replay from the record
/// returns), and checking it with the type's own equality where it has one (`eq`, passed by the
/// executor when the attribute finds `PartialEq`):
///
/// - Always, the encodings of the value and of the replay must be equal, exactly or up to the
///   order of the elements of sequences and maps (needed for `HashMap` and `HashSet`). That
///   catches a `Deserialize` that drops or changes data (`skip_deserializing`, a lowercasing
///   `deserialize_with`, `-0.0` read as `0.0`), however loose the type's `==` is.
/// - With `eq`, a value that is `eq` to itself must also be `eq` to its replay. That catches
///   what the encodings cannot see: a `Serialize` that loses data before it reaches the format
///   (`#[serde(skip)]`, a lossy `with`/`into`/`from`, untagged variants of one shape) and a
///   `Deserialize` that reorders a `Vec`.
/// - Without `eq`, or for a value not `eq` to itself (a NaN inside), only the encodings are
///   compared: a `Deserialize` that reorders a `Vec`'s elements passes, and so does a
///   `Serialize` that loses data before the format, since both encodings lose it alike: the
///   documented limits of a check without `PartialEq`.
pub(crate) fn encode_checked_replay<T: Serialize + DeserializeOwned>(
    value: &T,
    eq: Option<fn(&T, &T) -> bool>,
) -> Result<(Vec<u8>, T), Unfaithful> {
    let first = encode(value)?;
    let replay: T =
        decode_value(&first).map_err(|err| Unfaithful::new::<T>(Reason::Decode(err)))?;
    // The type's equality, where it is reflexive for this value (NaN is not equal to itself).
    let eq = eq.filter(|eq| eq(value, value));
    if let Some(eq) = eq
        && !eq(value, &replay)
    {
        return Err(Unfaithful::new::<T>(Reason::NotEqual));
    }
    let second = encode_record(&replay, first.len())
        .map_err(|err| Unfaithful::new::<T>(Reason::Reencode(err)))?;
    if first == second {
        return Ok((first, replay));
    }
    // Not byte for byte: the same up to the order of elements (a HashMap), or a different value.
    let (Ok(stored), Ok(replayed)) = (canonical(&first), canonical(&second)) else {
        return Err(Unfaithful::new::<T>(Reason::Differs(None)));
    };
    if stored == replayed {
        return Ok((first, replay));
    }
    Err(Unfaithful::new::<T>(Reason::Differs(difference(
        &first, &second,
    ))))
}

/// Encodes `value` as a value record, without checking that it replays faithfully: for values
/// known to, and for measuring the encoder alone. Results go through [`encode_checked`].
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, Unfaithful> {
    encode_record(value, INITIAL_CAPACITY).map_err(|err| Unfaithful::new::<T>(Reason::Encode(err)))
}

/// Decodes a stored record: the value it holds, or the message of an unstorable record.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<Stored<T>, DecodeError> {
    match envelope(bytes)? {
        KIND_VALUE => decode_value(bytes).map(Stored::Value),
        _ => {
            let mut decoder = Decoder::new(bytes, HEADER);
            let why = decoder.str()?;
            decoder.finish()?;
            Ok(Stored::Unstorable(why.to_owned()))
        }
    }
}

/// What a record holds.
#[derive(Debug, PartialEq)]
pub(crate) enum Stored<T> {
    /// The first call's result.
    Value(T),
    /// The first call's result could not be stored faithfully; why, in words for the user.
    Unstorable(String),
}

/// A record that says "the first call's result could not be stored faithfully: `why`". It is
/// written instead of a value so that retries get a clear error and never run the body again.
pub(crate) fn unstorable(why: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + 10 + why.len());
    out.extend_from_slice(&[MAGIC, VERSION, KIND_UNSTORABLE]);
    put_varint(&mut out, why.len() as u64);
    out.extend_from_slice(why.as_bytes());
    out
}

/// Why a result cannot be stored: it would not replay as itself.
#[derive(Debug)]
pub(crate) struct Unfaithful {
    /// The result's type, as the compiler names it.
    type_name: &'static str,
    /// What went wrong.
    reason: Reason,
}

/// The ways a result fails the store-time check.
#[derive(Debug)]
enum Reason {
    /// The value does not encode (its `Serialize` failed, or it nests too deep).
    Encode(EncodeError),
    /// The value encodes, but does not decode as its own type.
    Decode(DecodeError),
    /// The value decodes, but the decoded value does not encode.
    Reencode(EncodeError),
    /// The decoded value differs from the value; where, when it could be found.
    Differs(Option<Difference>),
    /// The decoded value is not `==` to the value (by the type's own `PartialEq`).
    NotEqual,
}

impl Unfaithful {
    /// The error for a result of type `T`.
    fn new<T: ?Sized>(reason: Reason) -> Unfaithful {
        Unfaithful {
            type_name: std::any::type_name::<T>(),
            reason,
        }
    }
}

impl fmt::Display for Unfaithful {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ty = self.type_name;
        match &self.reason {
            Reason::Encode(err) => write!(f, "a result of type `{ty}` cannot be stored: {err}"),
            Reason::Reencode(err) => write!(
                f,
                "a result of type `{ty}` cannot be stored faithfully: it decodes, but the \
                 decoded value does not encode: {err}"
            ),
            Reason::Decode(err) => {
                write!(
                    f,
                    "a result of type `{ty}` cannot be stored faithfully: it does not decode \
                     back as `{ty}`: {}",
                    err.cause()
                )?;
                match err.known_serde_limit() {
                    Some(SerdeLimit::Wide) => write!(
                        f,
                        ". serde's buffer for `#[serde(flatten)]`, untagged and internally \
                         tagged enums cannot hold a u128 or an i128; move such fields out of \
                         them"
                    ),
                    Some(SerdeLimit::Newtype) => write!(
                        f,
                        ". If that newtype struct is inside an untagged or internally tagged \
                         enum or a `#[serde(flatten)]`: serde's buffer there reads no newtype \
                         struct as its inner value, so a `try_from` or `from` newtype needs \
                         `into` too, to write its inner value"
                    ),
                    None => write!(
                        f,
                        "; its Deserialize does not read back what its Serialize writes"
                    ),
                }
            }
            Reason::Differs(Some(at)) => {
                write!(
                    f,
                    "a result of type `{ty}` cannot be stored faithfully: a replay would differ \
                     from it: "
                )?;
                if at.path.is_empty() {
                    write!(f, "it is ")?;
                } else {
                    write!(f, "at `{}` it holds ", at.path)?;
                }
                write!(
                    f,
                    "`{}`, but would replay as `{}`. An untagged enum whose variants accept the \
                     same data replays as the first that accepts it (tag the enum, or order its \
                     variants so that none takes another's data), and a Deserialize impl that \
                     drops or changes data cannot be replayed",
                    at.stored, at.replayed
                )
            }
            Reason::NotEqual => write!(
                f,
                "a result of type `{ty}` cannot be stored faithfully: it decodes to a value that \
                 is not `==` to it, so its Serialize or Deserialize loses or changes something \
                 (a `#[serde(skip)]` field, a lossy `with`, `into` or `from`, untagged variants \
                 of the same shape, a Deserialize that reorders or drops data); make the two \
                 agree, or store a type that round-trips"
            ),
            Reason::Differs(None) => write!(
                f,
                "a result of type `{ty}` cannot be stored faithfully: a replay would differ from \
                 it (its Deserialize does not read back what its Serialize writes)"
            ),
        }
    }
}

impl std::error::Error for Unfaithful {}

/// Why a record does not decode.
///
/// Boxed, so that the `Result`s of the decoder's many small reads stay two words wide (returned
/// in registers): it makes decoding markedly faster, as in `serde_json`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DecodeError(Box<DecodeErrorInner>);

/// What a [`DecodeError`] holds.
#[derive(Debug, Clone, PartialEq)]
struct DecodeErrorInner {
    /// The offset in the record where it went wrong, when known.
    at: Option<usize>,
    /// What went wrong.
    kind: DecodeErrorKind,
}

/// The kinds of [`DecodeError`].
#[derive(Debug, Clone, PartialEq)]
enum DecodeErrorKind {
    /// The record has no bytes.
    Empty,
    /// The record starts with this byte, not [`MAGIC`].
    Foreign(u8),
    /// The record is of this format version, not [`VERSION`].
    Version(u8),
    /// The record's kind byte is unknown.
    Kind(u8),
    /// The record is malformed: truncated, trailing bytes, an unknown tag, invalid UTF-8, …
    Corrupt(String),
    /// The record is well formed but does not hold a value of the expected type.
    Mismatch(String),
}

impl DecodeError {
    /// An error of `kind` at `at`, if known.
    #[cold]
    fn new(at: Option<usize>, kind: DecodeErrorKind) -> DecodeError {
        DecodeError(Box::new(DecodeErrorInner { at, kind }))
    }

    /// A malformed record at `at`.
    #[cold]
    fn corrupt(at: usize, what: impl Into<String>) -> DecodeError {
        DecodeError::new(Some(at), DecodeErrorKind::Corrupt(what.into()))
    }

    /// A value that is not of the expected type, at `at`.
    #[cold]
    fn mismatch(at: usize, what: impl Into<String>) -> DecodeError {
        DecodeError::new(Some(at), DecodeErrorKind::Mismatch(what.into()))
    }

    /// The error, placed at `at` unless it knows where it happened.
    fn or_at(mut self, at: usize) -> DecodeError {
        self.0.at.get_or_insert(at);
        self
    }

    /// What went wrong, in the words of whoever found it (the type's `Deserialize`, serde, or
    /// the decoder) and where: for a record that was just encoded, at store time.
    fn cause(&self) -> Cause<'_> {
        Cause(self)
    }

    /// The limitation of serde's buffer (`Content`) this error is, if it is one, known by
    /// serde's words for it.
    fn known_serde_limit(&self) -> Option<SerdeLimit> {
        let DecodeErrorKind::Mismatch(what) = &self.0.kind else {
            return None;
        };
        // serde ≥ 1.0.2xx: "invalid type: integer `1` as u128, expected any value" from its
        // buffer's visitor; older releases: "u128 is not supported".
        let wide = ["u128", "i128"].iter().any(|ty| {
            what.contains(&format!("as {ty}, expected any value"))
                || what.contains(&format!("{ty} is not supported"))
        });
        if wide {
            Some(SerdeLimit::Wide)
        } else if what.starts_with("invalid type: newtype struct") {
            Some(SerdeLimit::Newtype)
        } else {
            None
        }
    }
}

/// The limitations of serde's buffer for `#[serde(flatten)]`, untagged and internally tagged
/// enums that a store-time refusal names.
#[derive(Debug, Clone, Copy, PartialEq)]
enum SerdeLimit {
    /// It has no `u128` or `i128`.
    Wide,
    /// It reads no newtype struct as its inner value (only a typed request to the decoder does).
    Newtype,
}

/// A [`DecodeError`] shown as its cause: "missing field `n` (at byte 9)".
struct Cause<'a>(&'a DecodeError);

impl fmt::Display for Cause<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.0.0.kind, self.0.0.at) {
            (DecodeErrorKind::Mismatch(what) | DecodeErrorKind::Corrupt(what), Some(at)) => {
                write!(f, "{what} (at byte {at} of its encoding)")
            }
            (DecodeErrorKind::Mismatch(what) | DecodeErrorKind::Corrupt(what), None) => {
                f.write_str(what)
            }
            _ => write!(f, "{}", self.0),
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = self.0.at.unwrap_or(0);
        match &self.0.kind {
            DecodeErrorKind::Empty => write!(f, "the stored record is empty"),
            DecodeErrorKind::Foreign(byte) => {
                write!(
                    f,
                    "the stored record was written by another version of idem's codec, or not \
                     by it: it starts with byte {byte:#04x}"
                )?;
                if byte.is_ascii_graphic() || byte.is_ascii_whitespace() {
                    write!(f, " ({:?})", char::from(*byte))?;
                }
                write!(
                    f,
                    ", where this version writes {MAGIC:#04x} (idem 0.1 stored JSON, whose \
                     records start with an ASCII byte)"
                )
            }
            DecodeErrorKind::Version(version) => write!(
                f,
                "the stored record was written by another version of idem's codec (format \
                 version {version}; this version of idem reads format version {VERSION})"
            ),
            DecodeErrorKind::Kind(kind) => write!(
                f,
                "the stored record is corrupt: unknown record kind {kind:#04x}"
            ),
            DecodeErrorKind::Corrupt(what) => {
                write!(f, "the stored record is corrupt at byte {at}: {what}")
            }
            DecodeErrorKind::Mismatch(what) => write!(
                f,
                "the stored value does not decode as the expected type (at byte {at}): {what}"
            ),
        }
    }
}

impl std::error::Error for DecodeError {}

impl de::Error for DecodeError {
    #[cold]
    fn custom<M: fmt::Display>(msg: M) -> Self {
        DecodeError::new(None, DecodeErrorKind::Mismatch(msg.to_string()))
    }
}

/// Why a value does not encode: its `Serialize` impl failed, or it nests too deep.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EncodeError(String);

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EncodeError {}

impl ser::Error for EncodeError {
    fn custom<M: fmt::Display>(msg: M) -> Self {
        EncodeError(format!("its Serialize impl failed: {msg}"))
    }
}

// ---------------------------------------------------------------------------------------------
// Envelope
// ---------------------------------------------------------------------------------------------

/// Checks a record's magic and version; returns its kind.
fn envelope(bytes: &[u8]) -> Result<u8, DecodeError> {
    let error = |at, kind| Err(DecodeError::new(Some(at), kind));
    match *bytes {
        [] => error(0, DecodeErrorKind::Empty),
        [first, ..] if first != MAGIC => error(0, DecodeErrorKind::Foreign(first)),
        [_] | [_, _] => error(bytes.len(), DecodeErrorKind::Corrupt("truncated".into())),
        [_, version, ..] if version != VERSION => error(1, DecodeErrorKind::Version(version)),
        [_, _, kind @ (KIND_VALUE | KIND_UNSTORABLE), ..] => Ok(kind),
        [_, _, kind, ..] => error(2, DecodeErrorKind::Kind(kind)),
    }
}

/// Decodes a record that holds a value (its envelope is checked again).
fn decode_value<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    if envelope(bytes)? != KIND_VALUE {
        return Err(DecodeError::mismatch(
            2,
            "the record says the result could not be stored",
        ));
    }
    let mut decoder = Decoder::new(bytes, HEADER);
    let value = T::deserialize(&mut decoder).map_err(|err| err.or_at(decoder.pos))?;
    decoder.finish()?;
    Ok(value)
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// Encodes `value` as a value record into a buffer of `capacity` bytes to start with.
fn encode_record<T: Serialize + ?Sized>(
    value: &T,
    capacity: usize,
) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(capacity.max(HEADER + 1));
    out.extend_from_slice(&[MAGIC, VERSION, KIND_VALUE]);
    let mut encoder = Encoder {
        out,
        depth: 0,
        bare: NO_BARE,
    };
    value.serialize(&mut encoder)?;
    Ok(encoder.out)
}

/// Appends `value` as a varint.
#[inline]
fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Appends a 128-bit `value` as a varint.
fn put_varint128(out: &mut Vec<u8>, mut value: u128) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Writes `value` as a varint at the start of `buf`; returns how many bytes it took.
fn varint_into(buf: &mut [u8; 10], mut value: u64) -> usize {
    let mut len = 0;
    while value >= 0x80 {
        buf[len] = value as u8 | 0x80;
        value >>= 7;
        len += 1;
    }
    buf[len] = value as u8;
    len + 1
}

/// Inserts `value` as a varint at `at` in `out`, moving what follows.
fn insert_varint(out: &mut Vec<u8>, at: usize, value: u64) {
    let mut buf = [0; 10];
    let len = varint_into(&mut buf, value);
    out.splice(at..at, buf[..len].iter().copied());
}

/// ZigZag: small negative and positive numbers both become small unsigned ones.
#[inline]
fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

/// ZigZag of a 128-bit number.
fn zigzag128(value: i128) -> u128 {
    ((value << 1) ^ (value >> 127)) as u128
}

/// The inverse of [`zigzag`].
#[inline]
fn unzigzag(value: u64) -> i64 {
    (value >> 1) as i64 ^ -((value & 1) as i64)
}

/// The inverse of [`zigzag128`].
fn unzigzag128(value: u128) -> i128 {
    (value >> 1) as i128 ^ -((value & 1) as i128)
}

/// The serializer: appends a value's encoding to one buffer, tracking its depth.
struct Encoder {
    /// The record so far.
    out: Vec<u8>,
    /// How many values enclose the one being written.
    depth: usize,
    /// Where a `u8` is written bare, without its tag: the start of an element of a packable run,
    /// set by [`Compound::element`]. Only the element itself can start there (any other value
    /// writes a tag first), so a `u8` nested in it is tagged. [`NO_BARE`] once used, or unset.
    bare: usize,
}

/// [`Encoder::bare`] when no `u8` is to be written bare.
const NO_BARE: usize = usize::MAX;

impl Encoder {
    /// Enters a value that encloses others; fails past [`MAX_DEPTH`].
    #[inline]
    fn enter(&mut self) -> Result<(), EncodeError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(EncodeError(format!(
                "it nests deeper than {MAX_DEPTH} levels (each Option, newtype, collection, \
                 struct and enum variant with data is one level)"
            )));
        }
        Ok(())
    }

    /// Leaves a value entered with [`Encoder::enter`].
    #[inline]
    fn leave(&mut self) {
        self.depth -= 1;
    }

    /// Appends a tag and a name (a varint length and UTF-8).
    #[inline]
    fn tag_name(&mut self, tag: u8, name: &str) {
        self.out.push(tag);
        put_varint(&mut self.out, name.len() as u64);
        self.out.extend_from_slice(name.as_bytes());
    }

    /// Starts a sequence, tuple, map, struct or variant with elements (its tag written).
    #[inline]
    fn compound(&mut self, packable: bool) -> Result<Compound<'_>, EncodeError> {
        self.enter()?;
        let start = self.out.len() - 1;
        Ok(Compound {
            encoder: self,
            start,
            packable,
            packed: 0,
        })
    }

    /// Reserves room for `len` elements of a sequence or tuple: at least a byte each, so never
    /// more than the encoding takes, unless the `Serialize` impl declares a wrong length (hence
    /// the cap).
    #[inline]
    fn reserve_elements(&mut self, len: Option<usize>) {
        /// The most a declared length reserves.
        const MAX_RESERVE: usize = 1 << 20;
        self.out.reserve(len.unwrap_or(0).min(MAX_RESERVE));
    }
}

/// A sequence, tuple, map, struct or variant being written.
///
/// A sequence or tuple is written packed while its elements are all `u8`: each is written as its
/// bare byte (see [`Encoder::bare`]). An element of another type turns the run back into tagged
/// elements (in place), and the compound is written unpacked from then on.
struct Compound<'a> {
    /// Where it goes.
    encoder: &'a mut Encoder,
    /// The offset of its tag.
    start: usize,
    /// Whether every element so far was a `u8`, and the compound may still be packed.
    packable: bool,
    /// How many `u8` elements follow the tag as bare bytes (while `packable`).
    packed: usize,
}

impl Compound<'_> {
    /// Writes one element: a bare byte for a `u8` while the run is packable.
    #[inline]
    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), EncodeError> {
        if !self.packable {
            return value.serialize(&mut *self.encoder);
        }
        let before = self.encoder.out.len();
        self.encoder.bare = before;
        value.serialize(&mut *self.encoder)?;
        // A bare u8 used the slot and wrote one byte; a one-byte value of another type (a unit,
        // a bool…) left the slot unused, and a nested run that used its own slot wrote more.
        if self.encoder.bare == NO_BARE && self.encoder.out.len() == before + 1 {
            self.packed += 1;
        } else {
            self.encoder.bare = NO_BARE;
            self.unpack(before);
        }
        Ok(())
    }

    /// Turns the bare bytes of the run back into tagged `u8`s, before the element written at
    /// `element`, and stops packing.
    #[cold]
    fn unpack(&mut self, element: usize) {
        self.packable = false;
        let (first, count) = (self.start + 1, self.packed);
        if count == 0 {
            return;
        }
        let out = &mut self.encoder.out;
        let end = out.len();
        out.resize(end + count, 0);
        out.copy_within(element..end, element + count);
        // From the back, so that no byte is overwritten before it is moved.
        for i in (0..count).rev() {
            out[first + 2 * i + 1] = out[first + i];
            out[first + 2 * i] = tag::U8;
        }
    }

    /// Writes a struct field: its name, its value.
    #[inline]
    fn field<T: Serialize + ?Sized>(&mut self, name: &str, value: &T) -> Result<(), EncodeError> {
        put_varint(&mut self.encoder.out, name.len() as u64 + 1);
        self.encoder.out.extend_from_slice(name.as_bytes());
        value.serialize(&mut *self.encoder)
    }

    /// Ends it: an end marker, or, for a non-empty run of u8, the count in front of the bytes.
    #[inline]
    fn end(self) -> Result<(), EncodeError> {
        self.encoder.leave();
        let out = &mut self.encoder.out;
        if self.packable && self.packed > 0 {
            insert_varint(out, self.start + 1, self.packed as u64);
            out[self.start] = if out[self.start] == tag::SEQ {
                tag::SEQ_U8
            } else {
                tag::TUPLE_U8
            };
        } else {
            out.push(tag::END);
        }
        Ok(())
    }
}

/// Appends formatted text to the record (for `collect_str`).
struct TextSink<'a>(&'a mut Vec<u8>);

impl fmt::Write for TextSink<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

impl<'a> ser::Serializer for &'a mut Encoder {
    type Ok = ();
    type Error = EncodeError;
    type SerializeSeq = Compound<'a>;
    type SerializeTuple = Compound<'a>;
    type SerializeTupleStruct = Compound<'a>;
    type SerializeTupleVariant = Compound<'a>;
    type SerializeMap = Compound<'a>;
    type SerializeStruct = Compound<'a>;
    type SerializeStructVariant = Compound<'a>;

    fn is_human_readable(&self) -> bool {
        // See the module docs: serde's buffer for flatten and untagged enums reads as readable.
        true
    }

    #[inline]
    fn serialize_bool(self, v: bool) -> Result<(), EncodeError> {
        self.out.push(if v { tag::TRUE } else { tag::FALSE });
        Ok(())
    }

    #[inline]
    fn serialize_i8(self, v: i8) -> Result<(), EncodeError> {
        self.out.extend_from_slice(&[tag::I8, v as u8]);
        Ok(())
    }

    #[inline]
    fn serialize_i16(self, v: i16) -> Result<(), EncodeError> {
        self.out.push(tag::I16);
        put_varint(&mut self.out, zigzag(v.into()));
        Ok(())
    }

    #[inline]
    fn serialize_i32(self, v: i32) -> Result<(), EncodeError> {
        self.out.push(tag::I32);
        put_varint(&mut self.out, zigzag(v.into()));
        Ok(())
    }

    #[inline]
    fn serialize_i64(self, v: i64) -> Result<(), EncodeError> {
        self.out.push(tag::I64);
        put_varint(&mut self.out, zigzag(v));
        Ok(())
    }

    fn serialize_i128(self, v: i128) -> Result<(), EncodeError> {
        self.out.push(tag::I128);
        put_varint128(&mut self.out, zigzag128(v));
        Ok(())
    }

    #[inline]
    fn serialize_u8(self, v: u8) -> Result<(), EncodeError> {
        if self.out.len() == self.bare {
            // An element of a packed run: its byte alone (see `Compound`).
            self.bare = NO_BARE;
            self.out.push(v);
        } else {
            self.out.extend_from_slice(&[tag::U8, v]);
        }
        Ok(())
    }

    #[inline]
    fn serialize_u16(self, v: u16) -> Result<(), EncodeError> {
        self.out.push(tag::U16);
        put_varint(&mut self.out, v.into());
        Ok(())
    }

    #[inline]
    fn serialize_u32(self, v: u32) -> Result<(), EncodeError> {
        self.out.push(tag::U32);
        put_varint(&mut self.out, v.into());
        Ok(())
    }

    #[inline]
    fn serialize_u64(self, v: u64) -> Result<(), EncodeError> {
        self.out.push(tag::U64);
        put_varint(&mut self.out, v);
        Ok(())
    }

    fn serialize_u128(self, v: u128) -> Result<(), EncodeError> {
        self.out.push(tag::U128);
        put_varint128(&mut self.out, v);
        Ok(())
    }

    #[inline]
    fn serialize_f32(self, v: f32) -> Result<(), EncodeError> {
        self.out.push(tag::F32);
        self.out.extend_from_slice(&v.to_bits().to_le_bytes());
        Ok(())
    }

    #[inline]
    fn serialize_f64(self, v: f64) -> Result<(), EncodeError> {
        self.out.push(tag::F64);
        self.out.extend_from_slice(&v.to_bits().to_le_bytes());
        Ok(())
    }

    #[inline]
    fn serialize_char(self, v: char) -> Result<(), EncodeError> {
        self.out.push(tag::CHAR);
        put_varint(&mut self.out, u32::from(v).into());
        Ok(())
    }

    #[inline]
    fn serialize_str(self, v: &str) -> Result<(), EncodeError> {
        self.tag_name(tag::STR, v);
        Ok(())
    }

    #[inline]
    fn serialize_bytes(self, v: &[u8]) -> Result<(), EncodeError> {
        self.out.push(tag::BYTES);
        put_varint(&mut self.out, v.len() as u64);
        self.out.extend_from_slice(v);
        Ok(())
    }

    #[inline]
    fn serialize_none(self) -> Result<(), EncodeError> {
        self.out.push(tag::NONE);
        Ok(())
    }

    #[inline]
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), EncodeError> {
        self.out.push(tag::SOME);
        self.enter()?;
        value.serialize(&mut *self)?;
        self.leave();
        Ok(())
    }

    #[inline]
    fn serialize_unit(self) -> Result<(), EncodeError> {
        self.out.push(tag::UNIT);
        Ok(())
    }

    #[inline]
    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), EncodeError> {
        self.out.push(tag::UNIT_STRUCT);
        Ok(())
    }

    #[inline]
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<(), EncodeError> {
        self.tag_name(tag::UNIT_VARIANT, variant);
        Ok(())
    }

    #[inline]
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        self.out.push(tag::NEWTYPE_STRUCT);
        self.enter()?;
        value.serialize(&mut *self)?;
        self.leave();
        Ok(())
    }

    #[inline]
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        self.tag_name(tag::NEWTYPE_VARIANT, variant);
        self.enter()?;
        value.serialize(&mut *self)?;
        self.leave();
        Ok(())
    }

    #[inline]
    fn serialize_seq(self, len: Option<usize>) -> Result<Compound<'a>, EncodeError> {
        self.out.push(tag::SEQ);
        self.reserve_elements(len);
        self.compound(true)
    }

    #[inline]
    fn serialize_tuple(self, len: usize) -> Result<Compound<'a>, EncodeError> {
        self.out.push(tag::TUPLE);
        self.reserve_elements(Some(len));
        self.compound(true)
    }

    #[inline]
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Compound<'a>, EncodeError> {
        self.out.push(tag::TUPLE_STRUCT);
        self.compound(false)
    }

    #[inline]
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Compound<'a>, EncodeError> {
        self.tag_name(tag::TUPLE_VARIANT, variant);
        self.compound(false)
    }

    #[inline]
    fn serialize_map(self, _len: Option<usize>) -> Result<Compound<'a>, EncodeError> {
        self.out.push(tag::MAP);
        self.compound(false)
    }

    #[inline]
    fn serialize_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Compound<'a>, EncodeError> {
        self.out.push(tag::STRUCT);
        self.compound(false)
    }

    #[inline]
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Compound<'a>, EncodeError> {
        self.tag_name(tag::STRUCT_VARIANT, variant);
        self.compound(false)
    }

    fn collect_str<T: fmt::Display + ?Sized>(self, value: &T) -> Result<(), EncodeError> {
        // Formats straight into the record, then puts the length in front: no String.
        self.out.push(tag::STR);
        let start = self.out.len();
        write!(TextSink(&mut self.out), "{value}")
            .map_err(|_| EncodeError("its Display impl failed".into()))?;
        let len = self.out.len() - start;
        insert_varint(&mut self.out, start, len as u64);
        Ok(())
    }
}

impl ser::SerializeSeq for Compound<'_> {
    type Ok = ();
    type Error = EncodeError;

    #[inline]
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), EncodeError> {
        self.element(value)
    }

    #[inline]
    fn end(self) -> Result<(), EncodeError> {
        Compound::end(self)
    }
}

impl ser::SerializeTuple for Compound<'_> {
    type Ok = ();
    type Error = EncodeError;

    #[inline]
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), EncodeError> {
        self.element(value)
    }

    #[inline]
    fn end(self) -> Result<(), EncodeError> {
        Compound::end(self)
    }
}

impl ser::SerializeTupleStruct for Compound<'_> {
    type Ok = ();
    type Error = EncodeError;

    #[inline]
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), EncodeError> {
        self.element(value)
    }

    #[inline]
    fn end(self) -> Result<(), EncodeError> {
        Compound::end(self)
    }
}

impl ser::SerializeTupleVariant for Compound<'_> {
    type Ok = ();
    type Error = EncodeError;

    #[inline]
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), EncodeError> {
        self.element(value)
    }

    #[inline]
    fn end(self) -> Result<(), EncodeError> {
        Compound::end(self)
    }
}

impl ser::SerializeMap for Compound<'_> {
    type Ok = ();
    type Error = EncodeError;

    #[inline]
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), EncodeError> {
        key.serialize(&mut *self.encoder)
    }

    #[inline]
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), EncodeError> {
        value.serialize(&mut *self.encoder)
    }

    #[inline]
    fn end(self) -> Result<(), EncodeError> {
        Compound::end(self)
    }
}

impl ser::SerializeStruct for Compound<'_> {
    type Ok = ();
    type Error = EncodeError;

    #[inline]
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        self.field(key, value)
    }

    #[inline]
    fn end(self) -> Result<(), EncodeError> {
        Compound::end(self)
    }
}

impl ser::SerializeStructVariant for Compound<'_> {
    type Ok = ();
    type Error = EncodeError;

    #[inline]
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        self.field(key, value)
    }

    #[inline]
    fn end(self) -> Result<(), EncodeError> {
        Compound::end(self)
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

/// The deserializer: a cursor over one record, and the readers of each part of the format.
///
/// Every read checks the bytes left first; nothing is allocated from a length or count in the
/// record; nesting is bounded by [`MAX_DEPTH`].
struct Decoder<'de> {
    /// The whole record (offsets in errors count from its first byte).
    input: &'de [u8],
    /// Where the next byte is read; never past the end of `input`.
    pos: usize,
    /// How many values enclose the one being read.
    depth: usize,
}

impl<'de> Decoder<'de> {
    /// A decoder reading `input` from `pos`.
    fn new(input: &'de [u8], pos: usize) -> Decoder<'de> {
        Decoder {
            input,
            pos: pos.min(input.len()),
            depth: 0,
        }
    }

    /// The error for a record that ends too soon.
    fn truncated(&self) -> DecodeError {
        DecodeError::corrupt(self.input.len(), "truncated")
    }

    /// How many bytes are left.
    #[inline]
    fn remaining(&self) -> usize {
        self.input.len() - self.pos
    }

    /// Checks that the whole record was read.
    fn finish(&self) -> Result<(), DecodeError> {
        if self.pos == self.input.len() {
            Ok(())
        } else {
            Err(DecodeError::corrupt(
                self.pos,
                "trailing bytes after the value",
            ))
        }
    }

    /// Reads one byte.
    #[inline(always)]
    fn byte(&mut self) -> Result<u8, DecodeError> {
        match self.input.get(self.pos) {
            Some(&byte) => {
                self.pos += 1;
                Ok(byte)
            }
            None => Err(self.truncated()),
        }
    }

    /// The next byte, not read.
    #[inline(always)]
    fn peek(&self) -> Result<u8, DecodeError> {
        self.input
            .get(self.pos)
            .copied()
            .ok_or_else(|| self.truncated())
    }

    /// Reads `n` bytes.
    #[inline(always)]
    fn take(&mut self, n: usize) -> Result<&'de [u8], DecodeError> {
        let input: &'de [u8] = self.input;
        match input.get(self.pos..self.pos.saturating_add(n)) {
            Some(bytes) => {
                self.pos += n;
                Ok(bytes)
            }
            None => Err(self.truncated()),
        }
    }

    /// Reads `N` bytes as an array.
    #[inline]
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    /// Reads a varint of at most 64 bits, in its shortest form.
    #[inline(always)]
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let at = self.pos;
        let first = self.byte()?;
        if first < 0x80 {
            return Ok(first.into());
        }
        let mut value = u64::from(first & 0x7f);
        let mut shift = 7;
        loop {
            let byte = self.byte()?;
            if shift == 63 && byte > 1 {
                return Err(DecodeError::corrupt(at, "an integer overflows 64 bits"));
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                if byte == 0 {
                    return Err(DecodeError::corrupt(
                        at,
                        "an integer is not in its shortest form",
                    ));
                }
                return Ok(value);
            }
            shift += 7;
        }
    }

    /// Reads a varint of at most 128 bits, in its shortest form.
    fn varint128(&mut self) -> Result<u128, DecodeError> {
        let at = self.pos;
        let mut value = 0u128;
        let mut shift = 0;
        loop {
            let byte = self.byte()?;
            if shift == 126 && byte > 3 {
                return Err(DecodeError::corrupt(at, "an integer overflows 128 bits"));
            }
            value |= u128::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                if byte == 0 && shift > 0 {
                    return Err(DecodeError::corrupt(
                        at,
                        "an integer is not in its shortest form",
                    ));
                }
                return Ok(value);
            }
            shift += 7;
        }
    }

    /// Reads a varint that must fit `T`.
    #[inline]
    fn varint_as<T: TryFrom<u64>>(&mut self, what: &str) -> Result<T, DecodeError> {
        let at = self.pos;
        T::try_from(self.varint()?)
            .map_err(|_| DecodeError::corrupt(at, format!("{what} out of range")))
    }

    /// Reads a ZigZag varint that must fit `T`.
    #[inline]
    fn signed_as<T: TryFrom<i64>>(&mut self, what: &str) -> Result<T, DecodeError> {
        let at = self.pos;
        T::try_from(unzigzag(self.varint()?))
            .map_err(|_| DecodeError::corrupt(at, format!("{what} out of range")))
    }

    /// Reads a length: a varint no greater than the bytes left.
    #[inline(always)]
    fn len(&mut self) -> Result<usize, DecodeError> {
        let at = self.pos;
        let len = self.varint()?;
        match usize::try_from(len) {
            Ok(len) if len <= self.remaining() => Ok(len),
            _ => Err(DecodeError::corrupt(
                at,
                format!(
                    "a length of {len} runs past the end of the record ({} left)",
                    self.remaining()
                ),
            )),
        }
    }

    /// Reads UTF-8 of `len` bytes.
    #[inline(always)]
    fn utf8(&mut self, len: usize) -> Result<&'de str, DecodeError> {
        let at = self.pos;
        std::str::from_utf8(self.take(len)?)
            .map_err(|_| DecodeError::corrupt(at, "a string is not valid UTF-8"))
    }

    /// Reads a string or a name: a varint length, UTF-8.
    #[inline(always)]
    fn str(&mut self) -> Result<&'de str, DecodeError> {
        let len = self.len()?;
        self.utf8(len)
    }

    /// Reads bytes: a varint length, bytes.
    #[inline]
    fn bytes(&mut self) -> Result<&'de [u8], DecodeError> {
        let len = self.len()?;
        self.take(len)
    }

    /// Reads the count and bytes of a packed u8 run.
    fn packed(&mut self) -> Result<&'de [u8], DecodeError> {
        let at = self.pos;
        let bytes = self.bytes()?;
        if bytes.is_empty() {
            return Err(DecodeError::corrupt(at, "an empty packed run"));
        }
        Ok(bytes)
    }

    /// Reads the next struct field's name, or `None` (the end marker, not read) after the last.
    #[inline(always)]
    fn field_name(&mut self) -> Result<Option<&'de str>, DecodeError> {
        if self.peek()? == tag::END {
            return Ok(None);
        }
        let at = self.pos;
        // Not 0: a 0 first byte is the end marker, and a longer form of 0 is refused.
        let len = self.varint()?.saturating_sub(1);
        match usize::try_from(len) {
            Ok(len) if len <= self.remaining() => self.utf8(len).map(Some),
            _ => Err(DecodeError::corrupt(
                at,
                "a field name runs past the end of the record",
            )),
        }
    }

    /// Whether the next byte is the end marker (not read).
    #[inline(always)]
    fn at_end_marker(&self) -> Result<bool, DecodeError> {
        Ok(self.peek()? == tag::END)
    }

    /// Reads the end marker that must follow the elements a type read.
    #[inline]
    fn end_marker(&mut self) -> Result<(), DecodeError> {
        let at = self.pos;
        if self.byte()? == tag::END {
            Ok(())
        } else {
            Err(DecodeError::mismatch(
                at,
                "the stored value has more elements than the type reads",
            ))
        }
    }

    /// Reads a `char`.
    fn char(&mut self) -> Result<char, DecodeError> {
        let at = self.pos;
        let value = self.varint()?;
        u32::try_from(value)
            .ok()
            .and_then(char::from_u32)
            .ok_or_else(|| DecodeError::corrupt(at, format!("{value:#x} is not a char")))
    }

    /// Enters a value that encloses others; fails past [`MAX_DEPTH`].
    #[inline]
    fn enter(&mut self) -> Result<(), DecodeError> {
        if self.depth >= MAX_DEPTH {
            return Err(DecodeError::corrupt(
                self.pos,
                format!("nested deeper than {MAX_DEPTH} levels"),
            ));
        }
        self.depth += 1;
        Ok(())
    }

    /// Leaves a value entered with [`Decoder::enter`].
    #[inline]
    fn leave(&mut self) {
        self.depth -= 1;
    }

    /// Reads past one value.
    fn skip(&mut self) -> Result<(), DecodeError> {
        let at = self.pos;
        let tag = self.byte()?;
        self.skip_after(tag, at)
    }

    /// Reads past the rest of a value whose tag, at `at`, was read.
    fn skip_after(&mut self, tag: u8, at: usize) -> Result<(), DecodeError> {
        match tag {
            tag::UNIT | tag::NONE | tag::FALSE | tag::TRUE | tag::UNIT_STRUCT => Ok(()),
            tag::I8 | tag::U8 => self.take(1).map(drop),
            tag::I16 => self.signed_as::<i16>("an i16").map(drop),
            tag::I32 => self.signed_as::<i32>("an i32").map(drop),
            tag::I64 => self.varint().map(drop),
            tag::I128 | tag::U128 => self.varint128().map(drop),
            tag::U16 => self.varint_as::<u16>("a u16").map(drop),
            tag::U32 => self.varint_as::<u32>("a u32").map(drop),
            tag::U64 => self.varint().map(drop),
            tag::F32 => self.take(4).map(drop),
            tag::F64 => self.take(8).map(drop),
            tag::CHAR => self.char().map(drop),
            tag::STR => self.str().map(drop),
            tag::BYTES => self.bytes().map(drop),
            tag::SEQ_U8 | tag::TUPLE_U8 => self.packed().map(drop),
            tag::SOME | tag::NEWTYPE_STRUCT => self.nested(Decoder::skip),
            tag::SEQ | tag::TUPLE | tag::TUPLE_STRUCT => self.nested(Decoder::skip_elements),
            tag::MAP => self.nested(Decoder::skip_entries),
            tag::STRUCT => self.nested(Decoder::skip_fields),
            tag::UNIT_VARIANT => self.str().map(drop),
            tag::NEWTYPE_VARIANT => {
                self.str()?;
                self.nested(Decoder::skip)
            }
            tag::TUPLE_VARIANT => {
                self.str()?;
                self.nested(Decoder::skip_elements)
            }
            tag::STRUCT_VARIANT => {
                self.str()?;
                self.nested(Decoder::skip_fields)
            }
            other => Err(unknown_tag(at, other)),
        }
    }

    /// Runs `read` one level deeper.
    #[inline(always)]
    fn nested<T>(
        &mut self,
        read: impl FnOnce(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<T, DecodeError> {
        self.enter()?;
        let value = read(self)?;
        self.leave();
        Ok(value)
    }

    /// Reads past values up to and including the end marker.
    fn skip_elements(&mut self) -> Result<(), DecodeError> {
        while !self.at_end_marker()? {
            self.skip()?;
        }
        self.pos += 1;
        Ok(())
    }

    /// Reads past keys and values up to and including the end marker.
    fn skip_entries(&mut self) -> Result<(), DecodeError> {
        while !self.at_end_marker()? {
            self.skip()?;
            self.skip()?;
        }
        self.pos += 1;
        Ok(())
    }

    /// Reads past field names and values up to and including the end marker.
    fn skip_fields(&mut self) -> Result<(), DecodeError> {
        while self.field_name()?.is_some() {
            self.skip()?;
        }
        self.pos += 1;
        Ok(())
    }

    /// Visits the elements of a sequence, tuple or tuple struct, then reads its end marker.
    #[inline]
    fn visit_elements<V: Visitor<'de>>(&mut self, visitor: V) -> Result<V::Value, DecodeError> {
        self.nested(|this| {
            let value = visitor.visit_seq(Elements { decoder: this })?;
            this.end_marker()?;
            Ok(value)
        })
    }

    /// Visits a packed u8 run as a sequence of `u8`.
    fn visit_packed<V: Visitor<'de>>(&mut self, visitor: V) -> Result<V::Value, DecodeError> {
        let bytes = self.packed()?;
        self.nested(|this| {
            let mut run = Packed { bytes, next: 0 };
            let value = visitor.visit_seq(&mut run)?;
            if run.next == bytes.len() {
                Ok(value)
            } else {
                Err(DecodeError::mismatch(
                    this.pos,
                    "the stored value has more elements than the type reads",
                ))
            }
        })
    }

    /// Visits a map's entries, then reads its end marker.
    #[inline]
    fn visit_entries<V: Visitor<'de>>(&mut self, visitor: V) -> Result<V::Value, DecodeError> {
        self.nested(|this| {
            let value = visitor.visit_map(Entries { decoder: this })?;
            this.end_marker()?;
            Ok(value)
        })
    }

    /// Visits a struct's fields as a map from their names, then reads its end marker.
    #[inline]
    fn visit_fields<V: Visitor<'de>>(&mut self, visitor: V) -> Result<V::Value, DecodeError> {
        self.nested(|this| {
            let value = visitor.visit_map(Fields { decoder: this })?;
            this.end_marker()?;
            Ok(value)
        })
    }
}

/// The error for a byte that is no tag where a value belongs.
fn unknown_tag(at: usize, tag: u8) -> DecodeError {
    if tag == tag::END {
        DecodeError::corrupt(at, "an end marker where a value belongs")
    } else {
        DecodeError::corrupt(at, format!("unknown tag {tag:#04x}"))
    }
}

/// The typed requests of [`Decoder`]'s `Deserializer` impl other than option, newtype struct and
/// enum: each visits the stored shape ([`Decoder::visit`]), seeing through newtype structs.
macro_rules! typed_requests {
    ($($method:ident($($arg:ident: $ty:ty),*))*) => {$(
        #[inline]
        fn $method<V: Visitor<'de>>(
            self,
            $($arg: $ty,)*
            visitor: V,
        ) -> Result<V::Value, DecodeError> {
            self.visit::<true, V>(visitor)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for &mut Decoder<'de> {
    type Error = DecodeError;

    fn is_human_readable(&self) -> bool {
        true // as the encoder: see the module docs
    }

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        self.visit::<false, V>(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.peek()? {
            tag::NONE => {
                self.pos += 1;
                visitor.visit_none()
            }
            tag::SOME => {
                self.pos += 1;
                self.nested(|this| visitor.visit_some(this))
            }
            // A validated newtype of an option (`try_from = "Option<T>"`): its option.
            tag::NEWTYPE_STRUCT if self.newtype_of_option() => {
                self.pos += 1;
                self.nested(|this| this.deserialize_option(visitor))
            }
            // A value stored before the type became an Option (as JSON reads it).
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        if self.peek()? == tag::NEWTYPE_STRUCT {
            self.pos += 1;
            self.nested(|this| visitor.visit_newtype_struct(this))
        } else {
            // A value stored before the type was wrapped (as JSON reads it).
            visitor.visit_newtype_struct(self)
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        match self.peek()? {
            tag::UNIT_VARIANT => {
                self.pos += 1;
                let name = self.str()?;
                visitor.visit_enum(Variant {
                    decoder: self,
                    name,
                    shape: tag::UNIT_VARIANT,
                })
            }
            shape @ (tag::NEWTYPE_VARIANT | tag::TUPLE_VARIANT | tag::STRUCT_VARIANT) => {
                self.pos += 1;
                let name = self.str()?;
                self.nested(|this| {
                    visitor.visit_enum(Variant {
                        decoder: this,
                        name,
                        shape,
                    })
                })
            }
            tag::STR => {
                self.pos += 1;
                visitor.visit_enum(BorrowedStrDeserializer::new(self.str()?))
            }
            // A validated newtype of an enum (`try_from = "Enum"`): its variant.
            tag::NEWTYPE_STRUCT => {
                self.pos += 1;
                self.nested(|this| this.deserialize_enum(name, variants, visitor))
            }
            // Not a variant: the visitor says what it expected.
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        self.skip()?;
        visitor.visit_unit()
    }

    typed_requests! {
        deserialize_bool() deserialize_i8() deserialize_i16() deserialize_i32()
        deserialize_i64() deserialize_i128() deserialize_u8() deserialize_u16()
        deserialize_u32() deserialize_u64() deserialize_u128() deserialize_f32()
        deserialize_f64() deserialize_char() deserialize_str() deserialize_string()
        deserialize_bytes() deserialize_byte_buf() deserialize_unit()
        deserialize_unit_struct(_name: &'static str) deserialize_seq()
        deserialize_tuple(_len: usize) deserialize_tuple_struct(_name: &'static str, _len: usize)
        deserialize_map() deserialize_struct(_name: &'static str, _fields: &'static [&'static str])
        deserialize_identifier()
    }
}

impl<'de> Decoder<'de> {
    /// Visits the next value as the shape it is stored as (`deserialize_any`), or, for a typed
    /// request (`UNWRAP`), as the value inside a stored newtype struct: a validated newtype
    /// (`#[serde(try_from = "String")] struct Email(String)`) serializes as a newtype struct and
    /// deserializes as its inner type, as self-describing formats without newtypes (JSON) allow.
    #[inline]
    fn visit<const UNWRAP: bool, V: Visitor<'de>>(
        &mut self,
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        let at = self.pos;
        match self.byte()? {
            tag::UNIT | tag::UNIT_STRUCT => visitor.visit_unit(),
            tag::NONE => visitor.visit_none(),
            tag::SOME => self.nested(|this| visitor.visit_some(this)),
            tag::FALSE => visitor.visit_bool(false),
            tag::TRUE => visitor.visit_bool(true),
            tag::I8 => visitor.visit_i8(self.byte()? as i8),
            tag::I16 => visitor.visit_i16(self.signed_as("an i16")?),
            tag::I32 => visitor.visit_i32(self.signed_as("an i32")?),
            tag::I64 => visitor.visit_i64(unzigzag(self.varint()?)),
            tag::I128 => visitor.visit_i128(unzigzag128(self.varint128()?)),
            tag::U8 => visitor.visit_u8(self.byte()?),
            tag::U16 => visitor.visit_u16(self.varint_as("a u16")?),
            tag::U32 => visitor.visit_u32(self.varint_as("a u32")?),
            tag::U64 => visitor.visit_u64(self.varint()?),
            tag::U128 => visitor.visit_u128(self.varint128()?),
            tag::F32 => visitor.visit_f32(f32::from_bits(u32::from_le_bytes(self.array()?))),
            tag::F64 => visitor.visit_f64(f64::from_bits(u64::from_le_bytes(self.array()?))),
            tag::CHAR => visitor.visit_char(self.char()?),
            tag::STR => visitor.visit_borrowed_str(self.str()?),
            tag::BYTES => visitor.visit_borrowed_bytes(self.bytes()?),
            tag::NEWTYPE_STRUCT if UNWRAP => self.nested(|this| this.visit::<true, V>(visitor)),
            tag::NEWTYPE_STRUCT => self.nested(|this| visitor.visit_newtype_struct(this)),
            tag::SEQ | tag::TUPLE | tag::TUPLE_STRUCT => self.visit_elements(visitor),
            tag::SEQ_U8 | tag::TUPLE_U8 => self.visit_packed(visitor),
            tag::MAP => self.visit_entries(visitor),
            tag::STRUCT => self.visit_fields(visitor),
            // serde's buffer takes a unit variant as its name, and a variant with data as a map
            // of one entry (it refuses `visit_enum`), as from any self-describing format.
            tag::UNIT_VARIANT => visitor.visit_borrowed_str(self.str()?),
            shape @ (tag::NEWTYPE_VARIANT | tag::TUPLE_VARIANT | tag::STRUCT_VARIANT) => {
                let name = self.str()?;
                self.nested(|this| {
                    let mut entry = VariantEntry {
                        decoder: this,
                        name,
                        shape,
                        read: 0,
                    };
                    let value = visitor.visit_map(&mut entry)?;
                    if entry.read == 2 {
                        Ok(value)
                    } else {
                        Err(DecodeError::mismatch(
                            at,
                            format!("the data of variant `{name}` was not read"),
                        ))
                    }
                })
            }
            other => Err(unknown_tag(at, other)),
        }
    }

    /// Whether the newtype struct(s) at the cursor hold a none or a some.
    fn newtype_of_option(&self) -> bool {
        // Looks no further than the depth limit: a longer run of newtypes does not decode.
        let ahead = self.input.get(self.pos..).unwrap_or_default();
        ahead
            .iter()
            .take(MAX_DEPTH + 1)
            .find(|&&byte| byte != tag::NEWTYPE_STRUCT)
            .is_some_and(|&byte| byte == tag::NONE || byte == tag::SOME)
    }
}

/// The elements of a sequence, tuple or tuple struct, up to its end marker (not read).
struct Elements<'a, 'de> {
    /// The record, at the next element or the end marker.
    decoder: &'a mut Decoder<'de>,
}

impl<'de> SeqAccess<'de> for Elements<'_, 'de> {
    type Error = DecodeError;

    #[inline]
    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, DecodeError> {
        if self.decoder.at_end_marker()? {
            return Ok(None);
        }
        seed.deserialize(&mut *self.decoder).map(Some)
    }
}

/// The elements of a packed u8 run.
struct Packed<'de> {
    /// The run.
    bytes: &'de [u8],
    /// The index of the next element.
    next: usize,
}

impl<'de> SeqAccess<'de> for Packed<'de> {
    type Error = DecodeError;

    #[inline]
    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, DecodeError> {
        match self.bytes.get(self.next) {
            Some(&byte) => {
                self.next += 1;
                seed.deserialize(U8Deserializer::new(byte)).map(Some)
            }
            None => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        // Exact, and bounded by the record: one byte an element.
        Some(self.bytes.len() - self.next)
    }
}

/// The entries of a map, up to its end marker (not read).
struct Entries<'a, 'de> {
    /// The record, at the next key or the end marker.
    decoder: &'a mut Decoder<'de>,
}

impl<'de> MapAccess<'de> for Entries<'_, 'de> {
    type Error = DecodeError;

    #[inline]
    fn next_key_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, DecodeError> {
        if self.decoder.at_end_marker()? {
            return Ok(None);
        }
        seed.deserialize(&mut *self.decoder).map(Some)
    }

    #[inline]
    fn next_value_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<S::Value, DecodeError> {
        seed.deserialize(&mut *self.decoder)
    }
}

/// The fields of a struct, as a map from their names, up to its end marker (not read).
struct Fields<'a, 'de> {
    /// The record, at the next field name or the end marker.
    decoder: &'a mut Decoder<'de>,
}

impl<'de> MapAccess<'de> for Fields<'_, 'de> {
    type Error = DecodeError;

    #[inline]
    fn next_key_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, DecodeError> {
        match self.decoder.field_name()? {
            Some(name) => seed
                .deserialize(BorrowedStrDeserializer::new(name))
                .map(Some),
            None => Ok(None),
        }
    }

    #[inline]
    fn next_value_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<S::Value, DecodeError> {
        seed.deserialize(&mut *self.decoder)
    }
}

/// A variant with data seen by `deserialize_any`: a map of one entry, from its name to its data.
struct VariantEntry<'a, 'de> {
    /// The record, at the variant's data.
    decoder: &'a mut Decoder<'de>,
    /// The variant's name.
    name: &'de str,
    /// Its tag: newtype, tuple or struct variant.
    shape: u8,
    /// 0 before the key, 1 after it, 2 after the value.
    read: u8,
}

impl<'de> MapAccess<'de> for VariantEntry<'_, 'de> {
    type Error = DecodeError;

    fn next_key_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, DecodeError> {
        if self.read != 0 {
            return Ok(None);
        }
        self.read = 1;
        seed.deserialize(BorrowedStrDeserializer::new(self.name))
            .map(Some)
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<S::Value, DecodeError> {
        if self.read != 1 {
            return Err(DecodeError::mismatch(
                self.decoder.pos,
                "a map value was asked for before its key",
            ));
        }
        self.read = 2;
        match self.shape {
            tag::NEWTYPE_VARIANT => seed.deserialize(&mut *self.decoder),
            shape => seed.deserialize(VariantData {
                decoder: self.decoder,
                fields: shape == tag::STRUCT_VARIANT,
            }),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(usize::from(self.read == 0))
    }
}

/// The elements of a tuple variant (a sequence) or the fields of a struct variant (a map), read
/// as a value of their own.
struct VariantData<'a, 'de> {
    /// The record, at the first element or field.
    decoder: &'a mut Decoder<'de>,
    /// Fields (a struct variant) rather than elements (a tuple variant).
    fields: bool,
}

impl<'de> de::Deserializer<'de> for VariantData<'_, 'de> {
    type Error = DecodeError;

    fn is_human_readable(&self) -> bool {
        true // as the encoder
    }

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        let value = if self.fields {
            visitor.visit_map(Fields {
                decoder: &mut *self.decoder,
            })?
        } else {
            visitor.visit_seq(Elements {
                decoder: &mut *self.decoder,
            })?
        };
        self.decoder.end_marker()?;
        Ok(value)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

/// A variant read by `deserialize_enum`: its name, then data of the shape the type expects.
struct Variant<'a, 'de> {
    /// The record, at the variant's data.
    decoder: &'a mut Decoder<'de>,
    /// The variant's name.
    name: &'de str,
    /// Its tag: unit, newtype, tuple or struct variant.
    shape: u8,
}

impl Variant<'_, '_> {
    /// The error for a stored variant of another shape than the type's.
    fn shape_mismatch(&self, expected: &'static str) -> DecodeError {
        let stored = match self.shape {
            tag::UNIT_VARIANT => Unexpected::UnitVariant,
            tag::NEWTYPE_VARIANT => Unexpected::NewtypeVariant,
            tag::TUPLE_VARIANT => Unexpected::TupleVariant,
            _ => Unexpected::StructVariant,
        };
        let err: DecodeError = de::Error::invalid_type(stored, &expected);
        err.or_at(self.decoder.pos)
    }
}

impl<'a, 'de> EnumAccess<'de> for Variant<'a, 'de> {
    type Error = DecodeError;
    type Variant = Variant<'a, 'de>;

    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Self::Variant), DecodeError> {
        let value = seed.deserialize(BorrowedStrDeserializer::<DecodeError>::new(self.name))?;
        Ok((value, self))
    }
}

impl<'de> VariantAccess<'de> for Variant<'_, 'de> {
    type Error = DecodeError;

    fn unit_variant(self) -> Result<(), DecodeError> {
        match self.shape {
            tag::UNIT_VARIANT => Ok(()),
            _ => Err(self.shape_mismatch("unit variant")),
        }
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<S::Value, DecodeError> {
        match self.shape {
            tag::NEWTYPE_VARIANT => seed.deserialize(self.decoder),
            _ => Err(self.shape_mismatch("newtype variant")),
        }
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        match self.shape {
            tag::TUPLE_VARIANT => {
                let value = visitor.visit_seq(Elements {
                    decoder: &mut *self.decoder,
                })?;
                self.decoder.end_marker()?;
                Ok(value)
            }
            _ => Err(self.shape_mismatch("tuple variant")),
        }
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        match self.shape {
            tag::STRUCT_VARIANT => {
                let value = visitor.visit_map(Fields {
                    decoder: &mut *self.decoder,
                })?;
                self.decoder.end_marker()?;
                Ok(value)
            }
            _ => Err(self.shape_mismatch("struct variant")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The check: canonical form, and where two encodings differ
// ---------------------------------------------------------------------------------------------

/// A value record with the elements of every sequence and map sorted by their encoding,
/// recursively: two records are equal up to the order of elements when their canonical forms are.
fn canonical(record: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(record.len());
    out.extend_from_slice(record.get(..HEADER).unwrap_or_default());
    let mut decoder = Decoder::new(record, HEADER);
    canonical_value(&mut decoder, &mut out)?;
    decoder.finish()?;
    Ok(out)
}

/// Appends the canonical form of the next value.
fn canonical_value(decoder: &mut Decoder<'_>, out: &mut Vec<u8>) -> Result<(), DecodeError> {
    let at = decoder.pos;
    let tag = decoder.byte()?;
    match tag {
        tag::SOME | tag::NEWTYPE_STRUCT => {
            out.push(tag);
            decoder.nested(|d| canonical_value(d, out))
        }
        tag::NEWTYPE_VARIANT => {
            let name = decoder.str()?;
            copy_name(out, tag, name);
            decoder.nested(|d| canonical_value(d, out))
        }
        tag::SEQ => {
            out.push(tag);
            decoder.nested(|d| canonical_sorted(d, out, 1))
        }
        tag::MAP => {
            out.push(tag);
            decoder.nested(|d| canonical_sorted(d, out, 2))
        }
        tag::SEQ_U8 => {
            let mut bytes = decoder.packed()?.to_vec();
            bytes.sort_unstable();
            out.push(tag);
            put_varint(out, bytes.len() as u64);
            out.extend_from_slice(&bytes);
            Ok(())
        }
        tag::TUPLE | tag::TUPLE_STRUCT => {
            out.push(tag);
            decoder.nested(|d| canonical_in_order(d, out))
        }
        tag::TUPLE_VARIANT => {
            let name = decoder.str()?;
            copy_name(out, tag, name);
            decoder.nested(|d| canonical_in_order(d, out))
        }
        tag::STRUCT | tag::STRUCT_VARIANT => {
            if tag == tag::STRUCT {
                out.push(tag);
            } else {
                let name = decoder.str()?;
                copy_name(out, tag, name);
            }
            decoder.nested(|d| {
                while let Some(name) = d.field_name()? {
                    put_varint(out, name.len() as u64 + 1);
                    out.extend_from_slice(name.as_bytes());
                    canonical_value(d, out)?;
                }
                d.pos += 1;
                out.push(tag::END);
                Ok(())
            })
        }
        // Holds no sequence or map: copied as it is.
        _ => {
            decoder.skip_after(tag, at)?;
            out.extend_from_slice(&decoder.input[at..decoder.pos]);
            Ok(())
        }
    }
}

/// Appends a tag and a name.
fn copy_name(out: &mut Vec<u8>, tag: u8, name: &str) {
    out.push(tag);
    put_varint(out, name.len() as u64);
    out.extend_from_slice(name.as_bytes());
}

/// Appends the canonical forms of the values up to the end marker, in order, and the marker.
fn canonical_in_order(decoder: &mut Decoder<'_>, out: &mut Vec<u8>) -> Result<(), DecodeError> {
    while !decoder.at_end_marker()? {
        canonical_value(decoder, out)?;
    }
    decoder.pos += 1;
    out.push(tag::END);
    Ok(())
}

/// Appends the elements up to the end marker (each `per_element` values: 1 for a sequence, 2 for
/// a map entry), canonical and sorted by their encoding, and the marker.
fn canonical_sorted(
    decoder: &mut Decoder<'_>,
    out: &mut Vec<u8>,
    per_element: usize,
) -> Result<(), DecodeError> {
    let mut scratch = Vec::new();
    let mut elements = Vec::new();
    while !decoder.at_end_marker()? {
        let start = scratch.len();
        for _ in 0..per_element {
            canonical_value(decoder, &mut scratch)?;
        }
        elements.push(start..scratch.len());
    }
    decoder.pos += 1;
    // Encodings are self-delimiting, so sorting entries as key-then-value bytes sorts by key.
    elements.sort_unstable_by(|a, b| scratch[a.clone()].cmp(&scratch[b.clone()]));
    for element in elements {
        out.extend_from_slice(&scratch[element]);
    }
    out.push(tag::END);
    Ok(())
}

/// Where a replay differs from the stored value.
#[derive(Debug)]
struct Difference {
    /// The path to the value that differs: `.field`, `[index]`, `.0`, `[key]`; empty for the root.
    path: String,
    /// The stored value there, shown briefly.
    stored: String,
    /// The replayed value there, shown briefly.
    replayed: String,
}

/// The first place where two value records differ other than by the order of elements, if it
/// can be found. Sequence elements are compared by position, map entries by key.
fn difference(stored: &[u8], replayed: &[u8]) -> Option<Difference> {
    let mut a = Decoder::new(stored, HEADER);
    let mut b = Decoder::new(replayed, HEADER);
    let mut path = String::new();
    diff_value(&mut a, &mut b, &mut path).ok().flatten()
}

/// A difference at `path` between the values at `at_a` and `at_b`.
fn here(path: &str, a: &Decoder<'_>, at_a: usize, b: &Decoder<'_>, at_b: usize) -> Difference {
    Difference {
        path: path.to_owned(),
        stored: show(a.input, at_a),
        replayed: show(b.input, at_b),
    }
}

/// The canonical form of the next value, read past.
fn canonical_next(decoder: &mut Decoder<'_>) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    canonical_value(decoder, &mut out)?;
    Ok(out)
}

/// Compares the next values of `a` and `b` and reads past them; the first difference other than
/// by order, if any. Runs only when a value is refused, so it may canonicalise a value several
/// times.
fn diff_value(
    a: &mut Decoder<'_>,
    b: &mut Decoder<'_>,
    path: &mut String,
) -> Result<Option<Difference>, DecodeError> {
    let (at_a, at_b) = (a.pos, b.pos);
    if canonical_next(a)? == canonical_next(b)? {
        return Ok(None); // equal, or equal up to order
    }
    // They differ: look inside for where. Whatever is found, it is returned.
    a.pos = at_a;
    b.pos = at_b;
    let whole = |a: &Decoder<'_>, b: &Decoder<'_>, path: &str| here(path, a, at_a, b, at_b);
    let tag = a.byte()?;
    if tag != b.byte()? {
        return Ok(Some(whole(a, b, path)));
    }
    if matches!(
        tag,
        tag::UNIT_VARIANT | tag::NEWTYPE_VARIANT | tag::TUPLE_VARIANT | tag::STRUCT_VARIANT
    ) && a.str()? != b.str()?
    {
        return Ok(Some(whole(a, b, path)));
    }
    a.enter()?;
    b.enter()?;
    let found = match tag {
        tag::SOME | tag::NEWTYPE_STRUCT | tag::NEWTYPE_VARIANT => diff_value(a, b, path)?,
        tag::SEQ | tag::TUPLE | tag::TUPLE_STRUCT | tag::TUPLE_VARIANT => {
            let mut index = 0;
            // A different number of elements is best shown whole, not as shifted elements.
            let same_count = count_elements(a)? == count_elements(b)?;
            loop {
                if !same_count || a.at_end_marker()? {
                    break None;
                }
                let len = path.len();
                let _ = if tag == tag::SEQ {
                    write!(path, "[{index}]")
                } else {
                    write!(path, ".{index}")
                };
                if let Some(found) = diff_value(a, b, path)? {
                    break Some(found);
                }
                path.truncate(len);
                index += 1;
            }
        }
        tag::SEQ_U8 | tag::TUPLE_U8 => {
            let (x, y) = (a.packed()?, b.packed()?);
            let same_count = x.len() == y.len();
            let first = x.iter().zip(y).position(|(x, y)| x != y);
            first.filter(|_| same_count).map(|index| Difference {
                path: if tag == tag::SEQ_U8 {
                    format!("{path}[{index}]")
                } else {
                    format!("{path}.{index}")
                },
                stored: format!("{}u8", x[index]),
                replayed: format!("{}u8", y[index]),
            })
        }
        tag::MAP => diff_entries(a, b, path)?,
        tag::STRUCT | tag::STRUCT_VARIANT => loop {
            match (a.field_name()?, b.field_name()?) {
                (Some(x), Some(y)) if x == y => {
                    let len = path.len();
                    let _ = write!(path, ".{x}");
                    if let Some(found) = diff_value(a, b, path)? {
                        break Some(found);
                    }
                    path.truncate(len);
                }
                _ => break None, // other fields
            }
        },
        _ => None, // a scalar
    };
    Ok(Some(found.unwrap_or_else(|| whole(a, b, path))))
}

/// How many values follow `decoder` up to the next end marker (not read).
fn count_elements(decoder: &Decoder<'_>) -> Result<usize, DecodeError> {
    let mut ahead = Decoder {
        input: decoder.input,
        pos: decoder.pos,
        depth: decoder.depth,
    };
    let mut count = 0;
    while !ahead.at_end_marker()? {
        ahead.skip()?;
        count += 1;
    }
    Ok(count)
}

/// Compares the entries of two maps (their tags read) by key; the first difference, if any.
fn diff_entries(
    a: &mut Decoder<'_>,
    b: &mut Decoder<'_>,
    path: &mut String,
) -> Result<Option<Difference>, DecodeError> {
    // The replay's entries, by canonical key.
    let mut replayed = Vec::new();
    while !b.at_end_marker()? {
        let key = canonical_next(b)?;
        replayed.push((key, b.pos));
        b.skip()?;
    }
    replayed.sort_unstable();
    while !a.at_end_marker()? {
        let key_at = a.pos;
        let key = canonical_next(a)?;
        let len = path.len();
        let _ = write!(path, "[{}]", show(a.input, key_at));
        let Ok(found) = replayed.binary_search_by(|(k, _)| k.as_slice().cmp(&key)) else {
            return Ok(Some(Difference {
                path: path.clone(),
                stored: show(a.input, a.pos),
                replayed: "no such entry".into(),
            }));
        };
        let mut value = Decoder {
            input: b.input,
            pos: replayed[found].1,
            depth: b.depth,
        };
        if let Some(found) = diff_value(a, &mut value, path)? {
            return Ok(Some(found));
        }
        path.truncate(len);
    }
    Ok(None) // the replay has more entries
}

/// How many characters a value is shown with, at the most, in an [`Unfaithful`] message.
const SHOWN: usize = 80;

/// The value at `at` in `record`, shown briefly in Rust-like notation (`5u32`, `Some(None)`,
/// `[1u8, 2u8]`, `Variant { field: "x" }`), cut short with `…`.
fn show(record: &[u8], at: usize) -> String {
    let mut out = String::new();
    let mut decoder = Decoder::new(record, at);
    if show_value(&mut decoder, &mut out).is_err() && !out.ends_with('…') {
        out.push('…');
    }
    out
}

/// Shows the next value; `Err` once `out` is full (or the value is malformed).
fn show_value(d: &mut Decoder<'_>, out: &mut String) -> fmt::Result {
    /// A read, or stop showing.
    fn ok<T>(read: Result<T, DecodeError>) -> Result<T, fmt::Error> {
        read.map_err(|_| fmt::Error)
    }
    if out.len() >= SHOWN {
        out.push('…');
        return Err(fmt::Error);
    }
    let at = d.pos;
    let tag = ok(d.byte())?;
    match tag {
        tag::UNIT => out.push_str("()"),
        tag::NONE => out.push_str("None"),
        tag::SOME => {
            out.push_str("Some(");
            ok(d.enter())?;
            show_value(d, out)?;
            out.push(')');
        }
        tag::FALSE => out.push_str("false"),
        tag::TRUE => out.push_str("true"),
        tag::I8 => write!(out, "{}i8", ok(d.byte())? as i8)?,
        tag::I16 => write!(out, "{}i16", ok(d.signed_as::<i16>("an i16"))?)?,
        tag::I32 => write!(out, "{}i32", ok(d.signed_as::<i32>("an i32"))?)?,
        tag::I64 => write!(out, "{}i64", unzigzag(ok(d.varint())?))?,
        tag::I128 => write!(out, "{}i128", unzigzag128(ok(d.varint128())?))?,
        tag::U8 => write!(out, "{}u8", ok(d.byte())?)?,
        tag::U16 => write!(out, "{}u16", ok(d.varint_as::<u16>("a u16"))?)?,
        tag::U32 => write!(out, "{}u32", ok(d.varint_as::<u32>("a u32"))?)?,
        tag::U64 => write!(out, "{}u64", ok(d.varint())?)?,
        tag::U128 => write!(out, "{}u128", ok(d.varint128())?)?,
        tag::F32 => {
            let bits = u32::from_le_bytes(ok(d.array())?);
            show_float(out, f64::from(f32::from_bits(bits)), bits.into(), "f32")?;
        }
        tag::F64 => {
            let bits = u64::from_le_bytes(ok(d.array())?);
            show_float(out, f64::from_bits(bits), bits, "f64")?;
        }
        tag::CHAR => write!(out, "{:?}", ok(d.char())?)?,
        tag::STR => {
            let s = ok(d.str())?;
            match s.char_indices().nth(SHOWN / 2) {
                Some((cut, _)) => write!(out, "{:?}…", &s[..cut])?,
                None => write!(out, "{s:?}")?,
            }
        }
        tag::BYTES => {
            let bytes = ok(d.bytes())?;
            let shown = &bytes[..bytes.len().min(SHOWN / 2)];
            write!(out, "b\"{}\"", shown.escape_ascii())?;
            if shown.len() < bytes.len() {
                out.push('…');
            }
        }
        tag::UNIT_STRUCT => out.push_str("unit struct"),
        tag::NEWTYPE_STRUCT => {
            out.push_str("newtype struct(");
            ok(d.enter())?;
            show_value(d, out)?;
            out.push(')');
        }
        tag::SEQ => show_elements(d, out, "[", "]")?,
        tag::TUPLE => show_elements(d, out, "(", ")")?,
        tag::TUPLE_STRUCT => show_elements(d, out, "tuple struct(", ")")?,
        tag::SEQ_U8 | tag::TUPLE_U8 => {
            let bytes = ok(d.packed())?;
            out.push_str(if tag == tag::SEQ_U8 { "[" } else { "(" });
            for (i, byte) in bytes.iter().enumerate() {
                if out.len() >= SHOWN {
                    out.push('…');
                    return Err(fmt::Error);
                }
                let comma = if i == 0 { "" } else { ", " };
                write!(out, "{comma}{byte}u8")?;
            }
            out.push_str(if tag == tag::SEQ_U8 { "]" } else { ")" });
        }
        tag::MAP => {
            out.push('{');
            ok(d.enter())?;
            let mut first = true;
            while !ok(d.at_end_marker())? {
                out.push_str(if first { "" } else { ", " });
                first = false;
                show_value(d, out)?;
                out.push_str(": ");
                show_value(d, out)?;
            }
            d.pos += 1;
            out.push('}');
        }
        tag::STRUCT => {
            out.push_str("struct");
            show_fields(d, out)?;
        }
        tag::UNIT_VARIANT => out.push_str(ok(d.str())?),
        tag::NEWTYPE_VARIANT => {
            write!(out, "{}(", ok(d.str())?)?;
            ok(d.enter())?;
            show_value(d, out)?;
            out.push(')');
        }
        tag::TUPLE_VARIANT => {
            let name = ok(d.str())?;
            write!(out, "{name}(")?;
            show_elements(d, out, "", ")")?;
        }
        tag::STRUCT_VARIANT => {
            out.push_str(ok(d.str())?);
            show_fields(d, out)?;
        }
        other => {
            ok(Err::<(), _>(unknown_tag(at, other)))?;
        }
    }
    Ok(())
}

/// Shows a float: its value with its type, or its bits for a NaN.
fn show_float(out: &mut String, value: f64, bits: u64, ty: &str) -> fmt::Result {
    if value.is_nan() {
        write!(out, "{ty}::NAN (bits {bits:#x})")
    } else if value == f64::INFINITY {
        write!(out, "{ty}::INFINITY")
    } else if value == f64::NEG_INFINITY {
        write!(out, "{ty}::NEG_INFINITY")
    } else {
        write!(out, "{value:?}{ty}")
    }
}

/// Shows elements up to the end marker between `open` and `close`.
fn show_elements(d: &mut Decoder<'_>, out: &mut String, open: &str, close: &str) -> fmt::Result {
    out.push_str(open);
    d.enter().map_err(|_| fmt::Error)?;
    let mut first = true;
    while !d.at_end_marker().map_err(|_| fmt::Error)? {
        out.push_str(if first { "" } else { ", " });
        first = false;
        show_value(d, out)?;
    }
    d.pos += 1;
    out.push_str(close);
    Ok(())
}

/// Shows struct fields up to the end marker as ` { name: value, … }`.
fn show_fields(d: &mut Decoder<'_>, out: &mut String) -> fmt::Result {
    out.push_str(" {");
    d.enter().map_err(|_| fmt::Error)?;
    let mut first = true;
    while let Some(name) = d.field_name().map_err(|_| fmt::Error)? {
        write!(out, "{} {name}: ", if first { "" } else { "," })?;
        first = false;
        show_value(d, out)?;
    }
    d.pos += 1;
    out.push_str(" }");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
    use std::fmt::Debug;
    use std::marker::PhantomData;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use proptest::prelude::*;
    use serde::de::IgnoredAny;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::{Value, json};

    use super::*;

    // --- A counting allocator: allocations and the largest one, per thread -------------------
    //
    // `benches/codec.rs` compiles this file too, and cargo builds benchmarks with `cfg(test)`,
    // but in the bench profile, without debug assertions: gating the allocator on them keeps it
    // (and the tests that need it) out of the benchmark, which must measure the system allocator.

    #[cfg(debug_assertions)]
    use counting::allocations;

    /// Counts heap allocations per thread, for the tests of what encoding and decoding allocate.
    #[cfg(debug_assertions)]
    mod counting {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        /// Counts this thread's heap allocations and the largest one asked for.
        struct Counting;

        thread_local! {
            // Const-initialised `Cell`s: using them never allocates, so the allocator may.
            static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
            static LARGEST: Cell<usize> = const { Cell::new(0) };
        }

        /// Notes one allocation of `size` bytes.
        fn count(size: usize) {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
            LARGEST.with(|n| n.set(n.get().max(size)));
        }

        // SAFETY: every method forwards to `System` with the caller's arguments unchanged; the
        // counters are const-initialised thread-local `Cell`s, which never allocate.
        unsafe impl GlobalAlloc for Counting {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                count(layout.size());
                // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::alloc`'s contract.
                unsafe { System.alloc(layout) }
            }
            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                // SAFETY: `ptr` was allocated by `System` through this allocator with this layout.
                unsafe { System.dealloc(ptr, layout) }
            }
            unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
                count(new_size);
                // SAFETY: `ptr` was allocated by `System` with `layout`; the caller upholds the
                // rest.
                unsafe { System.realloc(ptr, layout, new_size) }
            }
        }

        #[global_allocator]
        static GLOBAL: Counting = Counting;

        /// Runs `f`; returns its result, how many allocations it made and the largest one's size.
        pub(super) fn allocations<R>(f: impl FnOnce() -> R) -> (R, usize, usize) {
            let before = ALLOCATIONS.with(Cell::get);
            LARGEST.with(|n| n.set(0));
            let out = f();
            (
                out,
                ALLOCATIONS.with(Cell::get) - before,
                LARGEST.with(Cell::get),
            )
        }
    }

    // --- Helpers -----------------------------------------------------------------------------

    /// The replay of `value`: stored with the check, then decoded.
    #[track_caller]
    fn replay<T: Serialize + DeserializeOwned>(value: &T) -> T {
        let bytes = encode_checked(value).unwrap_or_else(|err| panic!("refused: {err}"));
        assert_eq!(
            bytes,
            encode(value).unwrap(),
            "the check stores the first encoding"
        );
        match decode::<T>(&bytes) {
            Ok(Stored::Value(back)) => back,
            Ok(Stored::Unstorable(why)) => panic!("unstorable: {why}"),
            Err(err) => panic!("does not decode: {err}"),
        }
    }

    /// Asserts that `value` replays equal to itself.
    #[track_caller]
    fn round_trips<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: T) {
        assert_eq!(replay(&value), value);
    }

    /// Asserts that the check refuses `value`; returns the message.
    #[track_caller]
    fn refused<T: Serialize + DeserializeOwned>(value: &T) -> String {
        match encode_checked(value) {
            Ok(bytes) => panic!("stored: {}", hex(&bytes)),
            Err(err) => err.to_string(),
        }
    }

    /// `bytes` in lower-case hex, space-separated.
    fn hex(bytes: &[u8]) -> String {
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// A value record holding the value bytes `value`.
    fn record(value: &[u8]) -> Vec<u8> {
        let mut out = vec![MAGIC, VERSION, KIND_VALUE];
        out.extend_from_slice(value);
        out
    }

    /// The error decoding `bytes` as `T`, which must not decode.
    #[track_caller]
    fn decode_err<T: DeserializeOwned + Debug>(bytes: &[u8]) -> String {
        match decode::<T>(bytes) {
            Ok(value) => panic!("decoded {} as {value:?}", hex(bytes)),
            Err(err) => err.to_string(),
        }
    }

    // --- Types of every serde shape ------------------------------------------------------------

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct Unit;

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct Newtype(u32);

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct Tuple(u8, String, Option<i64>);

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct Small {
        id: u64,
        account: u32,
        name: String,
        note: Option<String>,
        amount: f64,
    }

    fn small() -> Small {
        Small {
            id: 42,
            account: 7,
            name: "Ada Lovelace".into(),
            note: None,
            amount: 12.5,
        }
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct Options {
        a: Option<Option<u32>>,
        b: f64,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    enum External {
        Unit,
        Newtype(u32),
        Tuple(u8, u8),
        Struct { x: i32 },
        NewtypeUnit(Unit),
        Nested(Option<Option<()>>),
        Boxed(Box<External>),
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    #[serde(tag = "type")]
    enum Internal {
        A {
            x: u32,
        },
        B(Small),
        C,
        D(Unit),
        E {
            ip: IpAddr,
            maybe: Option<Option<u8>>,
            unit: (),
            value: Value,
            variant: External,
        },
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    #[serde(tag = "t", content = "c")]
    enum Adjacent {
        A(u32),
        B { y: String },
        C,
        D(u8, Option<()>),
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    #[serde(untagged)]
    enum Untagged {
        A(u32),
        B(String),
        C { z: bool },
        D(Vec<Option<()>>),
        E(External),
        F(Newtype),
        // Before G: serde's buffer reads a unit struct as `None` too, so G would take it.
        H(Unit),
        G(Option<Option<i8>>),
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct Inner {
        p: u32,
        q: Option<String>,
        r: Option<Option<u8>>,
        s: Adjacent,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct Flat {
        id: u64,
        #[serde(flatten)]
        inner: Inner,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct FlatMap {
        id: u64,
        #[serde(flatten)]
        extra: BTreeMap<String, Option<Option<u8>>>,
    }

    /// Bytes as serde's bytes shape (`serialize_bytes`), as `serde_bytes` does.
    #[derive(Debug, PartialEq, Clone)]
    struct Bytes(Vec<u8>);

    impl Serialize for Bytes {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_bytes(&self.0)
        }
    }

    impl<'de> Deserialize<'de> for Bytes {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct BytesVisitor;
            impl<'de> Visitor<'de> for BytesVisitor {
                type Value = Bytes;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
                    Ok(Bytes(v.to_vec()))
                }
            }
            deserializer.deserialize_byte_buf(BytesVisitor)
        }
    }

    /// Serializes as a string where the format is human-readable, as a number where not.
    #[derive(Debug, PartialEq, Clone)]
    struct Readable;

    impl Serialize for Readable {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            if serializer.is_human_readable() {
                serializer.serialize_str("readable")
            } else {
                serializer.serialize_u8(0)
            }
        }
    }

    impl<'de> Deserialize<'de> for Readable {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            if deserializer.is_human_readable() {
                let s = String::deserialize(deserializer)?;
                (s == "readable")
                    .then_some(Readable)
                    .ok_or_else(|| de::Error::custom("not `readable`"))
            } else {
                u8::deserialize(deserializer).map(|_| Readable)
            }
        }
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    #[serde(tag = "kind")]
    enum WithReadable {
        R { readable: Readable, at: SocketAddr },
    }

    /// A linked list: each `Cons` is one level of nesting (a newtype variant).
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    enum List {
        Nil,
        Cons(Box<List>),
    }

    fn list(depth: usize) -> List {
        (0..depth).fold(List::Nil, |tail, _| List::Cons(Box::new(tail)))
    }

    // --- Round trips: the table ---------------------------------------------------------------

    #[test]
    fn options_keep_their_nesting() {
        round_trips(None::<u32>);
        round_trips(Some(None::<u32>));
        round_trips(Some(Some(None::<u8>)));
        round_trips(Some(Some(Some(None::<u8>))));
        round_trips(Some(()));
        round_trips(Some(Value::Null));
        round_trips(Some(Unit));
        round_trips(Some(vec![Some(()), None]));
        round_trips(None::<Vec<Option<()>>>);
        round_trips(Options {
            a: Some(None),
            b: 1.5,
        });
        round_trips(vec![
            None,
            Some(None),
            Some(Some(None)),
            Some(Some(Some(0u8))),
        ]);
    }

    #[test]
    fn floats_keep_their_bits() {
        let f64s = [
            0.0,
            -0.0,
            1.5,
            f64::MIN,
            f64::MAX,
            f64::MIN_POSITIVE,
            f64::EPSILON,
            5e-324, // the smallest subnormal
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            -f64::NAN,
            f64::from_bits(0x7ff0_0000_0000_0001), // a signalling NaN
            f64::from_bits(0x7ff8_dead_beef_0001), // a NaN with a payload
        ];
        for value in f64s {
            assert_eq!(replay(&value).to_bits(), value.to_bits(), "{value:?}");
            let some = replay(&Some(value)).map(f64::to_bits);
            assert_eq!(some, Some(value.to_bits()), "Some({value:?})");
        }
        let f32s = [
            0.0,
            -0.0,
            f32::MIN,
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::EPSILON,
            1e-45, // the smallest subnormal
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7f80_0001),
        ];
        for value in f32s {
            assert_eq!(replay(&value).to_bits(), value.to_bits(), "{value:?}");
        }
        assert!(replay(&vec![f64::NAN, -0.0])[1].is_sign_negative());
    }

    #[test]
    fn integers_at_their_limits() {
        round_trips((i8::MIN, i8::MAX, u8::MIN, u8::MAX));
        round_trips((i16::MIN, i16::MAX, u16::MAX, i32::MIN, i32::MAX, u32::MAX));
        round_trips((i64::MIN, i64::MAX, u64::MAX, -1i64, 0i64, 1i64));
        round_trips((i128::MIN, i128::MAX, u128::MAX, u128::MIN, -1i128));
        round_trips((usize::MAX, isize::MIN));
        round_trips(std::num::NonZeroU64::new(u64::MAX).unwrap());
        round_trips(std::num::Wrapping(-3i16));
    }

    #[test]
    fn structs_and_enums_of_every_shape() {
        round_trips(());
        round_trips(Unit);
        round_trips(Newtype(5));
        round_trips(Tuple(1, "x".into(), Some(-9)));
        round_trips(small());
        round_trips(vec![
            External::Unit,
            External::Newtype(1),
            External::Tuple(1, 2),
            External::Struct { x: -1 },
            External::NewtypeUnit(Unit),
            External::Nested(Some(None)),
            External::Boxed(Box::new(External::Boxed(Box::new(External::Unit)))),
        ]);
        round_trips(PhantomData::<String>);
        round_trips(Ok::<u32, String>(5));
        round_trips(Err::<u32, String>("failed".into()));
        round_trips(Ok::<Option<()>, ()>(Some(())));
        round_trips(std::cmp::Reverse(3u8));
        round_trips(3u32..9);
        round_trips(std::ops::Bound::Excluded(4i64));
    }

    #[test]
    fn internally_adjacently_and_un_tagged_enums() {
        round_trips(vec![
            Internal::A { x: 1 },
            Internal::B(small()),
            Internal::C,
            Internal::D(Unit),
            Internal::E {
                ip: IpAddr::V6(Ipv6Addr::LOCALHOST),
                maybe: Some(None),
                unit: (),
                value: json!({"k": [null, 1.5, -2, u64::MAX]}),
                variant: External::Tuple(3, 4),
            },
        ]);
        round_trips(vec![
            Adjacent::A(1),
            Adjacent::B { y: "q".into() },
            Adjacent::C,
            Adjacent::D(7, Some(())),
        ]);
        round_trips(vec![
            Untagged::A(1),
            Untagged::B("s".into()),
            Untagged::C { z: true },
            Untagged::D(vec![Some(()), None]),
            Untagged::E(External::Newtype(5)),
            Untagged::E(External::Struct { x: 3 }),
            Untagged::E(External::Tuple(3, 4)),
            Untagged::F(Newtype(6)),
            Untagged::H(Unit),
            Untagged::G(Some(None)),
            Untagged::G(None),
        ]);
    }

    #[test]
    fn flattened_structs_and_maps() {
        round_trips(Flat {
            id: 1,
            inner: Inner {
                p: 2,
                q: None,
                r: Some(None),
                s: Adjacent::D(1, None),
            },
        });
        round_trips(FlatMap {
            id: 1,
            extra: BTreeMap::from([
                ("none".into(), None),
                ("some none".into(), Some(None)),
                ("some some".into(), Some(Some(3))),
            ]),
        });
    }

    #[test]
    fn json_values() {
        round_trips(Value::Null);
        round_trips(json!({
            "null": null,
            "array": [1, null, 2.5, "x", {"b": true}, [], {}],
            "big": u64::MAX,
            "negative": i64::MIN,
            "float": -0.0,
            "tiny": 5e-324,
            "nested": {"a": {"b": {"c": [[[]]]}}},
        }));
        round_trips(vec![Some(Value::Null), None, Some(json!([null]))]);
    }

    #[test]
    fn bytes_chars_and_strings() {
        round_trips(Vec::<u8>::new());
        round_trips(vec![0u8, 255, 3]);
        round_trips(vec![0i8, -128, 127]);
        round_trips(Bytes(vec![]));
        round_trips(Bytes(vec![0, 1, 2, 255]));
        round_trips([7u8; 32]);
        round_trips([0u8; 0]);
        round_trips([1u32, 2, 3]);
        round_trips((1u8,));
        round_trips(vec![
            '\0',
            'a',
            'é',
            '\u{FFFD}',
            '\u{FEFF}',
            '😀',
            '\u{10FFFF}',
        ]);
        // Every kind of Unicode a Rust string can hold: NUL, controls, combining marks, a ZWJ
        // emoji sequence, a BOM, the replacement character, noncharacters and supplementary
        // planes. Lone surrogates cannot be tested: no `String` or `char` can hold one.
        let all = "\0\u{1}\t\n\r\u{1b}\u{7f}\u{80}\u{9f}e\u{301}\u{200b}\u{200d}\u{feff}\u{fffd}\
                   \u{fffe}\u{ffff}👩\u{200d}👩\u{200d}👧\u{1d11e}\u{e0001}\u{10fffd}\u{10ffff}";
        round_trips(String::from(all));
        let every_char: String = (0..=0x10FFFF)
            .filter_map(char::from_u32)
            .step_by(97)
            .collect();
        round_trips(every_char);
        round_trips(String::new());
        round_trips(Box::<str>::from("boxed"));
        round_trips(Cow::<str>::Owned("cow".into()));
    }

    #[test]
    fn maps_with_any_keys_and_sets() {
        round_trips(BTreeMap::from([((1u8, 2u8), 3u8), ((0, 0), 0)]));
        round_trips(HashMap::from([
            ((1u32, 2u32), 3u64),
            ((4, 5), 6),
            ((7, 8), 9),
        ]));
        round_trips(
            (0..1000u32)
                .map(|i| ((i, i * 7), u64::from(i)))
                .collect::<HashMap<_, _>>(),
        );
        round_trips(HashSet::from(["a".to_string(), "b".into(), "c".into()]));
        round_trips((0..=255u8).collect::<HashSet<_>>());
        round_trips(BTreeSet::from([Some(1u8), None]));
        round_trips(BTreeMap::from([(None, 1u8), (Some(()), 2)]));
        round_trips(BTreeMap::from([('x', true), ('y', false)]));
        round_trips(BTreeMap::from([(vec![1u16], Unit), (vec![], Unit)]));
        round_trips(HashMap::from([(
            "outer".to_string(),
            (0..50u16)
                .map(|i| (i, vec![i; 3]))
                .collect::<HashMap<_, _>>(),
        )]));
        round_trips(VecDeque::from([1u16, 2, 3]));
    }

    #[test]
    fn empty_and_large_collections() {
        round_trips((
            Vec::<u8>::new(),
            BTreeMap::<u8, u8>::new(),
            String::new(),
            HashSet::<u8>::new(),
            Vec::<Unit>::new(),
        ));
        round_trips((0..100_000u32).collect::<Vec<_>>());
        round_trips((0..100_000u32).map(|i| i as u8).collect::<Vec<u8>>());
        round_trips(
            (0..100_000u32)
                .map(|i| (i, i.to_string()))
                .collect::<BTreeMap<_, _>>(),
        );
        round_trips((0..100_000u64).collect::<HashSet<_>>());
    }

    #[test]
    fn std_types_with_their_own_serde() {
        round_trips(Duration::new(5, 999_999_999));
        round_trips(Duration::MAX);
        round_trips(UNIX_EPOCH);
        round_trips(SystemTime::now());
        round_trips(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        round_trips(IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 1, 2, 3, 4)));
        round_trips(SocketAddr::from(([127, 0, 0, 1], 8080)));
        round_trips(SocketAddr::from((Ipv6Addr::LOCALHOST, 443)));
        round_trips(std::path::PathBuf::from("/tmp/x"));
        round_trips(std::ffi::CString::new("c string").unwrap());
        round_trips(std::num::Saturating(7u8));
        round_trips(std::sync::Mutex::new(3u8).into_inner().unwrap());
        // `Arc<T>` and `Rc<T>` serialize only with serde's `rc` feature, which this crate does
        // not enable: nothing to test here.
    }

    #[test]
    fn tuples_up_to_sixteen() {
        round_trips((1u8, 2u16));
        round_trips((1u8, "two".to_string(), 3.0f32, Some('4')));
        // Tuples longer than 12 have no PartialEq or Debug: compared by their (injective)
        // encodings instead.
        let sixteen = (
            1u8,
            2i8,
            3u16,
            4i16,
            5u32,
            6i32,
            7u64,
            8i64,
            9u128,
            10i128,
            11.0f32,
            12.0f64,
            '1',
            "14".to_string(),
            (),
            Some(16u8),
        );
        assert_eq!(
            encode(&replay(&sixteen)).unwrap(),
            encode(&sixteen).unwrap()
        );
    }

    #[test]
    fn human_readable_forms_are_written_and_read_everywhere() {
        // Written in the readable form …
        let bytes = encode(&Readable).unwrap();
        assert_eq!(hex(&bytes), "c1 01 01 13 08 72 65 61 64 61 62 6c 65");
        round_trips(Readable);
        // … so it replays from serde's buffer too (an internally tagged enum), which always reads
        // as human-readable; the compact form would fail there.
        round_trips(WithReadable::R {
            readable: Readable,
            at: SocketAddr::from(([192, 168, 0, 1], 9)),
        });
        round_trips(Internal::E {
            ip: IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4)),
            maybe: None,
            unit: (),
            value: Value::Null,
            variant: External::Unit,
        });
    }

    // --- Refused, never replayed wrong ---------------------------------------------------------

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    #[serde(untagged)]
    enum Number {
        F(f64),
        U(u32),
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Big {
        v: u128,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct FlatBig {
        id: u8,
        #[serde(flatten)]
        inner: Big,
    }

    /// Its `Deserialize` drops a field.
    #[derive(Serialize, Debug, PartialEq)]
    struct Lossy {
        kept: u32,
        dropped: String,
    }

    impl<'de> Deserialize<'de> for Lossy {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            #[derive(Deserialize)]
            struct Kept {
                kept: u32,
            }
            let Kept { kept } = Kept::deserialize(deserializer)?;
            Ok(Lossy {
                kept,
                dropped: String::new(),
            })
        }
    }

    /// Its `Deserialize` reverses the elements.
    #[derive(Serialize, Debug, PartialEq)]
    #[serde(transparent)]
    struct Reversing(Vec<u32>);

    impl<'de> Deserialize<'de> for Reversing {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            let mut v = Vec::<u32>::deserialize(deserializer)?;
            v.reverse();
            Ok(Reversing(v))
        }
    }

    /// Its `Serialize` fails.
    #[derive(Deserialize, Debug)]
    struct Failing;

    impl Serialize for Failing {
        fn serialize<S: Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(ser::Error::custom("the mutex is poisoned"))
        }
    }

    #[test]
    fn an_untagged_enum_that_would_replay_another_variant_is_refused() {
        round_trips(Number::F(5.5)); // the first variant is fine
        let why = refused(&Number::U(5));
        assert!(why.contains("`5u32`") && why.contains("`5.0f64`"), "{why}");
        assert!(why.contains("Number"), "{why}");
        // A unit variant reads from serde's buffer as its name: here a string first.
        let why = refused(&Untagged::E(External::Unit));
        assert!(
            why.contains("`Unit`") && why.contains("`\"Unit\"`"),
            "{why}"
        );
    }

    #[test]
    fn a_u128_in_serdes_buffer_is_refused() {
        let why = refused(&FlatBig {
            id: 1,
            inner: Big { v: 1 },
        });
        assert!(why.contains("does not decode back"), "{why}");
        assert!(why.contains("u128"), "{why}");
        round_trips(Big { v: u128::MAX }); // outside a buffer, a u128 is fine
    }

    #[test]
    fn refusals_say_what_failed() {
        // A field its Serialize skips and its Deserialize requires: serde's words, and no
        // mention of serde's buffer, which has nothing to do with it.
        #[derive(Serialize, Deserialize, Debug)]
        struct SkipIfZero {
            #[serde(skip_serializing_if = "is_zero")]
            n: u32,
        }
        fn is_zero(n: &u32) -> bool {
            *n == 0
        }
        let why = refused(&SkipIfZero { n: 0 });
        assert!(
            why.contains("it does not decode back as `")
                && why.contains("SkipIfZero`: missing field `n` (at byte ")
                && why.contains("its Deserialize does not read back what its Serialize writes"),
            "{why}"
        );
        assert!(!why.contains("buffer"), "{why}");
        // A Deserialize that fails: its own words.
        #[derive(Serialize, Debug)]
        struct Fails(u8);
        impl<'de> Deserialize<'de> for Fails {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                u8::deserialize(d)?;
                Err(de::Error::custom("the checksum does not match"))
            }
        }
        let why = refused(&Fails(1));
        assert!(
            why.contains(": the checksum does not match (at byte "),
            "{why}"
        );
        assert!(!why.contains("buffer"), "{why}");
        // A Deserialize that leaves part of the value unread: not "a corrupt record".
        #[derive(Serialize, Debug)]
        struct Unread(u8, u8);
        impl<'de> Deserialize<'de> for Unread {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Lazy;
                impl<'de> Visitor<'de> for Lazy {
                    type Value = Unread;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("anything")
                    }
                    fn visit_some<D: Deserializer<'de>>(self, _: D) -> Result<Unread, D::Error> {
                        Ok(Unread(0, 0))
                    }
                }
                d.deserialize_option(Lazy)
            }
        }
        let why = refused(&Unread(1, 2));
        assert!(
            why.contains(": trailing bytes after the value (at byte "),
            "{why}"
        );
        assert!(!why.contains("corrupt") && !why.contains("buffer"), "{why}");
        // serde's buffer has no u128 or i128: said so, with serde's words first.
        let why = refused(&FlatBig {
            id: 1,
            inner: Big { v: 1 },
        });
        assert!(why.contains("integer `1` as u128"), "{why}");
        assert!(
            why.contains("serde's buffer") && why.contains("u128 or an i128"),
            "{why}"
        );
        #[derive(Serialize, Deserialize, Debug)]
        struct Wide {
            big: i128,
        }
        #[derive(Serialize, Deserialize, Debug)]
        #[serde(tag = "kind")]
        enum Tagged {
            W(Wide),
        }
        let why = refused(&Tagged::W(Wide { big: -1 }));
        assert!(why.contains("integer `-1` as i128"), "{why}");
        assert!(why.contains("serde's buffer"), "{why}");
        // A validated newtype in serde's buffer: the buffer named, conditionally.
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct Contact {
            email: Email,
        }
        #[derive(Serialize, Deserialize, Debug)]
        struct Flattened {
            id: u8,
            #[serde(flatten)]
            contact: Contact,
        }
        let why = refused(&Flattened {
            id: 1,
            contact: Contact {
                email: Email("a@b.c".into()),
            },
        });
        assert!(
            why.contains("invalid type: newtype struct, expected a string")
                && why.contains("serde's buffer there reads no newtype struct"),
            "{why}"
        );
        // Outside a buffer it replays.
        round_trips(Contact {
            email: Email("a@b.c".into()),
        })
    }

    #[test]
    fn a_lossy_deserialize_is_refused() {
        let why = refused(&Lossy {
            kept: 1,
            dropped: "data".into(),
        });
        assert!(why.contains("at `.dropped`"), "{why}");
        assert!(
            why.contains("`\"data\"`") && why.contains("`\"\"`"),
            "{why}"
        );
        // With nothing to lose it passes: the check compares values, not types.
        round_trips(Lossy {
            kept: 1,
            dropped: String::new(),
        });
    }

    #[test]
    fn order_differences_are_accepted_and_nothing_else() {
        // A HashMap's order differs between two instances: accepted.
        let map: HashMap<String, HashSet<u32>> = (0..200)
            .map(|i| (i.to_string(), (0..i).collect()))
            .collect();
        round_trips(map);
        // Without `==`, the check cannot tell a HashSet's sequence from a Vec's, so a Deserialize
        // that reorders a Vec passes too (the documented limit; with `==` it is caught, see
        // `element_order_is_accepted_without_eq_and_judged_by_eq_with_it`).
        let replayed = replay(&Reversing(vec![1, 2, 3]));
        assert_eq!(replayed, Reversing(vec![3, 2, 1]));
        // Different elements are not an order difference.
        #[derive(Serialize, Debug)]
        #[serde(transparent)]
        struct Dedup(Vec<u8>);
        impl<'de> Deserialize<'de> for Dedup {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let set = BTreeSet::<u8>::deserialize(deserializer)?;
                Ok(Dedup(set.into_iter().collect()))
            }
        }
        let why = refused(&Dedup(vec![1, 1, 2]));
        assert!(
            why.contains("[1u8, 1u8, 2u8]") && why.contains("[1u8, 2u8]"),
            "{why}"
        );
    }

    #[test]
    fn a_failing_serialize_is_refused() {
        let why = refused(&Failing);
        assert!(why.contains("the mutex is poisoned"), "{why}");
    }

    #[test]
    fn depth_is_limited_alike_when_encoding_and_decoding() {
        let ok = replay(&list(MAX_DEPTH));
        assert_eq!(ok, list(MAX_DEPTH));
        let why = refused(&list(MAX_DEPTH + 1));
        assert!(why.contains("deeper than 128"), "{why}");
        // The same count on both sides: the deepest record the encoder writes decodes, one level
        // more does not.
        let deepest = encode(&list(MAX_DEPTH)).unwrap();
        let mut deeper = deepest.clone();
        deeper.splice(
            HEADER..HEADER,
            encode(&list(1)).unwrap()[HEADER..][..6].to_vec(),
        );
        assert!(decode_err::<List>(&deeper).contains("deeper than 128"));
        assert!(decode_err::<IgnoredAny>(&deeper).contains("deeper than 128"));
        assert!(decode_err::<Value>(&deeper).contains("deeper than 128"));
        // Options, newtypes and sequences count too.
        let mut json = Value::Null;
        for _ in 0..MAX_DEPTH {
            json = Value::Array(vec![json]);
        }
        round_trips(json.clone());
        assert!(refused(&Value::Array(vec![json])).contains("deeper than 128"));
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    #[serde(untagged)]
    enum Mixed {
        Byte(u8),
        Text(String),
    }

    #[test]
    fn runs_of_u8_are_packed_and_unpacked_when_another_element_follows() {
        #[track_caller]
        fn encodes_as<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: T, hex_: &str) {
            assert_eq!(hex(&encode(&value).unwrap()[HEADER..]), hex_, "{value:?}");
            round_trips(value);
        }
        encodes_as((1u8, 2u8, 3u8), "1a 03 01 02 03");
        encodes_as((1u8, 2u8, 'x'), "19 0b 01 0b 02 12 78 00");
        encodes_as(('x', 1u8, 2u8), "19 12 78 0b 01 0b 02 00");
        encodes_as((1u8, 'x', 2u8), "19 0b 01 12 78 0b 02 00");
        encodes_as((1u8, (2u8, 3u8)), "19 0b 01 1a 02 02 03 00");
        encodes_as(vec![vec![1u8], vec![]], "17 18 01 01 17 00 00");
        encodes_as(
            vec![
                Mixed::Byte(1),
                Mixed::Byte(2),
                Mixed::Text("x".into()),
                Mixed::Byte(3),
            ],
            "17 0b 01 0b 02 13 01 78 0b 03 00",
        );
        let mut long: Vec<Mixed> = (0..=255).map(Mixed::Byte).collect();
        long.push(Mixed::Text("end".into()));
        round_trips(long);
        // 128 elements need a two-byte count.
        encodes_as(vec![7u8; 128], &format!("18 80 01{}", " 07".repeat(128)));
    }

    #[test]
    fn declared_lengths_are_neither_needed_nor_trusted() {
        // A sequence of unknown length (`serialize_seq(None)`, as `collect_seq` gives for an
        // iterator without an exact size, and `#[serde(flatten)]` for maps) and one whose
        // declared length is absurd both encode.
        let evens = (0..10u32).filter(|x| x % 2 == 0);
        let mut out = Encoder {
            out: Vec::new(),
            depth: 0,
            bare: NO_BARE,
        };
        ser::Serializer::collect_seq(&mut out, evens).unwrap();
        assert_eq!(hex(&out.out), "17 0d 00 0d 02 0d 04 0d 06 0d 08 00");

        #[derive(Debug, PartialEq, Deserialize)]
        struct Declared {
            a: u8,
        }
        impl Serialize for Declared {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeStruct;
                let mut s = serializer.serialize_struct("Declared", 9)?;
                s.serialize_field("a", &self.a)?;
                s.end()
            }
        }
        round_trips(Declared { a: 3 });
        #[derive(Debug, PartialEq)]
        struct Lies(Vec<String>);
        impl Serialize for Lies {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeSeq;
                let mut seq = serializer.serialize_seq(Some(usize::MAX))?;
                for item in &self.0 {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
        }
        impl<'de> Deserialize<'de> for Lies {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                Vec::deserialize(deserializer).map(Lies)
            }
        }
        round_trips(Lies(vec!["one".into()]));
        // What it reserves for the lie is capped.
        #[cfg(debug_assertions)]
        {
            let (_, _, largest) = allocations(|| encode(&Lies(vec!["one".into()])).unwrap());
            assert!(largest <= 2 << 20, "{largest} bytes reserved at once");
        }
    }

    #[test]
    fn decoding_borrows_strings_and_bytes_from_the_record() {
        let bytes = encode(&("borrowed", Bytes(vec![1, 2]))).unwrap();
        let mut decoder = Decoder::new(&bytes, HEADER);
        let (text, raw): (&str, &[u8]) = Deserialize::deserialize(&mut decoder).unwrap();
        assert_eq!((text, raw), ("borrowed", &[1u8, 2][..]));
        // Pointing into the record: nothing was copied.
        assert!(bytes.as_ptr_range().contains(&text.as_ptr()));
        assert!(bytes.as_ptr_range().contains(&raw.as_ptr()));
    }

    #[test]
    fn errors_are_proper_errors() {
        fn assert_bounds<T: std::error::Error + Send + Sync + 'static>() {}
        assert_bounds::<Unfaithful>();
        assert_bounds::<DecodeError>();
        // Small enough to pass around: a pointer for the decoder's error.
        assert_eq!(
            std::mem::size_of::<DecodeError>(),
            std::mem::size_of::<usize>()
        );
    }

    // --- The check with the type's `==` ---------------------------------------------------------

    /// The check as the executor runs it when the attribute finds `PartialEq`: the replay.
    fn checked_eq<T: Serialize + DeserializeOwned + PartialEq>(value: &T) -> Result<T, String> {
        encode_checked_replay(value, Some(PartialEq::eq))
            .map(|(_, replay)| replay)
            .map_err(|err| err.to_string())
    }

    /// The check without `==`: the replay.
    fn checked_without_eq<T: Serialize + DeserializeOwned>(value: &T) -> Result<T, String> {
        encode_checked_replay(value, None)
            .map(|(_, replay)| replay)
            .map_err(|err| err.to_string())
    }

    /// Asserts that the check with `==` refuses `value` as not `==` to its replay.
    #[track_caller]
    fn refused_with_eq<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: &T) {
        match checked_eq(value) {
            Ok(replay) => panic!("{value:?} stored, replays as {replay:?}"),
            Err(why) => assert!(why.contains("not `==` to it"), "{why}"),
        }
    }

    /// Asserts the documented limit: without `==`, `value` is stored and replays as `wrong`.
    #[track_caller]
    fn wrong_without_eq<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: &T, wrong: T) {
        assert_ne!(*value, wrong);
        assert_eq!(checked_without_eq(value).as_ref(), Ok(&wrong));
    }

    #[test]
    fn element_order_is_accepted_without_eq_and_judged_by_eq_with_it() {
        // A Deserialize that reorders a Vec: without `==` the encodings differ only in order,
        // which the check must accept for HashMap and HashSet, so it passes (the documented
        // limit); with `==` it is caught.
        let value = Reversing(vec![1, 2, 3]);
        wrong_without_eq(&value, Reversing(vec![3, 2, 1]));
        refused_with_eq(&value);
        // A HashSet (and a HashMap) is accepted both ways, though its replay iterates in
        // another order.
        let set: HashSet<u32> = (0..500).collect();
        let replay = checked_without_eq(&set).unwrap_or_else(|why| panic!("{why}"));
        assert_eq!(replay, set);
        // (The replay's hasher differs, so its encoding differs in order: the sorted comparison
        // accepted it, not the byte-for-byte one.)
        assert_ne!(encode(&replay).unwrap(), encode(&set).unwrap());
        assert_eq!(checked_eq(&set).as_ref(), Ok(&set));
        let map: HashMap<String, HashSet<u8>> = (0..50u8)
            .map(|i| (i.to_string(), (0..i).collect()))
            .collect();
        assert_eq!(checked_without_eq(&map).as_ref(), Ok(&map));
        assert_eq!(checked_eq(&map).as_ref(), Ok(&map));
        // A value holding a NaN is not `==` to itself, so `==` cannot judge its replay: it is
        // checked by its encodings, and accepted with `eq` (the NaN replays with its bits).
        let nan = (f64::NAN, vec![1u32, 2], Some(-0.0f32));
        let replay = checked_eq(&nan).unwrap_or_else(|why| panic!("{why}"));
        assert_eq!(replay.0.to_bits(), f64::NAN.to_bits());
        assert_eq!(
            (&replay.1, replay.2.map(f32::to_bits)),
            (&nan.1, Some((-0.0f32).to_bits()))
        );
        // … and so, holding a NaN, even a reordering Deserialize passes with `eq` (the limit
        // again: only the encodings judge it).
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct Measured {
            value: f64,
            samples: Reversing,
        }
        let measured = Measured {
            value: f64::NAN,
            samples: Reversing(vec![1, 2]),
        };
        let replay = checked_eq(&measured).unwrap_or_else(|why| panic!("{why}"));
        assert_eq!(replay.samples, Reversing(vec![2, 1]));
        // Not NaN, it is caught.
        refused_with_eq(&Measured {
            value: 1.0,
            samples: Reversing(vec![1, 2]),
        });
        // Different elements are refused without `eq` as with it.
        assert!(
            checked_without_eq(&Lossy {
                kept: 1,
                dropped: "x".into()
            })
            .is_err()
        );
    }

    /// The reviewer's lossy cases: each `Serialize` (or serde's untagged and flatten handling)
    /// loses data before the format sees it, so the value and its replay encode alike. With
    /// `==`, each is refused when stored; without it, each is stored and replays wrong (the
    /// documented limit, asserted by `wrong_without_eq`).
    #[test]
    fn lossy_serializations_are_refused_with_eq() {
        // A skipped field.
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct Skipped {
            id: u32,
            #[serde(skip)]
            secret: String,
        }
        let skipped = Skipped {
            id: 7,
            secret: "s3cr3t".into(),
        };
        refused_with_eq(&skipped);
        wrong_without_eq(
            &skipped,
            Skipped {
                id: 7,
                secret: String::new(),
            },
        );

        // `from`/`into` through a u8 that clamps.
        #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
        #[serde(from = "u8", into = "u8")]
        struct Percent(u32);
        impl From<u8> for Percent {
            fn from(v: u8) -> Percent {
                Percent(v.into())
            }
        }
        impl From<Percent> for u8 {
            fn from(p: Percent) -> u8 {
                p.0.min(100) as u8
            }
        }
        refused_with_eq(&Percent(250));
        wrong_without_eq(&Percent(250), Percent(100));
        assert_eq!(checked_eq(&Percent(40)), Ok(Percent(40)));

        // Untagged variants of one shape.
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        #[serde(untagged)]
        enum Amount {
            Cents(u64),
            Points(u64),
        }
        refused_with_eq(&Amount::Points(5));
        wrong_without_eq(&Amount::Points(5), Amount::Cents(5));
        assert_eq!(checked_eq(&Amount::Cents(5)), Ok(Amount::Cents(5)));

        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        #[serde(untagged)]
        enum Payment {
            Card { id: String },
            Bank { id: String },
        }
        let bank = Payment::Bank {
            id: "acct-1".into(),
        };
        refused_with_eq(&bank);
        wrong_without_eq(
            &bank,
            Payment::Card {
                id: "acct-1".into(),
            },
        );

        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        #[serde(untagged)]
        enum Status {
            Pending,
            Done,
        }
        refused_with_eq(&Status::Done);
        wrong_without_eq(&Status::Done, Status::Pending);

        // A flattened Option whose None and Some(all fields absent) serialize alike.
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct AllOptional {
            #[serde(skip_serializing_if = "Option::is_none", default)]
            note: Option<String>,
        }
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct FlatOpt {
            id: u8,
            #[serde(flatten)]
            extra: Option<AllOptional>,
        }
        let none = FlatOpt { id: 1, extra: None };
        refused_with_eq(&none);
        wrong_without_eq(
            &none,
            FlatOpt {
                id: 1,
                extra: Some(AllOptional { note: None }),
            },
        );
        let some = FlatOpt {
            id: 1,
            extra: Some(AllOptional { note: None }),
        };
        assert_eq!(checked_eq(&some).as_ref(), Ok(&some));
    }

    // --- Validated newtypes: a newtype struct read as its inner shape ---------------------------

    /// The validated-newtype pattern: `Serialize` derives a newtype struct, `Deserialize` reads a
    /// `String` and validates it.
    #[derive(Serialize, Deserialize, Debug, PartialEq, Eq, PartialOrd, Ord, Clone)]
    #[serde(try_from = "String")]
    struct Email(String);

    impl TryFrom<String> for Email {
        type Error = String;
        fn try_from(s: String) -> Result<Email, String> {
            if s.contains('@') {
                Ok(Email(s))
            } else {
                Err(format!("{s:?} is not an email address"))
            }
        }
    }

    /// The same on a number.
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    #[serde(try_from = "i64")]
    struct Even(i64);

    impl TryFrom<i64> for Even {
        type Error = String;
        fn try_from(v: i64) -> Result<Even, String> {
            if v % 2 == 0 {
                Ok(Even(v))
            } else {
                Err(format!("{v} is odd"))
            }
        }
    }

    /// `from` rather than `try_from`: `Deserialize` reads a `u32`.
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    #[serde(from = "u32")]
    struct Cents(u32);

    impl From<u32> for Cents {
        fn from(v: u32) -> Cents {
            Cents(v)
        }
    }

    /// The reverse: `Serialize` writes a `u32`, `Deserialize` derives a newtype struct.
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    #[serde(into = "u32")]
    struct Points(u32);

    impl From<Points> for u32 {
        fn from(p: Points) -> u32 {
            p.0
        }
    }

    /// `try_from` a struct of the same fields: `Serialize` derives the struct itself.
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    #[serde(try_from = "RawRange")]
    struct Range {
        lo: u32,
        hi: u32,
    }

    #[derive(Deserialize)]
    struct RawRange {
        lo: u32,
        hi: u32,
    }

    impl TryFrom<RawRange> for Range {
        type Error = &'static str;
        fn try_from(raw: RawRange) -> Result<Range, &'static str> {
            (raw.lo <= raw.hi)
                .then_some(Range {
                    lo: raw.lo,
                    hi: raw.hi,
                })
                .ok_or("lo > hi")
        }
    }

    /// A validated newtype of every other inner shape: bytes as a packed run, an option, an
    /// enum, a struct, a sequence.
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    #[serde(try_from = "Vec<u8>")]
    struct Blob(Vec<u8>);

    impl TryFrom<Vec<u8>> for Blob {
        type Error = &'static str;
        fn try_from(v: Vec<u8>) -> Result<Blob, &'static str> {
            Ok(Blob(v))
        }
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    #[serde(try_from = "Option<u32>")]
    struct MaybeId(Option<u32>);

    impl TryFrom<Option<u32>> for MaybeId {
        type Error = &'static str;
        fn try_from(v: Option<u32>) -> Result<MaybeId, &'static str> {
            Ok(MaybeId(v))
        }
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    #[serde(try_from = "External")]
    struct Checked(External);

    impl TryFrom<External> for Checked {
        type Error = &'static str;
        fn try_from(v: External) -> Result<Checked, &'static str> {
            Ok(Checked(v))
        }
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    #[serde(try_from = "Small")]
    struct ValidSmall(Small);

    impl TryFrom<Small> for ValidSmall {
        type Error = &'static str;
        fn try_from(v: Small) -> Result<ValidSmall, &'static str> {
            Ok(ValidSmall(v))
        }
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    #[serde(try_from = "Vec<Email>")]
    struct Recipients(Vec<Email>);

    impl TryFrom<Vec<Email>> for Recipients {
        type Error = &'static str;
        fn try_from(v: Vec<Email>) -> Result<Recipients, &'static str> {
            (!v.is_empty())
                .then_some(Recipients(v))
                .ok_or("no recipients")
        }
    }

    /// A derived newtype around a validated one: two newtype levels, each read its own way.
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct Sender(Email);

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct Message {
        from: Sender,
        to: Recipients,
        cc: Vec<Email>,
        retries: Option<Even>,
        by_address: BTreeMap<Email, Even>,
        #[serde(flatten)]
        range: Range,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    #[serde(transparent)]
    struct TransparentEmail {
        email: Email,
    }

    #[test]
    fn validated_newtypes_replay() {
        round_trips(Email("a@b.c".into()));
        round_trips(Even(4));
        round_trips(Even(i64::MIN));
        round_trips(Cents(250));
        round_trips(Points(9));
        round_trips(Range { lo: 1, hi: 2 });
        round_trips(Blob(vec![1, 2, 3]));
        round_trips(Blob(vec![]));
        round_trips(MaybeId(None));
        round_trips(MaybeId(Some(7)));
        round_trips(Checked(External::Unit));
        round_trips(Checked(External::Struct { x: 3 }));
        round_trips(ValidSmall(small()));
        round_trips(TransparentEmail {
            email: Email("t@x.y".into()),
        });
        round_trips(Sender(Email("s@x.y".into())));
        let email = |s: &str| Email(s.to_owned());
        round_trips(Message {
            from: Sender(email("from@x.y")),
            to: Recipients(vec![email("to@x.y")]),
            cc: vec![email("a@x.y"), email("b@x.y")],
            retries: Some(Even(2)),
            by_address: BTreeMap::from([(email("k@x.y"), Even(-8))]),
            range: Range { lo: 0, hi: 0 },
        });
        round_trips(vec![Some(Even(0)), None]);
        // The format is unchanged: a validated newtype is stored as the newtype struct its
        // Serialize writes, and the decoder reads it as its inner shape.
        assert_eq!(
            hex(&encode(&Email("a@b".into())).unwrap()[HEADER..]),
            "16 13 03 61 40 62"
        );
        assert_eq!(hex(&encode(&Even(4)).unwrap()[HEADER..]), "16 09 08");
    }

    #[test]
    fn validated_newtypes_still_validate() {
        // A record holding what fails the validation does not decode (it cannot have been
        // stored by the check, but a tool may seed one).
        let odd = encode(&Newtype(3)).unwrap(); // a newtype struct of 3u32
        assert!(decode_err::<Even>(&odd).contains("3 is odd"));
        let not_email = encode(&Sender(Email("nope".into()))).unwrap();
        assert!(
            decode_err::<Sender>(&not_email).contains("\"nope\" is not an email address"),
            "{}",
            decode_err::<Sender>(&not_email)
        );
        // And a newtype holding another shape is still the wrong type.
        assert!(decode_err::<Email>(&odd).contains("invalid type"));
        assert!(decode_err::<Range>(&odd).contains("invalid type"));
        // A newtype nesting past the depth limit is refused while it is unwrapped.
        let mut deep = record(&[tag::NEWTYPE_STRUCT; MAX_DEPTH + 1]);
        deep.extend_from_slice(&[tag::I64, 4]);
        assert!(decode_err::<Even>(&deep).contains("deeper than 128"));
        deep.splice(HEADER..HEADER + 1, []);
        assert_eq!(decode::<Even>(&deep).unwrap(), Stored::Value(Even(2)));
        // Read as an option, a newtype holding no option is a value stored before the type
        // became an Option, as any other value.
        assert_eq!(
            decode::<MaybeId>(&deep).unwrap(),
            Stored::Value(MaybeId(Some(2)))
        );
    }

    #[test]
    fn newtypes_are_unwrapped_only_for_typed_requests() {
        /// Says which visitor method `deserialize_any` called.
        struct Shape;
        impl<'de> Visitor<'de> for Shape {
            type Value = &'static str;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("anything")
            }
            fn visit_newtype_struct<D: Deserializer<'de>>(
                self,
                d: D,
            ) -> Result<&'static str, D::Error> {
                IgnoredAny::deserialize(d).map(|_| "newtype struct")
            }
            fn visit_i64<E>(self, _: i64) -> Result<&'static str, E> {
                Ok("i64")
            }
        }
        struct AnyShape(&'static str);
        impl<'de> Deserialize<'de> for AnyShape {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<AnyShape, D::Error> {
                d.deserialize_any(Shape).map(AnyShape)
            }
        }
        let even = encode(&Even(4)).unwrap();
        match decode::<AnyShape>(&even) {
            Ok(Stored::Value(AnyShape(shape))) => assert_eq!(shape, "newtype struct"),
            _ => panic!("does not decode"),
        }
        // serde's buffer keeps the newtype (Content::Newtype), as before: a derived newtype in an
        // untagged enum replays; a validated one does not decode from the buffer (serde's
        // buffer reads no newtype as its inner value), so it is refused, with serde's words.
        round_trips(Untagged::F(Newtype(6)));
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        #[serde(untagged)]
        enum Contact {
            Email(Email),
            Phone(u64),
        }
        round_trips(Contact::Phone(5));
        let why = refused(&Contact::Email(Email("a@b.c".into())));
        assert!(
            why.contains("did not match any variant of untagged enum Contact"),
            "{why}"
        );
        // Written as its inner value (`into`), it replays from the buffer too.
        #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
        #[serde(try_from = "String", into = "String")]
        struct Address(String);
        impl TryFrom<String> for Address {
            type Error = &'static str;
            fn try_from(s: String) -> Result<Address, &'static str> {
                Ok(Address(s))
            }
        }
        impl From<Address> for String {
            fn from(a: Address) -> String {
                a.0
            }
        }
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        #[serde(untagged)]
        enum Reachable {
            Address(Address),
            Phone(u64),
        }
        round_trips(Reachable::Address(Address("a@b.c".into())));
        // The reverse leniency stays: a value stored before the type was wrapped reads as the
        // newtype.
        assert_eq!(
            decode::<Newtype>(&encode(&5u32).unwrap()).unwrap(),
            Stored::Value(Newtype(5))
        );
        assert_eq!(
            decode::<Sender>(&encode(&"a@b").unwrap()).unwrap(),
            Stored::Value(Sender(Email("a@b".into())))
        );
    }

    // --- Golden vectors: the format, byte for byte ---------------------------------------------

    #[test]
    fn golden_vectors() {
        #[track_caller]
        fn golden<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: T, expected: &str) {
            let bytes = encode_checked(&value).unwrap();
            assert_eq!(hex(&bytes), expected, "{value:?}");
            assert_eq!(decode::<T>(&bytes).unwrap(), Stored::Value(value));
        }
        golden((), "c1 01 01 01");
        golden(Some(None::<u32>), "c1 01 01 03 02");
        golden(300u32, "c1 01 01 0d ac 02");
        golden(-1i64, "c1 01 01 09 01");
        golden(i64::MIN, "c1 01 01 09 ff ff ff ff ff ff ff ff ff 01");
        golden(
            u128::MAX,
            "c1 01 01 0f ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff 03",
        );
        golden(1.5f64, "c1 01 01 11 00 00 00 00 00 00 f8 3f");
        golden('\u{10FFFF}', "c1 01 01 12 ff ff 43");
        golden(String::from("hé"), "c1 01 01 13 03 68 c3 a9");
        golden(Bytes(vec![0, 255]), "c1 01 01 14 02 00 ff");
        golden(vec![1u8, 2, 3], "c1 01 01 18 03 01 02 03");
        golden(vec![1u16, 2], "c1 01 01 17 0c 01 0c 02 00");
        golden((1u8, 2u8), "c1 01 01 1a 02 01 02");
        golden((1u8, 'x'), "c1 01 01 19 0b 01 12 78 00");
        golden(Unit, "c1 01 01 15");
        golden(Newtype(5), "c1 01 01 16 0d 05");
        golden(
            Options {
                a: Some(None),
                b: -0.0,
            },
            "c1 01 01 1d 02 61 03 02 02 62 11 00 00 00 00 00 00 00 80 00",
        );
        golden(External::Unit, "c1 01 01 1e 04 55 6e 69 74");
        golden(
            External::Newtype(1),
            "c1 01 01 1f 07 4e 65 77 74 79 70 65 0d 01",
        );
        golden(
            External::Tuple(1, 2),
            "c1 01 01 20 05 54 75 70 6c 65 0b 01 0b 02 00",
        );
        golden(
            External::Struct { x: -1 },
            "c1 01 01 21 06 53 74 72 75 63 74 02 78 08 01 00",
        );
        golden(
            BTreeMap::from([((1u8, 2u8), 3u8)]),
            "c1 01 01 1c 1a 02 01 02 0b 03 00",
        );
        golden(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            "c1 01 01 13 09 31 32 37 2e 30 2e 30 2e 31",
        );
        assert_eq!(hex(&unstorable("no")), "c1 01 02 02 6e 6f");
    }

    // --- Unstorable records -------------------------------------------------------------------

    #[test]
    fn unstorable_records_round_trip_their_message() {
        for why in ["", "a `Number` result cannot be stored: …", "ünïcødé 😀 \0"] {
            let record = unstorable(why);
            assert_eq!(
                decode::<Small>(&record).unwrap(),
                Stored::Unstorable(why.into())
            );
            assert_eq!(
                decode::<()>(&record).unwrap(),
                Stored::Unstorable(why.into())
            );
            for cut in 0..record.len() {
                assert!(decode::<()>(&record[..cut]).is_err(), "{cut}");
            }
        }
        let mut trailing = unstorable("x");
        trailing.push(0);
        assert!(decode_err::<()>(&trailing).contains("trailing bytes"));
        let refusal = refused(&Number::U(1));
        assert_eq!(
            decode::<Number>(&unstorable(&refusal)).unwrap(),
            Stored::Unstorable(refusal)
        );
    }

    // --- Hostile and foreign records -----------------------------------------------------------

    #[test]
    fn records_of_other_versions_and_formats_are_errors_that_say_so() {
        for json in [
            &b"{\"a\":1}"[..],
            b"null",
            b"\"x\"",
            b"[1]",
            b"5",
            b" 5",
            b"\xef\xbb\xbf{}",
        ] {
            let err = decode_err::<Value>(json);
            assert!(
                err.contains("written by another version of idem's codec"),
                "{err}"
            );
        }
        let err = decode_err::<Value>(b"{}");
        assert!(err.contains("0x7b ('{')"), "{err}");
        assert!(decode_err::<()>(&[]).contains("empty"));
        assert!(decode_err::<()>(&[MAGIC]).contains("truncated"));
        assert!(decode_err::<()>(&[MAGIC, VERSION]).contains("truncated"));
        assert!(decode_err::<()>(&[MAGIC, VERSION, KIND_VALUE]).contains("truncated"));
        let err = decode_err::<()>(&[MAGIC, 2, KIND_VALUE, tag::UNIT]);
        assert!(
            err.contains("another version of idem's codec (format version 2"),
            "{err}"
        );
        let err = decode_err::<()>(&[MAGIC, 0, KIND_VALUE, tag::UNIT]);
        assert!(err.contains("another version"), "{err}");
        assert!(decode_err::<()>(&[MAGIC, VERSION, 0, tag::UNIT]).contains("record kind"));
        assert!(decode_err::<()>(&[MAGIC, VERSION, 3, tag::UNIT]).contains("record kind"));
    }

    #[test]
    fn malformed_records_are_errors() {
        let cases: &[(&[u8], &str)] = &[
            (&[tag::UNIT, tag::UNIT], "trailing bytes"),
            (&[0x22], "unknown tag 0x22"),
            (&[0xff], "unknown tag 0xff"),
            (&[tag::END], "an end marker where a value belongs"),
            (&[tag::STR, 2, 0xc3, 0x28], "not valid UTF-8"),
            (&[tag::STR, 1, 0xed], "not valid UTF-8"),
            // A surrogate, as WTF-8 / CESU-8 would write it: not UTF-8.
            (&[tag::STR, 3, 0xed, 0xa0, 0x80], "not valid UTF-8"),
            (&[tag::CHAR, 0x80, 0xb0, 0x03], "is not a char"), // U+D800
            (&[tag::CHAR, 0x80, 0x80, 0x44], "is not a char"), // past U+10FFFF
            (&[tag::U16, 0x80, 0x80, 0x04], "out of range"),
            (&[tag::I16, 0x80, 0x80, 0x04], "out of range"),
            (&[tag::U32, 0x80, 0x00], "shortest form"),
            (
                &[
                    tag::U64,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0x02,
                ],
                "overflows",
            ),
            (&[tag::U128, 0x80, 0x00], "shortest form"),
            (&[tag::SEQ_U8, 0], "empty packed run"),
            (&[tag::SEQ_U8, 3, 1, 2], "runs past the end"),
            (&[tag::SEQ, tag::UNIT], "truncated"),
            (&[tag::STRUCT, 0x05, b'a'], "field name runs past the end"),
            (&[tag::F64, 0, 0, 0], "truncated"),
        ];
        for (value, expected) in cases {
            let bytes = record(value);
            for err in [
                decode_err::<Value>(&bytes),
                decode_err::<IgnoredAny>(&bytes),
            ] {
                assert!(err.contains("corrupt"), "{}: {err}", hex(value));
                assert!(err.contains(expected), "{}: {err}", hex(value));
            }
        }
    }

    #[test]
    #[cfg(debug_assertions)] // counts allocations
    fn huge_declared_lengths_allocate_nothing() {
        let huge = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        for tag in [
            tag::STR,
            tag::BYTES,
            tag::SEQ_U8,
            tag::TUPLE_U8,
            tag::UNIT_VARIANT,
        ] {
            let mut value = vec![tag];
            value.extend_from_slice(&huge);
            let bytes = record(&value);
            let ((), _, largest) = allocations(|| {
                assert!(decode::<Value>(&bytes).is_err());
                assert!(decode::<String>(&bytes).is_err());
                assert!(decode::<Vec<u8>>(&bytes).is_err());
                assert!(decode::<IgnoredAny>(&bytes).is_err());
            });
            assert!(largest < 1024, "{largest} bytes allocated at once");
        }
        let mut struct_field = vec![tag::STRUCT];
        struct_field.extend_from_slice(&huge);
        assert!(decode_err::<Small>(&record(&struct_field)).contains("runs past the end"));
        let mut unstorable = vec![MAGIC, VERSION, KIND_UNSTORABLE];
        unstorable.extend_from_slice(&huge);
        assert!(decode_err::<()>(&unstorable).contains("runs past the end"));
        // A million elements, each one byte: whatever a visitor preallocates is bounded by the
        // record, since no count is ever read for a sequence.
        let mut seq = vec![tag::SEQ];
        seq.extend(std::iter::repeat_n(tag::UNIT, 1_000_000));
        let bytes = record(&seq);
        let (result, _, largest) = allocations(|| decode::<Vec<()>>(&bytes).map(drop));
        assert!(result.is_err());
        assert!(largest < 64 * 1024, "{largest} bytes allocated at once");
    }

    #[test]
    fn depth_bombs_are_errors() {
        for tag in [
            tag::SOME,
            tag::NEWTYPE_STRUCT,
            tag::SEQ,
            tag::TUPLE,
            tag::MAP,
        ] {
            let bytes = record(&vec![tag; 1_000_000]);
            let err = decode_err::<IgnoredAny>(&bytes);
            assert!(err.contains("deeper than 128"), "{tag:#x}: {err}");
            assert!(decode::<Value>(&bytes).is_err());
            assert!(decode::<List>(&bytes).is_err());
            assert!(canonical(&bytes).is_err());
        }
        let mut variants = Vec::new();
        for _ in 0..100_000 {
            variants.extend_from_slice(&[tag::NEWTYPE_VARIANT, 4, b'C', b'o', b'n', b's']);
        }
        let bytes = record(&variants);
        assert!(decode_err::<List>(&bytes).contains("deeper than 128"));
        assert!(decode_err::<Value>(&bytes).contains("deeper than 128"));
        let mut fields = Vec::new();
        for _ in 0..100_000 {
            fields.extend_from_slice(&[tag::STRUCT, 2, b'x']);
        }
        assert!(decode_err::<Value>(&record(&fields)).contains("deeper than 128"));
        assert!(canonical(&record(&fields)).is_err());
    }

    #[test]
    fn every_strict_prefix_of_a_record_is_an_error() {
        let records = [
            encode(&small()).unwrap(),
            encode(&Internal::B(small())).unwrap(),
            encode(&Flat {
                id: 1,
                inner: Inner {
                    p: 2,
                    q: Some("q".into()),
                    r: Some(None),
                    s: Adjacent::B { y: "y".into() },
                },
            })
            .unwrap(),
            encode(&json!({"a": [1, null, 2.5, "x", {"b": true}], "n": -5})).unwrap(),
            encode(&(u128::MAX, i64::MIN, 'x', Bytes(vec![1, 2]), [9u8; 4])).unwrap(),
            encode(&vec![External::Tuple(1, 2), External::Struct { x: 9 }]).unwrap(),
        ];
        for bytes in &records {
            assert!(decode::<IgnoredAny>(bytes).is_ok());
            for cut in 0..bytes.len() {
                let prefix = &bytes[..cut];
                assert!(decode::<IgnoredAny>(prefix).is_err(), "{}", hex(prefix));
                assert!(decode::<Value>(prefix).is_err(), "{}", hex(prefix));
            }
        }
        for cut in 0..records[0].len() {
            assert!(decode::<Small>(&records[0][..cut]).is_err());
        }
    }

    #[test]
    fn decoding_as_the_wrong_type_is_an_error() {
        let number = encode(&5u32).unwrap();
        assert!(decode_err::<String>(&number).contains("expected a string"));
        assert!(decode_err::<Small>(&number).contains("does not decode as the expected type"));
        assert!(decode_err::<()>(&number).contains("invalid type"));
        assert!(decode_err::<u8>(&encode(&300u32).unwrap()).contains("invalid value"));
        let text = encode(&"five").unwrap();
        assert!(decode_err::<u32>(&text).contains("invalid type: string \"five\""));
        let strukt = encode(&small()).unwrap();
        assert!(decode_err::<Vec<u8>>(&strukt).contains("invalid type: map"));
        assert!(decode_err::<Options>(&strukt).contains("missing field"));
        let tuple = encode(&(1u8, 2u8, 3u8)).unwrap();
        assert!(decode_err::<(u8, u8)>(&tuple).contains("more elements than the type reads"));
        let tuple = encode(&(1u16, 2u16, 3u16)).unwrap();
        assert!(decode_err::<(u16, u16)>(&tuple).contains("more elements than the type reads"));
        let variant = encode(&External::Newtype(1)).unwrap();
        #[derive(Deserialize, Debug)]
        enum Other {
            Newtype,
        }
        assert!(decode_err::<Other>(&variant).contains("newtype variant, expected unit variant"));
        #[derive(Deserialize, Debug)]
        enum Unknown {
            Something,
        }
        assert!(decode_err::<Unknown>(&variant).contains("unknown variant `Newtype`"));
        // Serde's usual conversions still apply: a stored u8 reads as a u64, and a value stored
        // before a type became an Option or a newtype reads as `Some(value)` or the newtype.
        assert_eq!(
            decode::<u64>(&encode(&7u8).unwrap()).unwrap(),
            Stored::Value(7)
        );
        assert_eq!(
            decode::<Option<u32>>(&number).unwrap(),
            Stored::Value(Some(5))
        );
        assert_eq!(
            decode::<Newtype>(&number).unwrap(),
            Stored::Value(Newtype(5))
        );
        assert_eq!(
            decode::<External>(&encode(&"Unit").unwrap()).unwrap(),
            Stored::Value(External::Unit)
        );
    }

    // --- Allocation and the fast path ----------------------------------------------------------

    #[test]
    #[cfg(debug_assertions)] // counts allocations
    fn encoding_allocates_only_its_output() {
        let value = small();
        let (bytes, n, _) = allocations(|| encode(&value).unwrap());
        assert_eq!(n, 1, "{} bytes", bytes.len());
        let ip = IpAddr::V6(Ipv6Addr::LOCALHOST);
        let (_, n, _) = allocations(|| encode(&(ip, Readable, Duration::ZERO)).unwrap());
        assert_eq!(n, 1);
        // Decoding borrows: a struct of numbers and options allocates nothing.
        let numbers = (1u64, Some(2.5f64), None::<u32>, true, Unit, [3u8; 4]);
        let bytes = encode(&numbers).unwrap();
        let (back, n, _) =
            allocations(|| decode::<(u64, Option<f64>, Option<u32>, bool, Unit, [u8; 4])>(&bytes));
        assert_eq!(back.unwrap(), Stored::Value(numbers));
        assert_eq!(n, 0);
    }

    // --- Properties ----------------------------------------------------------------------------

    /// A value of any data-model shape, for property tests. Floats compare by bits.
    #[derive(Serialize, Deserialize, Debug, Clone)]
    enum Tree {
        Unit,
        Bool(bool),
        I8(i8),
        I16(i16),
        I32(i32),
        I64(i64),
        I128(i128),
        U8(u8),
        U16(u16),
        U32(u32),
        U64(u64),
        U128(u128),
        F32(f32),
        F64(f64),
        Char(char),
        Str(String),
        Bytes(Bytes),
        Option(Option<Box<Tree>>),
        Seq(Vec<Tree>),
        Tuple((Box<Tree>, u8, Box<Tree>)),
        Map(BTreeMap<u16, Tree>),
        Struct { a: Box<Tree>, b: Option<Option<u8>> },
        UnitStruct(Unit),
        Newtype(Newtype),
        Bytes8(Vec<u8>),
        Json(Value),
    }

    impl PartialEq for Tree {
        fn eq(&self, other: &Tree) -> bool {
            // The encodings are injective, so equal encodings are equal values, NaNs included.
            encode(self).unwrap() == encode(other).unwrap()
        }
    }

    fn tree() -> impl Strategy<Value = Tree> {
        let json = prop_oneof![
            Just(Value::Null),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,8}".prop_map(Value::from),
        ];
        let leaf = prop_oneof![
            Just(Tree::Unit),
            any::<bool>().prop_map(Tree::Bool),
            any::<i8>().prop_map(Tree::I8),
            any::<i16>().prop_map(Tree::I16),
            any::<i32>().prop_map(Tree::I32),
            any::<i64>().prop_map(Tree::I64),
            any::<i128>().prop_map(Tree::I128),
            any::<u8>().prop_map(Tree::U8),
            any::<u16>().prop_map(Tree::U16),
            any::<u32>().prop_map(Tree::U32),
            any::<u64>().prop_map(Tree::U64),
            any::<u128>().prop_map(Tree::U128),
            any::<u32>().prop_map(|bits| Tree::F32(f32::from_bits(bits))),
            any::<u64>().prop_map(|bits| Tree::F64(f64::from_bits(bits))),
            any::<char>().prop_map(Tree::Char),
            "\\PC{0,12}".prop_map(Tree::Str),
            proptest::collection::vec(any::<u8>(), 0..8).prop_map(|b| Tree::Bytes(Bytes(b))),
            proptest::collection::vec(any::<u8>(), 0..8).prop_map(Tree::Bytes8),
            Just(Tree::UnitStruct(Unit)),
            any::<u32>().prop_map(|n| Tree::Newtype(Newtype(n))),
            json.prop_map(Tree::Json),
        ];
        leaf.prop_recursive(4, 48, 4, |inner| {
            prop_oneof![
                proptest::option::of(inner.clone()).prop_map(|t| Tree::Option(t.map(Box::new))),
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Tree::Seq),
                (inner.clone(), any::<u8>(), inner.clone()).prop_map(|(a, n, b)| Tree::Tuple((
                    Box::new(a),
                    n,
                    Box::new(b)
                ))),
                proptest::collection::btree_map(any::<u16>(), inner.clone(), 0..4)
                    .prop_map(Tree::Map),
                (
                    inner,
                    proptest::option::of(proptest::option::of(any::<u8>()))
                )
                    .prop_map(|(a, b)| Tree::Struct { a: Box::new(a), b }),
            ]
        })
    }

    /// Bytes that start like a value record and then mostly hold tags, so decoding goes deep.
    fn hostile() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![4 => 0u8..0x22, 1 => any::<u8>()];
        (0u8..4, proptest::collection::vec(byte, 0..48)).prop_map(|(kind, body)| {
            let mut out = vec![MAGIC, VERSION, kind];
            out.extend(body);
            out
        })
    }

    proptest! {
        // Generating trees is the slow part: fewer cases than for raw bytes.
        #![proptest_config(ProptestConfig {
            cases: 1000,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn any_tree_round_trips(value in tree()) {
            let bytes = encode_checked(&value).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(decode::<Tree>(&bytes).unwrap(), Stored::Value(value));
            prop_assert!(decode::<IgnoredAny>(&bytes).is_ok());
            prop_assert_eq!(canonical(&bytes).unwrap().len(), bytes.len());
        }

        #[test]
        fn mutated_records_never_panic(
            value in tree(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut bytes = encode(&value).unwrap();
            let i = at.index(bytes.len());
            bytes[i] = byte;
            let _ = decode::<Tree>(&bytes);
            let _ = decode::<Value>(&bytes);
            let _ = canonical(&bytes);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 3000,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn hostile_records_never_panic(bytes in hostile()) {
            let _ = decode::<Value>(&bytes);
            let _ = decode::<IgnoredAny>(&bytes);
            let _ = decode::<Tree>(&bytes);
            let _ = decode::<Small>(&bytes);
            let _ = decode::<Internal>(&bytes);
            let _ = decode::<Untagged>(&bytes);
            let _ = decode::<Flat>(&bytes);
            let _ = decode::<Vec<Option<u8>>>(&bytes);
            let _ = decode::<HashMap<(u32, u32), u64>>(&bytes);
            let _ = canonical(&bytes);
            let _ = show(&bytes, HEADER);
            let _ = difference(&bytes, &bytes[..bytes.len() / 2]);
        }
    }
}
