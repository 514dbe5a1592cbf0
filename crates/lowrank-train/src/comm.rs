//! The communicator data-parallel training runs over: every rank (process) holds the same
//! model and adapter, computes the gradients of its share of each optimizer step's batch, and
//! the ranks sum them with one all-reduce per step, so each takes the same update.
//!
//! [`Communicator`] is what the trainer needs from the engine: all-reduce sums of f32 and f64
//! buffers, a broadcast of bytes, a barrier, and this process's rank and the world's size.
//! [`SingleProcess`] (one rank; every operation is the identity) is what `train` uses.
//! With the `mpi` feature, [`Mpi`] implements it over the system's MPI library (`mpirun`,
//! Slurm's `srun`); another engine (NCCL on GPUs) would be one more implementation.

use thiserror::Error;

/// What a communicator or a rank's check of its peers can report.
#[derive(Debug, Error)]
pub enum CommError {
    /// MPI could not be started (`MPI_Init_thread` failed or ran before).
    #[error("MPI could not be initialised{0}")]
    Init(&'static str),
    /// This rank was given other inputs than rank 0 (a different command line, other files).
    #[error(
        "{what} differs from rank 0's ({here} here, {root} on rank 0); every rank must run the same command on the same files"
    )]
    Diverged {
        what: &'static str,
        here: String,
        root: String,
    },
}

impl From<CommError> for lowrank_core::Error {
    fn from(e: CommError) -> Self {
        lowrank_core::Error::Msg(e.to_string())
    }
}

/// The collective operations data-parallel training needs. Every rank must call them in the
/// same order with buffers of the same length (MPI's rule for collectives).
pub trait Communicator {
    /// This process's rank, 0..size.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Replaces `values` on every rank by their elementwise sum over the ranks.
    fn all_reduce_sum_f32(&self, values: &mut [f32]) -> Result<(), CommError>;
    /// As [`Communicator::all_reduce_sum_f32`], for f64 (losses, token counts).
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<(), CommError>;
    /// Replaces `bytes` on every rank by `root`'s (of any length).
    fn broadcast_bytes(&self, root: usize, bytes: &mut Vec<u8>) -> Result<(), CommError>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), CommError>;
    /// Ends every rank of the job with `code` (a failing rank must not leave the others
    /// waiting in a collective).
    fn abort(&self, code: i32) -> !;
}

/// One process: rank 0 of 1; every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&self, _: &mut [f32]) -> Result<(), CommError> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<(), CommError> {
        Ok(())
    }
    fn broadcast_bytes(&self, _: usize, _: &mut Vec<u8>) -> Result<(), CommError> {
        Ok(())
    }
    fn barrier(&self) -> Result<(), CommError> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// Checks that this rank's `value` of `what` is rank 0's (rank 0 broadcasts its own).
pub fn check_same(
    comm: &dyn Communicator,
    what: &'static str,
    value: &str,
) -> Result<(), CommError> {
    if comm.size() == 1 {
        return Ok(());
    }
    let mut root = value.as_bytes().to_vec();
    comm.broadcast_bytes(0, &mut root)?;
    let root = String::from_utf8_lossy(&root);
    if root != value {
        return Err(CommError::Diverged {
            what,
            here: value.to_string(),
            root: root.into_owned(),
        });
    }
    Ok(())
}

/// The share of `rows` that `rank` of `size` computes: the rank-th of `size` contiguous slices
/// whose lengths differ by at most one (empty when there are fewer rows than ranks).
pub fn shard<T>(rows: &[T], rank: usize, size: usize) -> &[T] {
    let (base, extra) = (rows.len() / size, rows.len() % size);
    let start = rank * base + rank.min(extra);
    &rows[start..start + base + usize::from(rank < extra)]
}

#[cfg(feature = "mpi")]
pub use self::mpi_world::Mpi;

#[cfg(feature = "mpi")]
mod mpi_world {
    use mpi::collective::SystemOperation;
    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    // MPI's own trait of that name (rank, size, abort), under another so ours stays nameable.
    use mpi::traits::{Communicator as _, CommunicatorCollectives as _, Root as _};

    use super::{CommError, Communicator};

    /// MPI's count arguments are C ints: longer buffers go in pieces of this many elements.
    const MAX_COUNT: usize = i32::MAX as usize;

    /// `MPI_COMM_WORLD` of the system's MPI; MPI is finalised when this is dropped.
    pub struct Mpi {
        // Dropped last: finalises MPI.
        _universe: Universe,
        world: SimpleCommunicator,
    }

    impl Mpi {
        /// Initialises MPI (only the calling thread makes MPI calls; candle's worker threads
        /// never do). A panic on any rank then aborts the whole job instead of leaving the
        /// other ranks blocked in the next collective.
        pub fn init() -> Result<Mpi, CommError> {
            let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
                .ok_or(CommError::Init(" (it already was)"))?;
            let world = universe.world();
            if world.size() > 1 {
                let report = std::panic::take_hook();
                std::panic::set_hook(Box::new(move |info| {
                    report(info);
                    SimpleCommunicator::world().abort(101);
                }));
            }
            Ok(Mpi {
                _universe: universe,
                world,
            })
        }
    }

    impl Communicator for Mpi {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn size(&self) -> usize {
            self.world.size() as usize
        }
        fn all_reduce_sum_f32(&self, values: &mut [f32]) -> Result<(), CommError> {
            for part in values.chunks_mut(MAX_COUNT) {
                let send = part.to_vec();
                self.world
                    .all_reduce_into(&send[..], part, SystemOperation::sum());
            }
            Ok(())
        }
        fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<(), CommError> {
            for part in values.chunks_mut(MAX_COUNT) {
                let send = part.to_vec();
                self.world
                    .all_reduce_into(&send[..], part, SystemOperation::sum());
            }
            Ok(())
        }
        fn broadcast_bytes(&self, root: usize, bytes: &mut Vec<u8>) -> Result<(), CommError> {
            let root = self.world.process_at_rank(root as i32);
            let mut len = bytes.len() as u64;
            root.broadcast_into(&mut len);
            bytes.resize(len as usize, 0);
            for part in bytes.chunks_mut(MAX_COUNT) {
                root.broadcast_into(part);
            }
            Ok(())
        }
        fn barrier(&self) -> Result<(), CommError> {
            self.world.barrier();
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            self.world.abort(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_rows_in_order_and_differ_by_at_most_one() {
        for len in 0..10 {
            let rows: Vec<usize> = (0..len).collect();
            for size in 1..5 {
                let parts: Vec<&[usize]> = (0..size).map(|r| shard(&rows, r, size)).collect();
                assert_eq!(parts.concat(), rows, "len {len}, size {size}");
                let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
                let (lo, hi) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
                assert!(hi - lo <= 1, "len {len}, size {size}: {lens:?}");
            }
        }
    }
}
