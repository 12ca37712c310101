//! Honouring a stored response's `Vary`: the first request's values of the headers the response
//! varies on are kept with it, and a replay goes only to a retry that sends the same values.

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};

/// The request headers a response varies on, with the first request's values of each.
#[derive(Debug, Default)]
pub(crate) struct Vary {
    kept: Vec<(HeaderName, Vec<HeaderValue>)>,
}

impl Vary {
    /// The names in `response`'s `Vary` headers, with `request`'s values of each. `Vary: *`
    /// names nothing that can be compared: such a response is replayed to every retry (see the
    /// module documentation of `http`).
    pub(crate) fn capture(response: &HeaderMap, request: &HeaderMap) -> Vary {
        let mut kept: Vec<(HeaderName, Vec<HeaderValue>)> = Vec::new();
        for value in response.get_all(header::VARY) {
            // A value that is not text names no header we could compare.
            let Ok(text) = value.to_str() else { continue };
            for item in text.split(',').map(str::trim) {
                // `*` varies on more than the request's headers: nothing to compare.
                if item == "*" {
                    continue;
                }
                let Ok(name) = HeaderName::from_bytes(item.as_bytes()) else {
                    continue; // not a header name
                };
                if kept.iter().any(|(n, _)| *n == name) {
                    continue;
                }
                let values = request.get_all(&name).iter().cloned().collect();
                kept.push((name, values));
            }
        }
        Vary { kept }
    }

    /// The kept names and values, as they were stored.
    pub(crate) fn from_parts(kept: Vec<(HeaderName, Vec<HeaderValue>)>) -> Vary {
        Vary { kept }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &(HeaderName, Vec<HeaderValue>)> {
        self.kept.iter()
    }

    /// The bytes kept: names and values.
    pub(crate) fn size(&self) -> usize {
        self.kept
            .iter()
            .map(|(name, values)| {
                name.as_str().len() + values.iter().map(|v| v.len()).sum::<usize>()
            })
            .sum()
    }

    /// The first kept header whose values in `request` are not the first request's.
    pub(crate) fn mismatch(&self, request: &HeaderMap) -> Option<&HeaderName> {
        self.kept.iter().find_map(|(name, first)| {
            let now = request.get_all(name);
            (!same_items(first.iter(), now.iter())).then_some(name)
        })
    }
}

/// Whether two lists of header values carry the same comma-separated items, in the same order:
/// `gzip, br` sent as one value or as two, with or without spaces, is the same list.
fn same_items<'a>(
    a: impl Iterator<Item = &'a HeaderValue>,
    b: impl Iterator<Item = &'a HeaderValue>,
) -> bool {
    items(a).eq(items(b))
}

fn items<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> impl Iterator<Item = &'a [u8]> {
    values
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(trim)
        .filter(|item| !item.is_empty())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn the_same_items_match_however_they_are_split() {
        let response = headers(&[("vary", "Accept-Encoding"), ("vary", "origin, *")]);
        let first = headers(&[("accept-encoding", "gzip, br"), ("origin", "https://a")]);
        let vary = Vary::capture(&response, &first);
        let names: Vec<&str> = vary.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["accept-encoding", "origin"]);
        assert_eq!(vary.mismatch(&first), None);
        let split = headers(&[
            ("accept-encoding", "gzip"),
            ("accept-encoding", " br "),
            ("origin", "https://a"),
        ]);
        assert_eq!(vary.mismatch(&split), None);
        let reordered = headers(&[("accept-encoding", "br, gzip"), ("origin", "https://a")]);
        assert_eq!(vary.mismatch(&reordered), Some(&header::ACCEPT_ENCODING));
        let other_origin = headers(&[("accept-encoding", "gzip,br"), ("origin", "https://b")]);
        assert_eq!(vary.mismatch(&other_origin), Some(&header::ORIGIN));
    }

    #[test]
    fn an_absent_header_is_a_value_too() {
        let response = headers(&[("vary", "accept-encoding")]);
        let vary = Vary::capture(&response, &HeaderMap::new());
        assert_eq!(vary.mismatch(&HeaderMap::new()), None);
        let gzip = headers(&[("accept-encoding", "gzip")]);
        assert_eq!(vary.mismatch(&gzip), Some(&header::ACCEPT_ENCODING));
    }

    #[test]
    fn vary_star_and_garbage_name_nothing() {
        let response = headers(&[("vary", "*"), ("vary", "a b, ,")]);
        let vary = Vary::capture(&response, &headers(&[("a", "1")]));
        assert_eq!(vary.iter().count(), 0);
        assert_eq!(vary.mismatch(&HeaderMap::new()), None);
    }
}
