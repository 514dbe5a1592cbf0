//! `lowrank generate`: stream a completion of a prompt to stdout.

use std::io::Write;

use anyhow::{Context, Result};
use lowrank_models::generate::{generate, Sampler, SamplingParams};
use lowrank_models::Message;

use super::{activate, load_adapters, load_model_with, ModelArgs, QuantArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: ModelArgs,
    #[arg(long)]
    prompt: String,
    /// Render the prompt as a user message with the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating after an end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Keep the base's linear weights and output head in bf16 (after --merge): half the memory
    /// and half the bytes read per decoded token; products still accumulate in f32; with
    /// --quantize, the embedding/output head (the decoder layers stay 4-bit).
    #[arg(long)]
    bf16_weights: bool,
    /// Round the input of every bf16 linear to bf16, as PyTorch's bf16 models and llama.cpp's
    /// bf16 matmul do (products exact, sums in f32): prefill runs on AVX512-BF16 dot products
    /// where the CPU has them. Needs --bf16-weights.
    #[arg(long, requires = "bf16_weights")]
    bf16_activations: bool,
    #[command(flatten)]
    quant: QuantArgs,
}

/// Prints decoded text as tokens arrive, holding back a partial UTF-8 character.
struct StreamPrinter<'a> {
    tokenizer: &'a lowrank_models::Tokenizer,
    ids: Vec<u32>,
    printed: usize,
}

impl StreamPrinter<'_> {
    fn push(&mut self, id: u32) -> Result<()> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, true)?;
        if text.ends_with('\u{FFFD}') || text.len() < self.printed {
            return Ok(());
        }
        let mut out = std::io::stdout().lock();
        out.write_all(&text.as_bytes()[self.printed..])?;
        out.flush()?;
        self.printed = text.len();
        Ok(())
    }
}

pub fn run(args: Args) -> Result<()> {
    let target = &args.target;
    let mut loaded = load_model_with(&target.model, &args.quant)?;
    let adapters = load_adapters(&loaded.model, &target.adapter)?;
    let active = activate(&mut loaded.model, &adapters, target.merge)?;
    if args.bf16_weights {
        loaded
            .model
            .cast_for_inference(candle_core::DType::BF16)
            .context("--bf16-weights")?;
    }
    if args.bf16_activations {
        loaded
            .model
            .round_activations_to_bf16()
            .context("--bf16-activations")?;
    }
    let prompt = if args.chat {
        let messages = [Message {
            role: "user".into(),
            content: args.prompt.clone(),
        }];
        loaded
            .tokenizer
            .encode_chat(&messages, true)
            .context("--chat")?
    } else {
        loaded.tokenizer.encode(&args.prompt, true)?
    };
    let stops = if args.ignore_eos {
        vec![]
    } else {
        lowrank_models::generate::stop_token_ids(&loaded.dir, &loaded.model, &loaded.tokenizer)?
    };
    let mut sampler = Sampler::new(SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    });
    let mut printer = StreamPrinter {
        tokenizer: &loaded.tokenizer,
        ids: vec![],
        printed: 0,
    };
    let start = std::time::Instant::now();
    let mut first_token_at = None;
    let tokens = generate(
        &loaded.model,
        &prompt,
        &active,
        &mut sampler,
        args.max_tokens,
        &stops,
        |t| {
            first_token_at.get_or_insert_with(std::time::Instant::now);
            printer
                .push(t)
                .map_err(|e| lowrank_core::Error::Msg(e.to_string()))
        },
    )?;
    println!();
    // The first token comes out of the prompt's forward pass; the rest are one decoding step each.
    let end = std::time::Instant::now();
    let prefill = first_token_at
        .map_or(end - start, |t| t - start)
        .as_secs_f64();
    let decode = first_token_at.map_or(0.0, |t| (end - t).as_secs_f64());
    let decode_rate = if tokens.len() > 1 {
        (tokens.len() - 1) as f64 / decode
    } else {
        0.0
    };
    eprintln!(
        "[prefill: {} tokens in {:.3} s ({:.1} tokens/s); decode: {} tokens at {:.1} tokens/s]",
        prompt.len(),
        prefill,
        prompt.len() as f64 / prefill,
        tokens.len(),
        decode_rate
    );
    Ok(())
}
