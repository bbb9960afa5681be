//! The CPU-bound part of a recall (user tower and index search) runs on a small pool of its own
//! threads, not on the async workers. The workers stay free to read, parse and answer requests,
//! so when recalls arrive faster than the pool can serve them the excess is turned away at once
//! with a 503 instead of waiting unseen in socket buffers; and admission looks at the queue in
//! front of the pool: a request is refused when it would wait longer than `max_wait`, estimated
//! from the queue length and the recent service time. A fixed cap on requests in flight cannot
//! do that alone: the right cap is 100× smaller for a 5 ms brute-force search than for a 50 µs
//! graph search.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Shared {
    queued: AtomicUsize,
    running: AtomicUsize,
    pace: Mutex<Pace>,
}

/// How often the pool finishes a job while it has work: the time a queued job waits per job
/// ahead of it. Measured between completions rather than per job, because a search may itself
/// spread over several threads: what counts is the pool's throughput, not one job's duration.
#[derive(Default)]
struct Pace {
    last: Option<Instant>,
    /// Work was waiting or running at the last completion, so the pool stayed busy until this one.
    busy: bool,
    ns_per_job: u64,
}

/// A fixed pool of threads with a queue whose expected wait bounds admission. Searches that
/// split themselves (the exact index shards a query over threads) split over this pool too, so
/// the pool never runs more threads than it was given.
pub struct Compute {
    pool: rayon::ThreadPool,
    shared: Arc<Shared>,
    max_wait: Duration,
}

/// Why a job was not queued.
#[derive(Debug, Clone, Copy)]
pub struct Overloaded {
    pub expected_wait: Duration,
}

impl Compute {
    /// `threads` workers; jobs that would wait longer than `max_wait` are refused
    /// (`Duration::ZERO` never refuses).
    pub fn new(threads: usize, max_wait: Duration) -> std::io::Result<Compute> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("needle-compute-{i}"))
            .build()
            .map_err(std::io::Error::other)?;
        let shared =
            Arc::new(Shared { queued: AtomicUsize::new(0), running: AtomicUsize::new(0), pace: Mutex::default() });
        Ok(Compute { pool, shared, max_wait })
    }

    /// How long a job queued now would wait before a thread takes it.
    pub fn expected_wait(&self) -> Duration {
        let ahead = self.shared.queued.load(Relaxed) as u64;
        let pace = self.shared.pace.lock().unwrap_or_else(|e| e.into_inner()).ns_per_job;
        Duration::from_nanos(ahead.saturating_mul(pace))
    }

    /// Jobs waiting for a thread.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Relaxed)
    }

    /// Jobs being run.
    pub fn running(&self) -> usize {
        self.shared.running.load(Relaxed)
    }

    /// Runs `f` on the pool and awaits its result, or refuses at once when the queue is too long.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, Overloaded> {
        let expected_wait = self.expected_wait();
        if !self.max_wait.is_zero() && expected_wait > self.max_wait {
            return Err(Overloaded { expected_wait });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let shared = self.shared.clone();
        shared.queued.fetch_add(1, Relaxed);
        self.pool.spawn_fifo(move || {
            shared.queued.fetch_sub(1, Relaxed);
            shared.running.fetch_add(1, Relaxed);
            let t = Instant::now();
            // A panicking job must not take the process with it (rayon aborts on a panic
            // escaping a spawned job); its caller gets an error instead.
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let done = Instant::now();
            let others = shared.running.fetch_sub(1, Relaxed) - 1 + shared.queued.load(Relaxed);
            let mut pace = shared.pace.lock().unwrap_or_else(|e| e.into_inner());
            let sample = match pace.last {
                Some(last) if pace.busy => done - last,
                _ => done - t,
            };
            let ns = sample.as_nanos().min(u64::MAX as u128) as u64;
            // An exponential average over about 16 jobs.
            pace.ns_per_job = if pace.ns_per_job == 0 { ns } else { pace.ns_per_job - pace.ns_per_job / 16 + ns / 16 };
            pace.last = Some(done);
            pace.busy = others > 0;
            drop(pace);
            if let Ok(v) = out {
                let _ = tx.send(v);
            }
        });
        rx.await.map_err(|_| Overloaded { expected_wait })
    }
}

/// Lowers the calling thread's CPU priority (nice 10): background work (loading a model,
/// compacting published items) then takes the cycles requests leave over, not theirs.
pub fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority with the calling thread's id changes only that thread's scheduling.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_run_and_a_long_queue_is_refused() {
        let c = Arc::new(Compute::new(1, Duration::from_millis(15)).unwrap());
        assert_eq!(c.run(|| 6 * 7).await.unwrap(), 42);
        // Teach it that a job takes about 10 ms.
        for _ in 0..40 {
            c.run(|| std::thread::sleep(Duration::from_millis(10))).await.unwrap();
        }
        // Jobs that hold the thread until the gate opens.
        let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let blocked = |c: &Arc<Compute>| {
            let (c, open) = (c.clone(), open.clone());
            tokio::spawn(async move {
                c.run(move || {
                    while !open.load(Relaxed) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
                .await
            })
        };
        async fn until(f: impl Fn() -> bool) {
            while !f() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let running = blocked(&c);
        until(|| c.running() == 1).await;
        // One waits 0 jobs, the next one job (~10 ms): both within 15 ms.
        let second = blocked(&c);
        until(|| c.queued() == 1).await;
        let third = blocked(&c);
        until(|| c.queued() == 2).await;
        // Two jobs ahead, ~20 ms: refused at once.
        let refused = c.run(|| ()).await.unwrap_err();
        assert!(refused.expected_wait > Duration::from_millis(15), "{refused:?}");
        open.store(true, Relaxed);
        for job in [running, second, third] {
            assert!(job.await.unwrap().is_ok());
        }
        // Once the queue drains, jobs are admitted again.
        assert_eq!(c.run(|| 1).await.unwrap(), 1);
        assert_eq!(c.queued(), 0);
    }

    #[tokio::test]
    async fn a_panicking_job_keeps_the_pool_alive() {
        let c = Compute::new(1, Duration::ZERO).unwrap();
        assert!(c.run(|| panic!("boom")).await.is_err());
        assert_eq!(c.run(|| 3).await.unwrap(), 3);
    }
}
