//! The demo's phase messages on stderr.

use std::time::Instant;

/// Phase messages on stderr, with the time since the start.
pub struct Progress {
    start: Instant,
    quiet: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Progress {
            start: Instant::now(),
            quiet,
        }
    }

    pub fn say(&self, msg: impl AsRef<str>) {
        if !self.quiet {
            eprintln!(
                "[{:>6.1}s] {}",
                self.start.elapsed().as_secs_f64(),
                msg.as_ref()
            );
        }
    }

    pub fn seconds(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}
