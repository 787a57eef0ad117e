//! `cargo xtask demo`: two single-node clusters in network namespaces; a pod of cluster1
//! asks a pod of cluster2 for something, first without meshnet, then with it.


use meshnet_tests::{
    peer,
    topo::{self, Options, Topology},
};

fn step(text: &str) {
    println!("\n==> {text}");
}

fn main() -> std::process::ExitCode {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the demo needs root (network namespaces, bpffs, eBPF): run `cargo xtask demo` as root");
        return std::process::ExitCode::FAILURE;
    }
    // Every guard is dropped inside demo(), so namespaces go even when a step fails.
    match demo() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn demo() -> Result<(), String> {
    step("building two single-node clusters in network namespaces");
    let t = Topology::new(Options::default());
    println!(
        "    cluster1: node {} (pods 10.244.0.0/16), client pod {}\n    \
         cluster2: node {} (pods 10.245.0.0/16), east-west gateway NodePort {}:{} -> {}:{}, app pods {} and {}",
        t.node1.name,
        topo::CLIENT_IP,
        t.node2.name,
        topo::NODE2_LAN,
        topo::NODEPORT_TCP,
        topo::GW_IP,
        topo::GW_PORT,
        topo::APP_A,
        topo::APP_B
    );
    let target = topo::app_a();

    step(&format!("without meshnet: client {} -> remote pod {target}", topo::CLIENT_IP));
    match t.client.run(move || peer::tcp_request(target, "hello")) {
        Ok(reply) => return Err(format!("the remote pod answered without meshnet: {reply}")),
        Err(e) => println!("    fails as expected: {e}"),
    }

    step("starting `meshnet agent` on cluster1's node with this config");
    println!("{}", topo::node1_config(topo::POD_INTERFACES).lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n"));
    let mut agent = t.start_meshnet(&[]);

    step(&format!("with meshnet: client {} -> remote pod {target} (TCP)", topo::CLIENT_IP));
    let reply = t.client.run(move || peer::tcp_request(target, "hello over tcp"));
    match reply {
        Ok(r) => println!("    reply: {r}"),
        Err(e) => {
            let maps = t.meshnet("maps dump all").stdout;
            return Err(format!("the request failed with meshnet: {e}\nagent:\n{}\nmaps:\n{maps}", agent.child.output()));
        }
    }
    step(&format!("with meshnet: client {} -> remote pod {} (UDP)", topo::CLIENT_IP, topo::app_b()));
    let b = topo::app_b();
    let udp = t.client.run(move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        peer::udp_request(&s, b, "hello over udp")
    });
    match udp {
        Ok((r, from)) => println!("    reply from {from}: {r}"),
        Err(e) => return Err(format!("the UDP request failed with meshnet: {e}")),
    }

    step("what meshnet's maps hold (`meshnet maps dump`)");
    let out = t.meshnet("maps dump all");
    print!("{}", out.stdout.lines().map(|l| format!("    {l}\n")).collect::<String>());

    step("cleaning up: `meshnet detach`, then the namespaces go");
    let _ = agent.child.stop();
    let out = t.meshnet("detach");
    println!("    {}", out.stdout.trim());
    drop(t);
    println!("\ndone: the remote pod was unreachable without meshnet and answered through it.");
    Ok(())
}
