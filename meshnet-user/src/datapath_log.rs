//! `meshnet agent --datapath-log`: the logging object's lines in the agent's log.
//!
//! The logging object (meshnet-ebpf's `datapath-log` feature) writes its decisions to
//! aya-log's BPF ring buffer, which kernels before 5.8 lack: there the agent says so and keeps
//! the default object. Its lines go to `tracing` under the target [`TARGET`], filtered by
//! `--log-level` like every other line; the object is told the level at load time, so that a
//! filtered line is never written in the kernel either. What the object's rate limit held
//! back is read from its per-CPU budget map once a second, logged, and counted in
//! `meshnet_datapath_log_suppressed`.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use aya::{
    maps::{Array, MapData},
    Ebpf,
};
use aya_log::EbpfLogger;
use meshnet_common::{names, Counter, LogBudget, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// The `tracing` target of the datapath's lines (the object names it in every record, too).
pub const TARGET: &str = "meshnet::datapath";

/// Which object the agent loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The default object: no ring buffer, no logging.
    Default,
    /// The logging object, told to write lines up to `level` (aya-log's numbering: 1 error
    /// … 5 trace; 0 writes none).
    Logging { level: u8 },
}

/// What to load, given whether logging was asked for and whether the kernel has BPF ring
/// buffers; with the reason when logging was asked for and cannot be had.
#[must_use]
pub fn choose(requested: bool, ring_buffers: bool, kernel: &str) -> (Choice, Option<String>) {
    match (requested, ring_buffers) {
        (false, _) => (Choice::Default, None),
        (true, true) => (Choice::Logging { level: enabled_level() }, None),
        (true, false) => (
            Choice::Default,
            Some(format!(
                "--datapath-log needs BPF ring buffers (kernel 5.8 or newer) and this kernel ({kernel}) has none; \
                 loading the default datapath, without datapath logs (the counters still count every drop)"
            )),
        ),
    }
}

/// [`choose`] for the running kernel.
#[must_use]
pub fn choose_here(requested: bool) -> (Choice, Option<String>) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(|_| "unknown".into(), |s| s.trim().to_string());
    choose(requested, requested && ring_buffers_supported(), &release)
}

/// Whether the running kernel creates BPF ring buffers.
#[must_use]
pub fn ring_buffers_supported() -> bool {
    aya::sys::is_map_supported(aya::maps::MapType::RingBuf).unwrap_or(false)
}

/// The most verbose level `--log-level` lets through for [`TARGET`], in aya-log's numbering.
fn enabled_level() -> u8 {
    use tracing::Level;
    // aya-log's levels: Error = 1, Warn, Info, Debug, Trace = 5.
    [(Level::TRACE, 5), (Level::DEBUG, 4), (Level::INFO, 3), (Level::WARN, 2), (Level::ERROR, 1)]
        .into_iter()
        .find(|(level, _)| match *level {
            Level::TRACE => tracing::enabled!(target: TARGET, Level::TRACE),
            Level::DEBUG => tracing::enabled!(target: TARGET, Level::DEBUG),
            Level::INFO => tracing::enabled!(target: TARGET, Level::INFO),
            Level::WARN => tracing::enabled!(target: TARGET, Level::WARN),
            _ => tracing::enabled!(target: TARGET, Level::ERROR),
        })
        .map_or(0, |(_, n)| n)
}

/// Hands aya-log's records to `tracing` under [`TARGET`]: the records name a target too, but
/// it is one the object chose, and `--log-level` filters on this one.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let line = name_fields(&record.args().to_string());
        match record.level() {
            log::Level::Error => tracing::error!(target: TARGET, "{line}"),
            log::Level::Warn => tracing::warn!(target: TARGET, "{line}"),
            log::Level::Info => tracing::info!(target: TARGET, "{line}"),
            log::Level::Debug => tracing::debug!(target: TARGET, "{line}"),
            log::Level::Trace => tracing::trace!(target: TARGET, "{line}"),
        }
    }

    fn flush(&self) {}
}

/// Names the numbers the logging object writes (it writes numbers: see meshnet-ebpf's
/// `log::program`): `reason=N` becomes the name of counter N, as `maps dump stats` and the
/// metrics call it, and `proto=N` the protocol's name where it has one.
#[must_use]
pub fn name_fields(line: &str) -> String {
    line.split(' ')
        .map(|token| {
            if let Some(n) = token.strip_prefix("reason=") {
                if let Some(c) = n.parse::<u32>().ok().and_then(Counter::from_index) {
                    return format!("reason={}", c.name());
                }
            } else if let Some(n) = token.strip_prefix("proto=") {
                let name = match n.parse::<u8>() {
                    Ok(IPPROTO_TCP) => "tcp",
                    Ok(IPPROTO_UDP) => "udp",
                    Ok(IPPROTO_ICMP) => "icmp",
                    _ => return token.to_string(),
                };
                return format!("proto={name}");
            }
            token.to_string()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Reads the logging object's ring and budget until the agent exits. A no-op for an object
/// without them (the default one).
pub fn spawn(ebpf: &mut Ebpf, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    if ebpf.map(names::LOG_RING).is_none() {
        return Ok(());
    }
    let logger = EbpfLogger::init_with_logger(ebpf, ToTracing).context("reading the datapath's log ring")?;
    let budget: Array<MapData, LogBudget> = ebpf
        .take_map(names::LOG_BUDGET)
        .context("the logging object has no rate-limit map")?
        .try_into()?;
    // SAFETY: the logger owns the ring buffer's map fd for as long as the AsyncFd owns the
    // logger, and always answers that fd.
    let ring = unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the datapath's log ring: {e}"))?;
    metrics.datapath_log_enabled.set(1);
    info!(target: TARGET, "datapath logging on: new flows, drops, refusals and translated ICMP errors are logged here");
    let reader = tokio::spawn(read(ring, budget, metrics.clone()));
    // aya-log panics on a record it cannot decode: the agent goes on, and says that the
    // datapath's lines stopped.
    tokio::spawn(async move {
        if let Err(e) = reader.await {
            warn!(target: TARGET, error = %e, "reading the datapath's log ring failed; datapath logging stops (the datapath is not affected)");
            metrics.datapath_log_enabled.set(0);
        }
    });
    Ok(())
}

/// Lines the budget held back since the programs were loaded.
fn suppressed(budget: &Array<MapData, LogBudget>) -> u64 {
    budget.get(&0, 0).map_or(0, |b| b.suppressed)
}

async fn read(mut ring: AsyncFd<EbpfLogger<ToTracing>>, budget: Array<MapData, LogBudget>, metrics: Arc<Metrics>) {
    let mut reported = suppressed(&budget);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            ready = ring.readable_mut() => match ready {
                Ok(mut guard) => {
                    // Cleared before the ring is drained, not after: a record that comes in
                    // between is then read now or wakes the next turn, never waits unseen.
                    guard.clear_ready();
                    guard.get_inner_mut().flush();
                }
                Err(e) => {
                    warn!(target: TARGET, error = %e, "polling the datapath's log ring failed; datapath logging stops");
                    metrics.datapath_log_enabled.set(0);
                    return;
                }
            },
            _ = tick.tick() => {
                let now = suppressed(&budget);
                if now > reported {
                    let n = now - reported;
                    metrics.datapath_log_suppressed.inc_by(n);
                    warn!(target: TARGET, suppressed = n, "datapath log lines held back by the rate limit in the last second (the counters count every event)");
                    reported = now;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{choose, name_fields, Choice};

    #[test]
    fn reasons_and_protocols_are_named() {
        assert_eq!(
            name_fields("drop reason=9 proto=1 10.244.0.10:0 -> 10.245.0.20:0"),
            "drop reason=unsupported_proto proto=icmp 10.244.0.10:0 -> 10.245.0.20:0"
        );
        assert_eq!(
            name_fields("refused new flow reason=11 proto=6 10.244.0.10:4000 -> 10.245.0.20:80"),
            "refused new flow reason=nat_table_full proto=tcp 10.244.0.10:4000 -> 10.245.0.20:80"
        );
        assert_eq!(name_fields("new flow proto=17 a -> b"), "new flow proto=udp a -> b");
        // What names nothing stays as it is.
        assert_eq!(name_fields("drop reason=99 proto=132 x"), "drop reason=99 proto=132 x");
        // By slot, not by position in the list: the retired slots name nothing.
        assert_eq!(name_fields("reason=34 reason=35 reason=0"), "reason=tunnel_not_for_node reason=flow_opened reason=0");
        assert_eq!(name_fields("drop reason=x proto="), "drop reason=x proto=");
    }

    #[test]
    fn logging_is_loaded_only_when_asked_for_and_the_kernel_has_ring_buffers() {
        assert_eq!(choose(false, true, "6.1.0"), (Choice::Default, None));
        assert_eq!(choose(false, false, "5.4.0"), (Choice::Default, None));
        assert!(matches!(choose(true, true, "6.1.0"), (Choice::Logging { .. }, None)));
        let (choice, why) = choose(true, false, "5.4.280-1.el7.elrepo.x86_64");
        assert_eq!(choice, Choice::Default);
        let why = why.unwrap();
        assert!(why.contains("5.4.280-1.el7.elrepo.x86_64") && why.contains("5.8") && why.contains("default datapath"), "{why}");
    }
}
