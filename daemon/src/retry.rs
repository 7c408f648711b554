//! Waiting between attempts: one backoff for every retry in the daemon (API
//! writes, watches of the runtimes, netlink reconnects), and a sleep until an
//! optional instant for `select!` loops that may or may not have a timer.
use std::time::Duration;

use tokio::time::Instant;

/// Capped exponential backoff with jitter: attempt 0 waits about `first`,
/// each later one twice as long up to `cap`, every wait drawn from ±50% so a
/// fleet of daemons does not retry in step after an outage.
#[derive(Clone, Debug)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// From 500 ms up to 30 s: the API server's and the runtimes' pace.
    pub const fn new() -> Self {
        Self::with(Duration::from_millis(500), Duration::from_secs(30))
    }

    pub const fn with(first: Duration, cap: Duration) -> Self {
        Self { first, cap, attempt: 0 }
    }

    /// The wait before the next attempt; counts the attempt.
    pub fn next_wait(&mut self) -> Duration {
        let d = wait(self.first, self.cap, self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// A success: the next failure starts again from `first`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

fn wait(first: Duration, cap: Duration, attempt: u32) -> Duration {
    let base = first.saturating_mul(1u32 << attempt.min(16)).min(cap);
    base.mul_f64(0.5 + fastrand::f64())
}

/// Sleeps until `at`, or forever when there is no instant: a timer branch
/// of a `select!` that is off while `at` is None.
pub async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_is_capped_and_jittered() {
        let mut b = Backoff::new();
        for attempt in 0..20u32 {
            let d = b.next_wait().as_millis() as f64;
            let base = (500u64 << attempt.min(16)).min(30_000) as f64;
            assert!(d >= base * 0.5 - 1.0 && d <= base * 1.5 + 1.0, "attempt {attempt}: {d} ms");
        }
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(750));
    }

    #[tokio::test(start_paused = true)]
    async fn no_instant_never_wakes() {
        let woke = tokio::time::timeout(Duration::from_secs(3600), sleep_until(None)).await;
        assert!(woke.is_err());
        let at = Instant::now() + Duration::from_secs(1);
        tokio::time::timeout(Duration::from_secs(2), sleep_until(Some(at))).await.expect("wakes at the instant");
    }
}
