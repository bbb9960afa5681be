//! The CPU-bound part of a recall (user tower and index search) runs on a small pool of its own
//! threads, not on the async workers. The workers stay free to read, parse and answer requests,
//! so when recalls arrive faster than the pool can serve them the excess is turned away at once
//! with a 503 instead of waiting unseen in socket buffers; and admission looks at the queue in
//! front of the pool: a request is refused when it would wait longer than `max_wait`, estimated
//! from the queue length and the recent service time. A fixed cap on requests in flight cannot
//! do that alone: the right cap is 100× smaller for a 5 ms brute-force search than for a 50 µs
//! graph search.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Job = Box<dyn FnOnce() + Send>;

struct Shared {
    queued: AtomicUsize,
    /// Smoothed service time of one job, in nanoseconds.
    service_ns: AtomicU64,
}

/// A fixed pool of threads with a queue whose expected wait bounds admission.
pub struct Compute {
    tx: SyncSender<Job>,
    shared: Arc<Shared>,
    threads: usize,
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
        let threads = threads.max(1);
        // The channel only has to hold what admission lets in; a large bound never blocks.
        let (tx, rx) = sync_channel::<Job>(1 << 16);
        let rx = Arc::new(Mutex::new(rx));
        let shared = Arc::new(Shared { queued: AtomicUsize::new(0), service_ns: AtomicU64::new(0) });
        for i in 0..threads {
            let (rx, shared) = (rx.clone(), shared.clone());
            std::thread::Builder::new().name(format!("needle-compute-{i}")).spawn(move || work(&rx, &shared))?;
        }
        Ok(Compute { tx, shared, threads, max_wait })
    }

    /// How long a job queued now would wait before a thread takes it.
    pub fn expected_wait(&self) -> Duration {
        let queued = self.shared.queued.load(Relaxed);
        // Jobs up to the thread count start at once.
        let ahead = (queued + 1).saturating_sub(self.threads) as u64;
        Duration::from_nanos(ahead * self.shared.service_ns.load(Relaxed) / self.threads as u64)
    }

    /// Jobs waiting for a thread.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Relaxed)
    }

    /// Runs `f` on the pool and awaits its result, or refuses at once when the queue is too long.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, Overloaded> {
        let expected_wait = self.expected_wait();
        if !self.max_wait.is_zero() && expected_wait > self.max_wait {
            return Err(Overloaded { expected_wait });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.shared.queued.fetch_add(1, Relaxed);
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        if self.tx.send(job).is_err() {
            // Every thread is gone (they only end when the pool is dropped).
            self.shared.queued.fetch_sub(1, Relaxed);
            return Err(Overloaded { expected_wait });
        }
        // The job always runs and sends unless its thread panicked inside `f`.
        rx.await.map_err(|_| Overloaded { expected_wait })
    }
}

fn work(rx: &Mutex<Receiver<Job>>, shared: &Shared) {
    loop {
        let job = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        shared.queued.fetch_sub(1, Relaxed);
        let t = Instant::now();
        // A panicking job must not take the thread with it.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        let ns = t.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        // An exponential average over about 16 jobs; racing updates lose a sample, no more.
        let old = shared.service_ns.load(Relaxed);
        let new = if old == 0 { ns } else { old - old / 16 + ns / 16 };
        shared.service_ns.store(new, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_run_and_a_long_queue_is_refused() {
        let c = Arc::new(Compute::new(1, Duration::from_millis(20)).unwrap());
        assert_eq!(c.run(|| 6 * 7).await.unwrap(), 42);
        // Teach it that a job takes 10 ms, then queue more than 20 ms of work.
        for _ in 0..20 {
            c.run(|| std::thread::sleep(Duration::from_millis(10))).await.unwrap();
        }
        let mut pending = Vec::new();
        for _ in 0..6 {
            let c = c.clone();
            pending.push(tokio::spawn(async move { c.run(|| std::thread::sleep(Duration::from_millis(10))).await }));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let refused = c.run(|| ()).await.unwrap_err();
        assert!(refused.expected_wait > Duration::from_millis(20), "{refused:?}");
        let mut ok = 0;
        for p in pending {
            ok += p.await.unwrap().is_ok() as usize;
        }
        // Admission let in about max_wait / service + threads jobs, not all six.
        assert!((2..6).contains(&ok), "{ok} admitted");
        // Once the queue drains, jobs are admitted again.
        assert!(c.run(|| 1).await.is_ok());
        assert_eq!(c.queued(), 0);
    }

    #[tokio::test]
    async fn a_panicking_job_keeps_the_pool_alive() {
        let c = Compute::new(1, Duration::ZERO).unwrap();
        assert!(c.run(|| panic!("boom")).await.is_err());
        assert_eq!(c.run(|| 3).await.unwrap(), 3);
    }
}
