//! The two generation endpoints' requests (`/v1/completions`, `/v1/chat/completions`) as the
//! one generation handler sees them: the fields refused, the checks only one endpoint has, and
//! the prompt tokenized with how the answer is rendered.

use std::sync::Arc;

use lowrank_models::{Message, Tokenizer};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::api::*;
use crate::render::{CompletionRender, Echo, StreamRender};

/// The most tokens `logprobs` / `top_logprobs` may ask for at each position (OpenAI's and
/// vLLM's default bound).
const MAX_TOP_LOGPROBS: usize = 20;

fn check_top(value: usize, field: &str) -> Result<usize, ApiError> {
    if value > MAX_TOP_LOGPROBS {
        return Err(ApiError::bad(format!(
            "{field} must be between 0 and {MAX_TOP_LOGPROBS}"
        )));
    }
    Ok(value)
}

/// Refuses the first field of `other` that asks for something not implemented here.
pub(super) fn refuse_unsupported(
    other: &serde_json::Map<String, serde_json::Value>,
    lists: &[&[Unsupported]],
) -> Result<(), ApiError> {
    match first_unsupported(other, lists) {
        Some(field) => Err(ApiError::bad(format!(
            "`{field}` is not supported by this server"
        ))),
        None => Ok(()),
    }
}

/// A generation endpoint's request (`/v1/completions`, `/v1/chat/completions`): what the one
/// handler, [`super::generation::generation`], asks of it.
pub(super) trait GenerationRequest: DeserializeOwned {
    /// The fields of OpenAI's (or vLLM's) request this endpoint refuses.
    const UNSUPPORTED: &'static [&'static [Unsupported]];
    /// The prefix of its response ids.
    const ID_PREFIX: &'static str;
    /// `max_tokens` when the request has none.
    const DEFAULT_MAX_TOKENS: usize;
    /// What [`Self::check`] found, for [`Self::prepare`].
    type Checked;

    fn sampling(&self) -> &Sampling;
    fn other(&self) -> &serde_json::Map<String, serde_json::Value>;
    /// `model`, `adapter` and `adapters`: the base or adapter(s) to generate with.
    fn target(&self) -> (Option<&str>, Option<&str>, Option<&[StackedAdapter]>);
    /// Checks the fields only this endpoint has, before the adapters are looked up.
    fn check(&self) -> Result<Self::Checked, ApiError>;
    /// Tokenizes the prompt and says how to report the answer.
    fn prepare(
        &self,
        checked: Self::Checked,
        tokenizer: &Arc<Tokenizer>,
    ) -> Result<Prepared, ApiError>;
}

/// A generation request ready to start: its prompt, what it reports and how it is rendered.
pub(super) struct Prepared {
    pub prompt: Vec<u32>,
    pub logprobs: Option<usize>,
    pub prompt_logprobs: Option<usize>,
    pub echo: bool,
    pub render: StreamRender,
}

/// [`GenerationRequest`]'s accessors of the fields both requests have under the same names.
macro_rules! shared_request_fields {
    () => {
        fn sampling(&self) -> &Sampling {
            &self.sampling
        }

        fn other(&self) -> &serde_json::Map<String, serde_json::Value> {
            &self.other
        }

        fn target(&self) -> (Option<&str>, Option<&str>, Option<&[StackedAdapter]>) {
            let (model, adapter) = (self.model.as_deref(), self.adapter.as_deref());
            (model, adapter, self.adapters.as_deref())
        }
    };
}

impl GenerationRequest for CompletionRequest {
    const UNSUPPORTED: &'static [&'static [Unsupported]] = COMPLETION_UNSUPPORTED;
    const ID_PREFIX: &'static str = "cmpl";
    const DEFAULT_MAX_TOKENS: usize = 16;
    /// The prompt and `logprobs`.
    type Checked = (String, Option<usize>);

    shared_request_fields!();

    fn check(&self) -> Result<Self::Checked, ApiError> {
        let prompt = match &self.prompt {
            Prompt::One(p) => p.clone(),
            Prompt::Many(v) if v.len() == 1 => v[0].clone(),
            Prompt::Many(_) => {
                return Err(ApiError::bad(
                    "prompt must be a string or a list of exactly one string",
                ))
            }
        };
        let logprobs = self
            .logprobs
            .map(|k| check_top(k, "logprobs"))
            .transpose()?;
        Ok((prompt, logprobs))
    }

    fn prepare(
        &self,
        (prompt, logprobs): Self::Checked,
        tokenizer: &Arc<Tokenizer>,
    ) -> Result<Prepared, ApiError> {
        let ids = tokenizer
            .encode(&prompt, true)
            .map_err(|e| ApiError::bad(e.to_string()))?;
        let render = CompletionRender {
            tokenizer: tokenizer.clone(),
            echo: self.echo.then(|| Echo {
                text: prompt,
                ids: ids.clone(),
            }),
            logprobs: logprobs.is_some(),
        };
        Ok(Prepared {
            prompt: ids,
            logprobs,
            prompt_logprobs: logprobs.filter(|_| self.echo),
            echo: self.echo,
            render: StreamRender::Completion(render),
        })
    }
}

impl GenerationRequest for ChatRequest {
    const UNSUPPORTED: &'static [&'static [Unsupported]] = CHAT_UNSUPPORTED;
    const ID_PREFIX: &'static str = "chatcmpl";
    const DEFAULT_MAX_TOKENS: usize = 256;
    /// `Some(top_logprobs)` when logprobs are asked for.
    type Checked = Option<usize>;

    shared_request_fields!();

    fn check(&self) -> Result<Self::Checked, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::bad("messages is empty"));
        }
        if self.top_logprobs.is_some() && !self.logprobs {
            return Err(ApiError::bad("top_logprobs needs `logprobs: true`"));
        }
        let top_logprobs = check_top(self.top_logprobs.unwrap_or(0), "top_logprobs")?;
        Ok(self.logprobs.then_some(top_logprobs))
    }

    fn prepare(
        &self,
        logprobs: Self::Checked,
        tokenizer: &Arc<Tokenizer>,
    ) -> Result<Prepared, ApiError> {
        let messages: Vec<Message> = self
            .messages
            .iter()
            .map(|m| Message {
                role: m.role.clone(),
                content: m.content.clone(),
            })
            .collect();
        let ids = tokenizer
            .encode_chat(&messages, true)
            .map_err(|e| ApiError::bad(e.to_string()))?;
        Ok(Prepared {
            prompt: ids,
            logprobs,
            prompt_logprobs: None,
            echo: false,
            render: StreamRender::Chat { logprobs },
        })
    }
}
