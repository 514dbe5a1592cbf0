//! The decoding engine: one thread that owns the batch. Requests join the running batch
//! between steps (continuous batching); each step advances every running sequence by one
//! token, or by a chunk of its prompt, in a single `Llama::forward_rows` pass shared by all
//! tenants' adapters. Requests beyond the batch wait in a bounded queue; the KV cache budget
//! is reserved per request (prompt + max_tokens) on admission.
//!
//! A request whose prompt's log-probabilities are asked for (`echo` with `logprobs`) feeds its
//! prompt chunks through `Llama::forward` instead, which returns every position's logits, in
//! the same steps. A client that goes away is noticed between steps, so between the chunks of
//! a long prompt too.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use lowrank_models::generate::{Sampler, SamplingParams};
use lowrank_models::{ActiveAdapter, KvCache, Llama, RowStep, Tokenizer};
use tokio::sync::mpsc::UnboundedSender;

use crate::logprobs::{floor_boundary, token_logprobs, TokenLogprobs};
use crate::metrics::{EngineState, Metrics};
use crate::registry::AdapterLease;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoded together.
    pub max_batch: usize,
    /// Requests that may wait for a batch slot; more are refused.
    pub max_queue: usize,
    pub kv_cache_bytes: u64,
    /// Prompt tokens one sequence feeds per step, so a long prompt does not stall decoding.
    pub prefill_chunk: usize,
    pub request_timeout: Duration,
}

/// What a sequence sends back, in order: its prompt's log-probabilities (when asked), text
/// pieces, then one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One per prompt token; the first has none (nothing comes before it).
    PromptLogprobs(Vec<Option<TokenLogprobs>>),
    /// New text, with the log-probabilities (when asked) of the tokens sampled since the
    /// previous piece. The text may be empty when only held-back tokens remain. `last`: the
    /// sequence's final piece, which includes any character its last tokens left incomplete.
    Text {
        text: String,
        logprobs: Vec<TokenLogprobs>,
        last: bool,
    },
    Done {
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(EngineError),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("request timed out")]
    TimedOut,
    #[error("internal error: {0}")]
    Internal(String),
}

/// One sequence to generate. An HTTP request asking for `n` choices submits `n` of them.
pub struct Request {
    pub prompt: Vec<u32>,
    /// The adapters applied to this sequence, each with a multiplier on its ΔW; none = the base.
    pub adapters: Vec<(AdapterLease, f64)>,
    /// 0 only to score the prompt (`echo` with `max_tokens` 0).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    /// How many most likely tokens to report with each sampled one; `None`: no log-probabilities.
    pub logprobs: Option<usize>,
    /// Likewise for every prompt token.
    pub prompt_logprobs: Option<usize>,
    /// Which choice of its HTTP request this is; events are tagged with it.
    pub choice: usize,
    pub events: UnboundedSender<(usize, Event)>,
}

impl Request {
    fn send(&self, event: Event) {
        let _ = self.events.send((self.choice, event));
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("the server is at capacity; retry later")]
    QueueFull,
    #[error("prompt ({prompt} tokens) + max_tokens ({max_tokens}) needs {need} bytes of KV cache, more than the server's budget of {budget}")]
    TooLarge {
        prompt: usize,
        max_tokens: usize,
        need: u64,
        budget: u64,
    },
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// Bytes of KV cache one token of a sequence takes (keys and values of every layer, f32).
pub fn kv_bytes_per_token(model: &Llama) -> u64 {
    let c = model.config();
    (c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4) as u64
}

/// The handle the HTTP layer submits to.
pub struct Engine {
    model: Arc<Llama>,
    jobs: std::sync::Mutex<Option<Sender<Request>>>,
    /// Requests submitted and not finished (waiting + running).
    pending: Arc<AtomicUsize>,
    config: EngineConfig,
    kv_bytes_per_token: u64,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct Sequence {
    req: Request,
    cache: KvCache,
    /// Prompt tokens already fed.
    fed: usize,
    generated: Vec<u32>,
    sampler: Sampler,
    /// Bytes of decoded text already sent.
    sent: usize,
    /// Log-probabilities of sampled tokens not yet sent with a text piece.
    unsent_logprobs: Vec<TokenLogprobs>,
    /// The prompt's, gathered chunk by chunk until the prompt is fed.
    prompt_logprobs: Vec<Option<TokenLogprobs>>,
    started: Instant,
    first_token: Option<Instant>,
    kv_reserved: u64,
}

impl Engine {
    pub fn start(
        model: Arc<Llama>,
        tokenizer: Arc<Tokenizer>,
        config: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        let kv_bytes_per_token = kv_bytes_per_token(&model);
        let (tx, rx) = std::sync::mpsc::channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            model: model.clone(),
            tokenizer,
            config: config.clone(),
            metrics,
            pending: pending.clone(),
            kv_bytes_per_token,
            kv_reserved: 0,
            waiting: VecDeque::new(),
            running: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("lowrank-engine".into())
            // The engine's steps run on a pool of their own with this thread as one of its
            // workers: a decoding step is hundreds of short parallel ops, and handing each
            // from an outside thread to the pool (and waking it) costs a fifth of the step.
            .spawn(move || match rayon::ThreadPoolBuilder::new().build() {
                Ok(pool) => pool.install(|| worker.run(rx)),
                Err(_) => worker.run(rx),
            })
            .expect("spawn the engine thread");
        Engine {
            model,
            jobs: std::sync::Mutex::new(Some(tx)),
            pending,
            config,
            kv_bytes_per_token,
            thread: std::sync::Mutex::new(Some(thread)),
        }
    }

    /// The model the engine runs.
    pub fn model(&self) -> &Arc<Llama> {
        &self.model
    }

    /// Submits the sequences of one HTTP request: all are admitted, or none.
    pub fn submit(&self, reqs: Vec<Request>) -> Result<(), SubmitError> {
        for req in &reqs {
            let need = (req.prompt.len() + req.max_tokens) as u64 * self.kv_bytes_per_token;
            if need > self.config.kv_cache_bytes {
                return Err(SubmitError::TooLarge {
                    prompt: req.prompt.len(),
                    max_tokens: req.max_tokens,
                    need,
                    budget: self.config.kv_cache_bytes,
                });
            }
        }
        let count = reqs.len();
        let capacity = self.config.max_batch + self.config.max_queue;
        let admitted = self
            .pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n + count <= capacity).then_some(n + count)
            })
            .is_ok();
        if !admitted {
            return Err(SubmitError::QueueFull);
        }
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = jobs.as_ref() else {
            self.pending.fetch_sub(count, Ordering::SeqCst);
            return Err(SubmitError::ShuttingDown);
        };
        let failed = reqs.into_iter().filter_map(|r| tx.send(r).err()).count();
        if failed > 0 {
            // The engine thread is gone.
            self.pending.fetch_sub(failed, Ordering::SeqCst);
            return Err(SubmitError::ShuttingDown);
        }
        Ok(())
    }

    /// Stops taking requests, lets the running and queued ones finish, and waits for the thread.
    pub fn shutdown(&self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// How a request left the engine, for /metrics.
enum Outcome {
    Finished,
    Cancelled,
    TimedOut,
    Failed,
}

struct Worker {
    model: Arc<Llama>,
    tokenizer: Arc<Tokenizer>,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    pending: Arc<AtomicUsize>,
    kv_bytes_per_token: u64,
    kv_reserved: u64,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
}

impl Worker {
    fn run(mut self, jobs: Receiver<Request>) {
        let mut open = true;
        while open || !self.waiting.is_empty() || !self.running.is_empty() {
            // Block when idle; otherwise take whatever arrived since the last step.
            if self.waiting.is_empty() && self.running.is_empty() {
                match jobs.recv_timeout(Duration::from_millis(200)) {
                    Ok(req) => self.enqueue(req),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => open = false,
                }
            }
            loop {
                match jobs.try_recv() {
                    Ok(req) => self.enqueue(req),
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            // Gone clients first, so that none of them takes a batch slot.
            self.drop_abandoned();
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
            self.report();
        }
    }

    /// Publishes the queue, the KV cache use and the adapters in use for /metrics.
    fn report(&self) {
        let adapters = |seqs: &mut dyn Iterator<Item = &Sequence>| {
            seqs.flat_map(|s| s.req.adapters.iter().map(|(a, _)| a.id().clone()))
                .collect()
        };
        self.metrics.report_engine(&EngineState {
            waiting: self.waiting.len(),
            running: self.running.len(),
            kv_cache_usage: self.kv_reserved as f64 / self.config.kv_cache_bytes.max(1) as f64,
            running_adapters: adapters(&mut self.running.iter()),
            waiting_adapters: adapters(&mut self.waiting.iter()),
        });
    }

    fn enqueue(&mut self, req: Request) {
        let sampler = Sampler::new(req.sampling.clone());
        // The cache gets the room its admission reserves (prompt + max_tokens) at once.
        let cache = KvCache::with_capacity(req.prompt.len() + req.max_tokens);
        self.waiting.push_back(Sequence {
            req,
            cache,
            fed: 0,
            generated: Vec::new(),
            sampler,
            sent: 0,
            unsent_logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
            started: Instant::now(),
            first_token: None,
            kv_reserved: 0,
        });
    }

    fn admit(&mut self) {
        while self.running.len() < self.config.max_batch {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let need =
                (front.req.prompt.len() + front.req.max_tokens) as u64 * self.kv_bytes_per_token;
            if self.kv_reserved + need > self.config.kv_cache_bytes {
                break;
            }
            let mut seq = self.waiting.pop_front().expect("front exists");
            seq.kv_reserved = need;
            self.kv_reserved += need;
            self.running.push(seq);
        }
    }

    /// Ends sequences whose client went away or whose time ran out, waiting ones included.
    fn drop_abandoned(&mut self) {
        let timeout = self.config.request_timeout;
        let gone = |s: &Sequence| s.req.events.is_closed() || s.started.elapsed() > timeout;
        let mut finished = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            if gone(&self.running[i]) {
                finished.push(self.running.swap_remove(i));
            } else {
                i += 1;
            }
        }
        let (gone_waiting, still_waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(gone);
        self.waiting = still_waiting.into();
        for s in finished.into_iter().chain(gone_waiting) {
            // Counted before the client hears of it, so /metrics already shows it then.
            if s.req.events.is_closed() {
                self.release(&s, Outcome::Cancelled);
            } else {
                self.release(&s, Outcome::TimedOut);
                s.req.send(Event::Error(EngineError::TimedOut));
            }
        }
    }

    fn release(&mut self, seq: &Sequence, outcome: Outcome) {
        self.kv_reserved -= seq.kv_reserved;
        self.pending.fetch_sub(1, Ordering::SeqCst);
        let counter = match outcome {
            Outcome::Finished => &self.metrics.requests_ok,
            Outcome::Cancelled => &self.metrics.requests_cancelled,
            Outcome::TimedOut => &self.metrics.requests_timed_out,
            Outcome::Failed => &self.metrics.requests_server_error,
        };
        counter.inc();
        self.metrics
            .request_latency
            .observe(seq.started.elapsed().as_secs_f64());
    }

    fn step(&mut self) {
        let chunk = self.config.prefill_chunk.max(1);
        // The tokens each running sequence feeds this step.
        let plan: Vec<Vec<u32>> = self
            .running
            .iter()
            .map(|s| {
                if s.fed < s.req.prompt.len() {
                    s.req.prompt[s.fed..(s.fed + chunk).min(s.req.prompt.len())].to_vec()
                } else {
                    vec![*s
                        .generated
                        .last()
                        .expect("a fed sequence has sampled a token")]
                }
            })
            .collect();
        self.metrics.batch_size.observe(plan.len() as f64);
        self.metrics
            .step_tokens
            .record(plan.iter().map(Vec::len).sum());
        let logits = match self.forward(&plan) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("forward failed: {e}");
                for s in std::mem::take(&mut self.running) {
                    self.release(&s, Outcome::Failed);
                    s.req
                        .send(Event::Error(EngineError::Internal(e.to_string())));
                }
                return;
            }
        };
        let mut done = Vec::new();
        for (i, (tokens, row_logits)) in plan.iter().zip(logits).enumerate() {
            let s = &mut self.running[i];
            let was_prefill = s.fed < s.req.prompt.len();
            if was_prefill {
                s.fed += tokens.len();
                self.metrics.prompt_tokens.inc_by(tokens.len() as u64);
                if s.fed < s.req.prompt.len() {
                    continue;
                }
                if s.req.prompt_logprobs.is_some() {
                    s.req.send(Event::PromptLogprobs(std::mem::take(
                        &mut s.prompt_logprobs,
                    )));
                }
                if s.req.max_tokens == 0 {
                    done.push((i, "length"));
                    continue;
                }
            }
            let next = s.sampler.sample(&row_logits);
            if s.first_token.is_none() {
                s.first_token = Some(Instant::now());
                self.metrics
                    .time_to_first_token
                    .observe(s.started.elapsed().as_secs_f64());
            }
            let finish = if s.req.stop_ids.contains(&next) {
                self.emit_text(i, true);
                Some("stop")
            } else {
                s.generated.push(next);
                if let Some(k) = s.req.logprobs {
                    s.unsent_logprobs.push(token_logprobs(&row_logits, next, k));
                }
                self.metrics.generated_tokens.inc();
                let at_limit = s.generated.len() >= s.req.max_tokens;
                match self.emit_text(i, at_limit) {
                    Some(stop) => Some(stop),
                    None => at_limit.then_some("length"),
                }
            };
            if let Some(reason) = finish {
                done.push((i, reason));
            }
        }
        done.sort_unstable_by_key(|d| std::cmp::Reverse(d.0));
        let mut answers = Vec::with_capacity(done.len());
        for (i, finish_reason) in done {
            let s = self.running.swap_remove(i);
            self.release(&s, Outcome::Finished);
            let done = Event::Done {
                finish_reason,
                prompt_tokens: s.req.prompt.len(),
                completion_tokens: s.generated.len(),
            };
            answers.push((s.req.events.clone(), s.req.choice, done));
            // Unpin the adapter before the client hears back, so the budget already holds then.
            drop(s);
        }
        // Likewise /metrics no longer counts them once their clients hear back.
        if !answers.is_empty() {
            self.report();
        }
        for (events, choice, done) in answers {
            let _ = events.send((choice, done));
        }
    }

    /// One step's logits after each running sequence's tokens: one batched pass over the
    /// rows, and a pass of their own for prompt chunks whose every position is scored.
    fn forward(&mut self, plan: &[Vec<u32>]) -> lowrank_core::Result<Vec<Vec<f32>>> {
        let scored = |s: &Sequence| s.req.prompt_logprobs.is_some() && s.fed < s.req.prompt.len();
        let mut logits: Vec<Vec<f32>> = vec![Vec::new(); plan.len()];
        let mut rows = Vec::new();
        let mut batched = Vec::new();
        for (i, (s, tokens)) in self.running.iter_mut().zip(plan).enumerate() {
            if scored(s) {
                logits[i] = score_chunk(&self.model, s, tokens)?;
            } else {
                batched.push(i);
                rows.push(RowStep {
                    tokens,
                    cache: &mut s.cache,
                    adapters: s
                        .req
                        .adapters
                        .iter()
                        .map(|(a, w)| (a.adapter(), *w))
                        .collect(),
                });
            }
        }
        if !rows.is_empty() {
            let out = self.model.forward_rows(&mut rows)?.to_vec2::<f32>()?;
            for (i, row) in batched.into_iter().zip(out) {
                logits[i] = row;
            }
        }
        Ok(logits)
    }

    /// Sends the new text of sequence `i`. Holds back a partial UTF-8 character and anything
    /// that could still become a stop string, unless `flush`. Returns `Some("stop")` when a
    /// stop string appeared (the text is cut before it).
    fn emit_text(&mut self, i: usize, flush: bool) -> Option<&'static str> {
        let s = &mut self.running[i];
        let text = match self.tokenizer.decode(&s.generated, true) {
            Ok(t) => t,
            Err(_) => return None,
        };
        let longest_stop = s
            .req
            .stop_strings
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(0);
        let search_from = s.sent.saturating_sub(longest_stop);
        let stop_at = s
            .req
            .stop_strings
            .iter()
            .filter(|p| !p.is_empty())
            .filter_map(|p| {
                text[floor_boundary(&text, search_from)..]
                    .find(p.as_str())
                    .map(|j| j + floor_boundary(&text, search_from))
            })
            .min();
        let (end, reason) = match stop_at {
            Some(at) => (at.max(s.sent), Some("stop")),
            None if flush => (text.len(), None),
            None => {
                let mut end = text.len().saturating_sub(longest_stop.saturating_sub(1));
                if text.ends_with('\u{FFFD}') {
                    end = end.min(text.len() - '\u{FFFD}'.len_utf8());
                }
                (floor_boundary(&text, end).max(s.sent), None)
            }
        };
        // Held-back tokens' log-probabilities go out with the text they end up in, or with
        // the last piece.
        let finished = flush || reason.is_some();
        if end > s.sent || (finished && !s.unsent_logprobs.is_empty()) {
            s.req.send(Event::Text {
                text: text[s.sent..end].to_string(),
                logprobs: std::mem::take(&mut s.unsent_logprobs),
                last: finished,
            });
            s.sent = end;
        }
        reason
    }
}

/// Feeds a prompt chunk of `s` and records the log-probability of each prompt token it
/// predicts; returns the logits after its last token.
fn score_chunk(model: &Llama, s: &mut Sequence, tokens: &[u32]) -> lowrank_core::Result<Vec<f32>> {
    model.check_ids(tokens)?;
    let active: Vec<ActiveAdapter> = s
        .req
        .adapters
        .iter()
        .map(|(a, w)| ActiveAdapter::with_coefficient(a.adapter(), *w))
        .collect();
    let ids = Tensor::new(tokens, model.device())?.unsqueeze(0)?;
    let rows = model
        .forward(&ids, Some(&mut s.cache), &active)?
        .squeeze(0)?
        .to_vec2::<f32>()?;
    let k = s.req.prompt_logprobs.unwrap_or(0);
    if s.fed == 0 {
        s.prompt_logprobs.push(None);
    }
    // Row j predicts the prompt token after position fed + j.
    for (j, row) in rows.iter().enumerate() {
        if let Some(&next) = s.req.prompt.get(s.fed + j + 1) {
            s.prompt_logprobs.push(Some(token_logprobs(row, next, k)));
        }
    }
    rows.into_iter()
        .last()
        .ok_or_else(|| lowrank_core::Error::Msg("empty prompt chunk".into()))
}
