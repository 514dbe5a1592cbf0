//! lowrank-algebra: adapter algebra on factored updates ΔW = B·A — combining several adapters
//! into one and analysing the spectrum of an update — without forming d×k matrices where the
//! method allows it.

pub mod error;
pub mod factored;

pub use error::{Error, Result};
pub use factored::{Factored, LowRankSvd};
