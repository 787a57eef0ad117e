//! Remote-cluster credentials from Istio's remote secrets, vetted before kube-rs sees them.
//!
//! A remote secret is written by whoever can create Secrets in istio-system, and a
//! kubeconfig can run programs (exec plugins, auth-provider commands) or read local files.
//! An exec plugin in a remote secret has given remote code execution in a managed Istio
//! before. So only inline credentials pass: a bearer token, an inline client certificate and
//! key, an inline CA. Everything else is refused by name, with the cluster or user it was
//! found in and never the secret's values.

use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::Value;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VetError {
    #[error("{origin}: not a kubeconfig: {reason}")]
    Parse { origin: String, reason: String },
    #[error("{origin}: {place} uses `{field}`, which meshnet refuses ({why}); use an inline token, client certificate/key or CA")]
    Refused { origin: String, place: String, field: String, why: &'static str },
    #[error("{origin}: {what}")]
    Incomplete { origin: String, what: String },
}

const CLUSTER_ALLOWED: &[&str] = &["server", "certificate-authority-data", "tls-server-name", "extensions"];
const USER_ALLOWED: &[&str] = &["token", "client-certificate-data", "client-key-data", "extensions"];

fn why(field: &str) -> &'static str {
    match field {
        "exec" => "it runs a program on this host",
        "auth-provider" => "its plugins can run commands",
        "tokenFile" | "client-certificate" | "client-key" | "certificate-authority" => "it reads a local file",
        "proxy-url" => "it redirects API traffic through a proxy",
        "insecure-skip-tls-verify" => "it disables server verification",
        "username" | "password" => "basic auth is not supported",
        f if f.starts_with("act-as") || f.starts_with("as") => "impersonation is not allowed",
        _ => "it is not on meshnet's allow-list",
    }
}

/// Checks one kubeconfig (YAML or JSON text) and parses it. `source` names where it came
/// from for errors, e.g. `istio-system/istio-remote-secret-cluster2[cluster2]`.
pub fn vet(text: &str, source: &str) -> Result<Kubeconfig, VetError> {
    let raw: Value = serde_yaml::from_str(text).map_err(|e| VetError::Parse { origin: source.into(), reason: e.to_string() })?;
    let refuse = |place: String, field: &str| VetError::Refused {
        origin: source.into(),
        place,
        field: field.into(),
        why: why(field),
    };
    for (list, inner, allowed, kind) in
        [("clusters", "cluster", CLUSTER_ALLOWED, "cluster"), ("users", "user", USER_ALLOWED, "user")]
    {
        for item in raw.get(list).and_then(Value::as_array).into_iter().flatten() {
            let name = item.get("name").and_then(Value::as_str).unwrap_or("?");
            let Some(obj) = item.get(inner).and_then(Value::as_object) else { continue };
            for key in obj.keys() {
                if !allowed.contains(&key.as_str()) {
                    return Err(refuse(format!("{kind} {name:?}"), key));
                }
            }
        }
    }
    let kc = Kubeconfig::from_yaml(text).map_err(|e| VetError::Parse { origin: source.into(), reason: e.to_string() })?;
    if kc.clusters.is_empty() || kc.auth_infos.is_empty() {
        return Err(VetError::Incomplete { origin: source.into(), what: "needs a cluster and a user".into() });
    }
    Ok(kc)
}

/// A kube-rs client for a vetted kubeconfig, with its current context.
pub async fn client(kc: Kubeconfig, source: &str) -> Result<kube::Client, VetError> {
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| VetError::Incomplete { origin: source.into(), what: format!("unusable kubeconfig: {e}") })?;
    kube::Client::try_from(config).map_err(|e| VetError::Incomplete { origin: source.into(), what: format!("client: {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn inline_credentials_pass() {
        assert!(vet(&kubeconfig("    token: c2VjcmV0", ""), "s").is_ok());
        assert!(vet(&kubeconfig("    client-certificate-data: Zm9v\n    client-key-data: YmFy", ""), "s").is_ok());
    }

    #[test]
    fn exec_and_friends_are_refused_without_leaking_values() {
        let exec = "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: /bin/touch\n      args: [/tmp/pwned]";
        let e = vet(&kubeconfig(exec, ""), "istio-system/remote[cluster2]").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("user \"cluster2\" uses `exec`"), "{msg}");
        assert!(msg.contains("runs a program"), "{msg}");
        assert!(!msg.contains("/tmp/pwned"));
        for (user, field) in [
            ("    auth-provider: {name: gcp, config: {cmd-path: /bin/sh}}", "auth-provider"),
            ("    tokenFile: /var/run/secrets/token", "tokenFile"),
            ("    client-certificate: /etc/cert.pem\n    client-key: /etc/key.pem", "client-certificate"),
            ("    username: admin\n    password: hunter2", "password"),
            ("    token: abc\n    as: system:admin", "as"),
        ] {
            let msg = vet(&kubeconfig(user, ""), "s").unwrap_err().to_string();
            assert!(msg.contains(&format!("`{field}`")), "{field}: {msg}");
            assert!(!msg.contains("hunter2") && !msg.contains("abc\n"));
        }
        for (extra, field) in [
            ("\n    proxy-url: http://evil:3128", "proxy-url"),
            ("\n    certificate-authority: /etc/ca.pem", "certificate-authority"),
            ("\n    insecure-skip-tls-verify: true", "insecure-skip-tls-verify"),
        ] {
            let msg = vet(&kubeconfig("    token: abc", extra), "s").unwrap_err().to_string();
            assert!(msg.contains(&format!("cluster \"cluster2\" uses `{field}`")), "{msg}");
        }
    }
}
