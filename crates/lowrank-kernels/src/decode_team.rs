//! Helper threads for one inference step.
//!
//! A decoding step is some hundred short parallel passes over the weights (one per group of
//! projections), with short serial stretches between them (norms, attention, residual adds)
//! in which the pool's other threads have nothing to do and memory is idle. [`with_helpers`]
//! runs a step on the calling thread while the pool's other threads stay awake for the whole
//! step — spinning on rayon's queues, so they take a pass's work as soon as it is split rather
//! than waking from sleep — and lets the step [`warm`](DecodeTeam::warm) what a later pass
//! reads first: the helpers load it into their own caches during a serial stretch.
//!
//! Unmerged LoRA decoding warms the next pass's A factors (`lowrank-models`' batched step,
//! with one token), and with helpers awake a pass computes its A·x as one task that a helper
//! takes (`gemv.rs`), reading A from cache rather than from memory, while the calling thread
//! streams W at once.
//! Every step of the batched forward runs with helpers: on a 2-core AVX-512 Xeon VM, where
//! a wake-up goes through the hypervisor, spinning helpers served more tokens per second than
//! sleeping ones in 15 of 18 alternating runs (`step_rows`, f32 and NF4, 1, 8 and 32 rows; by
//! up to 40%, and 4–9% less in the other three).

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

thread_local! {
    /// This thread's part in a helped step, if any.
    static ROLE: Cell<Option<Role>> = const { Cell::new(None) };
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Runs a step that other threads help.
    Step,
    /// Helps another thread's step.
    Helper,
}

/// What a step's thread shares with its helpers.
#[derive(Default)]
struct Shared {
    /// Set when the step's work has returned or unwound: the helpers leave.
    done: AtomicBool,
    /// (address, bytes) of every slice handed to [`DecodeTeam::warm`] in this step, in order.
    spans: Mutex<Vec<(usize, usize)>>,
    /// How many of `spans` are there, so that helpers take the lock only when there is news.
    posted: AtomicUsize,
    /// Helpers that have started helping; the work waits for all of them (see [`with_helpers`]).
    arrived: AtomicUsize,
    /// Bytes the helpers have loaded, for the tests.
    #[cfg(test)]
    loaded: AtomicUsize,
}

/// A step's handle on its helpers, lent to the work of [`with_helpers`]. Memory handed to
/// [`warm`](Self::warm) must live for `'t`, which outlasts the `with_helpers` call: the
/// helpers read it until they leave, which is before that call returns.
pub struct DecodeTeam<'t> {
    shared: Option<Arc<Shared>>,
    /// Invariant in `'t`: a team must not take memory that lives less than `'t`.
    _memory: PhantomData<Cell<&'t [f32]>>,
}

impl<'t> DecodeTeam<'t> {
    /// Asks every helper to load `data` into its caches (with more than one, whichever takes
    /// the next pass's A·x has it). Does nothing without helpers.
    pub fn warm(&self, data: &[&'t [f32]]) {
        let Some(shared) = &self.shared else { return };
        let mut spans = shared.spans.lock().expect("warm spans");
        spans.extend(
            data.iter()
                .map(|d| (d.as_ptr() as usize, std::mem::size_of_val(*d))),
        );
        shared.posted.store(spans.len(), Ordering::Release);
    }

    /// Whether other threads help this step.
    pub fn is_helped(&self) -> bool {
        self.shared.is_some()
    }
}

/// Runs `work` on the calling thread with the current rayon pool's other threads as helpers
/// until it returns (see the module docs), and returns what it returns. Without helpers —
/// a caller outside any rayon pool, a pool of one thread, or a call made inside another step
/// or by a helper — `work` runs alone and [`DecodeTeam::warm`] does nothing. The pool's
/// threads spin while `work` runs, so it should be one decoding step, not a whole generation.
pub fn with_helpers<'t, R: Send>(work: impl FnOnce(&DecodeTeam<'t>) -> R + Send) -> R {
    let in_team = ROLE.with(Cell::get).is_some();
    let caller =
        rayon::current_thread_index().filter(|_| rayon::current_num_threads() > 1 && !in_team);
    let Some(caller) = caller else {
        return work(&DecodeTeam {
            shared: None,
            _memory: PhantomData,
        });
    };
    let shared = Arc::new(Shared::default());
    let work = Mutex::new(Some(work));
    let mut results = rayon::broadcast(|ctx| {
        if ctx.index() != caller {
            shared.arrived.fetch_add(1, Ordering::AcqRel);
            set_role(Role::Helper, || help(&shared));
            return None;
        }
        // The helpers leave even if the work panics (the panic then reaches the caller).
        let _leave = Leave(&shared);
        // The work starts once every helper is in `help`. A thread that has not yet taken its
        // share of the broadcast could otherwise steal a piece of the work first, take its
        // share while that piece waits on a join, and spin in `help` above the piece — which
        // the work then waits for: a deadlock (it hung a `generate` run).
        while shared.arrived.load(Ordering::Acquire) + 1 < ctx.num_threads() {
            std::hint::spin_loop();
        }
        let work = work
            .lock()
            .expect("the step's work")
            .take()
            .expect("one thread runs the work");
        let team = DecodeTeam {
            shared: Some(Arc::clone(&shared)),
            _memory: PhantomData,
        };
        Some(set_role(Role::Step, || work(&team)))
    });
    results
        .swap_remove(caller)
        .expect("rayon runs a broadcast's share of the calling thread on it")
}

/// Whether the current thread runs a step that other threads help.
pub(crate) fn helpers_awake() -> bool {
    ROLE.with(Cell::get) == Some(Role::Step)
}

/// Runs `work` in `role`, and restores the role this thread had (also on unwind).
fn set_role<R>(role: Role, work: impl FnOnce() -> R) -> R {
    struct Restore(Option<Role>);
    impl Drop for Restore {
        fn drop(&mut self) {
            ROLE.with(|r| r.set(self.0));
        }
    }
    let _restore = Restore(ROLE.with(|r| r.replace(Some(role))));
    work()
}

struct Leave<'a>(&'a Shared);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.done.store(true, Ordering::Release);
    }
}

/// A helper's loop: load what the step warms, run the pool's pending work (a pass's share,
/// a parallel attention), and otherwise spin.
fn help(shared: &Shared) {
    let mut loaded = 0;
    while !shared.done.load(Ordering::Acquire) {
        if shared.posted.load(Ordering::Acquire) > loaded {
            let spans = shared.spans.lock().expect("warm spans")[loaded..].to_vec();
            loaded += spans.len();
            load(&spans);
            #[cfg(test)]
            shared.loaded.fetch_add(
                spans.iter().map(|&(_, bytes)| bytes).sum(),
                Ordering::Relaxed,
            );
        }
        if rayon::yield_now() != Some(rayon::Yield::Executed) {
            std::hint::spin_loop();
        }
    }
}

/// Reads one value of every 64-byte line of `spans` (and each span's last value). Loads
/// rather than prefetch hints: the CPU drops prefetches it has no room for.
fn load(spans: &[(usize, usize)]) {
    const LINE: usize = 64;
    let mut sum = 0f32;
    for &(start, bytes) in spans {
        if bytes == 0 {
            continue;
        }
        let last = bytes - std::mem::size_of::<f32>();
        for offset in (0..bytes).step_by(LINE).chain([last]) {
            // SAFETY: (start, bytes) is the memory of a `&'t [f32]` given to `warm`, which
            // lives until the `with_helpers` call that lent the team returns, and that call
            // waits for every helper to leave; offset < bytes and is a multiple of 4, so the
            // read is an aligned f32 inside that slice.
            sum += unsafe { std::ptr::read_volatile((start + offset) as *const f32) };
        }
    }
    std::hint::black_box(sum);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    /// Inside a pool of two or three, the work runs on the calling thread with helpers awake,
    /// rayon work inside it completes, and every helper loads what it warms (in two calls)
    /// before the call returns.
    #[test]
    fn the_step_runs_on_its_thread_and_the_helpers_load_what_it_warms() {
        let data: Vec<f32> = (0..10_000).map(|i| i as f32).collect();
        let (first, rest) = data.split_at(4321);
        for threads in [2, 3] {
            let want = (threads - 1) * data.len() * 4;
            pool(threads).install(|| {
                let caller = std::thread::current().id();
                let (loaded, sum) = with_helpers(|team| {
                    assert_eq!(std::thread::current().id(), caller);
                    assert!(team.is_helped() && helpers_awake());
                    team.warm(&[first]);
                    let sum: f64 = data.par_iter().map(|&v| v as f64).sum();
                    team.warm(&[rest]);
                    let shared = team.shared.as_ref().unwrap();
                    let start = std::time::Instant::now();
                    while shared.loaded.load(Ordering::Relaxed) < want
                        && start.elapsed().as_secs() < 10
                    {
                        std::hint::spin_loop();
                    }
                    (shared.loaded.load(Ordering::Relaxed), sum)
                });
                assert_eq!(loaded, want, "{threads} threads");
                assert_eq!(sum, (0..10_000).map(|i| i as f64).sum::<f64>());
                assert!(!helpers_awake(), "the role ends with the step");
            });
        }
    }

    /// Outside any pool, in a pool of one thread, and inside another step, the work runs
    /// alone: nothing is warmed and no helper is awake.
    #[test]
    fn without_helpers_the_work_runs_alone() {
        fn step<'t>(team: &DecodeTeam<'t>, data: &'t [f32]) -> (bool, bool) {
            team.warm(&[data]);
            (team.is_helped(), helpers_awake())
        }
        let data = vec![1f32; 64];
        assert_eq!(with_helpers(|team| step(team, &data)), (false, false));
        let one = pool(1).install(|| with_helpers(|team| step(team, &data)));
        assert_eq!(one, (false, false));
        let nested = pool(2).install(|| with_helpers(|_| with_helpers(|team| step(team, &data))));
        assert_eq!(
            nested,
            (false, true),
            "a nested call runs inside the outer step"
        );
    }

    /// Thousands of steps, each starting parallel work at once, in a pool of two, end: a
    /// helper never takes a piece of the work before its share of the broadcast (it would then
    /// spin above that piece and the work would wait for it for ever). Run on a thread of its
    /// own, so that a deadlock fails the test instead of hanging it.
    #[test]
    fn steps_that_split_work_at_once_do_not_deadlock() {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            pool(2).install(|| {
                let data: Vec<u32> = (0..64).collect();
                let mut total = 0u64;
                for _ in 0..20_000 {
                    total += with_helpers(|_| {
                        data.par_iter()
                            .with_max_len(1)
                            .map(|&v| u64::from(v))
                            .sum::<u64>()
                    });
                }
                done.send(total).unwrap();
            });
        });
        let total = finished
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the steps deadlocked");
        assert_eq!(total, 20_000 * (0..64u64).sum::<u64>());
    }

    /// A panic in the work reaches the caller, and the helpers leave rather than spin on.
    #[test]
    fn a_panic_in_the_step_reaches_the_caller() {
        let pool = pool(2);
        let result = pool
            .install(|| std::panic::catch_unwind(|| with_helpers(|_| -> u8 { panic!("step") })));
        assert!(result.is_err());
        assert!(pool.install(|| with_helpers(|team| team.is_helped())));
    }
}
