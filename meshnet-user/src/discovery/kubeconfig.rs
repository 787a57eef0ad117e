//! Remote-cluster credentials from Istio's remote secrets, vetted before kube-rs sees them.
//!
//! A remote secret is written by whoever can create Secrets in istio-system, and a
//! kubeconfig can run programs (exec plugins, auth-provider commands), read local files
//! (tokenFile, certificate paths) or send the bearer token elsewhere (proxy-url). An exec
//! plugin in a remote secret has given remote code execution in a managed Istio before.
//!
//! Two parsers that disagree are a bypass: a check that does not expand YAML merge keys
//! passes an `exec:` that kube's parser merges in. So the text is parsed once, by the parser
//! kube uses (serde-saphyr), and everything that lets one YAML text mean different things to
//! different readers is refused first, on its event stream: anchors, aliases, merge keys,
//! tags, duplicate keys, more than one document. The event tree is then held against the
//! allow-list with every key at every level, the typed `Kubeconfig` is checked again
//! (nothing in `other`, no refused field), and a fresh `Kubeconfig` is built from the
//! allowed fields of the current context alone. [`client`] builds the `kube::Config` by
//! hand from those fields, so no path of kube's loader (proxy from the environment, files,
//! exec, in-cluster token) can run.
//!
//! Errors name the place (`users[0].user.exec`), the reason and a line and column. They
//! never carry text from the secret: parser and kube error messages quote it, so none of
//! them is passed on.

use std::{collections::HashSet, fmt, fmt::Write as _};

use base64::Engine as _;
use kube::config::{AuthInfo, Cluster, Context, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext};
use secrecy::{ExposeSecret as _, SecretString};
use serde_saphyr::granit_parser::{ErrorKind, Event, Parser, ScalarStyle, Span};

/// A line and column (both from 1) in the kubeconfig text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct At {
    pub line: usize,
    pub column: usize,
}

impl At {
    fn of(span: &Span) -> Self {
        Self { line: span.start.line(), column: span.start.col() + 1 }
    }
}

/// ` (line L, column C)`, or nothing when the place is unknown.
struct Where(Option<At>);

impl fmt::Display for Where {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(At { line, column }) => write!(f, " (line {line}, column {column})"),
            None => Ok(()),
        }
    }
}

const ALLOWED: &str = "a remote kubeconfig may hold only clusters (server, certificate-authority-data, \
tls-server-name), users (token, client-certificate-data, client-key-data), contexts and current-context";

/// Why a kubeconfig was refused. The texts are fixed or built from meshnet's own field names,
/// indices and positions: never from the secret's values, keys meshnet does not know, or
/// another library's error message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VetError {
    #[error("{origin}: not valid YAML{}", Where(Some(*.at)))]
    Syntax { origin: String, at: At },
    #[error("{origin}: {place} has {}, which meshnet refuses: {why}{}; {ALLOWED}", FieldName(*.field), Where(*.at))]
    Refused { origin: String, place: String, field: Option<&'static str>, why: &'static str, at: Option<At> },
    #[error("{origin}: `{path}` {why}{}", Where(*.at))]
    Invalid { origin: String, path: String, why: &'static str, at: Option<At> },
    #[error("{origin}: {what}")]
    Incomplete { origin: String, what: &'static str },
    #[error("{origin}: unusable kubeconfig: {what}")]
    Unusable { origin: String, what: &'static str },
    /// No length: the controller holds a value cut one byte past the bound.
    #[error("{origin}: the kubeconfig is longer than meshnet reads: at most {MAX_KUBECONFIG} bytes (256 KiB)")]
    TooLarge { origin: String },
}

/// The longest kubeconfig text read. `istioctl x create-remote-secret` writes a few KiB (a CA,
/// a token); a client certificate and key, or a corporate CA bundle, fit (Mozilla's whole
/// bundle, base64-encoded, is about 290 KB: a kubeconfig carrying it is refused).
/// Checked before any parsing: a text becomes a tree of some 50 times its size while it is
/// checked, once for each key of each remote secret, whoever writes them.
pub const MAX_KUBECONFIG: usize = 256 * 1024;

/// A refused key: its name when meshnet knows it, else no name at all (an unknown key is
/// secret content like any other).
struct FieldName(Option<&'static str>);

impl fmt::Display for FieldName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(name) => write!(f, "`{name}`"),
            None => f.write_str("an unknown key"),
        }
    }
}

/// Every key kube's kubeconfig types know, so that a refusal can name it.
const KNOWN_KEYS: &[&str] = &[
    "apiVersion", "kind", "preferences", "clusters", "users", "contexts", "current-context", "extensions",
    "name", "cluster", "user", "context", "namespace", "extension", "colors",
    "server", "insecure-skip-tls-verify", "certificate-authority", "certificate-authority-data", "proxy-url",
    "disable-compression", "tls-server-name",
    "username", "password", "token", "tokenFile", "client-certificate", "client-certificate-data", "client-key",
    "client-key-data", "as", "as-uid", "as-groups", "as-user-extra", "auth-provider", "exec",
];

fn known(key: &str) -> Option<&'static str> {
    KNOWN_KEYS.iter().copied().find(|k| *k == key)
}

fn why(field: Option<&str>) -> &'static str {
    match field {
        Some("exec") => "it runs a program on this host",
        Some("auth-provider") => "its plugins can run commands",
        Some("tokenFile" | "client-certificate" | "client-key" | "certificate-authority") => "it reads a local file",
        Some("proxy-url") => "it redirects API traffic through a proxy",
        Some("insecure-skip-tls-verify") => "it disables server verification",
        Some("username" | "password") => "basic auth is not supported",
        Some("as" | "as-uid" | "as-groups" | "as-user-extra") => "impersonation is not allowed",
        _ => "it is not on meshnet's allow-list",
    }
}

/// The part of a YAML document meshnet looks at, built from the parser's events. No
/// `Debug`: it holds the secret's values.
struct Node {
    at: At,
    kind: Kind,
}

enum Kind {
    Null,
    Scalar(String),
    Seq(Vec<Node>),
    /// Keys with where they stand, in order.
    Map(Vec<(String, At, Node)>),
}

enum Frame {
    Seq(At, Vec<Node>),
    Map { at: At, entries: Vec<(String, At, Node)>, key: Option<(String, At)>, seen: HashSet<String> },
}

/// Where the parser is, as `users[0].user`, for errors about the event stream.
fn stack_path(stack: &[Frame]) -> String {
    let mut path = String::new();
    for frame in stack {
        match frame {
            Frame::Seq(_, items) => {
                let _ = write!(path, "[{}]", items.len());
            }
            Frame::Map { key: Some((k, _)), .. } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(known(k).unwrap_or("<unknown key>"));
            }
            Frame::Map { key: None, .. } => {}
        }
    }
    if path.is_empty() {
        "the document".into()
    } else {
        path
    }
}

/// Parses the text into a [`Node`] tree with the parser serde-saphyr runs on (so both see
/// the same events), refusing anything that makes one text mean different things to
/// different readers.
fn events(text: &str, origin: &str) -> Result<Node, VetError> {
    let invalid = |stack: &[Frame], why: &'static str, at: At| VetError::Invalid {
        origin: origin.into(),
        path: stack_path(stack),
        why,
        at: Some(at),
    };
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<Node> = None;
    let mut documents = 0;
    for ev in Parser::new_from_str(text) {
        let (event, span) = ev.map_err(|e| {
            let at = At { line: e.marker().line(), column: e.marker().col() + 1 };
            if matches!(e.kind(), ErrorKind::UnknownAnchor) {
                invalid(&stack, "uses a YAML alias, which meshnet refuses in remote kubeconfigs", at)
            } else {
                VetError::Syntax { origin: origin.into(), at }
            }
        })?;
        let at = At::of(&span);
        let node = match event {
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Comment(..) => continue,
            Event::DocumentStart(..) => {
                documents += 1;
                if documents > 1 {
                    return Err(VetError::Invalid {
                        origin: origin.into(),
                        path: "the text".into(),
                        why: "holds more than one YAML document, which kube would merge",
                        at: Some(at),
                    });
                }
                continue;
            }
            Event::Alias(_) | Event::UnresolvedAlias(_) => {
                return Err(invalid(&stack, "uses a YAML alias, which meshnet refuses in remote kubeconfigs", at))
            }
            Event::Anchor(..) => {
                return Err(invalid(&stack, "defines a YAML anchor, which meshnet refuses in remote kubeconfigs", at))
            }
            Event::Scalar(value, style, anchor, tag) => {
                if anchor != 0 {
                    return Err(invalid(&stack, "defines a YAML anchor, which meshnet refuses in remote kubeconfigs", at));
                }
                if tag.is_some() {
                    return Err(invalid(&stack, "has a YAML tag, which meshnet refuses in remote kubeconfigs", at));
                }
                let null = style == ScalarStyle::Plain && matches!(&*value, "" | "~" | "null" | "Null" | "NULL");
                Node { at, kind: if null { Kind::Null } else { Kind::Scalar(value.into_owned()) } }
            }
            Event::SequenceStart(_, anchor, ref tag) | Event::MappingStart(_, anchor, ref tag) => {
                if anchor != 0 {
                    return Err(invalid(&stack, "defines a YAML anchor, which meshnet refuses in remote kubeconfigs", at));
                }
                if tag.is_some() {
                    return Err(invalid(&stack, "has a YAML tag, which meshnet refuses in remote kubeconfigs", at));
                }
                if matches!(event, Event::SequenceStart(..)) {
                    stack.push(Frame::Seq(at, Vec::new()));
                } else {
                    stack.push(Frame::Map { at, entries: Vec::new(), key: None, seen: HashSet::new() });
                }
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                Some(Frame::Seq(at, items)) => Node { at, kind: Kind::Seq(items) },
                Some(Frame::Map { at, entries, .. }) => Node { at, kind: Kind::Map(entries) },
                None => return Err(VetError::Syntax { origin: origin.into(), at }),
            },
            // A later parser's new kind of event: whatever it means, meshnet has not vetted it.
            _ => return Err(invalid(&stack, "uses a YAML construct meshnet does not accept", at)),
        };
        match stack.last_mut() {
            None if root.is_none() => root = Some(node),
            None => return Err(VetError::Syntax { origin: origin.into(), at }),
            Some(Frame::Seq(_, items)) => items.push(node),
            Some(Frame::Map { key: key @ None, seen, .. }) => {
                let Kind::Scalar(k) = node.kind else {
                    return Err(invalid(&stack, "has a key that is not a plain string", at));
                };
                if k == "<<" {
                    return Err(invalid(&stack, "has a YAML merge key (`<<`), which meshnet refuses in remote kubeconfigs", at));
                }
                if !seen.insert(k.clone()) {
                    *key = Some((k, at));
                    return Err(invalid(&stack, "appears twice in the same mapping", at));
                }
                *key = Some((k, at));
            }
            Some(Frame::Map { entries, key: key @ Some(_), .. }) => {
                let (k, kat) = key.take().expect("matched Some");
                entries.push((k, kat, node));
            }
        }
    }
    if let Some(Frame::Seq(at, _) | Frame::Map { at, .. }) = stack.last() {
        return Err(VetError::Syntax { origin: origin.into(), at: *at });
    }
    root.ok_or_else(|| VetError::Incomplete { origin: origin.into(), what: "empty kubeconfig" })
}

/// What meshnet accepts at one place of a remote kubeconfig.
enum Shape {
    /// Any scalar, read as a string.
    Str,
    /// Any scalar; kube reads it as a boolean.
    Bool,
    /// Kept by kube for extenders and dropped by meshnet: any content.
    Ignored,
    List(&'static Shape),
    /// Allowed keys; any other key is refused by name.
    Map(&'static [(&'static str, Shape)]),
}

const CLUSTER: Shape = Shape::Map(&[
    ("server", Shape::Str),
    ("certificate-authority-data", Shape::Str),
    ("tls-server-name", Shape::Str),
    ("extensions", Shape::Ignored),
]);
const USER: Shape = Shape::Map(&[
    ("token", Shape::Str),
    ("client-certificate-data", Shape::Str),
    ("client-key-data", Shape::Str),
    ("extensions", Shape::Ignored),
]);
const CONTEXT: Shape = Shape::Map(&[
    ("cluster", Shape::Str),
    ("user", Shape::Str),
    ("namespace", Shape::Str),
    ("extensions", Shape::Ignored),
]);
const KUBECONFIG: Shape = Shape::Map(&[
    ("apiVersion", Shape::Str),
    ("kind", Shape::Str),
    ("current-context", Shape::Str),
    ("preferences", Shape::Map(&[("colors", Shape::Bool), ("extensions", Shape::Ignored)])),
    ("clusters", Shape::List(&Shape::Map(&[("name", Shape::Str), ("cluster", CLUSTER)]))),
    ("users", Shape::List(&Shape::Map(&[("name", Shape::Str), ("user", USER)]))),
    ("contexts", Shape::List(&Shape::Map(&[("name", Shape::Str), ("context", CONTEXT)]))),
    ("extensions", Shape::Ignored),
]);

/// Holds the tree against the allow-list. `places` collects each node's position and path,
/// to name the field when serde-saphyr later reports only a position.
fn check(node: &Node, shape: &Shape, path: &str, origin: &str, places: &mut Vec<(At, String)>) -> Result<(), VetError> {
    places.push((node.at, path.to_owned()));
    let wrong = |why: &'static str| VetError::Invalid {
        origin: origin.into(),
        path: if path.is_empty() { "the document".into() } else { path.to_owned() },
        why,
        at: Some(node.at),
    };
    match (shape, &node.kind) {
        (Shape::Ignored, _) | (_, Kind::Null) | (Shape::Str | Shape::Bool, Kind::Scalar(_)) => Ok(()),
        (Shape::Str, _) => Err(wrong("must be a string")),
        (Shape::Bool, _) => Err(wrong("must be true or false")),
        (Shape::List(item), Kind::Seq(items)) => {
            for (i, n) in items.iter().enumerate() {
                check(n, item, &format!("{path}[{i}]"), origin, places)?;
            }
            Ok(())
        }
        (Shape::List(_), _) => Err(wrong("must be a list")),
        (Shape::Map(fields), Kind::Map(entries)) => {
            for (key, at, value) in entries {
                let name = known(key);
                let Some((_, inner)) = fields.iter().find(|(f, _)| Some(*f) == name) else {
                    return Err(VetError::Refused {
                        origin: origin.into(),
                        place: if path.is_empty() { "the top level".into() } else { path.to_owned() },
                        field: name,
                        why: why(name),
                        at: Some(*at),
                    });
                };
                let name = name.expect("allowed keys are known");
                let inner_path = if path.is_empty() { name.to_owned() } else { format!("{path}.{name}") };
                check(value, inner, &inner_path, origin, places)?;
            }
            Ok(())
        }
        (Shape::Map(_), _) => Err(wrong("must be a mapping")),
    }
}

/// Refuses every field of kube's types that is not on the allow-list, and anything kube kept
/// in an `other` map. [`events`] and [`check`] already refused them on the text; this holds
/// for any `Kubeconfig`, including one handed to [`client`] that did not come from [`vet`].
fn check_typed(kc: &Kubeconfig, origin: &str) -> Result<(), VetError> {
    let refuse = |place: String, field: Option<&'static str>| VetError::Refused {
        origin: origin.into(),
        place,
        field,
        why: why(field),
        at: None,
    };
    if !kc.other.is_empty() || kc.preferences.as_ref().is_some_and(|p| !p.other.is_empty()) {
        return Err(refuse("the top level".into(), None));
    }
    for (i, c) in kc.clusters.iter().enumerate() {
        let place = format!("clusters[{i}].cluster");
        if !c.other.is_empty() {
            return Err(refuse(format!("clusters[{i}]"), None));
        }
        let Some(cl) = &c.cluster else { continue };
        for (set, field) in [
            (cl.insecure_skip_tls_verify.is_some(), "insecure-skip-tls-verify"),
            (cl.certificate_authority.is_some(), "certificate-authority"),
            (cl.proxy_url.is_some(), "proxy-url"),
            (cl.disable_compression.is_some(), "disable-compression"),
        ] {
            if set {
                return Err(refuse(place, Some(field)));
            }
        }
        if !cl.other.is_empty() {
            return Err(refuse(place, None));
        }
    }
    for (i, u) in kc.auth_infos.iter().enumerate() {
        let place = format!("users[{i}].user");
        if !u.other.is_empty() {
            return Err(refuse(format!("users[{i}]"), None));
        }
        let Some(a) = &u.auth_info else { continue };
        for (set, field) in [
            (a.exec.is_some(), "exec"),
            (a.auth_provider.is_some(), "auth-provider"),
            (a.token_file.is_some(), "tokenFile"),
            (a.client_certificate.is_some(), "client-certificate"),
            (a.client_key.is_some(), "client-key"),
            (a.username.is_some(), "username"),
            (a.password.is_some(), "password"),
            (a.impersonate.is_some(), "as"),
            (a.impersonate_uid.is_some(), "as-uid"),
            (a.impersonate_groups.is_some(), "as-groups"),
            (a.impersonate_user_extra.is_some(), "as-user-extra"),
        ] {
            if set {
                return Err(refuse(place, Some(field)));
            }
        }
        if !a.other.is_empty() {
            return Err(refuse(place, None));
        }
    }
    for (i, c) in kc.contexts.iter().enumerate() {
        if !c.other.is_empty() {
            return Err(refuse(format!("contexts[{i}]"), None));
        }
        if c.context.as_ref().is_some_and(|x| !x.other.is_empty()) {
            return Err(refuse(format!("contexts[{i}].context"), None));
        }
    }
    Ok(())
}

/// Refuses a second entry of one name in a list.
fn unique<T>(items: &[T], name: impl Fn(&T) -> &str, list: &'static str, origin: &str) -> Result<(), VetError> {
    let mut seen = HashSet::new();
    for (i, item) in items.iter().enumerate() {
        if !seen.insert(name(item)) {
            return Err(VetError::Invalid {
                origin: origin.into(),
                path: format!("{list}[{i}].name"),
                why: "repeats the name of an earlier entry",
                at: None,
            });
        }
    }
    Ok(())
}

/// The current context's cluster, user and context. Names must be unique: with two entries of
/// one name, which one is meant depends on the reader.
fn select<'a>(kc: &'a Kubeconfig, origin: &str) -> Result<(&'a Cluster, &'a AuthInfo, &'a Context), VetError> {
    let incomplete = |what| VetError::Incomplete { origin: origin.into(), what };
    unique(&kc.clusters, |c: &NamedCluster| &c.name, "clusters", origin)?;
    unique(&kc.auth_infos, |u: &NamedAuthInfo| &u.name, "users", origin)?;
    unique(&kc.contexts, |c: &NamedContext| &c.name, "contexts", origin)?;
    let current = kc.current_context.as_deref().ok_or_else(|| incomplete("needs a current-context"))?;
    let context = kc
        .contexts
        .iter()
        .find(|c| c.name == current)
        .and_then(|c| c.context.as_ref())
        .ok_or_else(|| incomplete("current-context names no context in the kubeconfig"))?;
    let cluster = kc
        .clusters
        .iter()
        .find(|c| c.name == context.cluster)
        .and_then(|c| c.cluster.as_ref())
        .ok_or_else(|| incomplete("the current context names no cluster in the kubeconfig"))?;
    let user = context.user.as_deref().ok_or_else(|| incomplete("the current context names no user"))?;
    let user = kc
        .auth_infos
        .iter()
        .find(|u| u.name == user)
        .and_then(|u| u.auth_info.as_ref())
        .ok_or_else(|| incomplete("the current context names no user in the kubeconfig"))?;
    if cluster.server.as_deref().is_none_or(str::is_empty) {
        return Err(incomplete("the current cluster has no server"));
    }
    Ok((cluster, user, context))
}

/// The serde-saphyr options: kube's parser, with every ambiguity an error and error texts
/// without snippets of the source (they are not shown anyway).
fn options() -> serde_saphyr::Options {
    let mut o = serde_saphyr::Options::default();
    o.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::Error;
    o.merge_keys = serde_saphyr::MergeKeyPolicy::Error;
    o.reject_unsupported_tags = true;
    o.with_snippet = false;
    o
}

/// Checks one kubeconfig (YAML, or JSON, which is YAML) and returns a fresh `Kubeconfig`
/// holding only the current context and its allowed fields. `origin` names where it came
/// from for errors, e.g. `istio-system/istio-remote-secret-cluster2[cluster2]`.
pub fn vet(text: &str, origin: &str) -> Result<Kubeconfig, VetError> {
    if text.len() > MAX_KUBECONFIG {
        return Err(VetError::TooLarge { origin: origin.into() });
    }
    let tree = events(text, origin)?;
    let mut places = Vec::new();
    check(&tree, &KUBECONFIG, "", origin, &mut places)?;
    drop(tree);
    let kc: Kubeconfig = serde_saphyr::from_str_with_options(text, options()).map_err(|e| {
        let at = e.location().and_then(|l| {
            Some(At { line: usize::try_from(l.line()).ok()?, column: usize::try_from(l.column()).ok()? })
        });
        // serde-saphyr reports positions only; the place is the last node starting there or before.
        let path = at
            .and_then(|at| places.iter().rev().find(|(p, _)| (p.line, p.column) <= (at.line, at.column)))
            .map_or_else(|| "the document".to_owned(), |(_, path)| if path.is_empty() { "the document".into() } else { path.clone() });
        VetError::Invalid { origin: origin.into(), path, why: "does not have the type kube expects", at }
    })?;
    check_typed(&kc, origin)?;
    let (cluster, user, context) = select(&kc, origin)?;
    if let Some(t) = &user.token {
        if t.expose_secret().is_empty() || !t.expose_secret().bytes().all(|b| b.is_ascii_graphic()) {
            let i = kc.auth_infos.iter().position(|u| u.auth_info.as_ref().is_some_and(|a| std::ptr::eq(a, user))).unwrap_or(0);
            return Err(VetError::Invalid {
                origin: origin.into(),
                path: format!("users[{i}].user.token"),
                why: "must be printable ASCII without spaces",
                at: None,
            });
        }
    }
    Ok(fresh(cluster, user, context, kc.current_context.clone().unwrap_or_default()))
}

/// A new `Kubeconfig` with nothing but the allowed fields of the selected entries.
fn fresh(cluster: &Cluster, user: &AuthInfo, context: &Context, current: String) -> Kubeconfig {
    let cluster_name = context.cluster.clone();
    let user_name = context.user.clone().unwrap_or_default();
    Kubeconfig {
        clusters: vec![NamedCluster {
            name: cluster_name.clone(),
            cluster: Some(Cluster {
                server: cluster.server.clone(),
                certificate_authority_data: cluster.certificate_authority_data.clone(),
                tls_server_name: cluster.tls_server_name.clone(),
                ..Cluster::default()
            }),
            ..NamedCluster::default()
        }],
        auth_infos: vec![NamedAuthInfo {
            name: user_name.clone(),
            auth_info: Some(AuthInfo {
                token: user.token.clone(),
                client_certificate_data: user.client_certificate_data.clone(),
                client_key_data: user.client_key_data.clone(),
                ..AuthInfo::default()
            }),
            ..NamedAuthInfo::default()
        }],
        contexts: vec![NamedContext {
            name: current.clone(),
            context: Some(Context {
                cluster: cluster_name,
                user: Some(user_name),
                namespace: context.namespace.clone(),
                ..Context::default()
            }),
            ..NamedContext::default()
        }],
        current_context: Some(current),
        api_version: Some("v1".into()),
        kind: Some("Config".into()),
        ..Kubeconfig::default()
    }
}

fn decode(data: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(data.trim()).ok()
}

/// A kube-rs client for a vetted kubeconfig's current context. The `kube::Config` is built
/// here field by field rather than by kube's loader, which would take a proxy from the
/// environment and read files; every error is a fixed text.
// Async as kube's loader was, which the callers await; building the config by hand needs no I/O.
#[allow(clippy::unused_async)]
pub async fn client(kc: Kubeconfig, origin: &str) -> Result<kube::Client, VetError> {
    let config = config(&kc, origin)?;
    let builder = kube::client::ClientBuilder::try_from(config).map_err(|_| VetError::Unusable {
        origin: origin.into(),
        what: "the CA, client certificate or key could not be loaded, or the token is not a valid header value",
    })?;
    Ok(builder.with_layer(&super::response_limits::ResponseLimitsLayer).build())
}

/// The `kube::Config` for a kubeconfig's current context, from its allowed fields only.
fn config(kc: &Kubeconfig, origin: &str) -> Result<kube::Config, VetError> {
    check_typed(kc, origin)?;
    let (cluster, user, context) = select(kc, origin)?;
    let unusable = |what| VetError::Unusable { origin: origin.into(), what };
    let server = cluster.server.as_deref().unwrap_or_default();
    let url = server.parse().map_err(|_| unusable("the server is not a URL"))?;
    let mut config = kube::Config::new(url);
    if !matches!(config.cluster_url.scheme_str(), Some("https" | "http")) || config.cluster_url.host().is_none() {
        return Err(unusable("the server must be an http or https URL with a host"));
    }
    // Credentials in the URL would ride along in every error message that quotes it.
    if config.cluster_url.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(unusable("the server URL must not hold credentials"));
    }
    if let Some(ca) = &cluster.certificate_authority_data {
        let pem = decode(ca).ok_or_else(|| unusable("certificate-authority-data is not base64"))?;
        let certs: Vec<Vec<u8>> = pem::parse_many(&pem)
            .map_err(|_| unusable("certificate-authority-data is not PEM"))?
            .into_iter()
            .filter(|p| p.tag() == "CERTIFICATE")
            .map(pem::Pem::into_contents)
            .collect();
        if certs.is_empty() {
            return Err(unusable("certificate-authority-data holds no certificate"));
        }
        config.root_cert = Some(certs);
    }
    config.tls_server_name.clone_from(&cluster.tls_server_name);
    if let Some(ns) = &context.namespace {
        config.default_namespace.clone_from(ns);
    }
    let cert = user.client_certificate_data.as_deref();
    let key = user.client_key_data.as_ref().map(|k| k.expose_secret().to_owned());
    match (cert, &key) {
        (Some(_), None) | (None, Some(_)) => {
            return Err(unusable("client-certificate-data and client-key-data go together"));
        }
        (Some(c), Some(k)) if decode(c).is_none() || decode(k).is_none() => {
            return Err(unusable("client-certificate-data or client-key-data is not base64"));
        }
        _ => {}
    }
    // Whoever writes the secret picks where the controller's requests go, and a few hundred
    // characters of the answer end up in status.yaml: the server is checked as a target, not
    // only as a place to send the token. Over plain http a token crosses the LAN readable by
    // anyone on it, and a server that answers with no TLS can be anything on the network (the
    // metadata service, a node's own ports); a loopback server (a port-forward, a test) stays
    // on the host. The texts name the field, never its value.
    let server_is = |why| {
        let i = kc.clusters.iter().position(|c| c.cluster.as_ref().is_some_and(|x| std::ptr::eq(x, cluster))).unwrap_or(0);
        VetError::Invalid { origin: origin.into(), path: format!("clusters[{i}].cluster.server"), why, at: None }
    };
    let host = config.cluster_url.host().unwrap_or_default();
    if config.cluster_url.scheme_str() == Some("http") && !is_loopback(host) {
        return Err(server_is("uses plain http, which meshnet allows only to a loopback address: use https"));
    }
    if let Some(why) = no_api_server_at(host) {
        return Err(server_is(why));
    }
    config.auth_info = AuthInfo {
        token: user.token.as_ref().map(|t| SecretString::from(t.expose_secret().to_owned())),
        client_certificate_data: cert.map(str::to_owned),
        client_key_data: key.map(SecretString::from),
        ..AuthInfo::default()
    };
    Ok(config)
}

/// Why no other cluster's API server can be at `host` (a URL's host, IPv6 in brackets), if
/// it is an address no API server has: 0.0.0.0 reaches this host, 169.254.169.254 the cloud
/// metadata service. The address is read as the resolver reads it: `getaddrinfo` takes
/// `2852039166` or `0xa9fea9fe` for 169.254.169.254 too. A name is the resolver's to answer.
fn no_api_server_at(host: &str) -> Option<&'static str> {
    let ip = if let Some(inner) = host.strip_prefix('[') {
        // A zone (`%25eth0`) or anything else a resolver might still make an address of is refused.
        let Some(ip) = inner.strip_suffix(']').and_then(|h| h.parse::<std::net::Ipv6Addr>().ok()) else {
            return Some("is a bracketed host that is not a plain IPv6 address");
        };
        std::net::IpAddr::V6(ip)
    } else {
        let host = host.strip_suffix('.').unwrap_or(host);
        host.parse::<std::net::IpAddr>().ok().or_else(|| inet_aton(host).map(std::net::IpAddr::V4))?
    };
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) if v4.octets()[0] == 0 => Some("is an unspecified address (0.0.0.0/8), which reaches this host"),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => Some("is an unspecified address (::), which reaches this host"),
        std::net::IpAddr::V4(v4) if v4.is_link_local() => {
            Some("is a link-local address (169.254.0.0/16), where the cloud metadata service answers")
        }
        std::net::IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("is a link-local address (fe80::/10)"),
        std::net::IpAddr::V4(v4) if v4.is_broadcast() => Some("is the broadcast address"),
        ip if ip.is_multicast() => Some("is a multicast address"),
        _ => None,
    }
}

/// The IPv4 address glibc's `inet_aton` (and with it `getaddrinfo`) reads in `s`, which no
/// IP parser of Rust's does: one to four parts, each decimal, octal (a leading `0`) or hex
/// (`0x`), the last one filling the bytes the others leave. Taking a little more than glibc
/// does only refuses a name no DNS has.
fn inet_aton(s: &str) -> Option<std::net::Ipv4Addr> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() > 4 {
        return None;
    }
    let mut addr: u64 = 0;
    for (i, part) in parts.iter().enumerate() {
        let (digits, radix) = match part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            Some(hex) => (hex, 16),
            None if part.len() > 1 && part.starts_with('0') => (&part[1..], 8),
            None => (*part, 10),
        };
        if digits.starts_with(['+', '-']) {
            return None;
        }
        let value = if digits.is_empty() && radix == 16 { 0 } else { u64::from_str_radix(digits, radix).ok()? };
        // The last part fills the bytes left: 4 of them after no dot, 1 after three.
        let bits = if i + 1 == parts.len() { 8 * (4 - i) } else { 8 };
        if value >> bits != 0 {
            return None;
        }
        addr = addr << bits | value;
    }
    u32::try_from(addr).ok().map(std::net::Ipv4Addr::from)
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "s3cr3t-T0KEN-4f9c2a7e";

    fn kubeconfig(user: &str, cluster_extra: &str) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: cluster2
  cluster:
    server: https://192.0.2.2:6443
    certificate-authority-data: Zm9v{cluster_extra}
users:
- name: cluster2
  user:
{user}
contexts:
- name: cluster2
  context: {{cluster: cluster2, user: cluster2}}
current-context: cluster2
"
        )
    }

    /// What `istioctl x create-remote-secret` writes.
    const ISTIOCTL: &str = "apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: Zm9v
    server: https://192.0.2.2:6443
  name: cluster2
contexts:
- context:
    cluster: cluster2
    user: cluster2
  name: cluster2
current-context: cluster2
kind: Config
preferences: {}
users:
- name: cluster2
  user:
    token: s3cr3t-T0KEN-4f9c2a7e
";

    /// Refused, for the given reason, and without the token or the smuggled command or path.
    fn refused(text: &str, reason: &str) -> String {
        let e = vet(text, "istio-system/remote[cluster2]").expect_err(text);
        let msg = e.to_string();
        assert!(msg.contains(reason), "want {reason:?} in: {msg}");
        for secret in [TOKEN, "/bin/sh", "/tmp/pwned", "/var/run/secrets", "evil"] {
            assert!(!msg.contains(secret), "{secret} leaks into: {msg}");
        }
        msg
    }

    /// A text past the bound is refused before it is parsed: a 1 MiB secret of
    /// `extensions: [a, a, ...]` is some 50 MB as a tree while it is checked. The error names
    /// the bound, and nothing of the text.
    #[test]
    fn a_kubeconfig_past_64_kib_is_refused_unparsed() {
        let token = format!("    token: {TOKEN}");
        let pad = (MAX_KUBECONFIG - kubeconfig(&token, "").len()) / 4;
        let most = kubeconfig(&token, &"Zm9v".repeat(pad));
        assert!(most.len() <= MAX_KUBECONFIG && vet(&most, "s").is_ok());
        let over = kubeconfig(&token, &"Zm9v".repeat(pad + 1));
        let msg = refused(&over, "at most 262144 bytes (256 KiB)");
        assert_eq!(msg, "istio-system/remote[cluster2]: the kubeconfig is longer than meshnet reads: at most 262144 bytes (256 KiB)");
        let flood = format!("{ISTIOCTL}extensions: [{}a]\n", "a, ".repeat(350_000));
        refused(&flood, "at most 262144 bytes (256 KiB)");
    }

    #[test]
    fn inline_credentials_pass() {
        assert!(vet(&kubeconfig("    token: c2VjcmV0", ""), "s").is_ok());
        assert!(vet(&kubeconfig("    client-certificate-data: Zm9v\n    client-key-data: YmFy", ""), "s").is_ok());
        let kc = vet(ISTIOCTL, "s").unwrap();
        assert_eq!(kc.current_context.as_deref(), Some("cluster2"));
        assert_eq!(kc.auth_infos[0].auth_info.as_ref().unwrap().token.as_ref().unwrap().expose_secret(), TOKEN);
    }

    #[test]
    fn json_is_yaml_and_vetted_the_same() {
        let ok = format!(
            r#"{{"apiVersion":"v1","kind":"Config","clusters":[{{"name":"c","cluster":{{"server":"https://192.0.2.2:6443"}}}}],
"users":[{{"name":"u","user":{{"token":"{TOKEN}"}}}}],"contexts":[{{"name":"x","context":{{"cluster":"c","user":"u"}}}}],"current-context":"x"}}"#
        );
        assert!(vet(&ok, "s").is_ok());
        let exec = ok.replace(&format!(r#""token":"{TOKEN}""#), r#""exec":{"command":"/bin/sh","args":["-c","touch /tmp/pwned"]}"#);
        refused(&exec, "users[0].user has `exec`");
        let file = ok.replace(&format!(r#""token":"{TOKEN}""#), r#""tokenFile":"/var/run/secrets/kubernetes.io/serviceaccount/token""#);
        refused(&file, "users[0].user has `tokenFile`");
        let dup = ok.replace(&format!(r#""token":"{TOKEN}""#), &format!(r#""token":"{TOKEN}","token":"x""#));
        refused(&dup, "appears twice");
    }

    /// Only the current context's allowed fields reach kube: no other entry, no extension.
    #[test]
    fn the_result_is_built_from_allowed_fields_only() {
        let text = format!(
            "apiVersion: v1
kind: Config
extensions: [{{name: a, extension: {{exec: x}}}}]
clusters:
- name: c
  cluster: {{server: 'https://192.0.2.2:6443', tls-server-name: api.example, extensions: [{{name: client.authentication.k8s.io/exec, extension: {{x: 1}}}}]}}
- name: other
  cluster: {{server: 'https://192.0.2.9:6443'}}
users:
- name: u
  user: {{token: {TOKEN}}}
contexts:
- name: x
  context: {{cluster: c, user: u, namespace: ns}}
current-context: x
"
        );
        let kc = vet(&text, "s").unwrap();
        assert_eq!(kc.clusters.len(), 1);
        let c = kc.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(c.server.as_deref(), Some("https://192.0.2.2:6443"));
        assert_eq!(c.tls_server_name.as_deref(), Some("api.example"));
        assert!(c.extensions.is_none() && kc.extensions.is_none());
        assert_eq!(kc.contexts[0].context.as_ref().unwrap().namespace.as_deref(), Some("ns"));
    }

    #[test]
    fn exec_and_friends_are_refused_without_leaking_values() {
        let exec = "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: /bin/touch\n      args: [/tmp/pwned]";
        let msg = refused(&kubeconfig(exec, ""), "users[0].user has `exec`");
        assert!(msg.contains("runs a program") && msg.contains("(line 11, column 5)"), "{msg}");
        for (user, field) in [
            ("    auth-provider: {name: gcp, config: {cmd-path: /bin/sh}}", "auth-provider"),
            ("    tokenFile: /var/run/secrets/token", "tokenFile"),
            ("    client-certificate: /etc/cert.pem\n    client-key: /etc/key.pem", "client-certificate"),
            ("    username: admin\n    password: hunter2", "username"),
            ("    token: abc\n    as: system:admin", "as"),
            ("    token: abc\n    as-groups: [system:masters]", "as-groups"),
        ] {
            let msg = refused(&kubeconfig(user, ""), &format!("users[0].user has `{field}`"));
            assert!(!msg.contains("hunter2") && !msg.contains("system:"), "{msg}");
        }
        for (extra, field) in [
            ("\n    proxy-url: http://evil:3128", "proxy-url"),
            ("\n    certificate-authority: /etc/ca.pem", "certificate-authority"),
            ("\n    insecure-skip-tls-verify: true", "insecure-skip-tls-verify"),
        ] {
            refused(&kubeconfig("    token: abc", extra), &format!("clusters[0].cluster has `{field}`"));
        }
    }

    /// YAML that means one thing to one reader and another to the next is refused wherever it
    /// is, for both ways in: a program to run and a file to read.
    #[test]
    fn merge_keys_anchors_aliases_and_tags_are_refused() {
        for (smuggled, what) in [
            ("{apiVersion: client.authentication.k8s.io/v1, command: /bin/sh, args: [-c, touch /tmp/pwned]}", "exec"),
            ("/var/run/secrets/kubernetes.io/serviceaccount/token", "tokenFile"),
        ] {
            let field = format!("{what}: {smuggled}");
            let base = kubeconfig("    token: abc", "");
            let users = |with: &str| base.replace("- name: cluster2\n  user:\n    token: abc\n", with);
            let cases = [
                // The reported bypass: a whole user sits under an anchor elsewhere and is merged
                // into the list, where a check that does not expand merges sees no `user` at all.
                (
                    format!(
                        "preferences:\n  extensions:\n  - name: d\n    extension: &evil {{name: cluster2, user: {{{field}}}}}\n{}",
                        users("- <<: *evil\n")
                    ),
                    "anchor",
                ),
                (users(&format!("- name: cluster2\n  <<: {{user: {{{field}}}}}\n")), "merge key"),
                (
                    base.replace("users:\n- name: cluster2\n  user:\n    token: abc\n", &format!("<<: {{users: [{{name: cluster2, user: {{{field}}}}}]}}\n")),
                    "merge key",
                ),
                (
                    format!("x-defaults: &evil\n  {field}\n{}", kubeconfig("    <<: *evil\n    token: abc", "")),
                    "anchor",
                ),
                (format!("preferences:\n  extensions:\n  - name: d\n    extension: &evil {{{field}}}\n{}", kubeconfig("    <<: *evil", "")), "anchor"),
                // A merge needs no anchor.
                (kubeconfig(&format!("    <<: {{{field}}}\n    token: abc"), ""), "merge key"),
                (kubeconfig(&format!("    <<: [{{{field}}}]"), ""), "merge key"),
                (kubeconfig(&format!("    ? <<\n    : {{{field}}}"), ""), "merge key"),
                (kubeconfig(&format!("    \"<<\": {{{field}}}"), ""), "merge key"),
                (kubeconfig(&format!("    !!merge <<: {{{field}}}"), ""), "tag"),
                // An anchor alone is refused, so no alias can reach it.
                (kubeconfig(&format!("    token: &t abc\n    {field}"), ""), "anchor"),
                (kubeconfig("    token: *t", ""), "alias"),
                (kubeconfig(&format!("    !!str {field}"), ""), "tag"),
                (kubeconfig(&format!("    {what}: !!str {smuggled}"), ""), "tag"),
                (kubeconfig("    token: !!binary YWJj", ""), "tag"),
                (format!("%TAG !e! tag:example.com,2000:\n---\n{}", kubeconfig("    token: !e!x abc", "")), "tag"),
                (format!("!!map\n{}", kubeconfig("    token: abc", "")), "tag"),
                // First-wins and last-wins readers disagree on duplicates.
                (kubeconfig(&format!("    token: abc\n    token: abc\n    {field}"), ""), "appears twice"),
                (format!("{}users:\n- name: cluster2\n  user:\n    {field}\n", kubeconfig("    token: abc", "")), "appears twice"),
                // kube merges documents, first wins per name.
                (format!("{}---\n{}", kubeconfig("    token: abc", ""), kubeconfig(&format!("    {field}"), "")), "more than one YAML document"),
                (format!("---\n{}---\n{}", kubeconfig(&format!("    {field}"), ""), kubeconfig("    token: abc", "")), "more than one YAML document"),
            ];
            // The reported bypasses are real: kube's own parser expands the merges.
            for (text, _) in &cases[..3] {
                let kube_sees = Kubeconfig::from_yaml(text).unwrap();
                let user = kube_sees.auth_infos[0].auth_info.as_ref().unwrap();
                assert!(user.exec.is_some() || user.token_file.is_some(), "kube does not see the smuggled {what} in:\n{text}");
            }
            for (text, reason) in cases {
                refused(&text, reason);
            }
        }
    }

    #[test]
    fn unknown_fields_are_refused_at_every_level() {
        let base = kubeconfig("    token: abc", "");
        for (text, place) in [
            (format!("evil: 1\n{base}"), "the top level has an unknown key"),
            (base.replace("- name: cluster2\n  cluster:", "- name: cluster2\n  evil: 1\n  cluster:"), "clusters[0] has an unknown key"),
            (base.replace("    server:", "    evil: 1\n    server:"), "clusters[0].cluster has an unknown key"),
            (base.replace("- name: cluster2\n  user:", "- name: cluster2\n  evil: 1\n  user:"), "users[0] has an unknown key"),
            (base.replace("    token: abc", "    token: abc\n    evil: 1"), "users[0].user has an unknown key"),
            (base.replace("  context: {", "  evil: 1\n  context: {"), "contexts[0] has an unknown key"),
            (base.replace("user: cluster2}", "user: cluster2, evil: 1}"), "contexts[0].context has an unknown key"),
            (format!("preferences: {{evil: 1}}\n{base}"), "preferences has an unknown key"),
            (base.replace("    server:", "    disable-compression: true\n    server:"), "has `disable-compression`"),
        ] {
            refused(&text, place);
        }
        // An unknown key's own text is never quoted: it may be secret content.
        let msg = refused(&base.replace("    token: abc", &format!("    token: abc\n    {TOKEN}: 1")), "an unknown key");
        assert!(!msg.contains(TOKEN), "{msg}");
    }

    #[test]
    fn the_typed_config_is_checked_again_before_kube_sees_it() {
        let mut kc = vet(ISTIOCTL, "s").unwrap();
        kc.auth_infos[0].auth_info.as_mut().unwrap().exec = Some(kube::config::ExecConfig {
            command: Some("/bin/sh".into()),
            ..Default::default()
        });
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let e = rt.block_on(client(kc, "s")).err().unwrap();
        assert!(e.to_string().contains("users[0].user has `exec`"), "{e}");
        let mut kc = vet(ISTIOCTL, "s").unwrap();
        kc.auth_infos[0].auth_info.as_mut().unwrap().token_file = Some("/var/run/secrets/x".into());
        let e = rt.block_on(client(kc, "s")).err().unwrap();
        assert!(e.to_string().contains("`tokenFile`"), "{e}");
        let mut kc = vet(ISTIOCTL, "s").unwrap();
        kc.other.insert("evil".into(), serde_json::json!(1));
        assert!(rt.block_on(client(kc, "s")).is_err());
        assert!(rt.block_on(client(vet(ISTIOCTL, "s").unwrap(), "s")).is_err(), "Zm9v is no PEM certificate");
    }

    /// A wrongly typed field next to a token: the error says where and why, and holds no
    /// byte of the token and no snippet of the text, whichever check finds it.
    #[test]
    fn errors_name_the_field_never_the_content() {
        for (text, place) in [
            (ISTIOCTL.replace("    server: https://192.0.2.2:6443", &format!("    server: [{TOKEN}]")), "`clusters[0].cluster.server` must be a string"),
            (ISTIOCTL.replace("    token: ", "    token:\n      x: "), "`users[0].user.token` must be a string"),
            (ISTIOCTL.replace("preferences: {}", &format!("preferences: {{colors: {TOKEN}}}")), "`preferences.colors` does not have the type"),
            (ISTIOCTL.replace("  name: cluster2\ncontexts", "  name: [x]\ncontexts"), "`clusters[0].name` must be a string"),
            (ISTIOCTL.replace("users:\n", &format!("users: {TOKEN}\nx:\n")), "`users` must be a list"),
            (format!("{ISTIOCTL}  - {TOKEN}\n"), "not valid YAML"),
            (ISTIOCTL.replace(&format!("token: {TOKEN}"), &format!("token: \"{TOKEN}")), "not valid YAML"),
            (ISTIOCTL.replace("token: s3cr3t", "token: s3 cr3t"), "must be printable ASCII"),
        ] {
            let e = vet(&text, "istio-system/remote[cluster2]").expect_err(&text);
            let msg = e.to_string();
            assert!(msg.contains(place), "want {place:?} in: {msg}");
            assert!(!msg.contains(TOKEN) && !msg.contains("s3cr3t") && !msg.contains("T0KEN"), "token leaks: {msg}");
            assert!(!format!("{e:?}").contains("s3cr3t"), "token leaks into Debug: {e:?}");
        }
        assert!(vet("just text", "s").unwrap_err().to_string().contains("`the document` must be a mapping"));
        assert!(vet("", "s").unwrap_err().to_string().contains("empty kubeconfig"));
        let e = vet(&ISTIOCTL.replace("preferences: {}", "preferences: {colors: maybe}"), "s").unwrap_err();
        assert!(e.to_string().contains("(line 14, column"), "{e}");
    }

    /// Nothing of the client's configuration comes from this host: no proxy (kube's loader
    /// would take `HTTPS_PROXY`), no file, no program, no impersonation, TLS verified.
    #[test]
    fn the_client_config_holds_nothing_local() {
        let text = ISTIOCTL.replace("    certificate-authority-data: Zm9v\n", "").replace(
            "    token: s3cr3t-T0KEN-4f9c2a7e",
            "    token: s3cr3t-T0KEN-4f9c2a7e\n    client-certificate-data: Zm9v\n    client-key-data: YmFy",
        );
        let c = config(&vet(&text, "s").unwrap(), "s").unwrap();
        assert_eq!(c.cluster_url.to_string(), "https://192.0.2.2:6443/");
        assert!(c.proxy_url.is_none() && c.root_cert_file.is_none() && c.root_cert.is_none());
        assert!(!c.accept_invalid_certs && c.headers.is_empty());
        let a = &c.auth_info;
        assert_eq!(a.token.as_ref().unwrap().expose_secret(), TOKEN);
        assert_eq!(a.client_certificate_data.as_deref(), Some("Zm9v"));
        assert_eq!(a.client_key_data.as_ref().unwrap().expose_secret(), "YmFy");
        assert!(a.token_file.is_none() && a.exec.is_none() && a.auth_provider.is_none());
        assert!(a.client_certificate.is_none() && a.client_key.is_none() && a.username.is_none() && a.password.is_none());
        assert!(a.impersonate.is_none() && a.impersonate_groups.is_none() && a.impersonate_uid.is_none());
        assert!(a.impersonate_user_extra.is_none() && a.other.is_empty());
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        for depth in [100, 300, 100_000] {
            let deep = format!("extensions: {}{}\n{ISTIOCTL}", "[".repeat(depth), "]".repeat(depth));
            let _ = vet(&deep, "s");
        }
        assert!(vet(&format!("extensions: {}{}\n{ISTIOCTL}", "[".repeat(100_000), "]".repeat(100_000)), "s").is_err());
    }

    #[test]
    fn client_errors_are_fixed_texts() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let bad_ca = |ca: &str| ISTIOCTL.replace("certificate-authority-data: Zm9v", &format!("certificate-authority-data: {ca}"));
        let body = base64::engine::general_purpose::STANDARD.encode(TOKEN);
        let pem = base64::engine::general_purpose::STANDARD.encode(format!("-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n"));
        for (text, what) in [
            (bad_ca(&format!("{TOKEN}!")), "not base64"),
            (bad_ca(&pem), "could not be loaded"),
            (ISTIOCTL.replace("https://192.0.2.2:6443", &format!("socks5://{TOKEN}")), "http or https"),
            (ISTIOCTL.replace("https://192.0.2.2:6443", &format!("https://admin:{TOKEN}@192.0.2.2:6443")), "must not hold credentials"),
        ] {
            let e = rt.block_on(client(vet(&text, "s").unwrap(), "s")).err().unwrap().to_string();
            assert!(e.contains(what) && !e.contains("s3cr3t") && !e.contains(&body), "{e}");
        }
        let no_ca = ISTIOCTL.replace("    certificate-authority-data: Zm9v\n", "").replace("https://", "http://");
        let e = rt.block_on(client(vet(&no_ca, "s").unwrap(), "s")).err().unwrap().to_string();
        assert!(e.contains("only to a loopback address") && !e.contains(TOKEN), "{e}");
        for server in ["http://127.0.0.1:6443", "http://127.0.0.53:80", "http://[::1]:6443", "http://localhost:8080"] {
            let local = no_ca.replace("http://192.0.2.2:6443", server);
            assert!(rt.block_on(client(vet(&local, "s").unwrap(), "s")).is_ok(), "{server}");
        }
        for server in ["http://10.0.0.1:6443", "http://[::ffff:127.0.0.1]:6443", "http://localhost.evil:80", "http://0.0.0.0:80"] {
            let remote = no_ca.replace("http://192.0.2.2:6443", server);
            assert!(rt.block_on(client(vet(&remote, "s").unwrap(), "s")).is_err(), "{server}");
        }
        let tokenless = no_ca.replace(&format!("  user:\n    token: {TOKEN}\n"), "  user: {}\n");
        assert_ne!(tokenless, no_ca);
        assert!(rt.block_on(client(vet(&tokenless.replace("192.0.2.2", "127.0.0.1"), "s").unwrap(), "s")).is_ok());
    }

    /// Whoever writes a remote secret chooses where the controller sends its requests, and the
    /// answer's first few hundred characters land in `status.yaml`: no plain http past the
    /// host, with a token or without, and no address no other cluster's API server has (the
    /// metadata service, this host through 0.0.0.0, a multicast group), in whatever spelling
    /// the resolver takes. The error names the field, never the address.
    #[test]
    fn servers_no_remote_api_server_has_are_refused() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let with = |server: &str, token: bool| {
            let text = ISTIOCTL.replace("    certificate-authority-data: Zm9v\n", "").replace("https://192.0.2.2:6443", server);
            let text = if token { text } else { text.replace(&format!("  user:\n    token: {TOKEN}\n"), "  user: {}\n") };
            rt.block_on(client(vet(&text, "s").unwrap(), "s")).map(|_| ())
        };
        for server in ["http://192.0.2.2:6443", "http://10.0.0.1", "http://api.example:80", "http://169.254.169.254"] {
            let e = with(server, false).unwrap_err().to_string();
            assert!(e.contains("`clusters[0].cluster.server` uses plain http") && e.contains("only to a loopback address"), "{server}: {e}");
        }
        let mut texts = std::collections::BTreeSet::new();
        for server in [
            "https://169.254.169.254",
            "https://169.254.0.1:6443",
            "https://[fe80::1]:6443",
            "https://[febf::1]",
            "https://[::ffff:169.254.169.254]",
            "https://0.0.0.0:6443",
            "https://0.1.2.3",
            "https://[::]:6443",
            "https://[::ffff:0.0.0.0]",
            "https://224.0.0.1",
            "https://239.255.255.250:1900",
            "https://[ff02::1]",
            "https://255.255.255.255",
            // What getaddrinfo takes for an address though no IP parser does.
            "https://2852039166",
            "https://0xa9fea9fe",
            "https://0251.0376.0251.0376",
            "https://169.254.43518",
            "https://0",
            "https://0x0.0",
            "https://[fe80::1%25eth0]",
        ] {
            for token in [true, false] {
                let Err(e) = with(server, token) else { panic!("{server} accepted") };
                let msg = e.to_string();
                assert!(msg.starts_with("s: `clusters[0].cluster.server` is "), "{server}: {msg}");
                let authority = server.trim_start_matches("https://");
                // `0` is in any text; the count of texts below shows it is not taken from the value.
                assert!((authority.len() < 2 || !msg.contains(authority)) && !msg.contains(TOKEN), "{server} leaks into: {msg}");
                texts.insert(msg);
            }
        }
        // One fixed text a kind, whatever the spelling: nothing of the value is in them.
        assert_eq!(texts.len(), 7, "{texts:#?}");
        // The index is the entry's own in the kubeconfig it checks.
        let second = ISTIOCTL
            .replace("    certificate-authority-data: Zm9v\n", "")
            .replace("clusters:\n", "clusters:\n- cluster: {server: 'https://192.0.2.9'}\n  name: other\n")
            .replace("https://192.0.2.2:6443", "https://169.254.169.254");
        let e = rt.block_on(client(vet(&second, "s").unwrap(), "s")).err().unwrap().to_string();
        assert!(e.contains("`clusters[0].cluster.server`"), "{e}");
        let e = config(&vet(&second, "s").unwrap(), "s").err().unwrap().to_string();
        assert!(e.contains("`clusters[0].cluster.server`"), "the vetted config holds the selected entry alone: {e}");
        let kc: Kubeconfig = serde_saphyr::from_str_with_options(&second, options()).unwrap();
        let e = config(&kc, "s").err().unwrap().to_string();
        assert!(e.contains("`clusters[1].cluster.server`"), "{e}");
        // Addresses an API server may have, and names, which are the resolver's to answer.
        for server in [
            "https://192.0.2.2:6443",
            "https://10.0.0.1",
            "https://169.255.0.1",
            "https://[2001:db8::1]:6443",
            "https://[fec0::1]",
            "https://api.example:6443",
            "https://cafe.de",
            "https://1.2.3.4.example",
            "https://127.0.0.1:6443",
            "http://127.0.0.1:6443",
            "http://[::1]:6443",
            "http://localhost:8080",
        ] {
            assert!(with(server, true).is_ok() && with(server, false).is_ok(), "{server}");
        }
    }
}
