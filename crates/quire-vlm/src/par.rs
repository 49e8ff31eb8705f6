//! Thread-parallel kernels for CPU inference over a small persistent pool.
//!
//! candle hands a matmul with a single row (one new token per sequence) to `gemm`'s gemv
//! kernel, which runs on one thread, and its unary ops run on one thread too. [`par_for`] runs
//! indexed tasks on a persistent pool (`RAYON_NUM_THREADS` threads in all, like candle, the
//! caller included) whose workers spin briefly between jobs, so the many small dispatches of
//! token-by-token decoding cost microseconds, not scheduler wake-ups. [`ParLinear`] uses it for
//! decoding products: outputs split by features, each a dot product computed by
//! [`crate::kernels::matvec_rows`] the same way whatever the batch size or split.

use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use candle_core::{Module, Result, Tensor};
use candle_nn::Linear;

/// One published job: tasks `0..n`, claimed through `next`.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
}

impl Job<'_> {
    fn run(&self) {
        loop {
            let i = self.next.fetch_add(1, Relaxed);
            if i >= self.n {
                break;
            }
            self.f.run_task(i);
        }
    }
}

trait Task {
    fn run_task(&self, i: usize);
}
impl<F: Fn(usize) + Sync + ?Sized> Task for F {
    fn run_task(&self, i: usize) {
        // A panicking task must not unwind through the pool; the job's result is then
        // incomplete, which the caller's own panic (on its share) or checks will surface.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self(i))).is_err() {
            POISONED.store(true, Relaxed);
        }
    }
}

static POISONED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Set in `active` while no job may be entered.
const CLOSED: usize = 1 << (usize::BITS - 1);

struct Pool {
    workers: usize,
    /// Job generation; workers wait for it to change.
    seq: AtomicU64,
    /// The current job (type-erased `*const Job`), valid while `active` is not CLOSED or
    /// counts a worker inside.
    job: AtomicPtr<()>,
    /// Workers inside the current job, plus the CLOSED bit.
    active: AtomicUsize,
    /// Parked workers and their wake-up.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    /// One caller at a time; others run their tasks inline.
    submit: Mutex<()>,
}

/// How long an idle worker polls for the next job before parking.
const SPIN: Duration = Duration::from_micros(200);

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let workers = candle_core::utils::get_num_threads().max(1) - 1;
        let p: &'static Pool = Box::leak(Box::new(Pool {
            workers,
            seq: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            active: AtomicUsize::new(CLOSED),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            submit: Mutex::new(()),
        }));
        for i in 0..workers {
            std::thread::Builder::new()
                .name(format!("quire-vlm-par-{i}"))
                .spawn(move || worker(p))
                .expect("spawning a pool worker thread");
        }
        p
    })
}

fn worker(p: &'static Pool) {
    let mut seen = p.seq.load(SeqCst);
    loop {
        // Wait for a new generation: spin, then park.
        let start = Instant::now();
        let mut spins = 0u32;
        while p.seq.load(SeqCst) == seen {
            spins += 1;
            if spins < 1024 {
                std::hint::spin_loop();
            } else {
                // Keep polling without holding the core from threads that have work.
                std::thread::yield_now();
            }
            if spins % 64 == 0 && start.elapsed() > SPIN {
                let mut g = p.lock.lock().unwrap_or_else(|e| e.into_inner());
                p.sleepers.fetch_add(1, SeqCst);
                while p.seq.load(SeqCst) == seen {
                    g = p.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                p.sleepers.fetch_sub(1, SeqCst);
                break;
            }
        }
        seen = p.seq.load(SeqCst);
        let a = p.active.fetch_add(1, SeqCst);
        if a & CLOSED == 0 {
            let job = p.job.load(SeqCst) as *const Job<'static>;
            // SAFETY: the job stays alive until the caller has seen `active` drop to zero,
            // which cannot happen before the decrement below.
            unsafe { (*job).run() };
        }
        p.active.fetch_sub(1, SeqCst);
    }
}

/// Runs `f(i)` for every `i < n`, spread over the pool (the calling thread takes part).
/// Returns when all calls are done. Tasks are claimed dynamically, so `f` must not depend on
/// which thread runs it. Nested or concurrent calls run inline on the calling thread.
pub fn par_for(n: usize, f: &(dyn Fn(usize) + Sync)) {
    if n == 0 {
        return;
    }
    let p = pool();
    let guard = if n > 1 && p.workers > 0 { p.submit.try_lock().ok() } else { None };
    let Some(_guard) = guard else {
        (0..n).for_each(f);
        return;
    };
    let job = Job { f, n, next: AtomicUsize::new(0) };
    p.job.store(&job as *const Job as *mut (), SeqCst);
    p.active.fetch_and(!CLOSED, SeqCst);
    p.seq.fetch_add(1, SeqCst);
    if p.sleepers.load(SeqCst) > 0 {
        let _g = p.lock.lock().unwrap_or_else(|e| e.into_inner());
        p.wake.notify_all();
    }
    job.run();
    p.active.fetch_or(CLOSED, SeqCst);
    // Workers still inside finish their last task; if one was preempted, let it run.
    let mut spins = 0u32;
    while p.active.load(SeqCst) & !CLOSED != 0 {
        spins += 1;
        if spins < 512 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    if POISONED.swap(false, SeqCst) {
        panic!("a parallel task panicked");
    }
}

/// A linear layer on the pool: decoding products (one new token per sequence) with
/// [`crate::kernels::matvec_rows`], others (CPU f32) with gemm split by output features
/// ([`crate::kernels::matmul_wt_cols`]); other devices and dtypes go to candle's matmul.
pub struct ParLinear {
    full: Linear,
    /// The weight as a contiguous f32 CPU slice source, when the kernel path applies.
    cpu: Option<(Tensor, Option<Tensor>)>,
    out: usize,
    inp: usize,
}

/// Outputs per task: a few hundred KiB of weights for the widest inputs here.
const TASK_OUTPUTS: usize = 64;

impl ParLinear {
    pub fn new(inner: Linear) -> Result<Self> {
        let w = inner.weight();
        let (out, inp) = w.dims2()?;
        let cpu = if w.device().is_cpu() && w.dtype() == candle_core::DType::F32 {
            let b = match inner.bias() {
                Some(b) if b.dtype() == candle_core::DType::F32 => Some(b.contiguous()?),
                Some(_) => return Ok(ParLinear { full: inner, cpu: None, out, inp }),
                None => None,
            };
            Some((w.contiguous()?, b))
        } else {
            None
        };
        Ok(ParLinear { full: inner, cpu, out, inp })
    }

    /// One layer computing `parts` side by side (weights stacked by output features); the
    /// output is their outputs concatenated along the last dimension.
    pub fn fused(parts: &[Linear]) -> Result<Self> {
        let ws: Vec<&Tensor> = parts.iter().map(|l| l.weight()).collect();
        let w = Tensor::cat(&ws, 0)?;
        let bias = if parts.iter().all(|l| l.bias().is_some()) {
            let bs: Vec<&Tensor> = parts.iter().filter_map(|l| l.bias()).collect();
            Some(Tensor::cat(&bs, 0)?)
        } else if parts.iter().all(|l| l.bias().is_none()) {
            None
        } else {
            let mut bs = Vec::new();
            for l in parts {
                bs.push(match l.bias() {
                    Some(b) => b.clone(),
                    None => Tensor::zeros(l.weight().dim(0)?, l.weight().dtype(), l.weight().device())?,
                });
            }
            Some(Tensor::cat(&bs, 0)?)
        };
        Self::new(Linear::new(w, bias))
    }

    pub fn weight(&self) -> &Tensor {
        self.full.weight()
    }
}

/// Raw f32 data of a contiguous CPU tensor, handed to `f`.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) = &*s else {
        candle_core::bail!("expected an f32 CPU tensor");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("expected a contiguous tensor");
    };
    Ok(f(&data[a..b]))
}

struct SendPtr(*mut f32);
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

impl Module for ParLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        // One position per sequence: (.., 1, in) or a single (in) / (1, in) row.
        let decoding = match dims.len() {
            0 => false,
            1 => true,
            r => dims[r - 2] == 1,
        };
        let Some((w, bias)) = self.cpu.as_ref().filter(|_| x.dtype() == candle_core::DType::F32 && x.device().is_cpu()) else {
            return self.full.forward(x);
        };
        let x = x.contiguous()?;
        let rows = x.elem_count() / self.inp;
        let (n, k) = (self.out, self.inp);
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank >= 1") = n;
        if !decoding {
            // Several positions per sequence (a prefill): gemm, split by output features.
            let mut y = match bias {
                Some(b) => with_f32(b, |b| b.repeat(rows))?,
                None => vec![0f32; rows * n],
            };
            with_f32(&x, |xs| with_f32(w, |ws| crate::kernels::matmul_wt_cols(xs, ws, &mut y, rows, k, n, bias.is_some())))??;
            return Tensor::from_vec(y, shape, x.device());
        }
        let mut y = vec![0f32; rows * n];
        let yp = SendPtr(y.as_mut_ptr());
        with_f32(&x, |xs| {
            with_f32(w, |ws| {
                let run = |bs: Option<&[f32]>| {
                    let tasks = n.div_ceil(TASK_OUTPUTS);
                    let yp = &yp;
                    par_for(tasks, &|t| {
                        let o0 = t * TASK_OUTPUTS;
                        let o1 = (o0 + TASK_OUTPUTS).min(n);
                        // SAFETY: tasks write disjoint output columns of `y`, which outlives par_for.
                        unsafe { crate::kernels::matvec_rows(ws, k, bs, xs, rows, n, o0, o1, yp.0) };
                    });
                };
                match bias {
                    Some(b) => with_f32(b, |bs| run(Some(bs))),
                    None => {
                        run(None);
                        Ok(())
                    }
                }
            })
        })???;
        Tensor::from_vec(y, shape, x.device())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn par_for_runs_every_task_once() {
        let hits: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..50 {
            par_for(hits.len(), &|i| {
                hits[i].fetch_add(1, Relaxed);
            });
        }
        assert!(hits.iter().all(|h| h.load(Relaxed) == 50));
    }

    /// Weight-streaming rate of the decoding product (run with --release --ignored --nocapture).
    #[test]
    #[ignore]
    fn matvec_bandwidth() {
        let (n, k) = (1 << 16, 1024);
        let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32).collect();
        let lin = ParLinear::new(Linear::new(Tensor::from_vec(w, (n, k), &candle_core::Device::Cpu).unwrap(), None)).unwrap();
        let x = Tensor::ones((1, 1, k), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let mut best = f64::MAX;
        for _ in 0..20 {
            let t = Instant::now();
            lin.forward(&x).unwrap();
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("matvec: {:.1} GB/s (best of 20)", (n * k * 4) as f64 / best / 1e9);
    }
}
