//! A small persistent thread pool for CPU inference ([`par_for`]), what the parallel kernels run on.
//!
//! candle hands a matmul with a single row (one new token per sequence) to `gemm`'s gemv
//! kernel, which runs on one thread, and its unary ops run on one thread too. [`par_for`] runs
//! indexed tasks on a persistent pool (`RAYON_NUM_THREADS` threads in all, like candle, the
//! caller included) whose workers spin briefly between jobs, so the many small dispatches of
//! token-by-token decoding cost microseconds, not scheduler wake-ups. The kernels
//! ([`crate::kernels`]) and the linear layer ([`crate::linear::ParLinear`]) run on it; this
//! module imports neither.

use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

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
            if spins.is_multiple_of(64) && start.elapsed() > SPIN {
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
}
