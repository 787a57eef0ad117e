//! Leader election on a coordination/v1 Lease, judged only by this replica's own monotonic
//! clock.
//!
//! Nodes' wall clocks disagree, and a replica that compared the lease's `renewTime` with its
//! own clock would take over a live leader whose clock runs behind (two leaders), or wait
//! forever behind a dead one whose clock ran ahead. So, as client-go's leaderelection does,
//! `renewTime` is only a value that changes with every renewal: a follower remembers when it
//! last saw the lease record change, by its own clock, and takes over once it has not
//! changed for a whole lease duration. The leader, for its part, stops acting as leader
//! when it has not renewed for two thirds of the duration, well before anyone may take over.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{api::PostParams, Api};
use tokio::time::Instant;
use tracing::debug;

use super::bounded;

/// What identifies one version of the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<String>,
    resource_version: Option<String>,
}

impl Record {
    fn of(lease: &Lease) -> Self {
        let spec = lease.spec.as_ref();
        Self {
            holder: spec.and_then(|s| s.holder_identity.clone()).filter(|h| !h.is_empty()),
            renew_time: spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0.to_string()),
            resource_version: lease.metadata.resource_version.clone(),
        }
    }
}

/// One replica's view of the lease.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The last record seen and when (by this replica's clock) it was first seen.
    observed: Option<(Record, Instant)>,
    /// When this replica last renewed successfully.
    renewed: Option<Instant>,
    /// How many times this replica took the lease (from no one, or from a holder gone silent).
    terms: u64,
}

impl Elector {
    #[must_use]
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        Self { api, name: name.into(), identity: identity.into(), duration, observed: None, renewed: None, terms: 0 }
    }

    /// How long a leader keeps acting without a successful renewal.
    fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// How many times this replica took the lease, renewals aside: a change while it believed
    /// it led all along means another held the lease in between.
    #[must_use]
    pub fn terms(&self) -> u64 {
        self.terms
    }

    /// Until when this replica leads without another renewal (`None`: it does not lead).
    #[must_use]
    pub fn leading_until(&self) -> Option<Instant> {
        self.renewed.map(|t| t + self.renew_deadline())
    }

    fn still_leading(&self) -> bool {
        self.renewed.is_some_and(|t| t.elapsed() < self.renew_deadline())
    }

    /// Takes or renews the lease; true while this replica leads.
    pub async fn tick(&mut self) -> bool {
        match self.try_tick().await {
            Ok(leading) => leading,
            Err(e) => {
                debug!(error = %format!("{e:#}"), "lease not renewed or taken");
                self.still_leading()
            }
        }
    }

    async fn try_tick(&mut self) -> anyhow::Result<bool> {
        let now = Instant::now();
        let Some(mut lease) = bounded("reading the lease", self.api.get_opt(&self.name)).await? else {
            let mut lease = Lease::default();
            lease.metadata.name = Some(self.name.clone());
            lease.spec = Some(self.spec(None));
            let made = bounded("creating the lease", self.api.create(&PostParams::default(), &lease)).await?;
            self.took(&made, now);
            self.terms += 1;
            return Ok(true);
        };
        let record = Record::of(&lease);
        if self.observed.as_ref().is_none_or(|(r, _)| *r != record) {
            self.observed = Some((record.clone(), now));
        }
        let ours = record.holder.as_deref() == Some(self.identity.as_str());
        if !ours {
            self.renewed = None;
            let unchanged_for = self.observed.as_ref().map_or(Duration::ZERO, |(_, at)| now - *at);
            let duration = lease
                .spec
                .as_ref()
                .and_then(|s| s.lease_duration_seconds)
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.duration, Duration::from_secs);
            // A released lease (no holder) is free at once; a held one only once its holder
            // has been silent for a whole duration by our clock.
            if record.holder.is_some() && unchanged_for < duration {
                return Ok(false);
            }
        }
        let old = lease.spec.take().unwrap_or_default();
        let mut spec = self.spec(Some(&old));
        if ours {
            spec.acquire_time = old.acquire_time;
            spec.lease_transitions = old.lease_transitions;
        }
        lease.spec = Some(spec);
        // The resourceVersion in `lease` makes this a compare-and-swap: of two replicas that
        // both judge the lease free, one wins.
        let written = bounded("renewing the lease", self.api.replace(&self.name, &PostParams::default(), &lease)).await?;
        self.took(&written, now);
        if !ours {
            self.terms += 1;
        }
        Ok(true)
    }

    fn took(&mut self, lease: &Lease, at: Instant) {
        self.renewed = Some(at);
        self.observed = Some((Record::of(lease), at));
    }

    fn spec(&self, old: Option<&LeaseSpec>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX)),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(old.map_or(0, |o| o.lease_transitions.unwrap_or(0) + 1)),
            ..LeaseSpec::default()
        }
    }

    /// Gives the lease up, so that another replica takes over at once rather than after a
    /// lease duration. Best effort: on failure the lease simply expires.
    pub async fn release(&mut self) {
        if !self.still_leading() {
            return;
        }
        self.renewed = None;
        let result = async {
            let Some(mut lease) = bounded("reading the lease", self.api.get_opt(&self.name)).await? else { return Ok(()) };
            if Record::of(&lease).holder.as_deref() != Some(self.identity.as_str()) {
                return Ok(());
            }
            if let Some(spec) = lease.spec.as_mut() {
                spec.holder_identity = None;
            }
            bounded("releasing the lease", self.api.replace(&self.name, &PostParams::default(), &lease)).await.map(drop)
        }
        .await;
        if let Err(e) = result {
            debug!(error = %format!("{e:#}"), "lease not released; it expires instead");
        }
    }
}
