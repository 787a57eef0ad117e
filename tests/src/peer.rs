//! The workloads of the simulated clusters.
//!
//! - An app pod runs an echo service on TCP and UDP: each request line or datagram is
//!   answered with `app IP:PORT got REQUEST`.
//! - The east-west gateway pod stands in for Istio's: it routes by a first line
//!   `TO IP:PORT` (what SNI carries for Istio) and relays the rest. A packet reaching it at
//!   its NodePort no longer names the remote pod in its headers, exactly as with Istio.
//! - A client "sidecar" connects to the remote pod IP and sends that line first.
//!
//! Servers run on threads inside their pod's namespace and stop when their guard drops.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::NetNs;

/// How long a request waits for its peer. Generous: only a failing test waits it out, and
/// under emulation (the kernel-matrix VMs of `cargo xtask test`) on a busy machine 200
/// concurrent exchanges through the gateway relay took over 5 s.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Stops its server threads on drop.
pub struct Server {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) threads: Vec<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

pub(crate) fn serve_tcp(listener: TcpListener, stop: Arc<AtomicBool>, handle: impl Fn(TcpStream) + Send + Sync + Clone + 'static) {
    listener.set_nonblocking(true).unwrap();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                let h = handle.clone();
                std::thread::spawn(move || h(s));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

pub(crate) fn serve_udp(sock: UdpSocket, stop: Arc<AtomicBool>, handle: impl Fn(&UdpSocket, &[u8], SocketAddr) + Send + Sync + Clone + 'static) {
    sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let sock = Arc::new(sock);
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let (h, sock, data) = (handle.clone(), sock.clone(), buf[..n].to_vec());
            std::thread::spawn(move || h(&sock, &data, from));
        }
    }
}

/// The echo app of an app pod, on TCP and UDP `port`.
#[must_use]
pub fn app(ns: &NetNs, ip: &str, port: u16) -> Server {
    let stop = Arc::new(AtomicBool::new(false));
    let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
    let tcp = ns.run(move || TcpListener::bind(addr).unwrap());
    let udp = ns.run(move || UdpSocket::bind(addr).unwrap());
    let me = addr.to_string();
    let threads = vec![
        {
            let (stop, me) = (stop.clone(), me.clone());
            std::thread::spawn(move || {
                serve_tcp(tcp, stop, move |s| {
                    let mut w = s.try_clone().unwrap();
                    for line in BufReader::new(s).lines().map_while(Result::ok) {
                        // One write per line: write! issues one per piece, and Nagle holds
                        // the second back for the peer's delayed ACK (40 ms a line).
                        if w.write_all(format!("app {me} got {line}\n").as_bytes()).is_err() {
                            break;
                        }
                    }
                });
            })
        },
        {
            let stop = stop.clone();
            std::thread::spawn(move || {
                serve_udp(udp, stop, move |sock, data, from| {
                    let reply = format!("app {me} got {}", String::from_utf8_lossy(data));
                    let _ = sock.send_to(reply.as_bytes(), from);
                });
            })
        },
    ];
    Server { stop, threads }
}

/// Splits a request `TO IP:PORT\nrest` into its target and the rest.
fn parse_target(data: &[u8]) -> Option<(SocketAddrV4, &[u8])> {
    let nl = data.iter().position(|b| *b == b'\n')?;
    let head = std::str::from_utf8(&data[..nl]).ok()?;
    let target = head.strip_prefix("TO ")?.trim().parse().ok()?;
    Some((target, &data[nl + 1..]))
}

/// The east-west gateway pod, on TCP and UDP `port`.
#[must_use]
pub fn gateway(ns: &NetNs, ip: &str, port: u16) -> Server {
    let stop = Arc::new(AtomicBool::new(false));
    let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
    let tcp = ns.run(move || TcpListener::bind(addr).unwrap());
    let udp = ns.run(move || UdpSocket::bind(addr).unwrap());
    let ns_path = ns.path();
    let threads = vec![
        {
            let (stop, ns_path) = (stop.clone(), ns_path.clone());
            std::thread::spawn(move || {
                serve_tcp(tcp, stop, move |s| {
                    // Outgoing connections must be made from inside the gateway's namespace.
                    crate::enter(&ns_path);
                    relay_tcp(s);
                });
            })
        },
        {
            let stop = stop.clone();
            std::thread::spawn(move || {
                serve_udp(udp, stop, move |sock, data, from| {
                    crate::enter(&ns_path);
                    let Some((target, payload)) = parse_target(data) else { return };
                    let up = UdpSocket::bind("0.0.0.0:0").unwrap();
                    up.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                    let _ = up.send_to(payload, target);
                    let mut buf = vec![0u8; 65_536];
                    if let Ok((n, _)) = up.recv_from(&mut buf) {
                        let _ = sock.send_to(&buf[..n], from);
                    }
                });
            })
        },
    ];
    Server { stop, threads }
}

fn relay_tcp(client: TcpStream) {
    client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut head = String::new();
    if reader.read_line(&mut head).is_err() {
        return;
    }
    let Some((target, _)) = parse_target(head.as_bytes()) else { return };
    let Ok(upstream) = TcpStream::connect_timeout(&target.into(), IO_TIMEOUT) else { return };
    // Whatever the BufReader already buffered belongs upstream too.
    let mut up_w = upstream.try_clone().unwrap();
    if up_w.write_all(reader.buffer()).is_err() {
        return;
    }
    let mut down_w = client.try_clone().unwrap();
    let mut up_r = upstream;
    let back = std::thread::spawn(move || {
        let mut buf = [0u8; 16_384];
        while let Ok(n) = up_r.read(&mut buf) {
            if n == 0 || down_w.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = down_w.shutdown(Shutdown::Write);
    });
    let mut client_r = client;
    client_r.set_read_timeout(None).unwrap();
    let mut buf = [0u8; 16_384];
    while let Ok(n) = client_r.read(&mut buf) {
        if n == 0 || up_w.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = up_w.shutdown(Shutdown::Write);
    let _ = back.join();
}

/// A sidecar-style TCP request: connects to the remote pod `target` from `bind` (if any),
/// names the target first, sends `msg`, and returns the reply line.
pub fn tcp_request(target: SocketAddrV4, msg: &str) -> std::io::Result<String> {
    let s = TcpStream::connect_timeout(&target.into(), IO_TIMEOUT)?;
    tcp_exchange(s, target, msg)
}

pub fn tcp_exchange(s: TcpStream, target: SocketAddrV4, msg: &str) -> std::io::Result<String> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut w = s.try_clone()?;
    w.write_all(format!("TO {target}\n{msg}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim_end().to_string())
}

/// A UDP request on `sock` (possibly unconnected and shared between targets). Returns the
/// reply and the address it came from.
pub fn udp_request(sock: &UdpSocket, target: SocketAddrV4, msg: &str) -> std::io::Result<(String, SocketAddr)> {
    sock.set_read_timeout(Some(IO_TIMEOUT))?;
    sock.send_to(format!("TO {target}\n{msg}").as_bytes(), target)?;
    let mut buf = [0u8; 2048];
    let (n, from) = sock.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

/// Sends one request per target from one unconnected socket, then collects the replies by
/// their source address: the replies of both flows are in flight at once.
pub fn udp_fanout(sock: &UdpSocket, targets: &[SocketAddrV4], msg: &str) -> std::io::Result<HashMap<SocketAddr, String>> {
    sock.set_read_timeout(Some(IO_TIMEOUT))?;
    for t in targets {
        sock.send_to(format!("TO {t}\n{msg}").as_bytes(), t)?;
    }
    let mut out = HashMap::new();
    let mut buf = [0u8; 2048];
    while out.len() < targets.len() {
        let (n, from) = sock.recv_from(&mut buf)?;
        out.insert(from, String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    Ok(out)
}
