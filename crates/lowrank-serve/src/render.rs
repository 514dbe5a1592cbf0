//! Engine events to OpenAI bodies: whole answers of `n` choices, or SSE chunks as they come,
//! with `logprobs` and `echo` in the shapes OpenAI (and vLLM) give them.

use std::convert::Infallible;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use lowrank_models::Tokenizer;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::api::*;
use crate::continuous_batching::{EngineError, Event};
use crate::logprobs::{Detokenizer, TokenLogprobs};

/// The engine's events of every choice of one HTTP request.
pub type Events = UnboundedReceiver<(usize, Event)>;

/// What one choice produced.
#[derive(Debug, Default)]
pub struct ChoiceOutput {
    pub text: String,
    pub logprobs: Vec<TokenLogprobs>,
    pub prompt_logprobs: Vec<Option<TokenLogprobs>>,
    pub finish_reason: &'static str,
}

/// The HTTP status of a request the engine could not finish.
pub fn engine_error_status(e: &EngineError) -> StatusCode {
    match e {
        EngineError::TimedOut => StatusCode::GATEWAY_TIMEOUT,
        EngineError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Waits for all `n` choices to finish.
pub async fn collect(mut rx: Events, n: usize) -> Result<(Vec<ChoiceOutput>, Usage), EngineError> {
    let mut choices: Vec<ChoiceOutput> = (0..n).map(|_| ChoiceOutput::default()).collect();
    let mut usage = Usage {
        prompt_tokens: 0,
        completion_tokens: 0,
        total_tokens: 0,
    };
    let mut finished = 0;
    while let Some((index, ev)) = rx.recv().await {
        let choice = &mut choices[index];
        match ev {
            Event::PromptLogprobs(p) => choice.prompt_logprobs = p,
            Event::Text { text, logprobs, .. } => {
                choice.text.push_str(&text);
                choice.logprobs.extend(logprobs);
            }
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                choice.finish_reason = finish_reason;
                usage.prompt_tokens = prompt_tokens;
                usage.completion_tokens += completion_tokens;
                finished += 1;
                if finished == n {
                    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
                    return Ok((choices, usage));
                }
            }
            Event::Error(e) => return Err(e),
        }
    }
    Err(EngineError::Internal("the engine stopped".into()))
}

/// Turns each token into the text it adds (and its alternatives into theirs), keeping the
/// running character offset for a completion's `text_offset`.
pub struct TokenTexts {
    detokenizer: Detokenizer,
    offset: usize,
}

impl TokenTexts {
    pub fn new(tokenizer: Arc<Tokenizer>, offset: usize) -> Self {
        TokenTexts {
            detokenizer: Detokenizer::new(tokenizer),
            offset,
        }
    }

    /// Appends `token` to a completion's logprobs: its text, log-probability and the most
    /// likely tokens there, with the token itself (as OpenAI: up to `logprobs` + 1 entries).
    pub fn completion(
        &mut self,
        out: &mut CompletionLogprobs,
        token: u32,
        logprobs: Option<&TokenLogprobs>,
    ) {
        let top = logprobs.map(|lp| {
            let mut top = TopLogprobs::default();
            for &(id, logprob) in &lp.top {
                top.insert(self.detokenizer.peek(id), logprob);
            }
            if !lp.top.iter().any(|&(id, _)| id == token) {
                top.insert(self.detokenizer.peek(token), lp.logprob);
            }
            top
        });
        let text = self.detokenizer.push(token);
        out.text_offset.push(self.offset);
        self.offset += text.chars().count();
        out.tokens.push(text);
        out.token_logprobs.push(logprobs.map(|lp| lp.logprob));
        out.top_logprobs.push(top);
    }

    /// One generated token of a chat answer, with the `k` most likely tokens there.
    fn chat(&mut self, lp: &TokenLogprobs) -> ChatTokenLogprob {
        let top_logprobs = lp
            .top
            .iter()
            .map(|&(id, logprob)| {
                let token = self.detokenizer.peek(id);
                ChatTopLogprob {
                    bytes: token.as_bytes().to_vec(),
                    token,
                    logprob,
                }
            })
            .collect();
        let token = self.detokenizer.push(lp.token);
        self.offset += token.chars().count();
        ChatTokenLogprob {
            bytes: token.as_bytes().to_vec(),
            token,
            logprob: lp.logprob,
            top_logprobs,
        }
    }

    /// Gives the last token in `out` the text its sequence left incomplete, so that the
    /// tokens' texts join up to the whole text.
    pub fn finish_completion(&mut self, out: &mut CompletionLogprobs) {
        let rest = self.detokenizer.remainder();
        if let Some(last) = out.tokens.last_mut() {
            self.offset += rest.chars().count();
            last.push_str(&rest);
        }
    }

    /// Likewise for a chat answer's last token.
    pub fn finish_chat(&mut self, content: &mut [ChatTokenLogprob]) {
        let rest = self.detokenizer.remainder();
        if let Some(last) = content.last_mut() {
            self.offset += rest.chars().count();
            last.token.push_str(&rest);
            last.bytes = last.token.as_bytes().to_vec();
        }
    }

    /// Chat logprobs of answer tokens; `last`: the answer's final ones.
    pub fn chat_logprobs(&mut self, logprobs: &[TokenLogprobs], last: bool) -> ChatLogprobs {
        let mut content: Vec<ChatTokenLogprob> = logprobs.iter().map(|lp| self.chat(lp)).collect();
        if last {
            self.finish_chat(&mut content);
        }
        ChatLogprobs { content }
    }

    /// Counts text that has no tokens of its own (an echoed prompt without logprobs).
    pub fn skip(&mut self, text: &str) {
        self.offset += text.chars().count();
    }

    /// Starts decoding afresh at the current offset: an answer's tokens are decoded apart from
    /// the echoed prompt's, as the engine decodes its text.
    pub fn restart(&mut self) {
        self.detokenizer = Detokenizer::new(self.detokenizer.tokenizer());
    }
}

/// What a completion echoes before its answer.
#[derive(Clone)]
pub struct Echo {
    pub text: String,
    pub ids: Vec<u32>,
}

/// Builds completion choices (whole or streamed) for one request.
pub struct CompletionRender {
    pub tokenizer: Arc<Tokenizer>,
    pub echo: Option<Echo>,
    /// `logprobs` was asked for.
    pub logprobs: bool,
}

impl CompletionRender {
    /// The logprobs of an echoed prompt, continuing `texts`.
    fn prompt_logprobs(
        &self,
        texts: &mut TokenTexts,
        ids: &[u32],
        logprobs: &[Option<TokenLogprobs>],
    ) -> CompletionLogprobs {
        let mut out = CompletionLogprobs::default();
        for (i, &id) in ids.iter().enumerate() {
            texts.completion(&mut out, id, logprobs.get(i).and_then(Option::as_ref));
        }
        out
    }

    /// The logprobs of answer tokens; `last`: the answer's final ones.
    fn generated_logprobs(
        &self,
        texts: &mut TokenTexts,
        logprobs: &[TokenLogprobs],
        last: bool,
    ) -> CompletionLogprobs {
        let mut out = CompletionLogprobs::default();
        for lp in logprobs {
            texts.completion(&mut out, lp.token, Some(lp));
        }
        if last {
            texts.finish_completion(&mut out);
        }
        out
    }

    /// A whole choice: the echoed prompt (with its tokens' logprobs), then the answer.
    pub fn choice(&self, index: usize, output: ChoiceOutput) -> CompletionChoice {
        let mut text = String::new();
        let mut logprobs = CompletionLogprobs::default();
        let mut texts = TokenTexts::new(self.tokenizer.clone(), 0);
        if let Some(echo) = &self.echo {
            text.push_str(&echo.text);
            if self.logprobs {
                logprobs = self.prompt_logprobs(&mut texts, &echo.ids, &output.prompt_logprobs);
                texts.restart();
            } else {
                texts.skip(&echo.text);
            }
        }
        logprobs.append(self.generated_logprobs(&mut texts, &output.logprobs, true));
        text.push_str(&output.text);
        CompletionChoice {
            index,
            text,
            logprobs: self.logprobs.then_some(logprobs),
            finish_reason: Some(output.finish_reason),
        }
    }
}

/// Per-choice state of a stream.
struct StreamedChoice {
    texts: TokenTexts,
    /// The chat role goes with a choice's first chunk.
    first: bool,
}

/// The chunks of one request's stream.
pub enum StreamRender {
    Completion(CompletionRender),
    /// `Some(k)`: logprobs with the `k` most likely tokens.
    Chat {
        logprobs: Option<usize>,
    },
}

/// Streams the events of `n` choices as SSE `data:` lines in OpenAI's chunk shape, then the
/// usage (when asked) and `[DONE]`. A task forwards them and also watches for the client
/// hanging up, so that a client gone during a long prefill (no events yet) drops the
/// engine's channel at once and the engine stops the sequences at its next step.
pub fn stream(
    rx: Events,
    n: usize,
    render: StreamRender,
    header: ChunkHeader,
    include_usage: bool,
) -> Response {
    let (tx, out) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let mut streamer = Streamer {
            rx,
            n,
            render,
            header,
            include_usage,
            tx,
        };
        streamer.run().await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out)).into_response()
}

/// What every chunk of a stream repeats.
pub struct ChunkHeader {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub tokenizer: Arc<Tokenizer>,
}

struct Streamer {
    rx: Events,
    n: usize,
    render: StreamRender,
    header: ChunkHeader,
    include_usage: bool,
    tx: tokio::sync::mpsc::Sender<Result<SseEvent, Infallible>>,
}

impl Streamer {
    // Chunks are written straight to text: through a `Value`, f32 log-probabilities would
    // print widened to f64 digits, unlike the whole answers.
    fn completion_chunk(
        &self,
        index: usize,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish_reason: Option<&'static str>,
    ) -> String {
        let choice = CompletionChoice {
            index,
            text,
            logprobs,
            finish_reason,
        };
        self.completion_body(vec![choice], None)
    }

    fn completion_body(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> String {
        serde_json::to_string(&CompletionResponse {
            id: self.header.id.clone(),
            object: "text_completion",
            created: self.header.created,
            model: self.header.model.clone(),
            choices,
            usage,
        })
        .unwrap_or_default()
    }

    fn chat_chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> String {
        serde_json::to_string(&ChatChunk {
            id: self.header.id.clone(),
            object: "chat.completion.chunk",
            created: self.header.created,
            model: self.header.model.clone(),
            choices,
            usage,
        })
        .unwrap_or_default()
    }

    /// Sends one `data:` line; false when the client has gone.
    async fn send(&self, data: String) -> bool {
        self.tx
            .send(Ok(SseEvent::default().data(data)))
            .await
            .is_ok()
    }

    async fn run(&mut self) {
        let mut choices: Vec<StreamedChoice> = (0..self.n)
            .map(|_| StreamedChoice {
                texts: TokenTexts::new(self.header.tokenizer.clone(), 0),
                first: true,
            })
            .collect();
        // An echo without logprobs goes out at once; with them, once the prompt is scored.
        if let StreamRender::Completion(CompletionRender {
            echo: Some(echo),
            logprobs: false,
            ..
        }) = &self.render
        {
            for (index, choice) in choices.iter_mut().enumerate() {
                choice.texts.skip(&echo.text);
                let chunk = self.completion_chunk(index, echo.text.clone(), None, None);
                if !self.send(chunk).await {
                    return;
                }
            }
        }
        let mut usage = Usage {
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
        };
        let mut finished = 0;
        while finished < self.n {
            let next = tokio::select! {
                next = self.rx.recv() => next,
                // The client hung up: return, dropping the engine's channel.
                () = self.tx.closed() => return,
            };
            let Some((index, event)) = next else {
                let error = EngineError::Internal("the engine stopped".into());
                self.send_error(&error).await;
                return;
            };
            let choice = &mut choices[index];
            let data = match (&self.render, event) {
                (_, Event::Error(e)) => {
                    self.send_error(&e).await;
                    return;
                }
                (
                    _,
                    Event::Done {
                        finish_reason,
                        prompt_tokens,
                        completion_tokens,
                    },
                ) => {
                    finished += 1;
                    usage.prompt_tokens = prompt_tokens;
                    usage.completion_tokens += completion_tokens;
                    match &self.render {
                        StreamRender::Completion(_) => {
                            self.completion_chunk(index, String::new(), None, Some(finish_reason))
                        }
                        StreamRender::Chat { .. } => {
                            let delta = Delta {
                                role: std::mem::take(&mut choice.first).then_some("assistant"),
                                content: None,
                            };
                            self.chat_chunk(
                                vec![ChatChunkChoice {
                                    index,
                                    delta,
                                    logprobs: None,
                                    finish_reason: Some(finish_reason),
                                }],
                                None,
                            )
                        }
                    }
                }
                (StreamRender::Completion(render), Event::PromptLogprobs(logprobs)) => {
                    let Some(echo) = &render.echo else { continue };
                    let lp = render.prompt_logprobs(&mut choice.texts, &echo.ids, &logprobs);
                    choice.texts.restart();
                    self.completion_chunk(index, echo.text.clone(), Some(lp), None)
                }
                (
                    StreamRender::Completion(render),
                    Event::Text {
                        text,
                        logprobs,
                        last,
                    },
                ) => {
                    let lp = render
                        .logprobs
                        .then(|| render.generated_logprobs(&mut choice.texts, &logprobs, last));
                    self.completion_chunk(index, text, lp, None)
                }
                (
                    StreamRender::Chat { logprobs: k },
                    Event::Text {
                        text,
                        logprobs,
                        last,
                    },
                ) => {
                    let logprobs = k.map(|_| choice.texts.chat_logprobs(&logprobs, last));
                    let delta = Delta {
                        role: std::mem::take(&mut choice.first).then_some("assistant"),
                        content: Some(text),
                    };
                    self.chat_chunk(
                        vec![ChatChunkChoice {
                            index,
                            delta,
                            logprobs,
                            finish_reason: None,
                        }],
                        None,
                    )
                }
                (StreamRender::Chat { .. }, Event::PromptLogprobs(_)) => continue,
            };
            if !self.send(data).await {
                return;
            }
        }
        if self.include_usage {
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
            let data = match &self.render {
                StreamRender::Completion(_) => self.completion_body(vec![], Some(usage)),
                StreamRender::Chat { .. } => self.chat_chunk(vec![], Some(usage)),
            };
            if !self.send(data).await {
                return;
            }
        }
        self.send("[DONE]".into()).await;
    }

    async fn send_error(&self, e: &EngineError) {
        let body = ErrorBody::new(engine_error_status(e), e.to_string());
        if self
            .send(serde_json::to_string(&body).unwrap_or_default())
            .await
        {
            self.send("[DONE]".into()).await;
        }
    }
}
