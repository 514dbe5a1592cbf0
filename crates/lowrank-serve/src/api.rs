//! OpenAI-compatible request and response bodies (the wire format), kept apart from the
//! engine's own types so the JSON shape is pinned by tests here.

use serde::{Deserialize, Serialize};

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
    pub max_tokens: Option<usize>,
    /// The chat endpoint's newer name for `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
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
    pub model: String,
    pub prompt: Prompt,
    /// lowrank extension: the adapter id, when `model` names the base.
    pub adapter: Option<String>,
    /// lowrank extension: several adapters applied together (their weighted deltas added),
    /// when `model` names the base.
    pub adapters: Option<Vec<StackedAdapter>>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// `POST /v1/chat/completions`
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub adapter: Option<String>,
    pub adapters: Option<Vec<StackedAdapter>>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<()>,
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

#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessage,
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
    /// For adapters: the base model's id (as vLLM reports it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
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
