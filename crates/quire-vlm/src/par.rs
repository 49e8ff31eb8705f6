//! Thread-parallel matrix-vector products for CPU decoding.
//!
//! candle hands a matmul with a single row (one new token per sequence) to `gemm`'s gemv
//! kernel, which runs on one thread, so token-by-token decoding would use one core however
//! many are available. [`ParLinear`] splits such products by output features over a small
//! persistent pool (`RAYON_NUM_THREADS` threads in all, like candle). Each output is the same
//! dot product as in the unsplit call, so results are bit-identical.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use candle_core::{Module, Result, Tensor};
use candle_nn::Linear;

type Job = Box<dyn FnOnce() + Send + 'static>;

struct Pool {
    workers: Vec<Mutex<Sender<Job>>>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let n = candle_core::utils::get_num_threads().max(1) - 1;
        let workers = (0..n)
            .map(|i| {
                let (tx, rx) = channel::<Job>();
                std::thread::Builder::new()
                    .name(format!("quire-vlm-gemv-{i}"))
                    .spawn(move || {
                        for job in rx {
                            job();
                        }
                    })
                    .expect("spawning a gemv worker thread");
                Mutex::new(tx)
            })
            .collect();
        Pool { workers }
    })
}

/// Runs `tasks` concurrently (the first on the calling thread) and returns when all are done.
fn run_all<'a>(mut tasks: Vec<Box<dyn FnOnce() + Send + 'a>>) {
    let p = pool();
    let first = tasks.remove(0);
    let latch = Arc::new((Mutex::new(tasks.len()), Condvar::new()));
    for (i, task) in tasks.into_iter().enumerate() {
        let l = Arc::clone(&latch);
        let job: Box<dyn FnOnce() + Send + 'a> = Box::new(move || {
            // A panic must still release the caller, which keeps the borrowed data alive.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(task));
            let (m, cv) = &*l;
            *m.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
            cv.notify_one();
        });
        // SAFETY: this function does not return before every job has run to completion (the
        // latch below), so the borrows captured with lifetime 'a outlive their use.
        let job: Job = unsafe { std::mem::transmute::<Box<dyn FnOnce() + Send + 'a>, Job>(job) };
        let sent = p.workers[i % p.workers.len()].lock().unwrap_or_else(|e| e.into_inner()).send(job);
        if let Err(e) = sent {
            (e.0)(); // worker gone: run it here
        }
    }
    first();
    let (m, cv) = &*latch;
    let mut left = m.lock().unwrap_or_else(|e| e.into_inner());
    while *left > 0 {
        left = cv.wait(left).unwrap_or_else(|e| e.into_inner());
    }
}

/// A linear layer whose few-row products are split over threads by output features.
pub struct ParLinear {
    full: Linear,
    /// Row blocks of the weight (no bias), when splitting pays.
    parts: Vec<Linear>,
    bias: Option<Tensor>,
}

/// Products with at most this many rows go through the split path: only single rows, the
/// ones candle sends to the single-threaded gemv (more rows use gemm's own threads).
const MAX_ROWS: usize = 1;

impl ParLinear {
    pub fn new(inner: Linear) -> Result<Self> {
        let w = inner.weight();
        let threads = candle_core::utils::get_num_threads();
        let (out, _) = w.dims2()?;
        let mut parts = Vec::new();
        if w.device().is_cpu() && threads > 1 && out >= 64 * threads {
            let step = out.div_ceil(threads).div_ceil(16) * 16;
            let mut start = 0;
            while start < out {
                let len = step.min(out - start);
                parts.push(Linear::new(w.narrow(0, start, len)?, None));
                start += len;
            }
        }
        Ok(ParLinear { bias: inner.bias().cloned(), full: inner, parts })
    }

    pub fn weight(&self) -> &Tensor {
        self.full.weight()
    }
}

impl Module for ParLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?;
        if self.parts.len() < 2 || rows > MAX_ROWS {
            return self.full.forward(x);
        }
        let results: Vec<Mutex<Option<Result<Tensor>>>> = self.parts.iter().map(|_| Mutex::new(None)).collect();
        let tasks: Vec<Box<dyn FnOnce() + Send + '_>> = self
            .parts
            .iter()
            .zip(&results)
            .map(|(part, slot)| {
                Box::new(move || {
                    let r = part.forward(x);
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                }) as Box<dyn FnOnce() + Send + '_>
            })
            .collect();
        run_all(tasks);
        let outs = results
            .into_iter()
            .map(|s| s.into_inner().unwrap_or_else(|e| e.into_inner()).unwrap_or_else(|| candle_core::bail!("gemv task panicked")))
            .collect::<Result<Vec<_>>>()?;
        let y = Tensor::cat(&outs, candle_core::D::Minus1)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
