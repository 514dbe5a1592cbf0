//! Counters, gauges and histograms, rendered in Prometheus' text format for `GET /metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::registry::RegistryStats;

/// A histogram with fixed upper bounds (seconds or counts).
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum in micro-units, so it fits an atomic integer.
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        for (bound, c) in self.bounds.iter().zip(&self.counts) {
            if value <= *bound {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros
            .fetch_add((value * 1e6).max(0.0) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Values observed.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Their sum (to a millionth).
    pub fn sum(&self) -> f64 {
        self.sum_micros.load(Ordering::Relaxed) as f64 * 1e-6
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

const SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const SIZES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Everything the server counts.
pub struct Metrics {
    pub requests_ok: AtomicU64,
    pub requests_client_error: AtomicU64,
    pub requests_server_error: AtomicU64,
    pub requests_rejected: AtomicU64,
    pub requests_cancelled: AtomicU64,
    pub requests_timed_out: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub queue_length: AtomicU64,
    pub running: AtomicU64,
    pub open_connections: AtomicU64,
    pub request_latency: Histogram,
    pub time_to_first_token: Histogram,
    pub batch_size: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests_ok: AtomicU64::new(0),
            requests_client_error: AtomicU64::new(0),
            requests_server_error: AtomicU64::new(0),
            requests_rejected: AtomicU64::new(0),
            requests_cancelled: AtomicU64::new(0),
            requests_timed_out: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            queue_length: AtomicU64::new(0),
            running: AtomicU64::new(0),
            open_connections: AtomicU64::new(0),
            request_latency: Histogram::new(SECONDS),
            time_to_first_token: Histogram::new(SECONDS),
            batch_size: Histogram::new(SIZES),
        }
    }
}

impl Metrics {
    pub fn render(&self, adapters: RegistryStats) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, labels: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (label, v) in labels {
                let _ = writeln!(out, "{name}{label} {v}");
            }
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut out,
            "lowrank_requests_total",
            "Finished requests by outcome.",
            &[
                ("{status=\"ok\"}", load(&self.requests_ok)),
                (
                    "{status=\"client_error\"}",
                    load(&self.requests_client_error),
                ),
                (
                    "{status=\"server_error\"}",
                    load(&self.requests_server_error),
                ),
                ("{status=\"rejected\"}", load(&self.requests_rejected)),
                ("{status=\"cancelled\"}", load(&self.requests_cancelled)),
                ("{status=\"timed_out\"}", load(&self.requests_timed_out)),
            ],
        );
        counter(
            &mut out,
            "lowrank_prompt_tokens_total",
            "Prompt tokens processed.",
            &[("", load(&self.prompt_tokens))],
        );
        counter(
            &mut out,
            "lowrank_generated_tokens_total",
            "Tokens generated.",
            &[("", load(&self.generated_tokens))],
        );
        gauge(
            &mut out,
            "lowrank_queue_length",
            "Requests waiting for a batch slot.",
            load(&self.queue_length),
        );
        gauge(
            &mut out,
            "lowrank_running_requests",
            "Requests in the running batch.",
            load(&self.running),
        );
        gauge(
            &mut out,
            "lowrank_open_connections",
            "HTTP connections being served.",
            load(&self.open_connections),
        );
        gauge(
            &mut out,
            "lowrank_adapters_known",
            "Adapters that can be served.",
            adapters.known as u64,
        );
        gauge(
            &mut out,
            "lowrank_adapters_loaded",
            "Adapters in memory.",
            adapters.loaded as u64,
        );
        gauge(
            &mut out,
            "lowrank_adapters_loaded_bytes",
            "Bytes of adapter tensors in memory.",
            adapters.loaded_bytes,
        );
        counter(
            &mut out,
            "lowrank_adapter_loads_total",
            "Adapter loads from disk.",
            &[("", adapters.loads)],
        );
        counter(
            &mut out,
            "lowrank_adapter_evictions_total",
            "Adapters evicted (LRU).",
            &[("", adapters.evictions)],
        );
        self.request_latency
            .render(&mut out, "lowrank_request_seconds", "Request latency.");
        self.time_to_first_token.render(
            &mut out,
            "lowrank_time_to_first_token_seconds",
            "Time to the first token.",
        );
        self.batch_size
            .render(&mut out, "lowrank_batch_size", "Rows per decoding step.");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_cumulative_buckets() {
        let m = Metrics::default();
        m.request_latency.observe(0.02);
        m.request_latency.observe(3.0);
        m.requests_ok.fetch_add(2, Ordering::Relaxed);
        let text = m.render(RegistryStats {
            known: 3,
            loaded: 1,
            loaded_bytes: 10,
            loads: 4,
            evictions: 1,
        });
        assert!(text.contains("lowrank_request_seconds_bucket{le=\"0.025\"} 1"));
        assert!(text.contains("lowrank_request_seconds_bucket{le=\"5\"} 2"));
        assert!(text.contains("lowrank_request_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("lowrank_requests_total{status=\"ok\"} 2"));
        assert!(text.contains("lowrank_adapter_evictions_total 1"));
        assert!(text.contains("# TYPE lowrank_adapters_loaded gauge\nlowrank_adapters_loaded 1"));
    }
}
