//! lowrank-demo: the project's built-in demonstration, `lowrank demo`.
//!
//! On a machine with no files and no network it builds everything it needs: a character-level
//! tokenizer, a procedurally generated corpus, a tiny Llama-architecture model pretrained on that
//! corpus (full fine-tuning from random weights), then one LoRA/DoRA adapter per new skill, and a
//! report comparing base and adapters on every skill, the cost of each (parameters, file size,
//! peak memory against full fine-tuning) and merged against unmerged outputs.

pub mod charset;
pub mod engine;
pub mod error;
pub mod evaluate;
pub mod pipeline;
pub mod report;
pub mod tasks;
pub mod tiny;

pub use pipeline::{run, DemoConfig, Progress};
pub use report::DemoReport;
