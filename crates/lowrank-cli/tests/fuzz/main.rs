//! The fuzz suite (issue 23): property tests over every parser a user or client feeds.
//!
//! Each property runs generated inputs and mutated copies of the real fixtures (byte flips,
//! truncation, splicing, JSON fields replaced with values of the wrong type, huge numbers,
//! NaN-like strings...) and checks: no panic (a panicking case fails and is shrunk), a clear
//! error (not empty, naming the file or field where the API has one; an error whenever a field
//! has a type its parser cannot take), and no file written.
//!
//! Case counts are constants in each module and are printed when a property runs. The seed is
//! fixed, so CI runs the same inputs every time; `PROPTEST_RNG_SEED=<n>` picks other inputs and
//! `LOWRANK_FUZZ_SCALE=<k>` runs k times as many; `LOWRANK_FUZZ_VERBOSE=1` (with `--nocapture`)
//! prints every error and status the inputs got, to see how deep they reach.

mod support;

mod adapters;
mod commands;
mod data;
mod gguf;
mod models;
mod regressions;
mod server;
mod tokenizers;
