//! The checkpoint's tokenizer (`tokenizer.json` through the `tokenizers` crate) with the special
//! tokens and chat template of `tokenizer_config.json` / `chat_template.jinja`, rendered the way
//! transformers' `apply_chat_template` does.

use std::path::Path;

use lowrank_core::{Error, Result};
use serde::Serialize;
use serde_json::Value;

/// One chat message.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// The byte range `start..end` of the text a token came from.
pub type ByteSpan = (usize, usize);

/// A tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<String>,
}

/// A special token in tokenizer_config.json: a string, an AddedToken object, or null/absent.
fn token_text(config: &Path, field: &str, v: Option<&Value>) -> Result<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            other => Err(Error::field(
                config,
                field,
                format!(
                    "an AddedToken needs a string \"content\", found {}",
                    other.unwrap_or(&Value::Null)
                ),
            )),
        },
        Some(other) => Err(Error::field(
            config,
            field,
            format!("expected a token string or an AddedToken object, found {other}"),
        )),
    }
}

/// `chat_template` of tokenizer_config.json: a string, or a list of `{"name", "template"}`
/// of which "default" is used.
fn config_template(config: &Path, v: Option<&Value>) -> Result<Option<String>> {
    let bad = |msg: String| Error::field(config, "chat_template", msg);
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            for t in list {
                let (Some(name), Some(template)) = (
                    t.get("name").and_then(Value::as_str),
                    t.get("template").and_then(Value::as_str),
                ) else {
                    return Err(bad(format!(
                        "expected {{\"name\": string, \"template\": string}} entries, found {t}"
                    )));
                };
                if name == "default" {
                    return Ok(Some(template.to_string()));
                }
            }
            Ok(None)
        }
        Some(other) => Err(bad(format!(
            "expected a template string or a list of named templates, found {other}"
        ))),
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` and `chat_template.jinja`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::io(
                &path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "tokenizer.json not found (only fast tokenizers are supported)",
                ),
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Msg(format!("{}: cannot read tokenizer: {e}", path.display())))?;
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() {
            match lowrank_core::files::read_json(&config_path)? {
                Value::Object(fields) => fields,
                other => {
                    return Err(Error::Msg(format!(
                        "{}: expected a JSON object, found {other}",
                        config_path.display()
                    )))
                }
            }
        } else {
            serde_json::Map::new()
        };
        let template_file = dir.join("chat_template.jinja");
        let chat_template = if template_file.exists() {
            Some(
                std::fs::read_to_string(&template_file)
                    .map_err(|e| Error::io(&template_file, e))?,
            )
        } else {
            config_template(&config_path, config.get("chat_template"))?
        };
        Ok(Tokenizer {
            inner,
            bos_token: token_text(&config_path, "bos_token", config.get("bos_token"))?,
            eos_token: token_text(&config_path, "eos_token", config.get("eos_token"))?,
            chat_template,
        })
    }

    /// Token ids of `text` as transformers' `tokenizer(text)` gives them (special tokens included
    /// when `add_special_tokens`).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Msg(format!("tokenizer: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids with the byte range of `text` each token came from (special tokens the
    /// post-processor adds get an empty range), for masking parts of a rendered chat.
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<(Vec<u32>, Vec<ByteSpan>)> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Msg(format!("tokenizer: {e}")))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Msg(format!("tokenizer: {e}")))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of the EOS token named in tokenizer_config.json.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_id(t))
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders `messages` with the chat template, as `apply_chat_template(tokenize=False)`.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::Msg(
                "the tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)"
                    .into(),
            )
        })?;
        render_chat_template(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        )
    }

    /// Token ids of the rendered chat, as `apply_chat_template(tokenize=True)`: the template
    /// writes the special tokens itself, so none are added.
    pub fn encode_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }
}

/// Renders a HF chat template with jinja settings transformers uses (trim_blocks, lstrip_blocks,
/// `raise_exception`, Python string methods).
pub fn render_chat_template(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    minijinja_contrib::add_to_environment(&mut env);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| Error::Msg(format!("chat template does not parse: {e}")))?;
    let tmpl = env.get_template("chat").expect("just added");
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| {
        // raise_exception's message is what the template author wrote for the user.
        let detail = e
            .detail()
            .map(str::to_string)
            .unwrap_or_else(|| e.to_string());
        Error::Msg(format!("chat template: {detail}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tokenizer folder of the llama-style fixture with `config` as tokenizer_config.json.
    fn load_with_config(config: &str) -> Result<Tokenizer> {
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tokenizers/llama-style");
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            fixture.join("tokenizer.json"),
            dir.path().join("tokenizer.json"),
        )
        .unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), config).unwrap();
        Tokenizer::load(dir.path())
    }

    /// Found by the fuzz suite: special tokens and templates of the wrong type, and a config
    /// that is not an object, were ignored (no EOS, no template) instead of refused.
    #[test]
    fn config_fields_of_the_wrong_type_are_errors() {
        for (config, named) in [
            (r#"{"bos_token": []}"#, "`bos_token`"),
            (r#"{"eos_token": 2}"#, "`eos_token`"),
            (r#"{"eos_token": {"content": 2}}"#, "`eos_token`"),
            (r#"{"chat_template": 5}"#, "`chat_template`"),
            (
                r#"{"chat_template": [{"name": "default", "template": 1}]}"#,
                "`chat_template`",
            ),
            ("[]", "expected a JSON object"),
        ] {
            let err = load_with_config(config).err().unwrap().to_string();
            assert!(
                err.contains("tokenizer_config.json") && err.contains(named),
                "{config}: {err}"
            );
        }
        let ok = load_with_config(
            r#"{"eos_token": {"content": "</s>"}, "bos_token": null,
                "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ eos_token }}"}]}"#,
        )
        .unwrap();
        assert_eq!(ok.apply_chat_template(&[], false).unwrap(), "</s>");
    }

    #[test]
    fn trim_blocks_and_exceptions_behave_like_transformers() {
        let tmpl = "{% for m in messages %}\n  {{ m['content'].strip() }}|{% endfor %}{% if messages|length > 1 %}{{ raise_exception('too many') }}{% endif %}";
        let one = [Message {
            role: "user".into(),
            content: "  hi ".into(),
        }];
        // lstrip_blocks strips before block tags only, so the indentation before `{{` stays, as in jinja2.
        assert_eq!(
            render_chat_template(tmpl, &one, false, "", "").unwrap(),
            "  hi|"
        );
        let two = [one[0].clone(), one[0].clone()];
        let err = render_chat_template(tmpl, &two, false, "", "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("too many"), "{err}");
    }
}
