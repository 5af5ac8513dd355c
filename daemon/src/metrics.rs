//! cprd's figures as metrics (the `prometheus-client` crate), in the Prometheus text format, for
//! `cprctl metrics` and the textfile collector of node_exporter: no network port of cprd's own.
//!
//! Counters live here, in the owner of cprd's state, which feeds them as upgrades end and VMs
//! are re-attached; the gauges (VMs by state, handoffs in flight, each VM's VMM) are taken from
//! the VMs at the moment of rendering.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::engine::{VmState, VmView};
use crate::error::CprdError;

/// Upper bounds of the downtime histogram's buckets, in seconds: 100 µs to 1 s.
pub const DOWNTIME_BUCKETS: [f64; 13] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// Every VM state, so that a state no VM is in is reported as 0 rather than left out.
const STATES: [VmState; 10] = [
    VmState::Stopped,
    VmState::Starting,
    VmState::Running,
    VmState::Paused,
    VmState::Upgrading,
    VmState::Stopping,
    VmState::Failed,
    VmState::NeedsAttention,
    VmState::Orphaned,
    VmState::Quarantined,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpgradeLabels {
    backend: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmmLabels {
    vm: String,
    backend: String,
    build_id: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

fn downtime_histogram() -> Histogram {
    Histogram::new(DOWNTIME_BUCKETS)
}

/// How an upgrade ended, as the `result` label says it.
pub fn result_label(outcome: &Result<(u64, u64), CprdError>) -> &'static str {
    match outcome {
        Ok(_) => "ok",
        Err(CprdError::UpgradeFailed(_)) => "rolled_back",
        Err(CprdError::RollbackFailed(_)) => "failed",
        Err(_) => "refused",
    }
}

/// The counters cprd keeps while it runs.
#[derive(Debug)]
pub struct Metrics {
    upgrades: Family<UpgradeLabels, Counter>,
    downtime: Family<BackendLabels, Histogram, fn() -> Histogram>,
    rollbacks: Family<BackendLabels, Counter>,
    reattaches: Counter,
    starts: Counter,
}

impl Metrics {
    /// Counters from zero; `starts` is how many times cprd started since the host booted
    /// (counted in the runtime directory, which outlives cprd's restarts).
    pub fn new(starts: u64) -> Self {
        let metrics = Self {
            upgrades: Family::default(),
            downtime: Family::new_with_constructor(downtime_histogram as fn() -> Histogram),
            rollbacks: Family::default(),
            reattaches: Counter::default(),
            starts: Counter::default(),
        };
        metrics.starts.inc_by(starts);
        metrics
    }

    /// Counts an upgrade of a VM of `backend` that ended with `outcome`.
    pub fn upgrade_ended(&self, backend: &str, outcome: &Result<(u64, u64), CprdError>) {
        let result = result_label(outcome);
        self.upgrades.get_or_create(&UpgradeLabels { backend: backend.into(), result: result.into() }).inc();
        let labels = BackendLabels { backend: backend.into() };
        match outcome {
            // Microseconds to seconds; a u64 of µs is exact in an f64 up to 285 years.
            #[allow(clippy::cast_precision_loss)]
            Ok((downtime_usec, _)) => self.downtime.get_or_create(&labels).observe(*downtime_usec as f64 / 1e6),
            Err(CprdError::UpgradeFailed(_)) => {
                self.rollbacks.get_or_create(&labels).inc();
            }
            Err(_) => {}
        }
    }

    /// Counts a VM a previous cprd left running and this one took back.
    pub fn reattached(&self) {
        self.reattaches.inc();
    }

    /// The text (Prometheus format) for the counters and for `vms` as they are now.
    pub fn render(&self, vms: &[VmView]) -> String {
        let mut registry = Registry::with_prefix("cprd");
        registry.register(
            "upgrades",
            "Upgrades of a VM's VMM by backend and result (ok, rolled_back, failed, refused)",
            self.upgrades.clone(),
        );
        registry.register(
            "upgrade_downtime_seconds",
            "Guest downtime of each committed upgrade, by backend",
            self.downtime.clone(),
        );
        registry.register(
            "rollbacks",
            "Upgrades that failed and were rolled back to the old VMM, by backend",
            self.rollbacks.clone(),
        );
        registry.register(
            "reattaches",
            "VMs a previous cprd left running that this cprd took back",
            self.reattaches.clone(),
        );
        registry.register("starts", "Times cprd started since the host booted", self.starts.clone());
        let by_state = Family::<StateLabels, Gauge>::default();
        let in_flight = Gauge::<i64>::default();
        for state in STATES {
            let n = i64::try_from(vms.iter().filter(|v| v.state == state).count()).unwrap_or(i64::MAX);
            by_state.get_or_create(&StateLabels { state: state.as_str().into() }).set(n);
            if state == VmState::Upgrading {
                in_flight.set(n);
            }
        }
        registry.register("vms", "VMs by state", by_state);
        registry.register("handoffs_in_flight", "Handoffs under way", in_flight);
        let vmm_info = Family::<VmmLabels, Gauge>::default();
        for v in vms.iter().filter(|v| v.main_pid != 0) {
            let version = v.vmm_release.split_whitespace().next().unwrap_or_default().to_string();
            vmm_info
                .get_or_create(&VmmLabels {
                    vm: v.name.clone(),
                    backend: v.backend.clone(),
                    build_id: v.vmm_version.clone(),
                    version,
                })
                .set(1);
        }
        registry.register("vmm_info", "The VMM running each VM: its build id and version (value 1)", vmm_info);
        let build = Family::<BuildLabels, Gauge>::default();
        build.get_or_create(&BuildLabels { version: crate::VERSION.into() }).set(1);
        registry.register("build_info", "cprd's version (value 1)", build);
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        prometheus_text(&text)
    }
}

/// The Prometheus text format (0.0.4) of an OpenMetrics exposition, which is what
/// node_exporter's textfile collector and `promtool check metrics` read. The two differ in three
/// places only: OpenMetrics names a counter's family without the `_total` its samples carry (the
/// text format names both alike), it has `# UNIT` lines, and it ends with `# EOF`.
pub fn prometheus_text(open_metrics: &str) -> String {
    let counters: std::collections::BTreeSet<&str> =
        open_metrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(open_metrics.len());
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Counts this start of cprd in `runtime_dir/starts` and returns the count (1 on a fresh boot).
pub fn count_start(runtime_dir: &std::path::Path) -> u64 {
    let file = runtime_dir.join("starts");
    let starts = std::fs::read_to_string(&file).ok().and_then(|t| t.trim().parse::<u64>().ok()).unwrap_or(0) + 1;
    let _ = std::fs::write(&file, format!("{starts}\n"));
    starts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrades_are_counted_by_backend_and_result_with_their_downtime() {
        let m = Metrics::new(3);
        m.upgrade_ended("cpr-vmm", &Ok((450, 2)));
        m.upgrade_ended("cpr-vmm", &Ok((2_000_000, 3)));
        m.upgrade_ended("qemu", &Err(CprdError::UpgradeFailed("x".into())));
        m.upgrade_ended("qemu", &Err(CprdError::NotAllowed("x".into())));
        m.reattached();
        let text = m.render(&[]);
        for line in [
            "cprd_upgrades_total{backend=\"cpr-vmm\",result=\"ok\"} 2",
            "cprd_upgrades_total{backend=\"qemu\",result=\"rolled_back\"} 1",
            "cprd_upgrades_total{backend=\"qemu\",result=\"refused\"} 1",
            "cprd_rollbacks_total{backend=\"qemu\"} 1",
            "cprd_upgrade_downtime_seconds_count{backend=\"cpr-vmm\"} 2",
            "cprd_upgrade_downtime_seconds_bucket{le=\"0.0005\",backend=\"cpr-vmm\"} 1",
            "cprd_upgrade_downtime_seconds_bucket{le=\"1.0\",backend=\"cpr-vmm\"} 1",
            "cprd_upgrade_downtime_seconds_bucket{le=\"+Inf\",backend=\"cpr-vmm\"} 2",
            "cprd_reattaches_total 1",
            "cprd_starts_total 3",
            "cprd_vms{state=\"running\"} 0",
            "cprd_handoffs_in_flight 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        }
        assert!(
            text.contains("# HELP cprd_upgrades_total Upgrades")
                && text.contains("# TYPE cprd_upgrades_total counter\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
    }
}
