//! deploy/ against Kubernetes 1.18, offline: every manifest, and what `kubectl apply -k
//! deploy/overlays/NAME` would apply for each overlay (rendered by the kustomize that kubectl
//! 1.18 embeds), validated by
//! `kubernetes-validate` against its bundled 1.18 schemas in strict mode, which rejects
//! unknown fields (a typo) and fields or API versions newer than 1.18. Negative checks prove
//! the validator is that strict. `cargo xtask setup` installs both tools under target/tools
//! (see xtask/src/manifests.rs); nothing here uses the network.
//!
//! Also: the ConfigMap holds a config meshnet accepts, the workloads' arguments parse, the
//! probes ask the --health-socket in a volume of the pod's own, and the RBAC grants exactly the
//! verbs the code calls.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use meshnet_tests::{container, strings};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn deploy() -> PathBuf {
    root().join("deploy")
}

/// A tool from target/tools, or from an environment variable; fails clearly when missing.
fn tool(var: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(var).map_or_else(|| root().join(default), PathBuf::from);
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask setup` (it installs the manifest validator and kubectl 1.20 under \
         target/tools), or set {var}",
        path.display()
    );
    path
}

fn validator() -> PathBuf {
    tool("MESHNET_KUBERNETES_VALIDATE", "target/tools/venv/bin/kubernetes-validate")
}

fn kubectl() -> PathBuf {
    tool("MESHNET_KUBECTL", "target/tools/kubectl-1.20/usr/bin/kubectl")
}

/// What the validator said about one file.
#[derive(Debug, Default)]
struct Verdict {
    /// `kind/name` of every resource that passed against 1.18.
    passed: BTreeSet<String>,
    /// Every other line: ERROR (invalid), WARN (no 1.18 schema for that kind and API version,
    /// which the validator itself lets pass), FATAL.
    problems: Vec<String>,
}

fn validate(path: &Path) -> Verdict {
    let out = Command::new(validator())
        .args(["--kubernetes-version", "1.18.0", "--strict"])
        .arg(path)
        .output()
        .expect("running kubernetes-validate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut v = Verdict::default();
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        let passed = line
            .strip_prefix("INFO ")
            .and_then(|l| l.split_once(" passed for resource "))
            .and_then(|(_, rest)| rest.strip_suffix(" against version 1.18"));
        match passed {
            Some(resource) => {
                v.passed.insert(resource.to_string());
            }
            None => v.problems.push(line.to_string()),
        }
    }
    if !out.status.success() && v.problems.is_empty() {
        v.problems.push(format!("exit status {}: {}", out.status, String::from_utf8_lossy(&out.stderr)));
    }
    v
}

fn assert_valid(path: &Path) -> BTreeSet<String> {
    let v = validate(path);
    assert!(v.problems.is_empty(), "{} is not valid for Kubernetes 1.18:\n{}", path.display(), v.problems.join("\n"));
    assert!(!v.passed.is_empty(), "{}: the validator found no resource", path.display());
    v.passed
}

/// The full manifests in deploy/ and deploy/base/: not the kustomizations, not meshnet's own
/// config file, not the overlays' partial patches (checked through the rendering).
fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = [deploy(), deploy().join("base")]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .filter(|p| !matches!(p.file_name().and_then(|n| n.to_str()), Some("kustomization.yaml" | "config.example.yaml")))
        .collect();
    files.sort();
    files
}

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("meshnet-manifests-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `kubectl kustomize DIR` with kubectl 1.20, whose kustomize (v2.0.3) is kubectl 1.18's.
fn render(dir: &Path) -> String {
    let out = Command::new(kubectl()).arg("kustomize").arg(dir).output().expect("running kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The objects `kubectl apply -k deploy/overlays/NAME` creates, for either overlay.
const KUSTOMIZED: [&str; 17] = [
    "namespace/meshnet",
    "configmap/meshnet-config",
    "serviceaccount/meshnet-agent",
    "clusterrole/meshnet-agent",
    "clusterrolebinding/meshnet-agent",
    "role/meshnet-agent",
    "rolebinding/meshnet-agent",
    "daemonset/meshnet-agent",
    "service/meshnet-tunnel",
    "serviceaccount/meshnet-controller",
    "role/meshnet-controller",
    "rolebinding/meshnet-controller",
    "clusterrole/meshnet-controller",
    "clusterrolebinding/meshnet-controller",
    "deployment/meshnet-controller",
    // The controller's Role and RoleBinding exist twice (istio-system and meshnet); the
    // validator names them by kind and name only.
    "role/meshnet-controller",
    "rolebinding/meshnet-controller",
];

#[test]
fn every_manifest_is_valid_for_kubernetes_1_18() {
    let files = manifests();
    assert!(files.len() >= 8, "expected the deploy manifests, found {files:?}");
    let mut all = BTreeSet::new();
    for f in &files {
        all.extend(assert_valid(f));
    }
    for want in KUSTOMIZED.iter().chain(&["role/meshnet-mesh-networks", "clusterrole/meshnet-remote-reader", "secret/meshnet-remote-reader-token"]) {
        assert!(all.contains(*want), "{want} is in no manifest; found {all:?}");
    }
}

/// The resources kustomization.yaml lists (a plain `resources:` list of files).
fn kustomization_resources(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("resources:") {
            inside = true;
        } else if inside {
            match line.trim_start().strip_prefix("- ") {
                Some(item) if line.starts_with(' ') => out.push(item.trim().to_string()),
                _ if line.trim().is_empty() || line.trim_start().starts_with('#') => {}
                _ => inside = false,
            }
        }
    }
    out
}

#[test]
fn the_kustomization_lists_every_cluster_manifest() {
    let base = deploy().join("base");
    let text = std::fs::read_to_string(base.join("kustomization.yaml")).unwrap();
    let listed = kustomization_resources(&text);
    assert!(!listed.is_empty(), "no resources in deploy/base/kustomization.yaml");
    for r in &listed {
        assert!(base.join(r).is_file(), "deploy/base/kustomization.yaml lists {r}, which does not exist");
    }
    // Everything in base/ is in it; what is applied on its own lives in deploy/.
    let separate = ["mesh-networks-rbac.yaml", "remote-reader.yaml", "remote-reader-tunnel.yaml", "detach.yaml"];
    for f in manifests() {
        let name = f.file_name().unwrap().to_str().unwrap().to_string();
        let in_base = f.parent() == Some(base.as_path());
        assert!(
            if in_base { listed.contains(&name) } else { separate.contains(&name.as_str()) },
            "{} is neither in base/kustomization.yaml nor one of the manifests applied separately ({separate:?})",
            f.display()
        );
    }
}

/// Renders one overlay as kubectl 1.18 would, validates it, and returns the text.
fn rendered_overlay(name: &str) -> String {
    let scratch = Scratch::new(name);
    let rendered = render(&deploy().join("overlays").join(name));
    let out = scratch.write("rendered.yaml", &rendered);
    let passed = assert_valid(&out);
    let want: BTreeSet<String> = KUSTOMIZED.iter().map(ToString::to_string).collect();
    assert_eq!(passed, want, "kubectl apply -k deploy/overlays/{name} would apply other objects than expected");
    assert!(rendered.contains("image: meshnet:0.1.0"));
    // The patch replaced the capability list and kept the rest of the container.
    for kept in ["- --kube", "mountPath: /sys/fs/bpf/meshnet", "readOnlyRootFilesystem: true", "- ALL", "- /run/meshnet/health.sock"] {
        assert!(rendered.contains(kept), "{name}: {kept} lost:\n{rendered}");
    }
    rendered
}

#[test]
fn the_modern_overlay_renders_with_cap_bpf() {
    assert_eq!(added_capabilities(&rendered_overlay("modern")), ["BPF", "NET_ADMIN", "PERFMON"]);
}

/// The user's stack: ELRepo 5.4 has no CAP_BPF and Docker 19.03 refuses to start a container
/// that asks for it.
#[test]
fn the_centos7_docker19_overlay_renders_without_cap_bpf() {
    assert_eq!(added_capabilities(&rendered_overlay("centos7-docker19")), ["SYS_ADMIN", "NET_ADMIN", "SYS_RESOURCE"]);
}

/// The README's install line is the overlay of the user's stack.
#[test]
fn the_readme_installs_the_users_overlay() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(readme.contains("kubectl apply -k deploy/overlays/centos7-docker19"), "README has no install line for the user's stack");
    for overlay in std::fs::read_dir(deploy().join("overlays")).unwrap() {
        let name = overlay.unwrap().file_name();
        assert!(readme.contains(&format!("deploy/overlays/{}", name.to_str().unwrap())), "README does not name overlay {name:?}");
    }
}

/// The controller, which parses what other clusters send, runs under the runtime's default
/// seccomp profile in both overlays, asked for in the only form Kubernetes 1.18 knows; the
/// agent asks for none (deploy/base/agent.yaml says why).
#[test]
fn the_controller_runs_under_the_runtimes_default_seccomp_profile() {
    const ANNOTATION: &str = "seccomp.security.alpha.kubernetes.io/pod";
    for overlay in ["modern", "centos7-docker19"] {
        let rendered = rendered_overlay(overlay);
        let workloads: Vec<serde_yaml::Value> = documents(&rendered).into_iter().filter(|d| d["kind"] == "Deployment" || d["kind"] == "DaemonSet").collect();
        let profile = |name: &str| {
            let w = workloads.iter().find(|d| d["metadata"]["name"] == name).unwrap_or_else(|| panic!("{overlay}: no {name}"));
            w["spec"]["template"]["metadata"]["annotations"][ANNOTATION].as_str().map(str::to_string)
        };
        assert_eq!(profile("meshnet-controller").as_deref(), Some("runtime/default"), "{overlay}: the controller's pod");
        assert_eq!(profile("meshnet-agent"), None, "{overlay}: the agent's pod");
    }
}

/// The `capabilities.add` list of the agent in rendered YAML (kubectl's block style).
fn added_capabilities(rendered: &str) -> Vec<String> {
    let lines: Vec<&str> = rendered.lines().collect();
    let at = lines.iter().position(|l| l.trim() == "add:").expect("no capabilities.add");
    let indent = lines[at].len() - lines[at].trim_start().len();
    lines[at + 1..]
        .iter()
        .take_while(|l| l.trim_start().starts_with("- ") && l.len() - l.trim_start().len() >= indent)
        .map(|l| l.trim_start().trim_start_matches("- ").to_string())
        .collect()
}

/// The validator is strict: a typo'd field, a field newer than 1.18 and an API version
/// 1.18 does not serve are each refused.
#[test]
fn the_validator_refuses_typos_and_newer_apis() {
    let scratch = Scratch::new("negative");
    let agent = std::fs::read_to_string(deploy().join("base/agent.yaml")).unwrap();
    assert!(agent.contains("      hostNetwork: true\n"));
    let typo = scratch.write("typo.yaml", &agent.replace("      hostNetwork: true\n", "      hostNetwrok: true\n"));
    let v = validate(&typo);
    assert!(v.passed.is_empty(), "a typo'd field passed: {v:?}");
    assert!(v.problems.iter().any(|p| p.starts_with("ERROR") && p.contains("'hostNetwrok' was unexpected")), "{v:?}");

    // securityContext.seccompProfile arrived in 1.19.
    let seccomp = agent.replacen(
        "          securityContext:\n",
        "          securityContext:\n            seccompProfile:\n              type: RuntimeDefault\n",
        1,
    );
    assert_ne!(seccomp, agent);
    let v = validate(&scratch.write("seccomp.yaml", &seccomp));
    assert!(v.problems.iter().any(|p| p.contains("'seccompProfile' was unexpected")), "{v:?}");

    // policy/v1 arrived in 1.21: the validator only warns, and that counts as a problem here.
    let pdb = "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata:\n  name: meshnet\nspec:\n  maxUnavailable: 1\n";
    let v = validate(&scratch.write("pdb.yaml", pdb));
    assert!(v.passed.is_empty() && v.problems.iter().any(|p| p.contains("policy/v1")), "{v:?}");
}

fn read(name: &str) -> String {
    std::fs::read_to_string(deploy().join(name)).unwrap()
}

/// The ConfigMap's `config.yaml`, a literal block scalar.
fn embedded_config(configmap: &str) -> String {
    let mut lines = configmap.lines().skip_while(|l| l.trim() != "config.yaml: |").skip(1);
    let first = lines.next().expect("config.yaml: | is empty");
    let indent = first.len() - first.trim_start().len();
    std::iter::once(first)
        .chain(lines.take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent))
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_configmap_holds_a_valid_config() {
    let text = embedded_config(&read("base/config.yaml"));
    let c = meshnet::config::Config::from_yaml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(c.cluster, "cluster1");
    assert_eq!(c.interfaces, ["veth*"]);
}

/// A container's `args:` list (one `- item` per line, comments skipped).
fn args(manifest: &str) -> Vec<String> {
    let lines: Vec<&str> = manifest.lines().collect();
    let at = lines.iter().position(|l| l.trim() == "args:").expect("no args:");
    lines[at + 1..]
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.starts_with('#'))
        .take_while(|l| l.starts_with("- "))
        .map(|l| l[2..].trim_matches('"').to_string())
        .collect()
}

/// The workloads' arguments are ones `meshnet` accepts: clap parses (and validates) every
/// argument before it acts on a trailing --help.
#[test]
fn the_workloads_arguments_parse() {
    let bin = meshnet_tests::meshnet_bin();
    let health = ["--health-socket", "/run/meshnet/health.sock"];
    for (file, name, want) in [
        ("base/agent.yaml", "agent", vec!["agent", "--config", "/etc/meshnet/config.yaml", "--kube", "--metrics-addr", "127.0.0.1:9464"]),
        (
            "base/controller.yaml",
            "controller",
            vec!["controller", "--leader-election", "true", "--service-cidrs", "10.96.0.0/12", "--metrics-addr", "0.0.0.0:9464"],
        ),
    ] {
        let manifest = read(file);
        let a = args(&manifest);
        assert_eq!(a, [want, health.to_vec()].concat(), "{file}");
        let out = Command::new(&bin).args(&a).arg("--help").output().unwrap();
        assert!(out.status.success(), "{file}: meshnet {a:?} does not parse:\n{}", String::from_utf8_lossy(&out.stderr));
        // Both probes ask the health socket, never the metrics port whose caps anyone who
        // reaches it can fill, and the socket's directory is a volume of the pod's own.
        let c = container(&documents(&manifest)[0], name);
        for (probe, what) in [("livenessProbe", "healthz"), ("readinessProbe", "readyz")] {
            let p = &c[probe];
            assert!(p["httpGet"].is_null() && p["tcpSocket"].is_null(), "{file}: {probe} is not an exec probe");
            let cmd = strings(&p["exec"]["command"]);
            assert_eq!(cmd, ["/usr/local/bin/meshnet", "probe", what, "--socket", health[1]], "{file}: {probe}");
            let out = Command::new(&bin).args(&cmd[1..]).arg("--help").output().unwrap();
            assert!(out.status.success(), "{file}: {probe} {cmd:?} does not parse:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        let mount = c["volumeMounts"].as_sequence().unwrap().iter().find(|m| m["mountPath"] == "/run/meshnet").cloned();
        let mount = mount.unwrap_or_else(|| panic!("{file}: nothing mounted at /run/meshnet"));
        let volumes = documents(&manifest)[0]["spec"]["template"]["spec"]["volumes"].clone();
        let volume = volumes.as_sequence().unwrap().iter().find(|v| v["name"] == mount["name"]).cloned().unwrap();
        assert!(volume["emptyDir"].is_mapping(), "{file}: the health socket's directory is not an emptyDir: {volume:?}");
        assert!(mount["readOnly"].is_null(), "{file}: the health socket's directory is read-only");
    }
    for file in ["base/agent.yaml", "detach.yaml"] {
        let m = read(file);
        assert!(m.contains("path: /sys/fs/bpf/meshnet\n"), "{file}: does not mount /sys/fs/bpf/meshnet");
        assert!(!m.contains("path: /sys/fs/bpf\n") && !m.contains("mountPath: /sys/fs/bpf\n"), "{file}: mounts all of bpffs");
    }
    // The downward-API variables the binary reads.
    assert!(read("base/agent.yaml").contains("- name: NODE_NAME\n              valueFrom:\n                fieldRef:\n                  fieldPath: spec.nodeName"));
    assert!(read("base/controller.yaml").contains("- name: POD_NAME\n              valueFrom:\n                fieldRef:\n                  fieldPath: metadata.name"));
    // The uninstall's command parses too.
    let detach = container(&documents(&read("detach.yaml"))[0], "detach");
    let argv = [strings(&detach["command"]), strings(&detach["args"])].concat();
    assert_eq!(argv, ["/usr/local/bin/meshnet", "detach", "--then-wait"]);
    let out = Command::new(&bin).args(&argv[1..]).arg("--help").output().unwrap();
    assert!(out.status.success(), "detach.yaml: {argv:?} does not parse:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Every rule of every Role and ClusterRole meshnet's own code runs under, and the calls that
/// need it: a verb no call makes fails this test, and so does one the code needs that is gone.
/// A watch (kube's watcher) is a list and a watch; a server-side apply is a patch, and a create
/// when the object is missing.
const RBAC: &[(&str, &str, &[&str], &[&str], &[&str])] = &[
    // (file, Role or ClusterRole namespace/name, resources, resourceNames, verbs)
    // The agent: get its own Node (the datapath-log annotation, source.rs), watch it; watch
    // meshnet-peers.
    ("base/agent-rbac.yaml", "ClusterRole /meshnet-agent", &["nodes"], &[], &["get", "list", "watch"]),
    ("base/agent-rbac.yaml", "Role meshnet/meshnet-agent", &["configmaps"], &["meshnet-peers"], &["list", "watch"]),
    // The controller: watch the remote secrets (mesh-networks lists them) and the istio
    // ConfigMap; watch the Nodes (mesh-networks lists them).
    ("base/controller-rbac.yaml", "Role istio-system/meshnet-controller", &["secrets"], &[], &["list", "watch"]),
    ("base/controller-rbac.yaml", "Role istio-system/meshnet-controller", &["configmaps"], &["istio"], &["list", "watch"]),
    ("base/controller-rbac.yaml", "ClusterRole /meshnet-controller", &["nodes"], &[], &["list", "watch"]),
    // Its ConfigMaps: applied (a create when missing); peers and holds read at start and
    // watched; status only written. The Lease: get, create, replace.
    ("base/controller-rbac.yaml", "Role meshnet/meshnet-controller", &["configmaps"], &[], &["create"]),
    ("base/controller-rbac.yaml", "Role meshnet/meshnet-controller", &["configmaps"], &["meshnet-peers", "meshnet-holds"], &["get", "list", "watch", "patch"]),
    ("base/controller-rbac.yaml", "Role meshnet/meshnet-controller", &["configmaps"], &["meshnet-status"], &["patch"]),
    ("base/controller-rbac.yaml", "Role meshnet/meshnet-controller", &["leases"], &[], &["create"]),
    ("base/controller-rbac.yaml", "Role meshnet/meshnet-controller", &["leases"], &["meshnet-controller"], &["get", "update"]),
    // mesh-networks: get and replace the istio ConfigMap; get the gateway Service, its
    // Endpoints and the Istio namespace, by name.
    ("mesh-networks-rbac.yaml", "Role istio-system/meshnet-mesh-networks", &["configmaps"], &["istio"], &["get", "update"]),
    ("mesh-networks-rbac.yaml", "Role istio-system/meshnet-mesh-networks", &["services", "endpoints"], &["istio-eastwestgateway"], &["get"]),
    ("mesh-networks-rbac.yaml", "ClusterRole /meshnet-mesh-networks", &["namespaces"], &["istio-system"], &["get"]),
];

#[test]
fn the_rbac_grants_exactly_what_the_code_calls() {
    let files: BTreeSet<&str> = RBAC.iter().map(|r| r.0).collect();
    let mut got = Vec::new();
    for file in files {
        for d in documents(&read(file)) {
            let kind = d["kind"].as_str().unwrap_or_default();
            if kind != "Role" && kind != "ClusterRole" {
                continue;
            }
            let who = format!("{kind} {}/{}", d["metadata"]["namespace"].as_str().unwrap_or_default(), d["metadata"]["name"].as_str().unwrap());
            for rule in d["rules"].as_sequence().unwrap() {
                let list = |key: &str| if rule[key].is_null() { Vec::new() } else { strings(&rule[key]) };
                assert!(list("apiGroups").iter().all(|g| g.is_empty() || g == "coordination.k8s.io"), "{file}: {who}: {rule:?}");
                got.push((file.to_string(), who.clone(), list("resources"), list("resourceNames"), list("verbs")));
            }
        }
    }
    let want: Vec<_> = RBAC
        .iter()
        .map(|(f, who, res, names, verbs)| {
            let v = |s: &[&str]| s.iter().map(ToString::to_string).collect::<Vec<_>>();
            ((*f).to_string(), (*who).to_string(), v(res), v(names), v(verbs))
        })
        .collect();
    assert_eq!(got, want, "the RBAC files differ from what the code calls (this test's table says which call needs which verb)");
}

/// The YAML documents of a manifest.
fn documents(text: &str) -> Vec<serde_yaml::Value> {
    text.split("\n---\n").map(|d| serde_yaml::from_str(d).unwrap()).collect()
}

/// `config.yaml`'s commented `tunnel:` section, uncommented.
fn commented_tunnel_section(config: &str) -> String {
    let lines: Vec<&str> = config.lines().collect();
    let at = lines.iter().position(|l| l.trim() == "# tunnel:").expect("config.yaml has no commented tunnel: section");
    lines[at..]
        .iter()
        .take_while(|l| l.trim_start().starts_with("# ") && (l.trim() == "# tunnel:" || l.trim_start().starts_with("#   ")))
        .map(|l| l.trim_start().trim_start_matches("# "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Tunnel mode's port is one value in two places: the meshnet-tunnel Service reserves it as a
/// UDP nodePort for the agents' pods, and the config's `tunnel:` section (commented until tunnel
/// mode is used) decapsulates it. The section, uncommented, is a config meshnet accepts.
#[test]
fn the_tunnel_service_reserves_the_configs_tunnel_port() {
    let svc = &documents(&read("base/tunnel-service.yaml"))[0];
    assert_eq!((svc["kind"].as_str(), svc["metadata"]["name"].as_str()), (Some("Service"), Some("meshnet-tunnel")));
    assert_eq!(svc["metadata"]["namespace"], "meshnet", "the controllers of other clusters look for it in meshnet's namespace");
    assert_eq!(svc["spec"]["type"], "NodePort");
    let ports = svc["spec"]["ports"].as_sequence().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!((ports[0]["name"].as_str(), ports[0]["protocol"].as_str()), (Some("tunnel"), Some("UDP")));
    let node_port = ports[0]["nodePort"].as_u64().unwrap();
    assert!((30_000..=32_767).contains(&node_port), "{node_port} is outside Kubernetes' default NodePort range");
    // It selects the agents' pods.
    let agent = &documents(&read("base/agent.yaml"))[0];
    let pod_labels = &agent["spec"]["template"]["metadata"]["labels"];
    for (k, v) in svc["spec"]["selector"].as_mapping().unwrap() {
        assert_eq!(&pod_labels[k], v, "the selector's {k:?} does not match the agent's pods");
    }

    let configmap = read("base/config.yaml");
    let section = commented_tunnel_section(&embedded_config(&configmap));
    let text = format!("{}\n{section}\n", embedded_config(&configmap));
    let c = meshnet::config::Config::from_yaml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let t = c.tunnel.expect("the uncommented section makes no tunnel settings");
    assert_eq!(u64::from(t.port), node_port, "config.yaml's tunnel.port is not the Service's nodePort");
    // The docs and doctor's fix name the same port and file.
    let ops = std::fs::read_to_string(root().join("docs/operations.md")).unwrap();
    assert!(ops.contains(&format!("nodePort {node_port}")) || ops.contains(&format!("UDP {node_port}")), "docs/operations.md does not name the tunnel port {node_port}");
}

/// A remote joined in tunnel mode lets the reader of remote-reader.yaml read its meshnet-tunnel
/// Service, and nothing else of meshnet's namespace.
#[test]
fn the_remote_reader_may_read_the_tunnel_service_only() {
    let docs = documents(&read("remote-reader-tunnel.yaml"));
    let role = docs.iter().find(|d| d["kind"] == "Role").unwrap();
    assert_eq!(role["metadata"]["namespace"], "meshnet");
    let rules = role["rules"].as_sequence().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0]["resources"], serde_yaml::Value::from(vec!["services"]));
    assert_eq!(rules[0]["resourceNames"], serde_yaml::Value::from(vec!["meshnet-tunnel"]));
    assert_eq!(rules[0]["verbs"], serde_yaml::Value::from(vec!["get", "list", "watch"]));
    let binding = docs.iter().find(|d| d["kind"] == "RoleBinding").unwrap();
    assert_eq!(binding["subjects"][0]["name"], "meshnet-remote-reader");
    assert_eq!(binding["subjects"][0]["namespace"], "istio-system", "the ServiceAccount of remote-reader.yaml");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let all = assert_valid(&deploy().join("remote-reader-tunnel.yaml"));
    assert_eq!(all, ["role/meshnet-remote-reader", "rolebinding/meshnet-remote-reader"].iter().map(ToString::to_string).collect());
}
