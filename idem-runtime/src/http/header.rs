//! Reading the `Idempotency-Key` header.
//!
//! Not the `sfv` crate (weighed for issue 17): a Structured Field String is the draft's form, but
//! Stripe's clients send bare keys such as `8e03978e-40d5` that are not Structured Field tokens
//! (a token cannot start with a digit), so `sfv` would still need this parser beside it, and it
//! would accept parameters (`"k";a=1`) that this layer refuses. The grammar here is the two forms
//! the docs state, nothing else.

use http::HeaderMap;

use super::IDEMPOTENCY_KEY;

/// Why a request's `Idempotency-Key` header could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyError {
    /// The header was sent more than once.
    Repeated,
    /// The value is neither a Structured Field String nor a bare token of visible ASCII.
    Malformed,
    /// A bare value with a comma or whitespace inside: a list of keys (two headers folded into
    /// one, `a, b`), not one key.
    List,
    /// The value is empty.
    Empty,
    /// The key is longer than the limit (its length in bytes, after unquoting).
    TooLong(usize),
}

/// The idempotency key of a request: `Ok(None)` when it sent none.
///
/// The value is accepted in two forms, which name the same key:
/// - the IETF draft's Structured Field String: `"abc"`, with `\"` and `\\` as the only escapes;
/// - the bare token that Stripe's clients send: `abc` (visible ASCII but `"` and `,`; no space
///   or tab inside). A bare value with a comma or whitespace inside is refused: `a, b` is what a
///   proxy makes of two `Idempotency-Key` headers folded into one, and taking it for one key
///   would hide that the request carried two.
///
/// Surrounding spaces and tabs are ignored. `max_len` bounds the key's length in bytes.
pub(crate) fn idempotency_key(
    headers: &HeaderMap,
    max_len: usize,
) -> Result<Option<String>, KeyError> {
    let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(KeyError::Repeated);
    }
    let raw = trim(value.as_bytes());
    // Cheap bound before any work: an unquoted key is at most as long as its quoted form.
    if raw.len() > max_len.saturating_mul(2).saturating_add(2) {
        return Err(KeyError::TooLong(raw.len()));
    }
    let key = match raw.first() {
        Some(b'"') => parse_sf_string(raw)?,
        Some(_) => parse_token(raw)?,
        None => return Err(KeyError::Empty),
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > max_len {
        return Err(KeyError::TooLong(key.len()));
    }
    Ok(Some(key))
}

fn trim(mut bytes: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = bytes {
        bytes = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = bytes {
        bytes = rest;
    }
    bytes
}

/// RFC 8941 §3.3.3: `DQUOTE *( unescaped / "%" / "\" ( DQUOTE / "\" ) ) DQUOTE`, where the
/// characters are printable ASCII. Nothing may follow the closing quote.
fn parse_sf_string(raw: &[u8]) -> Result<String, KeyError> {
    let mut out = String::with_capacity(raw.len());
    let mut bytes = raw.iter().skip(1);
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => match bytes.next() {
                Some(&c @ (b'"' | b'\\')) => out.push(char::from(c)),
                _ => return Err(KeyError::Malformed),
            },
            b'"' => {
                return if bytes.next().is_none() {
                    Ok(out)
                } else {
                    Err(KeyError::Malformed)
                };
            }
            0x20..=0x7e => out.push(char::from(b)),
            _ => return Err(KeyError::Malformed),
        }
    }
    // No closing quote.
    Err(KeyError::Malformed)
}

/// A bare key: visible ASCII, no double quote, no comma, no space or tab.
fn parse_token(raw: &[u8]) -> Result<String, KeyError> {
    if raw.iter().any(|&b| matches!(b, b',' | b' ' | b'\t')) {
        return Err(KeyError::List);
    }
    if raw.iter().all(|&b| (0x21..=0x7e).contains(&b) && b != b'"') {
        // Only ASCII: the conversion cannot fail, but stay panic-free anyway.
        String::from_utf8(raw.to_vec()).map_err(|_| KeyError::Malformed)
    } else {
        Err(KeyError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn key(value: &[u8]) -> Result<Option<String>, KeyError> {
        let mut headers = HeaderMap::new();
        let value = HeaderValue::from_bytes(value).map_err(|_| KeyError::Malformed)?;
        headers.insert(&IDEMPOTENCY_KEY, value);
        idempotency_key(&headers, 16)
    }

    #[test]
    fn quoted_and_bare_forms_name_the_same_key() {
        assert_eq!(key(b"\"abc\""), Ok(Some("abc".into())));
        assert_eq!(key(b"abc"), Ok(Some("abc".into())));
        assert_eq!(key(b"  abc\t"), Ok(Some("abc".into())));
        assert_eq!(key(b" \"a b\" "), Ok(Some("a b".into())));
    }

    #[test]
    fn sf_string_escapes() {
        assert_eq!(key(br#""a\"b\\c""#), Ok(Some(r#"a"b\c"#.into())));
        assert_eq!(key(br#""a\nb""#), Err(KeyError::Malformed));
        assert_eq!(key(br#""abc"#), Err(KeyError::Malformed));
        assert_eq!(key(br#""abc";p=1"#), Err(KeyError::Malformed));
        assert_eq!(key(br#""abc\"#), Err(KeyError::Malformed));
    }

    #[test]
    fn bad_values() {
        assert_eq!(key(b""), Err(KeyError::Empty));
        assert_eq!(key(b"\"\""), Err(KeyError::Empty));
        assert_eq!(key(b"ab\"c"), Err(KeyError::Malformed));
        // Folded headers, or a key with spaces: a list, not one key. Quoted, they are one key.
        assert_eq!(key(b"a, b"), Err(KeyError::List));
        assert_eq!(key(b"a,b"), Err(KeyError::List));
        assert_eq!(key(b"a b"), Err(KeyError::List));
        assert_eq!(key(b"a\tb"), Err(KeyError::List));
        assert_eq!(key(b"\"a, b\""), Ok(Some("a, b".into())));
        assert_eq!(key("ключ".as_bytes()), Err(KeyError::Malformed));
        assert_eq!(
            key(b"0123456789abcdef"),
            Ok(Some("0123456789abcdef".into()))
        );
        assert_eq!(key(b"0123456789abcdefg"), Err(KeyError::TooLong(17)));
        assert_eq!(
            key(b"\"0123456789abcdef\""),
            Ok(Some("0123456789abcdef".into()))
        );
        assert!(matches!(key(&[b'a'; 100]), Err(KeyError::TooLong(_))));
    }

    #[test]
    fn repeated_header_is_refused() {
        let mut headers = HeaderMap::new();
        headers.append(&IDEMPOTENCY_KEY, HeaderValue::from_static("a"));
        headers.append(&IDEMPOTENCY_KEY, HeaderValue::from_static("b"));
        assert_eq!(idempotency_key(&headers, 16), Err(KeyError::Repeated));
        assert_eq!(idempotency_key(&HeaderMap::new(), 16), Ok(None));
    }
}
