//! The stored form of a response: status, end-to-end headers and body, and the first request's
//! values of the headers the response varies on.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode, response};
use serde::de::{self, Error as _, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::body::ResponseBody;
use super::vary::{self, Vary};
use super::{IDEMPOTENT_EXPIRES_IN, IDEMPOTENT_NOT_STORED, IDEMPOTENT_REPLAYED};

/// Version of the stored form; a record of another version does not decode (a codec error,
/// answered with `500`, never a wrong replay). Version 1 kept bytes as JSON text or base64;
/// version 2 keeps them as bytes, whatever the codec, and adds the `Vary` values.
const VERSION: u8 = 2;

/// Headers that describe one connection or one transfer, not the response: never stored, so a
/// replay does not repeat them blindly (RFC 9110 §7.6.1). `content-length` is left to the server
/// to set from the stored body.
const NOT_STORED: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::CONTENT_LENGTH,
];

/// A response as the store keeps it, and (for the call that made it) the response itself.
pub(crate) struct StoredResponse {
    status: StatusCode,
    /// The end-to-end headers: what a replay sends.
    headers: HeaderMap,
    body: Bytes,
    /// The first request's values of the headers the response varies on.
    vary: Vary,
    /// The handler's response head and trailers, untouched: what the first call sends. Not stored.
    first: Option<(response::Parts, Option<HeaderMap>)>,
}

/// The part of a response that is stored besides its body: its end-to-end headers and the
/// request values its `Vary` names. Made before the body is read, to know its size.
pub(crate) struct StoredHead {
    headers: HeaderMap,
    vary: Vary,
}

impl StoredHead {
    /// What of `parts` is stored, with the values of `request` the response varies on.
    pub(crate) fn new(parts: &response::Parts, request: &HeaderMap) -> Self {
        StoredHead {
            headers: end_to_end(&parts.headers),
            vary: Vary::capture(&parts.headers, request),
        }
    }

    /// How many bytes the head takes, as quotas count it: status, header names and values,
    /// and the request values kept for `Vary`.
    pub(crate) fn size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        // The status and the version.
        4 + headers + self.vary.size()
    }
}

impl StoredResponse {
    /// The record of a response whose body was read whole.
    pub(crate) fn new(
        parts: response::Parts,
        head: StoredHead,
        body: Bytes,
        trailers: Option<HeaderMap>,
    ) -> Self {
        StoredResponse {
            status: parts.status,
            headers: head.headers,
            vary: head.vary,
            body,
            first: Some((parts, trailers)),
        }
    }

    /// The first header whose value in `request` differs from the first request's, among
    /// those the response varies on; `None` when the stored response may be replayed to it.
    pub(crate) fn vary_mismatch(&self, request: &HeaderMap) -> Option<&HeaderName> {
        self.vary.mismatch(request)
    }

    /// The response for the call that ran the handler: its own head, the buffered body, and
    /// when it was stored ([`expires_in`](crate::Outcome::expires_in) is known),
    /// [`Idempotent-Expires-In`](super::IDEMPOTENT_EXPIRES_IN).
    pub(crate) fn into_first<B>(self, expires_in: Option<Duration>) -> Response<ResponseBody<B>> {
        let mut response = match self.first {
            Some((parts, trailers)) => {
                Response::from_parts(parts, ResponseBody::full(self.body, trailers))
            }
            None => {
                let mut response = Response::new(ResponseBody::full(self.body, None));
                *response.status_mut() = self.status;
                *response.headers_mut() = self.headers;
                response
            }
        };
        set_expires_in(response.headers_mut(), expires_in);
        response
    }

    /// The stored response, with `Idempotent-Replayed: true` and, when `age` is known (how long
    /// ago it was stored), `Age` (RFC 9111 §5.1): the seconds it has spent in the store, added to
    /// the `Age` the response carried when it was stored, as a cache adds its resident time.
    ///
    /// `expires_in` (how long the record lives on) is sent as
    /// [`Idempotent-Expires-In`](super::IDEMPOTENT_EXPIRES_IN).
    pub(crate) fn into_replay<B>(
        self,
        age: Option<Duration>,
        expires_in: Option<Duration>,
    ) -> Response<ResponseBody<B>> {
        let mut response = Response::new(ResponseBody::full(self.body, None));
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        let headers = response.headers_mut();
        headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        set_expires_in(headers, expires_in);
        if let Some(age) = age {
            // A stored `Age` that is not a number is replaced (RFC 9111 §5.1: a cache that
            // cannot parse it must not use it).
            let stored = headers
                .get(header::AGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
            let age = stored.saturating_add(age.as_secs());
            headers.insert(header::AGE, HeaderValue::from(age));
        }
        response
    }
}

/// Sets [`Idempotent-Expires-In`](super::IDEMPOTENT_EXPIRES_IN) to the whole seconds the record
/// lives on (rounded down: the record lives at least that long), or removes a stored one when
/// that is not known.
fn set_expires_in(headers: &mut HeaderMap, expires_in: Option<Duration>) {
    match expires_in {
        Some(left) => {
            headers.insert(IDEMPOTENT_EXPIRES_IN, HeaderValue::from(left.as_secs()));
        }
        None => {
            headers.remove(IDEMPOTENT_EXPIRES_IN);
        }
    }
}

/// The headers of `headers` worth replaying: all but the hop-by-hop ones, those the `Connection`
/// header names, and this layer's own.
fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let named_by_connection: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if NOT_STORED.contains(name)
            || named_by_connection.contains(name)
            || name == IDEMPOTENT_REPLAYED
            || name == IDEMPOTENT_NOT_STORED
            || name == IDEMPOTENT_EXPIRES_IN
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The stored form. It only uses serde's data model (integers, strings, byte strings, sequences,
// a struct), so any codec can keep it: bytes go through `serialize_bytes`, which a binary codec
// keeps as they are and JSON writes as an array of numbers.
//
// { v: 2, status: 201, headers: [(name, bytes)], body: bytes, vary: [(name, [bytes])] }

/// Bytes written with `serialize_bytes`.
struct ByteStr<'a>(&'a [u8]);

impl Serialize for ByteStr<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

/// Bytes read back: as a byte string, or (from a codec that has none, like JSON) as a
/// sequence of numbers.
struct ByteBuf(Vec<u8>);

impl<'de> Deserialize<'de> for ByteBuf {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ByteBufVisitor;

        impl<'de> Visitor<'de> for ByteBufVisitor {
            type Value = ByteBuf;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }

            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<ByteBuf, E> {
                Ok(ByteBuf(v.to_vec()))
            }

            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<ByteBuf, E> {
                Ok(ByteBuf(v))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ByteBuf, A::Error> {
                // The hint comes from the record; never trust it for more than a small start.
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(byte) = seq.next_element::<u8>()? {
                    out.push(byte);
                }
                Ok(ByteBuf(out))
            }
        }

        deserializer.deserialize_bytes(ByteBufVisitor)
    }
}

#[derive(Serialize)]
struct WireRef<'a> {
    v: u8,
    status: u16,
    headers: Vec<(&'a str, ByteStr<'a>)>,
    body: ByteStr<'a>,
    vary: Vec<(&'a str, Vec<ByteStr<'a>>)>,
}

#[derive(Deserialize)]
struct Wire {
    v: u8,
    status: u16,
    headers: Vec<(String, ByteBuf)>,
    body: ByteBuf,
    vary: Vec<(String, Vec<ByteBuf>)>,
}

impl Serialize for StoredResponse {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        WireRef {
            v: VERSION,
            status: self.status.as_u16(),
            headers: self
                .headers
                .iter()
                .map(|(name, value)| (name.as_str(), ByteStr(value.as_bytes())))
                .collect(),
            body: ByteStr(&self.body),
            vary: self
                .vary
                .iter()
                .map(|(name, values)| {
                    (
                        name.as_str(),
                        values.iter().map(|v| ByteStr(v.as_bytes())).collect(),
                    )
                })
                .collect(),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for StoredResponse {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // A record of another version fails here: by its shape, or by its version.
        let wire = Wire::deserialize(deserializer)?;
        if wire.v != VERSION {
            return Err(D::Error::custom(format_args!(
                "stored response of version {}, expected {VERSION}",
                wire.v
            )));
        }
        let status = StatusCode::from_u16(wire.status).map_err(D::Error::custom)?;
        let name = |name: String| HeaderName::from_bytes(name.as_bytes()).map_err(D::Error::custom);
        let value = |value: ByteBuf| HeaderValue::from_bytes(&value.0).map_err(D::Error::custom);
        let mut headers = HeaderMap::with_capacity(wire.headers.len());
        for (n, v) in wire.headers {
            headers.append(name(n)?, value(v)?);
        }
        let mut kept = Vec::with_capacity(wire.vary.len());
        for (n, values) in wire.vary {
            let values = values.into_iter().map(value).collect::<Result<_, _>>()?;
            kept.push((name(n)?, values));
        }
        Ok(StoredResponse {
            status,
            headers,
            body: Bytes::from(wire.body.0),
            vary: vary::Vary::from_parts(kept),
            first: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(vary: &str, request: &[(&str, &str)]) -> StoredResponse {
        let mut response = Response::new(());
        *response.status_mut() = StatusCode::CREATED;
        let h = response.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.append("x-multi", HeaderValue::from_static("1"));
        h.append("x-multi", HeaderValue::from_static("2"));
        h.insert("x-binary", HeaderValue::from_bytes(b"\xff\xfe ok").unwrap());
        h.insert(header::CONNECTION, HeaderValue::from_static("close, x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        if !vary.is_empty() {
            h.insert(header::VARY, HeaderValue::from_str(vary).unwrap());
        }
        let mut req = HeaderMap::new();
        for (name, value) in request {
            req.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        let (parts, ()) = response.into_parts();
        let head = StoredHead::new(&parts, &req);
        StoredResponse::new(parts, head, Bytes::from_static(b"\x00\x01binary\xff"), None)
    }

    #[test]
    fn record_round_trips_byte_for_byte_and_drops_hop_by_hop_headers() {
        let record = record("", &[]);
        let json = serde_json::to_vec(&record).unwrap();
        let back: StoredResponse = serde_json::from_slice(&json).unwrap();
        assert_eq!(back.status, StatusCode::CREATED);
        assert_eq!(back.body, record.body);
        assert_eq!(back.headers, record.headers);
        let names: Vec<&str> = back.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type", "x-multi", "x-binary"]);
        assert_eq!(back.headers.get_all("x-multi").iter().count(), 2);
        assert!(back.first.is_none());

        let replay = back.into_replay::<()>(Some(Duration::from_millis(2500)), None);
        assert_eq!(replay.headers()[&IDEMPOTENT_REPLAYED], "true");
        assert_eq!(replay.headers()[header::AGE], "2");
    }

    #[test]
    fn vary_values_round_trip() {
        let record = record(
            "Accept-Encoding, accept-language",
            &[("accept-encoding", "gzip"), ("accept-encoding", "br")],
        );
        let json = serde_json::to_vec(&record).unwrap();
        let back: StoredResponse = serde_json::from_slice(&json).unwrap();
        let mut same = HeaderMap::new();
        same.append(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip, br"),
        );
        assert_eq!(back.vary_mismatch(&same), None);
        let other = HeaderMap::new();
        assert_eq!(back.vary_mismatch(&other), Some(&header::ACCEPT_ENCODING));
    }

    #[test]
    fn bad_records_do_not_decode() {
        for bad in [
            r#"{"v":1,"status":200,"headers":[],"body":{"t":""}}"#,
            r#"{"v":3,"status":200,"headers":[],"body":[],"vary":[]}"#,
            r#"{"v":2,"status":1000,"headers":[],"body":[],"vary":[]}"#,
            r#"{"v":2,"status":200,"headers":[["bad name",[]]],"body":[],"vary":[]}"#,
            r#"{"v":2,"status":200,"headers":[["x",[97,10,98]]],"body":[],"vary":[]}"#,
            r#"{"v":2,"status":200,"headers":[],"body":[256],"vary":[]}"#,
            r#"{"v":2,"status":200,"headers":[],"body":[],"vary":[["bad name",[]]]}"#,
            r#"{"v":2,"status":200,"headers":[],"body":[]}"#,
        ] {
            assert!(
                serde_json::from_str::<StoredResponse>(bad).is_err(),
                "{bad}"
            );
        }
    }
}
