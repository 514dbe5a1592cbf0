//! Data-parallel training without MPI: two ranks as two threads of this process, over an
//! in-memory communicator, against one `train` with the same global batch. (The `mpi`
//! feature's tests in crates/lowrank-cli/tests/mpi.rs run the same under `mpirun`.)

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, Mutex};

use candle_core::Device;
use lowrank_train::comm::{CommError, Communicator};
use lowrank_train::{train, train_with, Method, TrainOptions};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// What the ranks share: a barrier and one slot per rank for the values being reduced.
struct Shared {
    barrier: Barrier,
    slots: Mutex<Vec<Vec<f64>>>,
}

/// One rank of `size` threads; sums in rank order, as MPI does for two ranks.
struct ThreadRank {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
}

impl ThreadRank {
    fn ranks(size: usize) -> Vec<ThreadRank> {
        let shared = Arc::new(Shared {
            barrier: Barrier::new(size),
            slots: Mutex::new(vec![Vec::new(); size]),
        });
        (0..size)
            .map(|rank| ThreadRank {
                rank,
                size,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Every rank's `values` (after all have posted theirs).
    fn exchange(&self, values: Vec<f64>) -> Vec<Vec<f64>> {
        self.shared.slots.lock().unwrap()[self.rank] = values;
        self.shared.barrier.wait();
        let all = self.shared.slots.lock().unwrap().clone();
        self.shared.barrier.wait();
        all
    }
}

impl Communicator for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum_f32(&self, values: &mut [f32]) -> Result<(), CommError> {
        let all = self.exchange(values.iter().map(|&v| f64::from(v)).collect());
        for (i, v) in values.iter_mut().enumerate() {
            *v = all
                .iter()
                .map(|r| r[i] as f32)
                .reduce(|a, b| a + b)
                .unwrap();
        }
        Ok(())
    }
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<(), CommError> {
        let all = self.exchange(values.to_vec());
        for (i, v) in values.iter_mut().enumerate() {
            *v = all.iter().map(|r| r[i]).reduce(|a, b| a + b).unwrap();
        }
        Ok(())
    }
    fn broadcast_bytes(&self, root: usize, bytes: &mut Vec<u8>) -> Result<(), CommError> {
        let all = self.exchange(bytes.iter().map(|&b| f64::from(b)).collect());
        *bytes = all[root].iter().map(|&b| b as u8).collect();
        Ok(())
    }
    fn barrier(&self) -> Result<(), CommError> {
        self.shared.barrier.wait();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        panic!("rank {} aborted with {code}", self.rank)
    }
}

fn options(method: Method, out: &Path) -> TrainOptions {
    TrainOptions {
        model: fixtures().join("models/llama-tied").display().to_string(),
        data: fixtures().join("data/train.jsonl"),
        out: out.to_path_buf(),
        method,
        rank: 4,
        alpha: 8.0,
        lr: 1e-3,
        batch_size: 4,
        epochs: 3,
        quiet: true,
        ..Default::default()
    }
}

/// Two thread-ranks with global batch 4 give one process's losses and adapter (to float
/// rounding: each rank sums over its half of the batch first); only rank 0 writes.
#[test]
fn two_ranks_in_threads_equal_one_process() {
    for method in [Method::Lora, Method::Dora] {
        let tmp = tempfile::tempdir().unwrap();
        let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
        let single = train(&options(method, &one)).unwrap();
        let reports: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = ThreadRank::ranks(2)
                .into_iter()
                .map(|rank| {
                    let o = options(method, &two);
                    s.spawn(move || train_with(&o, &rank).unwrap())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(single.losses.len(), 6);
        for report in &reports {
            assert_eq!(report.losses.len(), 6);
            for (a, b) in single.losses.iter().zip(&report.losses) {
                assert!((a - b).abs() < 1e-6, "{method}: loss {a} vs {b}");
            }
        }
        let load = |dir: &Path| {
            candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
                .unwrap()
        };
        let (x, y) = (load(&one), load(&two));
        assert_eq!(x.len(), y.len());
        for (name, t) in &x {
            let d = (t - &y[name])
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-6, "{method} {name}: max |Δ| {d}");
        }
        let log = std::fs::read_to_string(two.join("training_log.jsonl")).unwrap();
        assert_eq!(
            log.lines().count(),
            6,
            "one line per step, from rank 0 only"
        );
        assert!(log.lines().all(|l| l.contains("\"world_size\":2")), "{log}");
    }
}
