//! Bounds on what a remote API server's answers may cost the controller. A remote is run by
//! someone else and may answer anything: kube's client reads a whole response into memory
//! and splits a watch stream into lines with no limit on their length, so one endless body,
//! or one endless line, would grow the controller until it is killed, and every peer's
//! publish with it, on every restart. Each remote client's responses pass through here:
//!
//! - the headers must come within [`HEADERS_WITHIN`];
//! - a response that is not a watch ends within [`BODY_WITHIN`] of its request and holds at
//!   most so many bytes and JSON values ([`NODE_PAGE`] for a page of a node list, of at most
//!   [`super::remote::PAGE_SIZE`] nodes; [`OTHER`] for the one object anything else asks for);
//! - a watch stream may run as long as the server keeps it, but no line of it (one event,
//!   one object) holds more than [`NODE_EVENT`] (or [`OTHER`]).
//!
//! Values are bounded as well as bytes because a parsed value may take a hundred times its
//! JSON's length (`[{},{},...]`).
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

/// What one answer may hold: bytes, and JSON values (see [`Count`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub bytes: u64,
    pub values: u64,
}

/// A page of a node list: 50 real nodes are some 50,000 values (their image lists, conditions
/// and managed fields) in up to 2.5 MB; 150,000 values of the smallest nodes a remote could
/// send instead (a name each) parse to some 30 MB (`resolve::RemoteNode`).
pub const NODE_PAGE: Bounds = Bounds { bytes: 8 << 20, values: 150_000 };
/// One watch event of a node: one object.
pub const NODE_EVENT: Bounds = Bounds { bytes: 4 << 20, values: 50_000 };
/// Anything else a remote is asked for is one small object (the gateway's Service and
/// Endpoints, a namespace, the version): 10,000 values of empty Services parse to 8 MB.
pub const OTHER: Bounds = Bounds { bytes: 1 << 20, values: 10_000 };

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
        let bounds = match (req.uri().path().ends_with("/nodes"), watch) {
            (true, false) => NODE_PAGE,
            (true, true) => NODE_EVENT,
            (false, _) => OTHER,
        };
        let sent = Instant::now();
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = tokio::time::timeout(HEADERS_WITHIN, response)
                .await
                .map_err(|_| format!("the remote API server sent no answer within {} s", HEADERS_WITHIN.as_secs()))?
                .map_err(Into::into)?;
            let limits = if watch { Limits::Lines } else { Limits::Whole(Box::pin(tokio::time::sleep_until(sent + BODY_WITHIN))) };
            Ok(response.map(|inner| Box::new(Bounded { inner, limits, bounds, count: Count::default() }) as Box<DynBody>))
        })
    }
}

enum Limits {
    /// A watch: each line (one event) is counted on its own.
    Lines,
    /// Anything else: the whole answer is counted, and must end by the deadline.
    Whole(Pin<Box<Sleep>>),
}

/// Bytes and JSON values of the answer (or of the watch line) so far. A value is counted at
/// each `{`, `[` and `,` outside strings: what a JSON parser allocates for is at least one of
/// those each, and `[{},{},...]` is 3 bytes a value where the value parsed may take hundreds.
#[derive(Default)]
struct Count {
    bytes: u64,
    values: u64,
    in_string: bool,
    escaped: bool,
}

impl Count {
    /// Counts `data`; for a watch (`lines`), from zero again after each newline. Past a bound,
    /// what was exceeded.
    fn add(&mut self, data: &[u8], lines: bool, bounds: Bounds) -> Result<(), String> {
        let Bounds { bytes: max_bytes, values: max_values } = bounds;
        let what = if lines { "a line of its watch stream" } else { "its answer" };
        for &b in data {
            // kube splits a watch into lines at every newline, in a string or not (a JSON
            // string holds none): each line is counted afresh, whatever the one before left open.
            if lines && b == b'\n' {
                *self = Self::default();
                continue;
            }
            self.bytes += 1;
            if self.bytes > max_bytes {
                return Err(format!("the remote API server sent more than {} MiB in {what}", max_bytes >> 20));
            }
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' | b',' => self.values += 1,
                _ => {}
            }
            if self.values > max_values {
                return Err(format!("the remote API server sent more than {max_values} JSON values in {what}"));
            }
        }
        Ok(())
    }
}

struct Bounded {
    inner: Box<DynBody>,
    limits: Limits,
    bounds: Bounds,
    count: Count,
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
            if let Err(e) = this.count.add(data, matches!(this.limits, Limits::Lines), this.bounds) {
                return Poll::Ready(Some(Err(e.into())));
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
        let many = usize::try_from(NODE_PAGE.bytes).unwrap() / LINE.len() + 1;
        assert_eq!(read(layer.layer(server(LINE, Some(many))), "/api/v1/nodes?watch=1").await, Ok(many as u64 * LINE.len() as u64));
        // Within its bound an answer is passed whole.
        assert_eq!(read(layer.layer(server(MIB, Some(8))), "/api/v1/nodes").await, Ok(8 << 20));
        // Anything but nodes is one small object.
        let e = read(layer.layer(server(MIB, None)), "/api/v1/namespaces/istio-system/services?fieldSelector=x").await.unwrap_err();
        assert!(e.contains("more than 1 MiB in its answer"), "{e}");
    }

    /// `[{},{},...]` is 3 bytes a value, and a value parsed may take hundreds: values are
    /// bounded too, counted outside strings only.
    #[tokio::test]
    async fn json_values_are_bounded_as_well_as_bytes() {
        const EMPTIES: &[u8] = &{
            let mut c = [0u8; 3 * 4096];
            let mut i = 0;
            while i < c.len() {
                c[i] = b'{';
                c[i + 1] = b'}';
                c[i + 2] = b',';
                i += 3;
            }
            c
        };
        const QUOTED: &[u8] = b"\"{[,{[,\\\"{[,\",";
        let layer = ResponseLimitsLayer;
        let e = read(layer.layer(server(EMPTIES, None)), "/api/v1/nodes?limit=50").await.unwrap_err();
        assert!(e.contains("more than 150000 JSON values in its answer"), "{e}");
        let e = read(layer.layer(server(EMPTIES, None)), "/api/v1/nodes?watch=true").await.unwrap_err();
        assert!(e.contains("more than 50000 JSON values in a line"), "{e}");
        let e = read(layer.layer(server(EMPTIES, None)), "/api/v1/namespaces/istio-system/endpoints").await.unwrap_err();
        assert!(e.contains("more than 10000 JSON values in its answer"), "{e}");
        // An endless string is bounded in bytes; a line left inside a string does not hide
        // the next line's values.
        // A server whose answer is `first`, then `then` 64 times.
        let opening = |first: &'static [u8], then: &'static [u8]| {
            tower::service_fn(move |_req: Request<()>| {
                let chunks = std::iter::once(first).chain(std::iter::repeat_n(then, 64));
                let frames = futures::stream::iter(chunks.map(|c| Ok::<_, BoxError>(Frame::data(Bytes::from_static(c)))));
                let body: Box<DynBody> = Box::new(http_body_util::StreamBody::new(frames));
                async move { Ok::<_, BoxError>(Response::new(body)) }
            })
        };
        let e = read(layer.layer(opening(b"{\"a\":\"", MIB)), "/api/v1/nodes?limit=50").await.unwrap_err();
        assert!(e.contains("more than 8 MiB in its answer"), "{e}");
        let e = read(layer.layer(opening(b"{\"a\":\"x\n", EMPTIES)), "/api/v1/nodes?watch=true").await.unwrap_err();
        assert!(e.contains("more than 50000 JSON values in a line"), "{e}");
        // Inside strings (escaped quotes too) nothing is a value: 9,000 strings of seven
        // brackets and commas each count one value each (the comma after each).
        let n = 9_000;
        assert_eq!(read(layer.layer(server(QUOTED, Some(n))), "/api/v1/namespaces/x/services").await, Ok((n * QUOTED.len()) as u64));
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
