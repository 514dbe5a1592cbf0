//! Counters, gauges and histograms for `GET /metrics`, in Prometheus' classic text format (0.0.4).
//!
//! Two sets of series. lowrank's own (`lowrank_*`), and the model-server protocol of Kubernetes'
//! Gateway API Inference Extension under vLLM's names, which its endpoint picker scrapes (every
//! ~50 ms) to route each request to a pod that has the request's adapter running, or room for it:
//! - `vllm:num_requests_waiting`, `vllm:num_requests_running` (gauges): sequences waiting for a
//!   batch slot, and in the running batch.
//! - `vllm:kv_cache_usage_perc` (gauge): the fraction (0–1) of the KV cache budget reserved by
//!   the running sequences (each reserves prompt + max_tokens on admission).
//! - `vllm:lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters}` (gauge):
//!   the adapters of the running and of the waiting sequences (comma-separated ids), and the most
//!   distinct adapters one batch holds within the loaded-adapter limit: min(--max-batch,
//!   --max-loaded-adapters), 0 for a merged deployment. Its value is the Unix time of the engine's
//!   last update, as vLLM sets it; the picker reads the series with the largest value, and this
//!   server exports one series only.
//! - `vllm:cache_config_info{block_size, num_gpu_blocks}` (gauge, 1): the KV cache is reserved by
//!   the token, so a block is one token and the budget holds `num_gpu_blocks` of them. No prefix
//!   caching (`enable_prefix_caching="False"`).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::registry::RegistryStats;
use crate::step_tokens::StepTokens;

/// The media type of the text format.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

const SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const SIZES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// The facts of a deployment that the protocol series carry.
#[derive(Debug, Clone)]
pub struct Protocol {
    /// The base model's id in the API (vLLM's `model_name` label).
    pub model_name: String,
    /// Distinct adapters one batch holds within the loaded-adapter limit.
    pub max_lora: usize,
    /// Tokens the KV cache budget holds.
    pub kv_cache_tokens: u64,
}

/// What the engine reports after each step: one snapshot, so a scrape never mixes two steps.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineState {
    pub waiting: usize,
    pub running: usize,
    /// Fraction of the KV cache budget reserved.
    pub kv_cache_usage: f64,
    pub running_adapters: BTreeSet<Arc<str>>,
    pub waiting_adapters: BTreeSet<Arc<str>>,
}

struct Reported {
    state: EngineState,
    /// Unix time of the report, in seconds.
    at: f64,
}

/// Everything the server counts.
pub struct Metrics {
    registry: Registry,
    pub requests_ok: IntCounter,
    pub requests_client_error: IntCounter,
    pub requests_server_error: IntCounter,
    pub requests_rejected: IntCounter,
    pub requests_cancelled: IntCounter,
    pub requests_timed_out: IntCounter,
    pub prompt_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    pub open_connections: IntGauge,
    pub request_latency: Histogram,
    pub time_to_first_token: Histogram,
    pub batch_size: Histogram,
    /// Steps by the tokens they fed (for the load benchmark's roofline; not exported).
    pub step_tokens: StepTokens,
    engine: Mutex<Reported>,
    protocol: Protocol,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Metrics {
    pub fn new(protocol: Protocol) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("lowrank_requests_total", "Finished requests by outcome."),
            &["status"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        let status = |s: &str| requests.with_label_values(&[s]);
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let histogram = |name: &str, help: &str, bounds: &[f64]| -> prometheus::Result<Histogram> {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(bounds.to_vec()))?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let open_connections =
            IntGauge::new("lowrank_open_connections", "HTTP connections being served.")?;
        registry.register(Box::new(open_connections.clone()))?;
        Ok(Metrics {
            requests_ok: status("ok"),
            requests_client_error: status("client_error"),
            requests_server_error: status("server_error"),
            requests_rejected: status("rejected"),
            requests_cancelled: status("cancelled"),
            requests_timed_out: status("timed_out"),
            prompt_tokens: counter("lowrank_prompt_tokens_total", "Prompt tokens processed.")?,
            generated_tokens: counter("lowrank_generated_tokens_total", "Tokens generated.")?,
            open_connections,
            request_latency: histogram("lowrank_request_seconds", "Request latency.", SECONDS)?,
            time_to_first_token: histogram(
                "lowrank_time_to_first_token_seconds",
                "Time to the first token.",
                SECONDS,
            )?,
            batch_size: histogram("lowrank_batch_size", "Rows per decoding step.", SIZES)?,
            step_tokens: StepTokens::default(),
            registry,
            engine: Mutex::new(Reported {
                state: EngineState::default(),
                at: unix_now(),
            }),
            protocol,
        })
    }

    /// Records the engine's state after a step (only when it changed: the time stamp then says
    /// when the adapter sets last changed).
    pub fn report_engine(&self, state: &EngineState) {
        let mut reported = self.engine.lock().unwrap_or_else(|e| e.into_inner());
        if reported.state != *state {
            reported.state = state.clone();
            reported.at = unix_now();
        }
    }

    /// Every series, in the text format.
    pub fn render(&self, adapters: RegistryStats) -> prometheus::Result<String> {
        let mut families = self.registry.gather();
        families.extend(self.scraped(adapters)?);
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::new();
        TextEncoder::new().encode(&families, &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }

    /// The series whose values are read at scrape time: the engine's last report and the
    /// adapter registry's counts.
    fn scraped(&self, adapters: RegistryStats) -> prometheus::Result<Vec<MetricFamily>> {
        let (state, at) = {
            let reported = self.engine.lock().unwrap_or_else(|e| e.into_inner());
            (reported.state.clone(), reported.at)
        };
        let p = &self.protocol;
        let mut families = Vec::new();
        let mut int_gauge = |name: &str, help: &str, v: i64| -> prometheus::Result<()> {
            let g = IntGauge::new(name, help)?;
            g.set(v);
            families.extend(g.collect());
            Ok(())
        };
        int_gauge(
            "lowrank_queue_length",
            "Requests waiting for a batch slot.",
            state.waiting as i64,
        )?;
        int_gauge(
            "lowrank_running_requests",
            "Requests in the running batch.",
            state.running as i64,
        )?;
        int_gauge(
            "lowrank_adapters_known",
            "Adapters that can be served.",
            adapters.known as i64,
        )?;
        int_gauge(
            "lowrank_adapters_loaded",
            "Adapters in memory.",
            adapters.loaded as i64,
        )?;
        int_gauge(
            "lowrank_adapters_loaded_bytes",
            "Bytes of adapter tensors in memory.",
            adapters.loaded_bytes as i64,
        )?;
        for (name, help, v) in [
            (
                "lowrank_adapter_loads_total",
                "Adapter loads from disk.",
                adapters.loads,
            ),
            (
                "lowrank_adapter_evictions_total",
                "Adapters evicted (LRU).",
                adapters.evictions,
            ),
        ] {
            let c = IntCounter::new(name, help)?;
            c.inc_by(v);
            families.extend(c.collect());
        }
        let model =
            |name: &str, help: &str| Opts::new(name, help).const_label("model_name", &p.model_name);
        let waiting = Gauge::with_opts(model(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
        ))?;
        waiting.set(state.waiting as f64);
        let running = Gauge::with_opts(model(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
        ))?;
        running.set(state.running as f64);
        let kv = Gauge::with_opts(model(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
        ))?;
        kv.set(state.kv_cache_usage);
        let lora = GaugeVec::new(
            Opts::new("vllm:lora_requests_info", "Running stats on lora requests."),
            &["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )?;
        let join = |s: &BTreeSet<Arc<str>>| s.iter().map(|a| &**a).collect::<Vec<_>>().join(",");
        lora.with_label_values(&[
            p.max_lora.to_string(),
            join(&state.running_adapters),
            join(&state.waiting_adapters),
        ])
        .set(at);
        let cache = GaugeVec::new(
            Opts::new(
                "vllm:cache_config_info",
                "Information of the LLMEngine CacheConfig",
            ),
            &["block_size", "num_gpu_blocks", "enable_prefix_caching"],
        )?;
        cache
            .with_label_values(&["1", &p.kv_cache_tokens.to_string(), "False"])
            .set(1.0);
        families.extend(waiting.collect());
        families.extend(running.collect());
        families.extend(kv.collect());
        families.extend(lora.collect());
        families.extend(cache.collect());
        Ok(families)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics::new(Protocol {
            model_name: "base".into(),
            max_lora: 4,
            kv_cache_tokens: 1000,
        })
        .unwrap()
    }

    #[test]
    fn prometheus_text_has_cumulative_buckets() {
        let m = metrics();
        m.request_latency.observe(0.02);
        m.request_latency.observe(3.0);
        m.requests_ok.inc_by(2);
        let text = m
            .render(RegistryStats {
                known: 3,
                loaded: 1,
                loaded_bytes: 10,
                loads: 4,
                evictions: 1,
            })
            .unwrap();
        assert!(text.contains("lowrank_request_seconds_bucket{le=\"0.025\"} 1"));
        assert!(text.contains("lowrank_request_seconds_bucket{le=\"5\"} 2"));
        assert!(text.contains("lowrank_request_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("lowrank_requests_total{status=\"ok\"} 2"));
        assert!(text.contains("lowrank_adapter_evictions_total 1"));
        assert!(text.contains("# TYPE lowrank_adapters_loaded gauge\nlowrank_adapters_loaded 1"));
    }

    #[test]
    fn the_lora_series_time_stamp_moves_only_when_the_state_changes() {
        let m = metrics();
        let lora_value = |m: &Metrics| -> f64 {
            let text = m.render(RegistryStats::default()).unwrap();
            let scrape = prom_text_format_parser::Scrape::parse(&text).unwrap();
            let family = scrape
                .metrics
                .iter()
                .find(|f| f.name == "vllm:lora_requests_info")
                .unwrap();
            assert_eq!(family.samples.len(), 1);
            family.samples[0].value.value.as_f64()
        };
        let mut state = EngineState {
            running: 1,
            ..EngineState::default()
        };
        state.running_adapters.insert("a".into());
        m.report_engine(&state);
        let first = lora_value(&m);
        std::thread::sleep(std::time::Duration::from_millis(20));
        m.report_engine(&state);
        assert_eq!(lora_value(&m), first);
        state.waiting_adapters.insert("b".into());
        m.report_engine(&state);
        assert!(lora_value(&m) > first);
    }
}
