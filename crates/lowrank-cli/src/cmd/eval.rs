//! `lowrank eval`: mean token loss and perplexity on `{"text": ...}` lines.
//!
//! A line longer than the model's context (`max_position_embeddings`) is scored in windows of
//! that many tokens, as transformers' sliding-window perplexity: a window starts every
//! `--stride` tokens and scores the tokens after the previous window's end, so every token
//! after a line's first is scored exactly once. The default stride, context − 1, makes
//! consecutive windows share one token (the cheapest pass, lm-evaluation-harness's rolling
//! windows); a smaller stride gives each token more context for more compute.

use std::path::PathBuf;

use anyhow::{bail, Result};
use lowrank_models::generate::{sequence_nll, windowed_nll};

use super::{activate, load_adapters, load_model_with, read_jsonl, ModelArgs, QuantArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: ModelArgs,
    /// JSONL file, one `{"text": ...}` per line.
    #[arg(long)]
    data: PathBuf,
    /// Truncate each sequence to its first N tokens.
    #[arg(long)]
    max_len: Option<usize>,
    /// Lines longer than the model's context are scored in windows of that length, one
    /// every N tokens; each token is scored once, with at least context − N tokens before it
    /// [default: context − 1].
    #[arg(long)]
    stride: Option<usize>,
    #[command(flatten)]
    quant: QuantArgs,
}

pub fn run(args: Args) -> Result<()> {
    let target = &args.target;
    let mut loaded = load_model_with(&target.model, &args.quant)?;
    let adapters = load_adapters(&loaded.model, &target.adapter)?;
    if target.merge && adapters.is_empty() {
        bail!("--merge needs an --adapter");
    }
    let active = activate(&mut loaded.model, &adapters, target.merge)?;
    let window = loaded.model.config().max_position_embeddings;
    let stride = args.stride.unwrap_or(window.saturating_sub(1));
    if stride == 0 || stride >= window {
        bail!(
            "--stride: must be between 1 and {} (the model's context of {window} tokens, max_position_embeddings, less one), found {stride}",
            window.saturating_sub(1)
        );
    }
    if args.max_len == Some(0) {
        bail!("--max-len: must be at least 1");
    }
    let lines = read_jsonl(&args.data)?;
    let (mut total, mut count, mut windowed) = (0.0, 0usize, 0usize);
    for (i, line) in lines.iter().enumerate() {
        let Some(text) = line.get("text").and_then(|t| t.as_str()) else {
            bail!(
                "{}:{}: expected an object with a string field \"text\"",
                args.data.display(),
                i + 1
            );
        };
        let ids = match args.max_len {
            Some(n) => loaded.tokenizer.encode_truncated(text, true, n)?,
            None => loaded.tokenizer.encode_long(text, true)?,
        };
        let (nll, n) = if ids.len() > window {
            windowed += 1;
            windowed_nll(&loaded.model, &ids, window, stride, &active)?
        } else {
            sequence_nll(&loaded.model, &ids, &active)?
        };
        total += nll;
        count += n;
    }
    if count == 0 {
        bail!(
            "{}: no line has two or more tokens, nothing to predict",
            args.data.display()
        );
    }
    let loss = total / count as f64;
    if !loss.is_finite() {
        bail!(
            "the loss is {loss}: the model{} computes non-finite values on {}",
            if adapters.is_empty() {
                ""
            } else {
                " with its adapters"
            },
            args.data.display()
        );
    }
    let mut report = serde_json::json!({"loss": loss, "perplexity": loss.exp(), "tokens": count});
    if windowed > 0 {
        eprintln!(
            "note: {windowed} line(s) longer than the model's context ({window} tokens, max_position_embeddings) were scored in windows of {window} tokens starting every {stride} (--stride)"
        );
        report["windowed_lines"] = windowed.into();
        report["window"] = window.into();
        report["stride"] = stride.into();
    }
    println!("{report}");
    Ok(())
}
