//! meshnet's user space: the node agent, the CLI, and what they share.

pub mod agent;
pub mod batch;
pub mod config;
pub mod datapath;
pub mod datapath_log;
pub mod doctor;
pub mod discovery;
pub mod dump;
pub mod explain;
#[cfg(test)]
mod golden;
pub mod grace;
pub mod health;
pub mod iptables;
pub mod ip_summed;
pub mod maps;
pub mod metrics;
pub mod migrate;
pub mod netlink;
pub mod nftables;
#[cfg(test)]
mod objcheck;
#[cfg(test)]
mod scratch;
pub mod pins;
pub mod tunnel;
pub mod yaml;
