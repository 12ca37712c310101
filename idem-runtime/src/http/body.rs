//! The response body of [`IdempotencyService`](super::IdempotencyService), and buffering the
//! handler's response.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::error::BoxError;

/// The body of a response that went through [`IdempotencyLayer`](super::IdempotencyLayer).
///
/// It is one of: the handler's own body, untouched (methods not guarded, requests without a
/// key, `5xx` responses); a buffered body (a stored or replayed response, a problem report); or
/// the part of a too-large body that was read while trying to store it, followed by the rest of
/// the handler's body. Its errors are the handler body's, boxed.
pub struct ResponseBody<B> {
    /// Bytes to send first.
    prefix: Option<Bytes>,
    /// The handler's body, to stream after `prefix`.
    rest: Option<Pin<Box<B>>>,
    /// An error the handler's body gave while it was buffered, to report after `prefix`.
    error: Option<BoxError>,
    /// Whether the body has paused once before reporting `error`: see `poll_frame`.
    paused: bool,
    /// Trailers to send last.
    trailers: Option<HeaderMap>,
}

impl<B> ResponseBody<B> {
    /// The handler's body, untouched.
    pub(crate) fn passthrough(body: B) -> Self {
        Self::partial(Bytes::new(), body)
    }

    /// The bytes read so far, then the rest of the handler's body.
    pub(crate) fn partial(prefix: Bytes, rest: B) -> Self {
        ResponseBody {
            prefix: Some(prefix),
            rest: Some(Box::pin(rest)),
            error: None,
            paused: false,
            trailers: None,
        }
    }

    /// A body held whole in memory.
    pub(crate) fn full(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        ResponseBody {
            prefix: Some(data),
            rest: None,
            error: None,
            paused: false,
            trailers,
        }
    }

    /// The bytes read before the handler's body failed, then its error.
    fn failed(prefix: Bytes, error: BoxError) -> Self {
        ResponseBody {
            prefix: Some(prefix),
            rest: None,
            error: Some(error),
            paused: false,
            trailers: None,
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(data) = this.prefix.take()
            && !data.is_empty()
        {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(rest) = &mut this.rest {
            match ready!(rest.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => return Poll::Ready(Some(Ok(frame))),
                Some(Err(err)) => {
                    this.rest = None;
                    return Poll::Ready(Some(Err(err.into())));
                }
                None => this.rest = None,
            }
        }
        if this.error.is_some() && !this.paused {
            // A server that reads an error from a body breaks the connection at once, dropping
            // what it has not written yet: the response head and the part read, here. Pausing
            // once lets it flush them first, so the client sees the response, and that it
            // broke off (no last chunk, the connection closed), not nothing at all.
            this.paused = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if let Some(err) = this.error.take() {
            return Poll::Ready(Some(Err(err)));
        }
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.as_ref().is_none_or(Bytes::is_empty)
            && self.rest.as_ref().is_none_or(|rest| rest.is_end_stream())
            && self.error.is_none()
            && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let prefix = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        match &self.rest {
            // Trailers need a chunked HTTP/1.1 message: an exact size would make the server send
            // `Content-Length`, and drop the trailers. A pending error needs one too: with an
            // exact size the server sends `Content-Length`, stops reading the body once that
            // many bytes are out, and never sees the error, so the client would get the part
            // that was read as a complete, well-formed response. Of unknown size, the body is
            // sent chunked, the error is read, and the server breaks the connection before the
            // last chunk: the client can tell the response broke, as it can without the layer.
            None if self.trailers.is_some() || self.error.is_some() => {
                let mut hint = SizeHint::new();
                hint.set_lower(prefix);
                hint
            }
            None => SizeHint::with_exact(prefix),
            Some(rest) => {
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(prefix));
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper.saturating_add(prefix));
                }
                hint
            }
        }
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("prefix_len", &self.prefix.as_ref().map(Bytes::len))
            .field("streaming", &self.rest.is_some())
            .field("error", &self.error)
            .field("paused", &self.paused)
            .field("trailers", &self.trailers)
            .finish()
    }
}

/// What reading a handler's response body into memory gave.
pub(crate) enum Buffered<B> {
    /// The whole body, within the limit.
    Whole {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// The body is larger than the limit: what was read, then the rest, to pass through.
    TooLarge(ResponseBody<B>),
    /// The body failed while it was read: what was read, then its error.
    Failed(ResponseBody<B>),
}

/// Reads `body` into memory, up to `limit` bytes. A body larger than that is never truncated:
/// it comes back whole, as what was read followed by the rest.
pub(crate) async fn buffer<B>(body: B, limit: usize) -> Buffered<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let limit = u64::try_from(limit).unwrap_or(u64::MAX);
    if body.size_hint().lower() > limit {
        return Buffered::TooLarge(ResponseBody::passthrough(body));
    }
    let mut body = Box::pin(body);
    let mut data = BytesMut::new();
    let mut trailers: Option<HeaderMap> = None;
    loop {
        match body.frame().await {
            None => {
                return Buffered::Whole {
                    data: data.freeze(),
                    trailers,
                };
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(chunk) => {
                    let len = (data.len() as u64).saturating_add(chunk.len() as u64);
                    data.extend_from_slice(&chunk);
                    if len > limit {
                        return Buffered::TooLarge(ResponseBody {
                            prefix: Some(data.freeze()),
                            rest: Some(body),
                            error: None,
                            paused: false,
                            trailers,
                        });
                    }
                }
                Err(frame) => {
                    if let Ok(more) = frame.into_trailers() {
                        match &mut trailers {
                            Some(t) => t.extend(more),
                            None => trailers = Some(more),
                        }
                    }
                }
            },
            Some(Err(err)) => {
                return Buffered::Failed(ResponseBody::failed(data.freeze(), err.into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    async fn collect(body: ResponseBody<impl Body<Data = Bytes, Error: Into<BoxError>>>) -> Bytes {
        match body.collect().await {
            Ok(c) => c.to_bytes(),
            Err(err) => panic!("body failed: {err}"),
        }
    }

    #[tokio::test]
    async fn small_body_is_buffered_whole() {
        match buffer(Full::new(Bytes::from_static(b"hello")), 5).await {
            Buffered::Whole { data, trailers } => {
                assert_eq!(&data[..], b"hello");
                assert!(trailers.is_none());
            }
            _ => panic!("expected a whole body"),
        }
    }

    #[tokio::test]
    async fn large_body_is_passed_through_not_truncated() {
        // A known length over the limit: not read at all.
        let Buffered::TooLarge(body) = buffer(Full::new(Bytes::from_static(b"hello!")), 5).await
        else {
            panic!("expected too large");
        };
        assert_eq!(&collect(body).await[..], b"hello!");

        // A streamed body of unknown length: read up to the limit, then the rest follows.
        let chunks = Chunks(["ab", "cd", "ef", "gh"].into());
        let Buffered::TooLarge(body) = buffer(chunks, 5).await else {
            panic!("expected too large");
        };
        assert_eq!(body.size_hint().lower(), 6);
        assert_eq!(&collect(body).await[..], b"abcdefgh");
    }

    #[tokio::test]
    async fn a_failed_body_is_of_unknown_size_and_ends_with_its_error() {
        let Buffered::Failed(body) = buffer(Fails(Some("partial")), 100).await else {
            panic!("expected a failed body");
        };
        // An exact size would let a server send `Content-Length` and never read the error.
        assert_eq!(body.size_hint().exact(), None);
        assert_eq!(body.size_hint().lower(), 7);
        assert!(!body.is_end_stream());
        let mut body = Box::pin(body);
        let first = body.frame().await.map(|f| f.map(Frame::into_data));
        assert!(matches!(first, Some(Ok(Ok(data))) if &data[..] == b"partial"));
        assert!(matches!(body.frame().await, Some(Err(_))));
    }

    /// A body that sends one chunk, then fails.
    struct Fails(Option<&'static str>);

    impl Body for Fails {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(Some(match self.0.take() {
                Some(chunk) => Ok(Frame::data(Bytes::from_static(chunk.as_bytes()))),
                None => Err(std::io::Error::other("the body broke")),
            }))
        }
    }

    /// A body of several chunks and unknown length.
    struct Chunks(std::collections::VecDeque<&'static str>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(
                self.0
                    .pop_front()
                    .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes())))),
            )
        }
    }
}
