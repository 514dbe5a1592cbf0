//! lowrank-algebra: adapter algebra on factored updates ΔW = B·A — combining several adapters
//! into one and analysing the spectrum of an update — without forming d×k matrices where the
//! method allows it.

pub mod analyze;
pub mod combine;
pub mod error;
pub mod factored;
mod jacobi;

pub use error::{Error, Result};
pub use factored::{Factored, LowRankSvd};
