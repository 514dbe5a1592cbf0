//! lowrank-demo: the project's built-in demonstration, `lowrank demo`.
//!
//! On a machine with no files and no network it builds everything it needs: a character-level
//! tokenizer, a procedurally generated corpus, a tiny Llama-architecture model pretrained on that
//! corpus (full fine-tuning from random weights), then one LoRA/DoRA adapter per new skill, and a
//! report comparing base and adapters on every skill, the cost of each (parameters, file size,
//! peak memory against full fine-tuning) and merged against unmerged outputs; then a rank sweep
//! on one skill, with the spectrum of every adapter's update (`lowrank analyze`).

pub mod charset;
pub mod config;
pub mod engine;
pub mod evaluate;
pub mod pipeline;
pub mod progress;
pub mod report;
pub mod sweep;
pub mod tasks;
pub mod tiny;

pub use config::DemoConfig;
pub use pipeline::run;
pub use progress::Progress;
pub use report::DemoReport;
