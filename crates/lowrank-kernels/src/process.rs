//! Process-wide settings the kernels' speed depends on, for a binary (the CLI, the benchmarks)
//! to apply first thing in `main`, before any other thread exists.

/// Environment variables through which a user tunes glibc's malloc; with any of them set, the
/// user's settings win over [`set_up`]'s.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub const USER_MALLOC_SETTINGS: [&str; 3] = [
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "GLIBC_TUNABLES",
];

/// Applies all of the settings below: candle's pool does not spin, glibc keeps freed memory,
/// and the calling thread joins the global rayon pool. Call it at the start of `main`.
pub fn set_up() {
    stop_candle_spinning();
    keep_freed_memory();
    join_rayon_pool();
}

/// candle's elementwise thread pool spins (25 000 rounds) after every parallel op before it
/// sleeps. With as many threads as cores that spinning takes a core from the rayon threads
/// running the next GEMM; sleeping at once costs one wake-up per large elementwise op. A value
/// the user set wins.
fn stop_candle_spinning() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
}

/// Lets glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.
/// A training step frees and reallocates the same activation buffers (megabytes each) every
/// step; by default glibc returns them (munmap, heap trimming) and every step page-faults them
/// in again. With buffers up to 32 MiB (glibc's largest allowed threshold) taken from
/// the heap and the heap never trimmed below 2 GiB of free space, steady steps fault about
/// never; peak RSS is unchanged, since it is set by the step's peak use either way. Settings
/// the user made through glibc's environment variables win.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_tuned = USER_MALLOC_SETTINGS
            .iter()
            .any(|var| std::env::var_os(var).is_some());
        if !user_tuned {
            // SAFETY: mallopt only changes malloc's parameters; called before any other
            // thread exists, so no allocation runs concurrently.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            }
        }
    }
}

/// The calling thread joins the global rayon pool as one of its workers: candle, gemm and the
/// kernels issue hundreds of short parallel ops per decoding step, and handing each from an
/// outside thread to the pool (and waking it) cost a fifth of the step. Running the work on
/// the main thread itself (rather than `install`ing it on a pool thread) keeps its allocations
/// in glibc's main arena, which reuses freed activation buffers; a thread arena hands them
/// back to the kernel and every training step paid the page faults again. Failing to build the
/// pool (one already exists) only loses that speed.
fn join_rayon_pool() {
    let _ = rayon::ThreadPoolBuilder::new()
        .use_current_thread()
        .build_global();
}
