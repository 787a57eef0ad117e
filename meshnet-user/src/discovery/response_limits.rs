//! Bounds on what a remote API server's answers may cost the controller. A remote is run by
//! someone else and may answer anything: kube's client reads a whole response into memory
//! and splits a watch stream into lines with no limit on their length, so one endless body,
//! or one endless line, would grow the controller until it is killed, and every peer's
//! publish with it, on every restart. Each remote client's responses pass through here:
//!
//! - the headers must come within [`HEADERS_WITHIN`];
//! - a response that is not a watch ends within [`BODY_WITHIN`] of its request and holds at
//!   most [`MAX_BODY`] bytes (a page of a list is at most [`super::remote::PAGE_SIZE`] objects);
//! - a watch stream may run as long as the server keeps it, but no line of it (one event,
//!   one object) grows past [`MAX_WATCH_LINE`] bytes.
//!
//! Past a bound the response fails with an error that says which, and the remote's watch
//! backs off and lists again, as after any failure: the peer is then stale, never
//! half-listed, and no other remote notices.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use kube::client::DynBody;
use tokio::time::{Instant, Sleep};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub const MAX_BODY: u64 = 8 << 20;
pub const MAX_WATCH_LINE: u64 = 4 << 20;
pub const HEADERS_WITHIN: Duration = Duration::from_secs(30);
pub const BODY_WITHIN: Duration = Duration::from_mins(2);

/// The [`tower::Layer`] for a remote client's stack (`kube::client::ClientBuilder::with_layer`).
#[derive(Debug, Clone, Copy, Default)]
pub struct ResponseLimitsLayer;

impl<S> tower::Layer<S> for ResponseLimitsLayer {
    type Service = ResponseLimits<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ResponseLimits { inner }
    }
}

#[derive(Debug, Clone)]
pub struct ResponseLimits<S> {
    inner: S,
}

/// Whether `uri` asks for a watch stream (kube writes `watch=true`; the server also takes `1`).
fn is_watch(uri: &Uri) -> bool {
    uri.query().is_some_and(|q| q.split('&').any(|p| matches!(p, "watch=true" | "watch=1")))
}

impl<S, ReqBody> tower::Service<Request<ReqBody>> for ResponseLimits<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<Box<DynBody>>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Box<DynBody>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let watch = is_watch(req.uri());
        let sent = Instant::now();
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = tokio::time::timeout(HEADERS_WITHIN, response)
                .await
                .map_err(|_| format!("the remote API server sent no answer within {} s", HEADERS_WITHIN.as_secs()))?
                .map_err(Into::into)?;
            let limits = if watch { Limits::Lines } else { Limits::Whole(Box::pin(tokio::time::sleep_until(sent + BODY_WITHIN))) };
            Ok(response.map(|inner| Box::new(Bounded { inner, limits, seen: 0 }) as Box<DynBody>))
        })
    }
}

enum Limits {
    /// A watch: `seen` counts the bytes since the last newline.
    Lines,
    /// Anything else: `seen` counts every byte, and the body must end by the deadline.
    Whole(Pin<Box<Sleep>>),
}

struct Bounded {
    inner: Box<DynBody>,
    limits: Limits,
    seen: u64,
}

impl Body for Bounded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Limits::Whole(deadline) = &mut this.limits {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Some(Err(format!("the remote API server's answer took longer than {} s", BODY_WITHIN.as_secs()).into())));
            }
        }
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let Some(data) = frame.data_ref() {
            let len = data.len() as u64;
            // For a watch: the line this chunk ends (the bytes before its first newline) and the
            // line it leaves open (after its last). A chunk is far shorter than the bound, so the
            // lines wholly inside it need no count of their own.
            let (ended, seen, limit, what) = match this.limits {
                Limits::Lines => match (data.iter().position(|&b| b == b'\n'), data.iter().rposition(|&b| b == b'\n')) {
                    (Some(first), Some(last)) => (this.seen + first as u64, len - 1 - last as u64, MAX_WATCH_LINE, "a line of its watch stream"),
                    _ => (0, this.seen + len, MAX_WATCH_LINE, "a line of its watch stream"),
                },
                Limits::Whole(_) => (0, this.seen + len, MAX_BODY, "its answer"),
            };
            this.seen = seen;
            if seen.max(ended) > limit {
                return Poll::Ready(Some(Err(format!("the remote API server sent more than {} MiB in {what}", limit >> 20).into())));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt as _;
    use http_body_util::BodyExt as _;
    use tower::{Layer as _, ServiceExt as _};

    /// A server whose every answer is `chunks` of `chunk` (then the end), or never ends.
    fn server(
        chunk: &'static [u8],
        chunks: Option<usize>,
    ) -> impl tower::Service<Request<()>, Response = Response<Box<DynBody>>, Error = BoxError, Future: Send + 'static> {
        tower::service_fn(move |_req: Request<()>| async move {
            let frames = futures::stream::repeat_with(move || Ok::<_, BoxError>(Frame::data(Bytes::from_static(chunk))));
            let body: Box<DynBody> = match chunks {
                Some(n) => Box::new(http_body_util::StreamBody::new(frames.take(n))),
                None => Box::new(http_body_util::StreamBody::new(frames)),
            };
            Ok(Response::new(body))
        })
    }

    async fn read(svc: impl tower::Service<Request<()>, Response = Response<Box<DynBody>>, Error = BoxError>, uri: &str) -> Result<u64, String> {
        let response = svc.oneshot(Request::builder().uri(uri).body(()).unwrap()).await.map_err(|e| e.to_string())?;
        let mut body = response.into_body();
        let mut total = 0;
        while let Some(frame) = body.frame().await {
            total += frame.map_err(|e| e.to_string())?.data_ref().map_or(0, |d| d.len() as u64);
        }
        Ok(total)
    }

    const MIB: &[u8] = &[b'x'; 1 << 20];
    /// Most of a MiB, then the newline that ends a line.
    const MIB_THEN_NEWLINE: &[u8] = &{
        let mut c = [b'x'; 1 << 20];
        c[(1 << 20) - 1] = b'\n';
        c
    };
    const LINE: &[u8] = b"{\"type\":\"ADDED\"}\n";

    #[tokio::test]
    async fn an_endless_answer_or_line_fails_at_its_bound() {
        let layer = ResponseLimitsLayer;
        let e = read(layer.layer(server(MIB, None)), "/api/v1/nodes?limit=100").await.unwrap_err();
        assert!(e.contains("more than 8 MiB in its answer"), "{e}");
        let e = read(layer.layer(server(MIB, None)), "/api/v1/nodes?watch=true&resourceVersion=1").await.unwrap_err();
        assert!(e.contains("more than 4 MiB in a line of its watch stream"), "{e}");
        // A line ended by the chunk that takes it past the bound fails too.
        let svc = tower::service_fn(|_req: Request<()>| {
            let chunks = [MIB, MIB, MIB, MIB, MIB_THEN_NEWLINE];
            let frames = futures::stream::iter(chunks.map(|c| Ok::<_, BoxError>(Frame::data(Bytes::from_static(c)))));
            let body: Box<DynBody> = Box::new(http_body_util::StreamBody::new(frames));
            async move { Ok::<_, BoxError>(Response::new(body)) }
        });
        let e = read(layer.layer(svc), "/api/v1/nodes?watch=true").await.unwrap_err();
        assert!(e.contains("more than 4 MiB in a line"), "{e}");
        // A watch of many short lines may outgrow any one answer's bound.
        let many = usize::try_from(MAX_BODY).unwrap() / LINE.len() + 1;
        assert_eq!(read(layer.layer(server(LINE, Some(many))), "/api/v1/nodes?watch=1").await, Ok(many as u64 * LINE.len() as u64));
        // Within its bound an answer is passed whole.
        assert_eq!(read(layer.layer(server(MIB, Some(8))), "/api/v1/nodes").await, Ok(8 << 20));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_answer_fails_in_time() {
        let stalled = tower::service_fn(|_req: Request<()>| async {
            let body: Box<DynBody> = Box::new(http_body_util::StreamBody::new(futures::stream::pending::<Result<Frame<Bytes>, BoxError>>()));
            Ok::<_, BoxError>(Response::new(body))
        });
        let e = read(ResponseLimitsLayer.layer(stalled), "/api/v1/nodes").await.unwrap_err();
        assert!(e.contains("took longer than 120 s"), "{e}");
        let silent = tower::service_fn(|_req: Request<()>| futures::future::pending::<Result<Response<Box<DynBody>>, BoxError>>());
        let e = read(ResponseLimitsLayer.layer(silent), "/api/v1/nodes?watch=true").await.unwrap_err();
        assert!(e.contains("no answer within 30 s"), "{e}");
    }

    #[test]
    fn watches_are_told_from_other_requests() {
        for (uri, watch) in [
            ("/api/v1/nodes?watch=true&timeoutSeconds=290", true),
            ("/api/v1/nodes?limit=500&watch=1", true),
            ("/api/v1/nodes?limit=500", false),
            ("/api/v1/nodes?xwatch=true", false),
            ("/api/v1/namespaces/watch=true/configmaps", false),
        ] {
            assert_eq!(is_watch(&uri.parse().unwrap()), watch, "{uri}");
        }
    }
}
