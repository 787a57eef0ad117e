//! The node agent: load, sync the maps to the config, attach to the pod interfaces, then
//! keep following the config and the interfaces until told to stop. Stopping leaves the
//! datapath in place; `meshnet detach` removes it.

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::{
    config::Config,
    datapath::{matching_interfaces, AttachMode, Datapath},
    maps::ControlMaps,
    pins::{Direction, Pins},
};

pub struct AgentOptions {
    pub config: PathBuf,
    pub pins: Pins,
    pub attach_mode: AttachMode,
    /// How often interfaces are rescanned for pods that came or went.
    pub rescan: Duration,
}

struct Agent {
    opts: AgentOptions,
    config: Config,
    datapath: Datapath,
    maps: ControlMaps,
    attached: BTreeSet<String>,
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(opts: AgentOptions) -> anyhow::Result<()> {
    // A bad config fails here, before anything is loaded or attached.
    let config = Config::load(&opts.config)?;
    let datapath = Datapath::load(&opts.pins, config.max_flows)?;
    let maps = ControlMaps::open(&opts.pins)?;
    let mut agent = Agent { opts, config, datapath, maps, attached: BTreeSet::new() };
    let report = agent.maps.sync(&agent.config.desired()).context("filling the maps")?;
    info!(?report, cluster = %agent.config.cluster, peers = agent.config.peers.len(), "maps synced");
    agent.rescan_interfaces()?;
    if agent.attached.is_empty() {
        warn!(patterns = ?agent.config.interfaces, "no interface matches yet; waiting for one to appear");
    }
    info!(pin_path = %agent.opts.pins.root().display(), interfaces = ?agent.attached, "meshnet agent ready");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(agent.opts.rescan);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => agent.reload(),
            _ = tick.tick() => {
                if let Err(e) = agent.rescan_interfaces() {
                    warn!(error = %format!("{e:#}"), "interface rescan failed");
                }
            }
        }
    }
    info!("stopping; the datapath stays in place (`meshnet detach` removes it)");
    Ok(())
}

impl Agent {
    /// Re-reads the config. An invalid one is logged and the old state keeps serving.
    fn reload(&mut self) {
        let config = match Config::load(&self.opts.config) {
            Ok(c) => c,
            Err(e) => {
                error!(error = %e, "reload refused; keeping the previous config");
                return;
            }
        };
        match self.maps.sync(&config.desired()) {
            Ok(report) => info!(?report, "config reloaded"),
            Err(e) => {
                error!(error = %format!("{e:#}"), "applying the new config failed");
                return;
            }
        }
        self.config = config;
        if let Err(e) = self.rescan_interfaces() {
            warn!(error = %format!("{e:#}"), "interface rescan failed");
        }
    }

    /// Attaches to matching interfaces not attached yet, and forgets those that are gone.
    fn rescan_interfaces(&mut self) -> anyhow::Result<()> {
        let present = matching_interfaces(&self.config.interfaces)?;
        for iface in present.difference(&self.attached.clone()) {
            match self.datapath.attach(iface, self.opts.attach_mode) {
                Ok(how) => {
                    info!(iface, ?how, "attached");
                    self.attached.insert(iface.clone());
                }
                Err(e) => warn!(iface, error = %format!("{e:#}"), "attach failed; will retry"),
            }
        }
        let gone: Vec<String> = self.attached.difference(&present).cloned().collect();
        for iface in gone {
            info!(iface, "interface gone");
            for dir in [Direction::Ingress, Direction::Egress] {
                // The kernel already dropped the attachment with the device; the pin is all
                // that is left of it.
                let _ = std::fs::remove_file(self.opts.pins.link(&iface, dir));
            }
            self.attached.remove(&iface);
        }
        Ok(())
    }
}
