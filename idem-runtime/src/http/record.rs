//! The stored form of a response: status, end-to-end headers and body.

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode, response};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::body::ResponseBody;
use super::{IDEMPOTENT_NOT_STORED, IDEMPOTENT_REPLAYED};

/// Version of the stored form; a record of another version does not decode (a codec error,
/// answered with `500`, never a wrong replay).
const VERSION: u8 = 1;

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
    /// The handler's response head and trailers, untouched: what the first call sends. Not stored.
    first: Option<(response::Parts, Option<HeaderMap>)>,
}

/// The part of a response that is stored besides its body: its end-to-end headers. Made
/// before the body is read, to know its size.
pub(crate) struct StoredHead {
    headers: HeaderMap,
}

impl StoredHead {
    /// What of `parts` is stored.
    pub(crate) fn new(parts: &response::Parts) -> Self {
        StoredHead {
            headers: end_to_end(&parts.headers),
        }
    }

    /// How many bytes the head takes, as quotas count it: status, header names and values.
    pub(crate) fn size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        // The status and the version.
        4 + headers
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
            body,
            first: Some((parts, trailers)),
        }
    }

    /// The response for the call that ran the handler: its own head, the buffered body.
    pub(crate) fn into_first<B>(self) -> Response<ResponseBody<B>> {
        match self.first {
            Some((parts, trailers)) => {
                Response::from_parts(parts, ResponseBody::full(self.body, trailers))
            }
            None => {
                let mut response = Response::new(ResponseBody::full(self.body, None));
                *response.status_mut() = self.status;
                *response.headers_mut() = self.headers;
                response
            }
        }
    }

    /// The stored response, with `Idempotent-Replayed: true`.
    pub(crate) fn into_replay<B>(self) -> Response<ResponseBody<B>> {
        let mut response = Response::new(ResponseBody::full(self.body, None));
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        response
            .headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        response
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
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// The JSON form: `{"v":1,"status":201,"headers":[["content-type",{"t":"application/json"}]],
/// "body":{"t":"..."}}`. Bytes are kept as text when they are UTF-8 and as base64 otherwise, so
/// bodies and header values round-trip byte for byte.
#[derive(Serialize)]
struct WireRef<'a> {
    v: u8,
    status: u16,
    headers: Vec<(&'a str, BlobRef<'a>)>,
    body: BlobRef<'a>,
}

#[derive(Deserialize)]
struct Wire {
    v: u8,
    status: u16,
    headers: Vec<(String, Blob)>,
    body: Blob,
}

#[derive(Serialize)]
enum BlobRef<'a> {
    #[serde(rename = "t")]
    Text(&'a str),
    #[serde(rename = "b")]
    Base64(String),
}

impl<'a> BlobRef<'a> {
    fn of(bytes: &'a [u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(text) => BlobRef::Text(text),
            Err(_) => BlobRef::Base64(base64::encode(bytes)),
        }
    }
}

#[derive(Deserialize)]
enum Blob {
    #[serde(rename = "t")]
    Text(String),
    #[serde(rename = "b")]
    Base64(String),
}

impl Blob {
    fn into_bytes(self) -> Option<Bytes> {
        match self {
            Blob::Text(text) => Some(Bytes::from(text)),
            Blob::Base64(b64) => base64::decode(&b64).map(Bytes::from),
        }
    }
}

impl Serialize for StoredResponse {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        WireRef {
            v: VERSION,
            status: self.status.as_u16(),
            headers: self
                .headers
                .iter()
                .map(|(name, value)| (name.as_str(), BlobRef::of(value.as_bytes())))
                .collect(),
            body: BlobRef::of(&self.body),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for StoredResponse {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = Wire::deserialize(deserializer)?;
        if wire.v != VERSION {
            return Err(D::Error::custom(format_args!(
                "stored response of version {}, expected {VERSION}",
                wire.v
            )));
        }
        let status = StatusCode::from_u16(wire.status).map_err(D::Error::custom)?;
        let mut headers = HeaderMap::with_capacity(wire.headers.len());
        for (name, value) in wire.headers {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(D::Error::custom)?;
            let value = value
                .into_bytes()
                .ok_or_else(|| D::Error::custom("invalid base64 in a stored header"))?;
            let value = HeaderValue::from_maybe_shared(value).map_err(D::Error::custom)?;
            headers.append(name, value);
        }
        let body = wire
            .body
            .into_bytes()
            .ok_or_else(|| D::Error::custom("invalid base64 in a stored body"))?;
        Ok(StoredResponse {
            status,
            headers,
            body,
            first: None,
        })
    }
}

/// Standard base64 (RFC 4648 §4) with padding: only for the rare header value or body that is
/// not UTF-8, so no dependency is taken for it.
mod base64 {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub(super) fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let b = [
                chunk.first().copied().unwrap_or(0),
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    fn value(c: u8) -> Option<u32> {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        Some(u32::from(v))
    }

    pub(super) fn decode(text: &str) -> Option<Vec<u8>> {
        let bytes = text.as_bytes();
        if !bytes.len().is_multiple_of(4) {
            return None;
        }
        let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
        let quads = bytes.len() / 4;
        for (q, quad) in bytes.chunks(4).enumerate() {
            let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
            if pad > 2 || (pad > 0 && q + 1 != quads) {
                return None;
            }
            let mut n = 0u32;
            for &c in &quad[..4 - pad] {
                n = (n << 6) | value(c)?;
            }
            n <<= 6 * pad as u32;
            let [_, b0, b1, b2] = n.to_be_bytes();
            out.extend_from_slice(&[b0, b1, b2][..3 - pad]);
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for len in 0..40u8 {
            let bytes: Vec<u8> = (0..len)
                .map(|i| i.wrapping_mul(97).wrapping_add(200))
                .collect();
            let text = base64::encode(&bytes);
            assert_eq!(base64::decode(&text).as_deref(), Some(&bytes[..]), "{text}");
        }
        assert_eq!(base64::encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64::encode(b"fo"), "Zm8=");
        assert_eq!(base64::decode("Zm8="), Some(b"fo".to_vec()));
        assert_eq!(base64::decode("Zm8"), None);
        assert_eq!(base64::decode("Z=8="), None);
        assert_eq!(base64::decode("Zm8=Zm8="), None);
    }

    #[test]
    fn record_round_trips_byte_for_byte_and_drops_hop_by_hop_headers() {
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
        let (parts, ()) = response.into_parts();
        let body = Bytes::from_static(b"\x00\x01binary\xff");
        let head = StoredHead::new(&parts);
        let record = StoredResponse::new(parts, head, body.clone(), None);

        let json = serde_json::to_vec(&record).unwrap();
        let back: StoredResponse = serde_json::from_slice(&json).unwrap();
        assert_eq!(back.status, StatusCode::CREATED);
        assert_eq!(back.body, body);
        assert_eq!(back.headers, record.headers);
        let names: Vec<&str> = back.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type", "x-multi", "x-binary"]);
        assert_eq!(back.headers.get_all("x-multi").iter().count(), 2);
        assert!(back.first.is_none());

        let replay = back.into_replay::<()>();
        assert_eq!(replay.headers()[&IDEMPOTENT_REPLAYED], "true");
    }

    #[test]
    fn bad_records_do_not_decode() {
        for bad in [
            r#"{"v":2,"status":200,"headers":[],"body":{"t":""}}"#,
            r#"{"v":1,"status":1000,"headers":[],"body":{"t":""}}"#,
            r#"{"v":1,"status":200,"headers":[["bad name",{"t":""}]],"body":{"t":""}}"#,
            r#"{"v":1,"status":200,"headers":[["x",{"t":"a\nb"}]],"body":{"t":""}}"#,
            r#"{"v":1,"status":200,"headers":[],"body":{"b":"!!"}}"#,
        ] {
            assert!(
                serde_json::from_str::<StoredResponse>(bad).is_err(),
                "{bad}"
            );
        }
    }
}
