//! The autoscaler's metrics and their Prometheus text exposition (format 0.0.4): written by
//! hand because the set is small and fixed, which keeps the crate free of a registry.

use std::fmt::Write;

/// A cumulative histogram with fixed upper bounds (seconds or counts).
#[derive(Clone, Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        for (bound, count) in self.bounds.iter().zip(&mut self.counts) {
            if value <= *bound {
                *count += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Appends the histogram's series; `labels` is the label list without braces
    /// (`runner="x"`), possibly empty.
    pub fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braced = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braced} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braced} {}", self.count);
    }
}

/// Queue wait, readiness and lifetime buckets, in seconds.
pub const WAIT_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];
pub const LIFETIME_BUCKETS: &[f64] = &[
    60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0,
];
pub const USE_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 500.0];

#[derive(Clone, Debug)]
pub struct Metrics {
    pub acquisitions: u64,
    pub acquisition_timeouts: u64,
    pub instances_requested: u64,
    pub instances_deleted: u64,
    pub instances_failed: u64,
    pub ready_check_failures: u64,
    pub provider_errors: u64,
    pub breaker_trips: u64,
    pub queue_wait_seconds: Histogram,
    pub readiness_seconds: Histogram,
    pub instance_lifetime_seconds: Histogram,
    pub instance_use_count: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            acquisitions: 0,
            acquisition_timeouts: 0,
            instances_requested: 0,
            instances_deleted: 0,
            instances_failed: 0,
            ready_check_failures: 0,
            provider_errors: 0,
            breaker_trips: 0,
            queue_wait_seconds: Histogram::new(WAIT_BUCKETS),
            readiness_seconds: Histogram::new(WAIT_BUCKETS),
            instance_lifetime_seconds: Histogram::new(LIFETIME_BUCKETS),
            instance_use_count: Histogram::new(USE_BUCKETS),
        }
    }
}

/// Escapes a label value per the exposition format.
pub fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The `# HELP` and `# TYPE` lines of a metric.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

impl Metrics {
    /// Appends every metric, labelled `runner`, with `instances` the count per state.
    pub fn write(&self, out: &mut String, runner: &str, instances: &[(&str, usize)]) {
        let runner = label(runner);
        let name = "podfleet_autoscaler_instances";
        header(out, name, "gauge", "Instances of the group by state");
        for (state, count) in instances {
            let _ = writeln!(
                out,
                "{name}{{runner=\"{runner}\",state=\"{state}\"}} {count}"
            );
        }
        let counters = [
            (
                "podfleet_autoscaler_acquisitions_total",
                "Slots handed to jobs",
                self.acquisitions,
            ),
            (
                "podfleet_autoscaler_acquisition_timeouts_total",
                "Jobs that found no slot within instance_acquire_timeout",
                self.acquisition_timeouts,
            ),
            (
                "podfleet_autoscaler_instances_requested_total",
                "Instances asked of the provider",
                self.instances_requested,
            ),
            (
                "podfleet_autoscaler_instances_deleted_total",
                "Instances the provider removed",
                self.instances_deleted,
            ),
            (
                "podfleet_autoscaler_instances_failed_total",
                "Instances that failed (provisioning, readiness, health)",
                self.instances_failed,
            ),
            (
                "podfleet_autoscaler_ready_check_failures_total",
                "Readiness checks that failed",
                self.ready_check_failures,
            ),
            (
                "podfleet_autoscaler_provider_errors_total",
                "Provider calls that failed",
                self.provider_errors,
            ),
            (
                "podfleet_autoscaler_creation_breaker_trips_total",
                "Times creation paused after failures in a row",
                self.breaker_trips,
            ),
        ];
        for (name, help, value) in counters {
            header(out, name, "counter", help);
            let _ = writeln!(out, "{name}{{runner=\"{runner}\"}} {value}");
        }
        let histograms = [
            (
                "podfleet_autoscaler_queue_wait_seconds",
                "Time jobs waited for a slot",
                &self.queue_wait_seconds,
            ),
            (
                "podfleet_autoscaler_instance_readiness_seconds",
                "Time from request to ready",
                &self.readiness_seconds,
            ),
            (
                "podfleet_autoscaler_instance_lifetime_seconds",
                "Time from first seen to deleted",
                &self.instance_lifetime_seconds,
            ),
            (
                "podfleet_autoscaler_instance_use_count",
                "Jobs an instance served before deletion",
                &self.instance_use_count,
            ),
        ];
        for (name, help, histogram) in histograms {
            header(out, name, "histogram", help);
            histogram.write(out, name, &format!("runner=\"{runner}\""));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_is_cumulative_and_labelled() {
        let mut metrics = Metrics::default();
        metrics.queue_wait_seconds.observe(0.3);
        metrics.queue_wait_seconds.observe(45.0);
        metrics.acquisitions = 2;
        let mut out = String::new();
        metrics.write(&mut out, "podman \"u\"", &[("ready", 1), ("busy", 2)]);
        for line in [
            "podfleet_autoscaler_instances{runner=\"podman \\\"u\\\"\",state=\"busy\"} 2",
            "podfleet_autoscaler_acquisitions_total{runner=\"podman \\\"u\\\"\"} 2",
            "podfleet_autoscaler_queue_wait_seconds_bucket{runner=\"podman \\\"u\\\"\",le=\"0.1\"} 0",
            "podfleet_autoscaler_queue_wait_seconds_bucket{runner=\"podman \\\"u\\\"\",le=\"0.5\"} 1",
            "podfleet_autoscaler_queue_wait_seconds_bucket{runner=\"podman \\\"u\\\"\",le=\"60\"} 2",
            "podfleet_autoscaler_queue_wait_seconds_bucket{runner=\"podman \\\"u\\\"\",le=\"+Inf\"} 2",
            "podfleet_autoscaler_queue_wait_seconds_sum{runner=\"podman \\\"u\\\"\"} 45.3",
            "# TYPE podfleet_autoscaler_instance_use_count histogram",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
    }
}
