//! Tokenizer folders: `tokenizer_config.json` (special tokens, chat templates), the
//! `chat_template.jinja` file, and `tokenizer.json` itself, loaded and then used to render and
//! encode a conversation as training and the server do.

use std::sync::OnceLock;

use lowrank_models::{Message, Tokenizer};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use serde_json::Value;

use crate::ensure;
use crate::support::*;

const CONFIG_CASES: u32 = 600;
const GENERATED_CONFIG_CASES: u32 = 400;
const TEMPLATE_CASES: u32 = 800;
const GENERATED_TEMPLATE_CASES: u32 = 800;
const TOKENIZER_JSON_CASES: u32 = 200;

const FOLDERS: &[&str] = &["tokenizers/llama-style", "tokenizers/qwen-style"];

const CONFIG_FIELDS: &[(&str, &[Ty])] = &[
    ("bos_token", &[Ty::Str, Ty::Object, Ty::Null]),
    ("eos_token", &[Ty::Str, Ty::Object, Ty::Null]),
    ("chat_template", &[Ty::Str, Ty::Array, Ty::Null]),
];

/// Messages as a client or a data file may send them.
pub fn messages() -> impl Strategy<Value = Vec<Message>> {
    let role = prop_oneof![
        4 => prop::sample::select(vec!["system", "user", "assistant"]).prop_map(str::to_string),
        1 => nasty_string(),
    ];
    let content = prop_oneof![
        3 => "[a-z ]{0,30}",
        1 => prop::sample::select(vec!["</s>", "<s>", "<|im_end|>", "<|im_start|>", "{{ x }}", "{% endfor %}", "\u{0}", "  padded  "])
            .prop_map(str::to_string),
        1 => nasty_string(),
    ];
    prop::collection::vec((role, content), 0..4).prop_map(|v| {
        v.into_iter()
            .map(|(role, content)| Message { role, content })
            .collect()
    })
}

/// Loads `files` as a tokenizer folder and uses it; checks no panic, errors that name the
/// folder (at load) or are not empty (at use), an error whenever `must_fail` lists something,
/// nothing written.
fn check_tokenizer(
    files: &[(&str, &[u8])],
    messages: &[Message],
    must_fail: &[String],
) -> Result<(), TestCaseError> {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("tok");
    std::fs::create_dir(&dir).unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let before = snapshot(root.path());
    match Tokenizer::load(&dir) {
        Ok(tok) => {
            ensure!(
                must_fail.is_empty(),
                "loaded with fields of the wrong type: {must_fail:?}"
            );
            use_tokenizer(&tok, messages)?;
        }
        Err(e) => {
            check_error(&e.to_string(), &[&dir.display().to_string()])?;
            check_type_error_names_field(&e.to_string(), &["tokenizer_config.json"], must_fail)?;
        }
    }
    check_unchanged(root.path(), &before)
}

fn use_tokenizer(tok: &Tokenizer, messages: &[Message]) -> Result<(), TestCaseError> {
    for generation_prompt in [false, true] {
        match tok.encode_chat(messages, generation_prompt) {
            Ok(ids) => {
                if let Err(e) = tok.decode(&ids, false) {
                    check_error(&e.to_string(), &[])?;
                }
            }
            Err(e) => check_error(&e.to_string(), &[])?,
        }
    }
    let text: String = messages.iter().map(|m| m.content.as_str()).collect();
    if let Err(e) = tok.encode(&text, true) {
        check_error(&e.to_string(), &[])?;
    }
    Ok(())
}

struct Folder {
    tokenizer: Vec<u8>,
    config: Vec<u8>,
    template: Option<Vec<u8>>,
}

fn folders() -> &'static [Folder] {
    static FOLDERS_READ: OnceLock<Vec<Folder>> = OnceLock::new();
    FOLDERS_READ.get_or_init(|| {
        FOLDERS
            .iter()
            .map(|f| Folder {
                tokenizer: read_fixture(&format!("{f}/tokenizer.json")),
                config: read_fixture(&format!("{f}/tokenizer_config.json")),
                template: std::fs::read(fixtures().join(f).join("chat_template.jinja")).ok(),
            })
            .collect()
    })
}

fn files(f: &Folder) -> Vec<(&'static str, &[u8])> {
    let mut v: Vec<(&str, &[u8])> = vec![
        ("tokenizer.json", &f.tokenizer),
        ("tokenizer_config.json", &f.config),
    ];
    if let Some(t) = &f.template {
        v.push(("chat_template.jinja", t));
    }
    v
}

fn replace<'a>(files: &mut Vec<(&'static str, &'a [u8])>, name: &'static str, bytes: &'a [u8]) {
    files.retain(|(n, _)| *n != name);
    files.push((name, bytes));
}

/// `tokenizer_config.json` edited as JSON or text (the qwen-style folder's template file
/// removed half the time so the config's own `chat_template` is used).
#[test]
fn tokenizer_config_json() {
    let folders = folders();
    let donors: Vec<Value> = folders
        .iter()
        .map(|f| serde_json::from_slice(&f.config).unwrap())
        .collect();
    let text_donors: Vec<&[u8]> = folders.iter().map(|f| f.config.as_slice()).collect();
    run(
        "tokenizer_config.json (mutated fixtures)",
        CONFIG_CASES,
        (
            any::<Index>(),
            any::<bool>(),
            prop_oneof![4 => json_edits(3).prop_map(Ok), 1 => byte_edits(3).prop_map(Err)],
            messages(),
        ),
        |(src, drop_template, edit, messages)| {
            let f = &folders[src.index(folders.len())];
            let config = match &edit {
                Ok(e) => serde_json::to_vec(&apply_json(
                    &donors[src.index(folders.len())],
                    e,
                    &donors.iter().collect::<Vec<_>>(),
                ))
                .unwrap(),
                Err(e) => apply_bytes(&f.config, 0..f.config.len(), e, &text_donors),
            };
            let must_fail = json_faults(&config, |v| wrong_types(v, CONFIG_FIELDS));
            let mut files = files(f);
            replace(&mut files, "tokenizer_config.json", &config);
            if drop_template {
                files.retain(|(n, _)| *n != "chat_template.jinja");
            }
            check_tokenizer(&files, &messages, &must_fail)
        },
    );
}

/// `tokenizer_config.json` made from scratch: the special tokens and the template as strings,
/// AddedToken objects, lists of named templates, or anything else.
#[test]
fn tokenizer_config_generated() {
    let folders = folders();
    let token = || {
        prop_oneof![
            3 => prop::sample::select(vec!["</s>", "<s>", "<|im_end|>", "<unk>", "", "not-a-token"]).prop_map(Value::from),
            1 => prop::sample::select(vec!["</s>", "<s>"]).prop_map(|t| serde_json::json!({"content": t, "special": true})),
            1 => nasty_value(),
        ]
    };
    let template = prop_oneof![
        2 => prop::collection::vec(template_piece(), 0..6).prop_map(|p| Value::from(p.concat())),
        1 => prop::collection::vec(
            (prop::sample::select(vec!["default", "tool_use", "rag"]), prop::collection::vec(template_piece(), 0..4)),
            0..3,
        )
        .prop_map(|list| {
            Value::Array(
                list.into_iter()
                    .map(|(name, pieces)| serde_json::json!({"name": name, "template": pieces.concat()}))
                    .collect(),
            )
        }),
        1 => nasty_value(),
    ];
    let fields = (
        prop::option::of(token()),
        prop::option::of(token()),
        prop::option::of(template),
        prop::collection::btree_map(key(), nasty_value(), 0..3),
    );
    run(
        "tokenizer_config.json (generated)",
        GENERATED_CONFIG_CASES,
        (any::<Index>(), fields, messages()),
        |(src, (bos, eos, template, extra), messages)| {
            let mut doc: serde_json::Map<String, Value> = extra.into_iter().collect();
            for (k, v) in [
                ("bos_token", bos),
                ("eos_token", eos),
                ("chat_template", template),
            ] {
                if let Some(v) = v {
                    doc.insert(k.into(), v);
                }
            }
            let doc = Value::Object(doc);
            let must_fail = wrong_types(&doc, CONFIG_FIELDS);
            let config = serde_json::to_vec(&doc).unwrap();
            let f = &folders[src.index(folders.len())];
            let mut files = files(f);
            replace(&mut files, "tokenizer_config.json", &config);
            files.retain(|(n, _)| *n != "chat_template.jinja");
            check_tokenizer(&files, &messages, &must_fail)
        },
    );
}

/// Pieces of Jinja that HF chat templates are made of, and some that break them.
fn template_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(vec![
            "{{ bos_token }}", "{{ eos_token }}", "{%- for message in messages -%}", "{% endfor %}",
            "{% if add_generation_prompt %}", "{% if message['role'] == 'user' %}", "{% elif loop.first %}",
            "{% else %}", "{% endif %}", "{{ message['role'] }}", "{{ message.content }}",
            "{{ message['content'].strip() }}", "{{ messages[0]['content'] }}", "{{ messages[-1].role }}",
            "{{ raise_exception('bad role') }}", "{% set loop_messages = messages[1:] %}",
            "{{ loop_messages | length }}", "{{ message['content'] | trim }}", "{{ messages | tojson }}",
            "{{ loop.index0 }}", "{{ range(3) | list }}", "{{ 'ab' * 3 }}", "{{ undefined.attr }}",
            "{{ none.x }}", "{{ 1 / 0 }}", "{{ 10 ** 400 }}", "{{ 'x' * 100000000000 }}",
            "{{ range(1000000) | list }}", "{{ message['content'][5:1] }}", "{{ message.content.split(' ') }}",
            "{{ message.content.startswith('a') }}", "{{ message.content | upper }}",
            "{% macro m(n) %}{{ m(n) }}{% endmacro %}{{ m(1) }}",
            "{% macro m() %}x{% endmacro %}{{ m() }}", "{% raw %}{{{% endraw %}", "{# comment #}",
            "{{", "}}", "{%", "%}", "{#", "#}", "{% endfor", "{{ message[", "{% include 'x' %}",
            "{% extends 'chat' %}", "{% import 'chat' as c %}", "{{ self }}", "<|im_start|>", "\n",
        ])
        .prop_map(str::to_string),
        1 => "[a-z <>|/]{0,12}",
    ]
}

/// Chat templates edited as text (bytes and Jinja pieces spliced in) and made from scratch.
#[test]
fn chat_template_mutated() {
    let folders = folders();
    let qwen = &folders[1];
    let base = qwen.template.clone().unwrap();
    let llama_config: Value = serde_json::from_slice(&folders[0].config).unwrap();
    let llama_template = llama_config["chat_template"]
        .as_str()
        .unwrap()
        .as_bytes()
        .to_vec();
    run(
        "chat templates (mutated fixtures)",
        TEMPLATE_CASES,
        (
            any::<bool>(),
            byte_edits(3),
            prop::collection::vec((any::<Index>(), template_piece()), 0..3),
            messages(),
        ),
        |(llama, edits, pieces, messages)| {
            let source = if llama { &llama_template } else { &base };
            let mut text = apply_bytes(source, 0..source.len(), &edits, &[&base, &llama_template]);
            for (at, piece) in &pieces {
                let i = at.index(text.len() + 1);
                text.splice(i..i, piece.bytes());
            }
            let mut files = files(qwen);
            replace(&mut files, "chat_template.jinja", &text);
            check_tokenizer(&files, &messages, &[])
        },
    );
    run(
        "chat templates (generated)",
        GENERATED_TEMPLATE_CASES,
        (prop::collection::vec(template_piece(), 0..10), messages()),
        |(pieces, messages)| {
            let text = pieces.concat();
            let mut files = files(qwen);
            replace(&mut files, "chat_template.jinja", text.as_bytes());
            check_tokenizer(&files, &messages, &[])
        },
    );
}

/// `tokenizer.json` edited as JSON or bytes.
#[test]
fn tokenizer_json() {
    let folders = folders();
    let docs: Vec<Value> = folders
        .iter()
        .map(|f| serde_json::from_slice(&f.tokenizer).unwrap())
        .collect();
    run(
        "tokenizer.json (mutated fixtures)",
        TOKENIZER_JSON_CASES,
        (
            any::<Index>(),
            prop_oneof![3 => json_edits(2).prop_map(Ok), 1 => byte_edits(3).prop_map(Err)],
            messages(),
        ),
        |(src, edit, messages)| {
            let i = src.index(folders.len());
            let f = &folders[i];
            let tokenizer = match &edit {
                Ok(e) => {
                    serde_json::to_vec(&apply_json(&docs[i], e, &docs.iter().collect::<Vec<_>>()))
                        .unwrap()
                }
                Err(e) => apply_bytes(&f.tokenizer, 0..f.tokenizer.len(), e, &[]),
            };
            let mut files = files(f);
            replace(&mut files, "tokenizer.json", &tokenizer);
            check_tokenizer(&files, &messages, &[])
        },
    );
}
