//! An in-process HTTP server that speaks enough of the Kubernetes API for meshnet's
//! discovery: list and watch with resourceVersion, watch events and bookmarks, 410 Gone
//! after a compaction (the client must relist), get, create, replace with optimistic
//! concurrency, delete, and `/version` as a 1.18 server answers. It can be switched to fail
//! every request with 500, to hang, or to answer without end. Objects are the JSON a 1.18 cluster returns.
//!
//! It binds inside a given network namespace, so that processes run there (the controller,
//! the agent) reach it on that namespace's loopback.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::{Query, State},
    http::{header, HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    Router,
};
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

/// How the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Every request fails with 500.
    Error,
    /// Every request hangs without an answer.
    Hang,
    /// Every request but `/version` (so that probes pass) gets 200 and a body that never
    /// ends, with no newline in it: a list that never completes, a watch line without end.
    Endless,
}

#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    collection: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// collection path -> name -> object
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    history: Vec<Event>,
    /// Watches from a resourceVersion below this get 410 Gone.
    floor: u64,
}

/// One request as the server received it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The body of a write (empty for reads).
    pub body: String,
}

struct Shared {
    store: Mutex<Store>,
    /// Every request, to tell which credentials clients sent and what they wrote.
    requests: Mutex<Vec<Request>>,
    events: broadcast::Sender<Event>,
    mode: watch::Sender<(Mode, u64)>,
}

/// A running fake API server; stops when dropped.
pub struct FakeApi {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn collection_of(obj: &Value) -> String {
    let api_version = obj["apiVersion"].as_str().unwrap_or("v1");
    let kind = obj["kind"].as_str().unwrap_or_default();
    let plural = match kind {
        "Node" => "nodes",
        "Service" => "services",
        "Endpoints" => "endpoints",
        "Secret" => "secrets",
        "ConfigMap" => "configmaps",
        "Namespace" => "namespaces",
        "Lease" => "leases",
        "EndpointSlice" => "endpointslices",
        other => panic!("fake API: unknown kind {other}"),
    };
    let prefix = if api_version == "v1" { "api/v1".to_string() } else { format!("apis/{api_version}") };
    match obj["metadata"]["namespace"].as_str() {
        Some(ns) if kind != "Namespace" && kind != "Node" => format!("{prefix}/namespaces/{ns}/{plural}"),
        _ => format!("{prefix}/{plural}"),
    }
}

fn kind_of_collection(c: &str) -> (&'static str, &'static str) {
    let plural = c.rsplit('/').next().unwrap_or_default();
    let api_version = if c.starts_with("apis/coordination.k8s.io/v1") {
        "coordination.k8s.io/v1"
    } else if c.starts_with("apis/discovery.k8s.io/v1beta1") {
        "discovery.k8s.io/v1beta1"
    } else {
        "v1"
    };
    let kind = match plural {
        "nodes" => "Node",
        "services" => "Service",
        "endpoints" => "Endpoints",
        "secrets" => "Secret",
        "configmaps" => "ConfigMap",
        "namespaces" => "Namespace",
        "leases" => "Lease",
        "endpointslices" => "EndpointSlice",
        _ => "Unknown",
    };
    (api_version, kind)
}

/// Splits a request path into (collection, optional name).
fn parse_path(path: &str) -> Option<(String, Option<String>)> {
    let p = path.trim_matches('/');
    let (prefix, rest) = if let Some(r) = p.strip_prefix("api/v1") {
        ("api/v1".to_string(), r)
    } else {
        let mut it = p.splitn(4, '/');
        let (a, g, v) = (it.next()?, it.next()?, it.next()?);
        if a != "apis" {
            return None;
        }
        (format!("apis/{g}/{v}"), &p[a.len() + g.len() + v.len() + 2..])
    };
    let seg: Vec<&str> = rest.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    match seg.as_slice() {
        [res] => Some((format!("{prefix}/{res}"), None)),
        ["namespaces", name] => Some((format!("{prefix}/namespaces"), Some((*name).to_string()))),
        [res, name] => Some((format!("{prefix}/{res}"), Some((*name).to_string()))),
        ["namespaces", ns, res] => Some((format!("{prefix}/namespaces/{ns}/{res}"), None)),
        ["namespaces", ns, res, name] => Some((format!("{prefix}/namespaces/{ns}/{res}"), Some((*name).to_string()))),
        _ => None,
    }
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code});
    (StatusCode::from_u16(code).unwrap(), axum::Json(body)).into_response()
}

fn matches(obj: &Value, q: &BTreeMap<String, String>) -> bool {
    if let Some(sel) = q.get("fieldSelector") {
        for term in sel.split(',').filter(|t| !t.is_empty()) {
            let (k, v) = term.split_once('=').unwrap_or((term, ""));
            let v = v.trim_start_matches('=');
            let actual = match k {
                "metadata.name" => obj["metadata"]["name"].as_str(),
                "metadata.namespace" => obj["metadata"]["namespace"].as_str(),
                _ => None,
            };
            if actual != Some(v) {
                return false;
            }
        }
    }
    if let Some(sel) = q.get("labelSelector") {
        for term in sel.split(',').filter(|t| !t.is_empty()) {
            let (k, v) = term.split_once('=').unwrap_or((term, ""));
            let v = v.trim_start_matches('=');
            if obj["metadata"]["labels"][k].as_str() != Some(v) {
                return false;
            }
        }
    }
    true
}

impl FakeApi {
    /// Starts a server bound to 127.0.0.1 inside the network namespace at `netns` (or the
    /// caller's namespace when `None`).
    #[must_use]
    pub fn start(netns: Option<&std::path::Path>) -> Self {
        let (events, _) = broadcast::channel(4096);
        let (mode, _) = watch::channel((Mode::Normal, 0));
        let shared = Arc::new(Shared { store: Mutex::new(Store::default()), requests: Mutex::new(Vec::new()), events, mode });
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let s = shared.clone();
        let netns = netns.map(std::path::Path::to_path_buf);
        let thread = std::thread::spawn(move || {
            if let Some(p) = netns {
                crate::enter(&p);
            }
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let app = Router::new().fallback(handle).with_state(s);
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop_rx.await;
                    })
                    .await;
            });
            rt.shutdown_timeout(Duration::from_millis(100));
        });
        let addr = addr_rx.recv().unwrap();
        Self { addr, shared, stop: Some(stop_tx), thread: Some(thread) }
    }

    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for this server with an inline bearer token.
    #[must_use]
    pub fn kubeconfig(&self, name: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {}\nusers:\n- name: {name}\n  user:\n    token: fake-token-{name}\ncontexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}\ncurrent-context: {name}\n",
            self.url()
        )
    }

    pub fn set_mode(&self, mode: Mode) {
        self.shared.mode.send_modify(|m| *m = (mode, m.1 + 1));
    }

    /// Creates or replaces an object (its apiVersion, kind and metadata.name set).
    pub fn apply(&self, mut obj: Value) {
        let collection = collection_of(&obj);
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let mut st = self.shared.store.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = json!(format!("uid-{rv}"));
        }
        let existed = st.objects.entry(collection.clone()).or_default().insert(name, obj.clone()).is_some();
        let ev = Event { rv, collection, kind: if existed { "MODIFIED" } else { "ADDED" }, object: obj };
        st.history.push(ev.clone());
        let _ = self.shared.events.send(ev);
    }

    pub fn delete(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str) {
        FakeApiRef(self.shared.clone()).delete(api_version, kind, namespace, name);
    }

    /// An object as stored, if present.
    #[must_use]
    pub fn get(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let probe = json!({"apiVersion": api_version, "kind": kind, "metadata": {"namespace": namespace}});
        self.shared.store.lock().unwrap().objects.get(&collection_of(&probe))?.get(name).cloned()
    }

    /// Every request received so far, oldest first.
    #[must_use]
    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Every object stored, as JSON text.
    #[must_use]
    pub fn dump(&self) -> String {
        serde_json::to_string(&self.shared.store.lock().unwrap().objects).unwrap()
    }

    /// Forgets history, as etcd compaction does: watches from older versions get 410 Gone,
    /// and open watches are closed so that clients must come back with what they have.
    pub fn compact(&self) {
        {
            let mut st = self.shared.store.lock().unwrap();
            st.floor = st.rv;
            st.history.clear();
        }
        let mode = self.shared.mode.borrow().0;
        self.set_mode(mode);
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        // Hanging requests would hold the graceful shutdown; release them first.
        self.set_mode(Mode::Normal);
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn handle(
    State(s): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
    body: Bytes,
) -> Response {
    s.requests.lock().unwrap().push(Request {
        method: method.to_string(),
        path: uri.path().to_string(),
        authorization: headers.get(header::AUTHORIZATION).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    let mut mode_rx = s.mode.subscribe();
    let (mode, _) = *mode_rx.borrow();
    match mode {
        Mode::Error => return status(500, "InternalError", "fake API server failing on purpose"),
        Mode::Hang => {
            // Answer only once the mode changes back (or never, for this request's client).
            let _ = mode_rx.changed().await;
            return status(503, "ServiceUnavailable", "was hanging");
        }
        Mode::Endless if uri.path() != "/version" => return endless(mode_rx),
        Mode::Normal | Mode::Endless => {}
    }
    let path = uri.path();
    if path == "/version" {
        return axum::Json(json!({"major": "1", "minor": "18", "gitVersion": "v1.18.2", "platform": "linux/amd64"})).into_response();
    }
    let Some((collection, name)) = parse_path(path) else {
        return status(404, "NotFound", &format!("no route {path}"));
    };
    match (method, name) {
        (Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => watch_collection(&s, collection, q),
        (Method::GET, None) => {
            let st = s.store.lock().unwrap();
            let items: Vec<Value> =
                st.objects.get(&collection).map(|m| m.values().filter(|o| matches(o, &q)).cloned().collect()).unwrap_or_default();
            let (api_version, kind) = kind_of_collection(&collection);
            axum::Json(json!({"kind": format!("{kind}List"), "apiVersion": api_version, "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}))
                .into_response()
        }
        (Method::GET, Some(name)) => {
            let st = s.store.lock().unwrap();
            match st.objects.get(&collection).and_then(|m| m.get(&name)) {
                Some(o) => axum::Json(o.clone()).into_response(),
                None => status(404, "NotFound", &format!("{collection} \"{name}\" not found")),
            }
        }
        (Method::POST, None) => write(&s, &collection, &body, true),
        (Method::PUT, Some(_)) => write(&s, &collection, &body, false),
        (Method::PATCH, Some(name)) => server_side_apply(&s, &collection, &name, &headers, &q, &body),
        (Method::DELETE, Some(name)) => {
            let (api_version, kind) = kind_of_collection(&collection);
            let ns = collection.split('/').skip_while(|x| *x != "namespaces").nth(1).map(str::to_owned);
            let fake = FakeApiRef(s.clone());
            fake.delete(api_version, kind, ns.as_deref(), &name);
            axum::Json(json!({"kind": "Status", "apiVersion": "v1", "status": "Success"})).into_response()
        }
        _ => status(405, "MethodNotAllowed", "not supported by the fake API"),
    }
}

/// The store operations without the server handle, for the request handlers.
struct FakeApiRef(Arc<Shared>);

impl FakeApiRef {
    fn delete(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str) {
        let probe = json!({"apiVersion": api_version, "kind": kind, "metadata": {"namespace": namespace}});
        let collection = collection_of(&probe);
        let mut st = self.0.store.lock().unwrap();
        let Some(mut obj) = st.objects.get_mut(&collection).and_then(|m| m.remove(name)) else { return };
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let ev = Event { rv, collection, kind: "DELETED", object: obj };
        st.history.push(ev.clone());
        let _ = self.0.events.send(ev);
    }
}

/// Server-side apply (the only PATCH the fake serves), as far as meshnet uses it: one field
/// manager that forces, so the applied object's fields replace the stored ones (`data`
/// whole, labels merged), and a missing object is created. What a 1.18 API server checks
/// is checked: the content type and a field manager.
fn server_side_apply(s: &Arc<Shared>, collection: &str, name: &str, headers: &HeaderMap, q: &BTreeMap<String, String>, body: &Bytes) -> Response {
    if headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) != Some("application/apply-patch+yaml") {
        return status(415, "UnsupportedMediaType", "only server-side apply is served");
    }
    if q.get("fieldManager").is_none_or(String::is_empty) {
        return status(422, "Invalid", "fieldManager is required for apply patch");
    }
    let Ok(patch) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest", "body is not JSON");
    };
    if patch["metadata"]["name"].as_str() != Some(name) {
        return status(400, "BadRequest", "metadata.name does not match the path");
    }
    let current = s.store.lock().unwrap().objects.get(collection).and_then(|m| m.get(name)).cloned();
    let Some(mut obj) = current else {
        return write(s, collection, &Bytes::from(serde_json::to_vec(&patch).unwrap()), true);
    };
    for (k, v) in patch.as_object().unwrap() {
        if k == "metadata" {
            for (mk, mv) in v.as_object().into_iter().flatten() {
                if mv.is_object() && obj["metadata"][mk].is_object() {
                    for (lk, lv) in mv.as_object().unwrap() {
                        obj["metadata"][mk][lk] = lv.clone();
                    }
                } else {
                    obj["metadata"][mk] = mv.clone();
                }
            }
        } else {
            obj[k] = v.clone();
        }
    }
    obj["metadata"]["resourceVersion"] = Value::Null;
    write(s, collection, &Bytes::from(serde_json::to_vec(&obj).unwrap()), false)
}

fn write(s: &Arc<Shared>, collection: &str, body: &Bytes, create: bool) -> Response {
    let Ok(mut obj) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest", "body is not JSON");
    };
    let (api_version, kind) = kind_of_collection(collection);
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(kind);
    if let Some(ns) = collection.split('/').skip_while(|x| *x != "namespaces").nth(1) {
        if kind != "Namespace" {
            obj["metadata"]["namespace"] = json!(ns);
        }
    }
    let Some(name) = obj["metadata"]["name"].as_str().map(str::to_owned) else {
        return status(422, "Invalid", "metadata.name is required");
    };
    let mut st = s.store.lock().unwrap();
    let current = st.objects.get(collection).and_then(|m| m.get(&name)).cloned();
    match (&current, create) {
        (Some(_), true) => return status(409, "AlreadyExists", &format!("\"{name}\" already exists")),
        (None, false) => return status(404, "NotFound", &format!("\"{name}\" not found")),
        (Some(cur), false) => {
            let sent = obj["metadata"]["resourceVersion"].as_str().unwrap_or_default();
            if !sent.is_empty() && sent != cur["metadata"]["resourceVersion"].as_str().unwrap_or_default() {
                return status(409, "Conflict", "the object has been modified; please apply your changes to the latest version");
            }
        }
        (None, true) => {}
    }
    st.rv += 1;
    let rv = st.rv;
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    if obj["metadata"]["uid"].is_null() {
        obj["metadata"]["uid"] = json!(format!("uid-{rv}"));
    }
    st.objects.entry(collection.to_string()).or_default().insert(name, obj.clone());
    let ev = Event { rv, collection: collection.to_string(), kind: if create { "ADDED" } else { "MODIFIED" }, object: obj.clone() };
    st.history.push(ev.clone());
    let _ = s.events.send(ev);
    (if create { StatusCode::CREATED } else { StatusCode::OK }, axum::Json(obj)).into_response()
}

fn watch_collection(s: &Arc<Shared>, collection: String, q: BTreeMap<String, String>) -> Response {
    let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = q.get("timeoutSeconds").and_then(|v| v.parse::<u64>().ok()).unwrap_or(290);
    // Subscribe before reading history, so no event falls between the two.
    let mut rx = s.events.subscribe();
    let mut mode_rx = s.mode.subscribe();
    let (backlog, gone, current_rv) = {
        let st = s.store.lock().unwrap();
        let gone = from != 0 && from < st.floor;
        let backlog: Vec<Event> =
            st.history.iter().filter(|e| e.rv > from && e.collection == collection && from != 0).cloned().collect();
        (backlog, gone, st.rv)
    };
    let (api_version, kind) = kind_of_collection(&collection);
    let stream = async_stream(move |tx: tokio::sync::mpsc::Sender<Bytes>| async move {
        let line = |v: Value| Bytes::from(format!("{v}\n"));
        if gone {
            let st = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": format!("too old resource version: {from}"), "reason": "Expired", "code": 410}});
            let _ = tx.send(line(st)).await;
            return;
        }
        let mut last = from.max(if from == 0 { current_rv } else { 0 });
        for e in backlog {
            if matches(&e.object, &q) {
                last = e.rv;
                if tx.send(line(json!({"type": e.kind, "object": e.object}))).await.is_err() {
                    return;
                }
            }
        }
        let deadline = tokio::time::sleep(Duration::from_secs(timeout));
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                () = &mut deadline => return,
                _ = mode_rx.changed() => return,
                _ = tick.tick(), if bookmarks => {
                    let bm = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": last.to_string()}}});
                    if tx.send(line(bm)).await.is_err() { return; }
                }
                ev = rx.recv() => match ev {
                    Ok(e) if e.collection == collection && e.rv > last => {
                        last = e.rv;
                        if matches(&e.object, &q) && tx.send(line(json!({"type": e.kind, "object": e.object}))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    });
    Response::builder().header("content-type", "application/json").body(stream).unwrap()
}

/// 64 KB of spaces after the start of a JSON list, again and again, until the mode changes.
fn endless(mut mode_rx: watch::Receiver<(Mode, u64)>) -> Response {
    let body = async_stream(move |tx: tokio::sync::mpsc::Sender<Bytes>| async move {
        let chunk = Bytes::from(vec![b' '; 1 << 16]);
        if tx.send(Bytes::from_static(b"{\"kind\": \"NodeList\", \"apiVersion\": \"v1\", \"items\": [")).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                _ = mode_rx.changed() => return,
                sent = tx.send(chunk.clone()) => if sent.is_err() { return },
            }
        }
    });
    Response::builder().header("content-type", "application/json").body(body).unwrap()
}

/// A streaming body fed by a task.
fn async_stream<F, Fut>(f: F) -> Body
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(f(tx));
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|o| o.map(Ok::<Bytes, std::io::Error>)));
    Body::from_stream(stream)
}
