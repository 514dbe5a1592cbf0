//! The checkpoint's tokenizer (`tokenizer.json` through the `tokenizers` crate) with the special
//! tokens and chat template of `tokenizer_config.json` / `chat_template.jinja`, rendered the way
//! transformers' `apply_chat_template` does.

use std::path::Path;

use lowrank_core::{Error, Result};
use serde::Serialize;
use serde_json::Value;

/// One chat message.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl<'de> serde::Deserialize<'de> for Message {
    /// From a JSON object only: the derive would also read `["user", "hi"]`.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        struct Fields {
            role: String,
            content: String,
        }
        let map = serde_json::Map::<String, Value>::deserialize(d)?;
        let f: Fields =
            serde_json::from_value(Value::Object(map)).map_err(serde::de::Error::custom)?;
        Ok(Message {
            role: f.role,
            content: f.content,
        })
    }
}

/// The byte range `start..end` of the text a token came from.
pub type ByteSpan = (usize, usize);

/// Truncated encoding starts from a prefix of this many bytes per wanted token (most tokens
/// cover 2 to 6 bytes of text), and never less than `MIN_PREFIX_BYTES`.
const BYTES_PER_TOKEN_GUESS: usize = 8;
const MIN_PREFIX_BYTES: usize = 4096;

/// Long texts are tokenized in chunks of this many bytes, overlapping by this many tokens.
const LONG_TEXT_CHUNK_BYTES: usize = 1 << 16;
const CHUNK_OVERLAP_TOKENS: usize = 32;

/// The largest char boundary of `text` at or before `len`.
fn floor_boundary(text: &str, len: usize) -> usize {
    let mut end = len.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// A tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    unk_token: Option<String>,
    pad_token: Option<String>,
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
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` and `chat_template.jinja`;
    /// or, when `dir` is a GGUF file, the tokenizer and chat template of its metadata.
    pub fn load(dir: &Path) -> Result<Self> {
        if crate::gguf::is_gguf(dir) {
            return Self::from_gguf(dir);
        }
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
        // Parsed as JSON first: tokenizers 0.22 panics (`expect("Helper")`) on some syntax
        // errors inside the "decoder" section when it parses the text itself.
        let json: Value = lowrank_core::files::read_json(&path)?;
        let inner: tokenizers::Tokenizer = serde_json::from_value(json)
            .map_err(|e| Error::file(&path, format!("cannot read tokenizer: {e}")))?;
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() {
            match lowrank_core::files::read_json(&config_path)? {
                Value::Object(fields) => fields,
                other => {
                    return Err(Error::file(
                        &config_path,
                        format!("expected a JSON object, found {other}"),
                    ))
                }
            }
        } else {
            serde_json::Map::new()
        };
        // Checked even when chat_template.jinja takes precedence: a broken field is an error.
        let config_template = config_template(&config_path, config.get("chat_template"))?;
        let template_file = dir.join("chat_template.jinja");
        let chat_template = if template_file.exists() {
            Some(
                std::fs::read_to_string(&template_file)
                    .map_err(|e| Error::io(&template_file, e))?,
            )
        } else {
            config_template
        };
        Ok(Tokenizer {
            inner,
            bos_token: token_text(&config_path, "bos_token", config.get("bos_token"))?,
            eos_token: token_text(&config_path, "eos_token", config.get("eos_token"))?,
            unk_token: token_text(&config_path, "unk_token", config.get("unk_token"))?,
            pad_token: token_text(&config_path, "pad_token", config.get("pad_token"))?,
            chat_template,
        })
    }

    /// The tokenizer a GGUF file's metadata describes (see [`crate::gguf_tokenizer`]).
    pub fn from_gguf(path: &Path) -> Result<Self> {
        let file = lowrank_gguf::GgufFile::open(path)?;
        let built = crate::gguf_tokenizer::from_gguf(&file)?;
        let inner: tokenizers::Tokenizer = serde_json::from_value(built.tokenizer_json)
            .map_err(|e| Error::file(path, format!("cannot build the tokenizer: {e}")))?;
        Ok(Tokenizer {
            inner,
            bos_token: built.bos_token,
            eos_token: built.eos_token,
            unk_token: built.unk_token,
            pad_token: built.pad_token,
            chat_template: built.chat_template,
        })
    }

    /// Writes `tokenizer.json` and a `tokenizer_config.json` (special tokens, chat template)
    /// into `dir`, for a checkpoint written from a model that had none (a GGUF base).
    pub fn save_hf_files(&self, dir: &Path) -> Result<()> {
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| Error::Msg(format!("tokenizer: {e}")))?;
        lowrank_core::files::write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
        let config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
            "chat_template": self.chat_template,
        });
        lowrank_core::files::write_json(&dir.join("tokenizer_config.json"), &config)
    }

    /// The `tokenizer.json` this tokenizer is built from.
    pub fn hf_json(&self) -> Result<Value> {
        serde_json::to_value(&self.inner).map_err(|e| Error::Msg(format!("tokenizer: {e}")))
    }

    /// The special tokens of tokenizer_config.json (or of a GGUF's metadata): BOS, EOS, unknown, padding.
    pub fn special_tokens(&self) -> [Option<&str>; 4] {
        [
            &self.bos_token,
            &self.eos_token,
            &self.unk_token,
            &self.pad_token,
        ]
        .map(Option::as_deref)
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
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

    /// The first `max_tokens` of [`Tokenizer::encode_with_offsets`], tokenizing only as much of
    /// `text` as they need: a 10 MB line cut to 64 tokens costs a few kilobytes of tokenizing
    /// (the tokenizer holds tens of bytes per input byte while it works). A prefix long enough
    /// to yield more than `max_tokens` is taken, and accepted when a prefix twice as long gives
    /// the same first `max_tokens` tokens (a cut only changes the tokens next to it); otherwise
    /// both grow, up to the whole text.
    pub fn encode_truncated_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
        max_tokens: usize,
    ) -> Result<(Vec<u32>, Vec<ByteSpan>)> {
        let prefix = |len: usize| &text[..floor_boundary(text, len)];
        let mut len = (max_tokens.saturating_mul(BYTES_PER_TOKEN_GUESS)).max(MIN_PREFIX_BYTES);
        while len < text.len() {
            let (ids, offsets) = self.encode_with_offsets(prefix(len), add_special_tokens)?;
            if ids.len() > max_tokens {
                let (more_ids, more_offsets) =
                    self.encode_with_offsets(prefix(len.saturating_mul(2)), add_special_tokens)?;
                if more_ids.len() > max_tokens
                    && ids[..max_tokens] == more_ids[..max_tokens]
                    && offsets[..max_tokens] == more_offsets[..max_tokens]
                {
                    return Ok((ids[..max_tokens].to_vec(), offsets[..max_tokens].to_vec()));
                }
            }
            len = len.saturating_mul(2);
        }
        let (mut ids, mut offsets) = self.encode_with_offsets(text, add_special_tokens)?;
        ids.truncate(max_tokens);
        offsets.truncate(max_tokens);
        Ok((ids, offsets))
    }

    /// [`Tokenizer::encode`] of a text of any length in bounded memory: the tokenizer holds
    /// tens of bytes per input byte while it works (1.8 GB for a 10 MB line), so a long text
    /// is tokenized in chunks of about 64 KB. Each chunk starts a few tokens before the
    /// previous one's accepted end and drops its own last tokens (a cut changes only the
    /// tokens next to it); the tokens of the overlap must come out the same (ids and byte
    /// offsets), or the whole text is tokenized at once instead.
    pub fn encode_long(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.encode_in_chunks(text, add_special_tokens, LONG_TEXT_CHUNK_BYTES)
    }

    fn encode_in_chunks(
        &self,
        text: &str,
        add_special_tokens: bool,
        chunk_bytes: usize,
    ) -> Result<Vec<u32>> {
        if text.len() <= 2 * chunk_bytes {
            return self.encode(text, add_special_tokens);
        }
        match self.chunked_ids(text, add_special_tokens, chunk_bytes)? {
            Some(ids) => Ok(ids),
            None => self.encode(text, add_special_tokens),
        }
    }

    /// The ids of `text` chunk by chunk, or None where an overlap does not agree.
    fn chunked_ids(
        &self,
        text: &str,
        add_special_tokens: bool,
        chunk_bytes: usize,
    ) -> Result<Option<Vec<u32>>> {
        // The special tokens the post-processor puts around any text (BOS, EOS...), checked on
        // the first chunk: the chunks are tokenized without them.
        let (before, after) = if add_special_tokens {
            let probe = floor_boundary(text, chunk_bytes);
            let with = self.encode(&text[..probe], true)?;
            let without = self.encode(&text[..probe], false)?;
            match (0..=with.len().saturating_sub(without.len()))
                .find(|&at| with[at..].starts_with(&without))
            {
                Some(at) => (with[..at].to_vec(), with[at + without.len()..].to_vec()),
                None => return Ok(None),
            }
        } else {
            (vec![], vec![])
        };
        let (mut ids, mut starts) = (before, Vec::new());
        let specials = ids.len();
        // Bytes before `next` are covered by accepted tokens; the next chunk starts at `from`.
        let (mut from, mut next) = (0, 0);
        loop {
            let end = floor_boundary(text, from + chunk_bytes);
            let last = end == text.len();
            let (chunk_ids, offsets) = self.encode_with_offsets(&text[from..end], false)?;
            let chunk_starts: Vec<usize> = offsets.iter().map(|o| o.0 + from).collect();
            // Where the new tokens begin, and the accepted tokens just before it must match.
            let Some(at) = chunk_starts.iter().position(|&s| s == next) else {
                return Ok(None);
            };
            let accepted = starts.len();
            let check = at.min(accepted).min(CHUNK_OVERLAP_TOKENS / 2);
            if check < accepted.min(CHUNK_OVERLAP_TOKENS / 2)
                || chunk_ids[at - check..at] != ids[ids.len() - check..]
                || chunk_starts[at - check..at] != starts[accepted - check..]
            {
                return Ok(None);
            }
            if last {
                ids.extend_from_slice(&chunk_ids[at..]);
                ids.extend_from_slice(&after);
                return Ok(Some(ids));
            }
            // Drop the tokens next to the cut; the kept ones end at a new byte position (the
            // byte tokens of one character share their start).
            let mut keep = chunk_ids.len().saturating_sub(CHUNK_OVERLAP_TOKENS);
            while keep > at && chunk_starts[keep] == chunk_starts[keep - 1] {
                keep -= 1;
            }
            if keep <= at {
                return Ok(None);
            }
            ids.extend_from_slice(&chunk_ids[at..keep]);
            starts.extend_from_slice(&chunk_starts[at..keep]);
            next = chunk_starts[keep];
            from = starts[starts.len().saturating_sub(CHUNK_OVERLAP_TOKENS)];
            debug_assert_eq!(ids.len(), specials + starts.len());
        }
    }

    /// The first `max_tokens` of [`Tokenizer::encode`], tokenizing only a prefix of a long text
    /// (see [`Tokenizer::encode_truncated_with_offsets`]).
    pub fn encode_truncated(
        &self,
        text: &str,
        add_special_tokens: bool,
        max_tokens: usize,
    ) -> Result<Vec<u32>> {
        Ok(self
            .encode_truncated_with_offsets(text, add_special_tokens, max_tokens)?
            .0)
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

    /// A tokenizer.json the tokenizers crate refuses: an error on that file, the path a field.
    #[test]
    fn an_unreadable_tokenizer_is_a_file_error_on_tokenizer_json() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
        match Tokenizer::load(dir.path()) {
            Err(Error::File { path, message }) => {
                assert_eq!(path, dir.path().join("tokenizer.json"));
                assert!(message.contains("cannot read tokenizer"), "{message}");
            }
            other => panic!("{:?}", other.err()),
        }
    }

    fn fixture_tokenizer(style: &str) -> Tokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tokenizers");
        Tokenizer::load(&dir.join(style)).unwrap()
    }

    /// Chunked tokenizing gives the ids of tokenizing at once (without falling back to it), for
    /// both tokenizer styles, with and without special tokens, on texts whose chunks cut words,
    /// numbers, multi-byte characters (byte-fallback tokens), runs of spaces and one unbroken
    /// word.
    #[test]
    fn chunked_tokenizing_equals_tokenizing_at_once() {
        let sentence =
            "The small dog finds the red ball under the tree, café 🤔 in 2001;   12 trains. ";
        let texts = [
            sentence.repeat(60),
            "ab ".repeat(2000),
            "x".repeat(5000),
            format!("{}<|im_end|>{}", sentence.repeat(20), "é".repeat(1500)),
            "🤔".repeat(1500),
        ];
        for style in ["llama-style", "qwen-style"] {
            let t = fixture_tokenizer(style);
            for text in &texts {
                for special in [true, false] {
                    let whole = t.encode(text, special).unwrap();
                    for chunk in [300, 1000] {
                        let chunked = t.chunked_ids(text, special, chunk).unwrap();
                        assert_eq!(
                            chunked.as_ref(),
                            Some(&whole),
                            "{style} special {special} chunk {chunk}: {:?}",
                            &text[..20]
                        );
                    }
                }
            }
        }
    }

    /// Found by the fuzz suite: tokenizers panicked (`expect("Helper")`) on a syntax error
    /// inside the "decoder" section of tokenizer.json.
    #[test]
    fn a_broken_tokenizer_json_is_an_error_not_a_panic() {
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tokenizers/llama-style");
        let text = std::fs::read_to_string(fixture.join("tokenizer.json")).unwrap();
        let decoder = text.find("\"decoder\"").unwrap();
        let inside = decoder + text[decoder..].find('{').unwrap() + 1;
        let broken = format!("{}\"x\" 1,{}", &text[..inside], &text[inside..]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), broken).unwrap();
        let err = Tokenizer::load(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("invalid JSON"),
            "{err}"
        );
    }

    /// Found by the fuzz suite: `["user", "hi"]` was read as a message.
    #[test]
    fn a_message_is_an_object() {
        let err = serde_json::from_str::<Vec<Message>>(r#"[["user", "hi"]]"#).unwrap_err();
        assert!(err.to_string().contains("expected a map"), "{err}");
        let m: Vec<Message> =
            serde_json::from_str(r#"[{"role": "user", "content": "hi", "name": "x"}]"#).unwrap();
        assert_eq!((m[0].role.as_str(), m[0].content.as_str()), ("user", "hi"));
        let err = serde_json::from_str::<Message>(r#"{"role": "user"}"#).unwrap_err();
        assert!(err.to_string().contains("content"), "{err}");
    }

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
        // The field is checked even where chat_template.jinja takes precedence.
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tokenizers/qwen-style");
        let dir = tempfile::tempdir().unwrap();
        for f in ["tokenizer.json", "chat_template.jinja"] {
            std::fs::copy(fixture.join(f), dir.path().join(f)).unwrap();
        }
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"chat_template": false}"#,
        )
        .unwrap();
        let err = Tokenizer::load(dir.path()).err().unwrap().to_string();
        assert!(err.contains("`chat_template`"), "{err}");
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
