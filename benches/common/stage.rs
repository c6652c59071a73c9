//! What the broker benches share (`#[path]`-included by each): whole numbers from the
//! environment, and stages timed with the process's CPU time.

use std::future::Future;
use std::time::{Duration, Instant};

/// A whole number from the environment variable `name`, or `default`.
pub fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of `values` (0 for none).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// The process's CPU time so far, user and system, all threads.
pub fn cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// A timed stage of `messages` messages: how long it took and the CPU time it used.
#[derive(Clone, Copy)]
pub struct Stage {
    took: Duration,
    cpu: Duration,
    messages: usize,
}

impl Stage {
    /// Times `stage`, which moves `messages` messages.
    pub async fn of<F: Future>(messages: usize, stage: F) -> (Stage, F::Output) {
        let (start, cpu_start) = (Instant::now(), cpu());
        let output = stage.await;
        let stage = Stage {
            took: start.elapsed(),
            cpu: cpu() - cpu_start,
            messages,
        };
        (stage, output)
    }

    /// Messages per second.
    pub fn rate(self) -> f64 {
        self.messages as f64 / self.took.as_secs_f64()
    }

    /// CPU µs per message.
    pub fn cpu_us(self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.messages as f64
    }
}
