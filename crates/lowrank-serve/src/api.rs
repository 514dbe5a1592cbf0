//! OpenAI-compatible request and response bodies (the wire format), kept apart from the
//! engine's own types so the JSON shape is pinned by tests here.

use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// A JSON object read as `T`: serde's derive also reads a struct from an array of its fields in
/// order (`["user", "hi"]` as a message, `[]` as stream options), which no client means.
fn object<T: DeserializeOwned, E: serde::de::Error>(map: Map<String, Value>) -> Result<T, E> {
    serde_json::from_value(Value::Object(map)).map_err(E::custom)
}

fn objects<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<Vec<T>, D::Error> {
    Vec::<Map<String, Value>>::deserialize(d)?
        .into_iter()
        .map(object)
        .collect()
}

fn optional_object<'de, D: Deserializer<'de>, T: DeserializeOwned>(
    d: D,
) -> Result<Option<T>, D::Error> {
    Option::<Map<String, Value>>::deserialize(d)?
        .map(object)
        .transpose()
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// `prompt`: a string, or a list holding exactly one string.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Sampling {
    /// Choices to generate, each its own sequence in the batch.
    pub n: Option<usize>,
    pub max_tokens: Option<usize>,
    /// The chat endpoint's newer name for `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// vLLM's and llama.cpp's extension; 0 or -1 turn it off.
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default, deserialize_with = "optional_object")]
    pub stream_options: Option<StreamOptions>,
}

/// lowrank extension: one adapter of a stack, with a multiplier on its ΔW.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StackedAdapter {
    pub name: String,
    #[serde(default = "unit_weight")]
    pub weight: f64,
}

fn unit_weight() -> f64 {
    1.0
}

/// `POST /v1/completions`
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The base model's id or an adapter's; absent: the base (as vLLM and llama.cpp do).
    pub model: Option<String>,
    pub prompt: Prompt,
    /// lowrank extension: the adapter id, when `model` names the base.
    pub adapter: Option<String>,
    /// How many most likely tokens to report with each token (0 to 20).
    pub logprobs: Option<usize>,
    /// Answer with the prompt followed by the completion.
    #[serde(default)]
    pub echo: bool,
    /// lowrank extension: several adapters applied together (their weighted deltas added),
    /// when `model` names the base.
    pub adapters: Option<Vec<StackedAdapter>>,
    #[serde(flatten)]
    pub sampling: Sampling,
    /// Every other field, checked against [`COMPLETION_UNSUPPORTED`].
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// `POST /v1/chat/completions`
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    #[serde(deserialize_with = "objects")]
    pub messages: Vec<ChatMessage>,
    pub adapter: Option<String>,
    /// Report each token's log-probability.
    #[serde(default)]
    pub logprobs: bool,
    /// And this many most likely tokens at each position (0 to 20; needs `logprobs`).
    pub top_logprobs: Option<usize>,
    pub adapters: Option<Vec<StackedAdapter>>,
    #[serde(flatten)]
    pub sampling: Sampling,
    /// Every other field, checked against [`CHAT_UNSUPPORTED`].
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// A field of OpenAI's (or vLLM's) API this server does not implement, and the values that
/// ask for nothing (null always does).
pub struct Unsupported {
    pub field: &'static str,
    pub no_op: fn(&Value) -> bool,
}

const fn refuse(field: &'static str, no_op: fn(&Value) -> bool) -> Unsupported {
    Unsupported { field, no_op }
}

fn never(_: &Value) -> bool {
    false
}
fn is_false(v: &Value) -> bool {
    v == &Value::Bool(false)
}
fn is_true(v: &Value) -> bool {
    v == &Value::Bool(true)
}
fn is_zero(v: &Value) -> bool {
    v.as_f64() == Some(0.0)
}
fn is_one(v: &Value) -> bool {
    v.as_f64() == Some(1.0)
}
fn is_empty(v: &Value) -> bool {
    match v {
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}
fn is_none_choice(v: &Value) -> bool {
    v == "none"
}
fn is_text_format(v: &Value) -> bool {
    v.get("type").is_some_and(|t| t == "text") && v.as_object().is_some_and(|o| o.len() == 1)
}
fn is_text_modality(v: &Value) -> bool {
    v.as_array().is_some_and(|a| a.iter().all(|m| m == "text"))
}

/// Sampling and decoding fields neither endpoint implements.
const SHARED_UNSUPPORTED: &[Unsupported] = &[
    refuse("best_of", is_one),
    refuse("logit_bias", is_empty),
    refuse("presence_penalty", is_zero),
    refuse("frequency_penalty", is_zero),
    refuse("repetition_penalty", is_one),
    refuse("min_p", is_zero),
    refuse("min_tokens", is_zero),
    refuse("ignore_eos", is_false),
    refuse("stop_token_ids", is_empty),
    refuse("include_stop_str_in_output", is_false),
    refuse("skip_special_tokens", is_true),
    refuse("use_beam_search", is_false),
    refuse("prompt_logprobs", never),
    refuse("truncate_prompt_tokens", never),
    refuse("response_format", is_text_format),
    refuse("guided_json", never),
    refuse("guided_regex", never),
    refuse("guided_choice", never),
    refuse("guided_grammar", never),
    refuse("structured_outputs", never),
];

/// Completion fields refused unless they ask for nothing.
pub const COMPLETION_UNSUPPORTED: &[&[Unsupported]] =
    &[SHARED_UNSUPPORTED, &[refuse("suffix", is_empty)]];

/// Chat fields refused unless they ask for nothing.
pub const CHAT_UNSUPPORTED: &[&[Unsupported]] = &[
    SHARED_UNSUPPORTED,
    &[
        refuse("tools", is_empty),
        refuse("tool_choice", is_none_choice),
        refuse("functions", is_empty),
        refuse("function_call", is_none_choice),
        refuse("audio", never),
        refuse("modalities", is_text_modality),
        refuse("prediction", never),
        refuse("web_search_options", never),
        refuse("reasoning_effort", never),
        refuse("echo", is_false),
        refuse("add_generation_prompt", is_true),
        refuse("continue_final_message", is_false),
        refuse("chat_template", never),
        refuse("chat_template_kwargs", is_empty),
    ],
];

/// The first field of `other` that asks for something this server does not do. Fields of
/// neither list are ignored, as vLLM does (`user`, `metadata`, `store`...).
pub fn first_unsupported<'a>(
    other: &'a Map<String, Value>,
    lists: &[&[Unsupported]],
) -> Option<&'a str> {
    lists.iter().flat_map(|l| l.iter()).find_map(|u| {
        let v = other.get(u.field)?;
        (!v.is_null() && !(u.no_op)(v)).then_some(u.field)
    })
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// A completion choice's `logprobs`: per token, its text, log-probability, the most likely
/// tokens there (text → log-probability; the token itself included) and where its text
/// starts in the choice's text (in characters). A prompt's first token has no log-probability.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<TopLogprobs>>,
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    pub fn append(&mut self, other: CompletionLogprobs) {
        self.tokens.extend(other.tokens);
        self.token_logprobs.extend(other.token_logprobs);
        self.top_logprobs.extend(other.top_logprobs);
        self.text_offset.extend(other.text_offset);
    }
}

/// Token text → log-probability, in order (an object on the wire; of two tokens with the same
/// text, the first is kept).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopLogprobs(pub Vec<(String, f32)>);

impl TopLogprobs {
    pub fn insert(&mut self, token: String, logprob: f32) {
        if !self.0.iter().any(|(t, _)| *t == token) {
            self.0.push((token, logprob));
        }
    }
}

impl Serialize for TopLogprobs {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (token, logprob) in &self.0 {
            map.serialize_entry(token, logprob)?;
        }
        map.end()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// A whole completion, or one streamed chunk of it (`object` is "text_completion" for both,
/// as OpenAI does).
#[derive(Debug, Clone, Serialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One of a chat position's most likely tokens.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    /// The token's text as UTF-8 bytes.
    pub bytes: Vec<u8>,
}

/// One generated token of a chat answer.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: Delta,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// Where the model or adapter was loaded from: a folder or a URL.
    pub root: String,
    /// For adapters: the base model's id; null for the base (as vLLM lists them).
    pub parent: Option<String>,
    /// The base's context length; null for adapters (as vLLM lists them).
    pub max_model_len: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

/// `POST /v1/load_lora_adapter` (vLLM's names).
#[derive(Debug, Clone, Deserialize)]
pub struct LoadAdapterRequest {
    pub lora_name: String,
    pub lora_path: String,
}

/// `POST /v1/unload_lora_adapter`
#[derive(Debug, Clone, Deserialize)]
pub struct UnloadAdapterRequest {
    pub lora_name: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub code: u16,
}

/// The error body every failed request gets.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

impl ErrorBody {
    /// The body for `status`, with OpenAI's error type for it.
    pub fn new(status: StatusCode, message: String) -> Self {
        let kind = match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => "timeout_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        ErrorBody {
            error: ErrorDetail {
                message,
                kind,
                code: status.as_u16(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn completion_request_accepts_openai_fields() {
        let r: CompletionRequest = serde_json::from_value(json!({
            "model": "tenant-a", "prompt": "Hi", "max_tokens": 5, "temperature": 0,
            "stop": ["\n", "."], "stream": true, "stream_options": {"include_usage": true},
            "seed": 3, "user": "ignored", "n": 1
        }))
        .unwrap();
        assert_eq!(r.prompt, Prompt::One("Hi".into()));
        assert_eq!(r.sampling.max_tokens, Some(5));
        assert_eq!(
            r.sampling.stop,
            Some(Stop::Many(vec!["\n".into(), ".".into()]))
        );
        assert!(r.sampling.stream && r.sampling.stream_options.unwrap().include_usage);
        let one: CompletionRequest = serde_json::from_value(
            json!({"model": "m", "prompt": ["x"], "stop": "y", "adapter": "a"}),
        )
        .unwrap();
        assert_eq!(one.sampling.stop.unwrap().into_vec(), vec!["y".to_string()]);
        assert_eq!(one.adapter.as_deref(), Some("a"));
        assert!(!one.sampling.stream);
    }

    #[test]
    fn chat_request_reads_messages_and_max_completion_tokens() {
        let r: ChatRequest = serde_json::from_value(json!({
            "model": "m", "messages": [{"role": "user", "content": "hello"}], "max_completion_tokens": 7
        }))
        .unwrap();
        assert_eq!(r.messages[0].content, "hello");
        assert_eq!(r.sampling.max_completion_tokens, Some(7));
        assert!(serde_json::from_value::<ChatRequest>(json!({"model": "m"})).is_err());
    }

    /// Found by the fuzz suite: serde's derive read these structs from arrays too.
    #[test]
    fn messages_and_stream_options_are_objects() {
        for body in [
            json!({"model": "m", "messages": [["user", "hi"]]}),
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream_options": []}),
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream_options": [true]}),
        ] {
            let err = serde_json::from_value::<ChatRequest>(body.clone()).unwrap_err();
            assert!(err.to_string().contains("expected a map"), "{body}: {err}");
        }
        let r: ChatRequest = serde_json::from_value(json!({"model": "m", "stream_options": null,
            "messages": [{"role": "user", "content": "hi"}]}))
        .unwrap();
        assert_eq!(r.messages[0].content, "hi");
        assert!(r.sampling.stream_options.is_none());
    }

    #[test]
    fn responses_have_openai_shapes() {
        let usage = Usage {
            prompt_tokens: 3,
            completion_tokens: 2,
            total_tokens: 5,
        };
        let c = CompletionResponse {
            id: "cmpl-1".into(),
            object: "text_completion",
            created: 1,
            model: "m".into(),
            choices: vec![CompletionChoice {
                index: 0,
                text: "ok".into(),
                logprobs: None,
                finish_reason: Some("length"),
            }],
            usage: Some(usage.clone()),
        };
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            json!({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                   "choices": [{"index": 0, "text": "ok", "logprobs": null, "finish_reason": "length"}],
                   "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
        );
        let chunk = ChatChunk {
            id: "c".into(),
            object: "chat.completion.chunk",
            created: 1,
            model: "m".into(),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta: Delta {
                    role: Some("assistant"),
                    content: None,
                },
                logprobs: None,
                finish_reason: None,
            }],
            usage: None,
        };
        assert_eq!(
            serde_json::to_value(&chunk).unwrap()["choices"][0],
            json!({"index": 0, "delta": {"role": "assistant"}, "finish_reason": null})
        );
        let err = ErrorBody {
            error: ErrorDetail {
                message: "no".into(),
                kind: "invalid_request_error",
                code: 400,
            },
        };
        assert_eq!(
            serde_json::to_value(&err).unwrap(),
            json!({"error": {"message": "no", "type": "invalid_request_error", "code": 400}})
        );
    }
}
