//! `lowrank eval`: mean token loss and perplexity on `{"text": ...}` lines.

use std::path::PathBuf;

use anyhow::{bail, Result};
use lowrank_models::generate::sequence_nll;

use super::{activate, load_adapters, load_model_with, read_jsonl, AdapterSpec, QuantArgs};

#[derive(clap::Args)]
pub struct Args {
    /// Model folder or Hub id org/name[@revision] (from the HF cache, else downloaded into it).
    #[arg(long)]
    model: String,
    /// PEFT adapter folder or Hub id org/name[@revision], optionally with `:WEIGHT`; repeat to stack adapters.
    #[arg(long)]
    adapter: Vec<AdapterSpec>,
    /// Merge the adapters into the weights instead of applying them unmerged.
    #[arg(long)]
    merge: bool,
    /// JSONL file, one `{"text": ...}` per line.
    #[arg(long)]
    data: PathBuf,
    /// Truncate each sequence to its first N tokens.
    #[arg(long)]
    max_len: Option<usize>,
    #[command(flatten)]
    quant: QuantArgs,
}

pub fn run(args: Args) -> Result<()> {
    let mut loaded = load_model_with(&args.model, &args.quant)?;
    let adapters = load_adapters(&loaded.model, &args.adapter)?;
    if args.merge && adapters.is_empty() {
        bail!("--merge needs an --adapter");
    }
    let active = activate(&mut loaded.model, &adapters, args.merge)?;
    let lines = read_jsonl(&args.data)?;
    let (mut total, mut count) = (0.0, 0usize);
    for (i, line) in lines.iter().enumerate() {
        let Some(text) = line.get("text").and_then(|t| t.as_str()) else {
            bail!(
                "{}:{}: expected an object with a string field \"text\"",
                args.data.display(),
                i + 1
            );
        };
        let mut ids = loaded.tokenizer.encode(text, true)?;
        if let Some(n) = args.max_len {
            ids.truncate(n);
        }
        let (nll, n) = sequence_nll(&loaded.model, &ids, &active)?;
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
    println!(
        "{}",
        serde_json::json!({"loss": loss, "perplexity": loss.exp(), "tokens": count})
    );
    Ok(())
}
