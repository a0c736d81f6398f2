//! Timeouts for I/O that usually completes on its first poll. tokio's `timeout` reads the clock
//! and builds a timer entry before it polls; on the request path most reads (after readiness)
//! and writes (into an empty socket buffer) finish at once, so these poll first and only arm
//! the timer when the operation has to wait. An idle timeout therefore counts from the first
//! poll that found nothing to do, which is what "idle" means.
//!
//! One struct holds the future and its timer once each: written as an `async fn`, the future
//! was kept twice (an async fn's argument stays beside the local it is moved into) and the timer
//! came with tokio's `Timeout` around it, 488 bytes around a 152-byte wait for readiness, in the
//! task of every held connection (docs/PERFORMANCE.md, "Memory per held connection").

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// The time ran out before the future finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

pin_project_lite::pin_project! {
    /// `fut` unless its time runs out: [`timeout`], [`timeout_at`].
    #[must_use = "futures do nothing unless polled"]
    pub struct Timeout<F> {
        #[pin]
        fut: F,
        #[pin]
        timer: Timer,
    }
}

pin_project_lite::pin_project! {
    /// The limit until the future first has to wait, the running timer after.
    #[project = TimerProj]
    enum Timer {
        After { limit: Duration },
        At { deadline: Instant },
        Armed { #[pin] sleep: Sleep },
    }
}

/// `fut`, unless it has made no progress for `limit` since its first poll.
pub fn timeout<F: Future>(limit: Duration, fut: F) -> Timeout<F> {
    Timeout { fut, timer: Timer::After { limit } }
}

/// `fut`, unless `deadline` passes first.
pub fn timeout_at<F: Future>(deadline: Instant, fut: F) -> Timeout<F> {
    Timeout { fut, timer: Timer::At { deadline } }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        loop {
            let sleep = match this.timer.as_mut().project() {
                TimerProj::Armed { sleep } => return sleep.poll(cx).map(|()| Err(Elapsed)),
                TimerProj::After { limit } => tokio::time::sleep(*limit),
                TimerProj::At { deadline } => tokio::time::sleep_until(*deadline),
            };
            this.timer.set(Timer::Armed { sleep });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    #[tokio::test]
    async fn ready_futures_pass_and_waiting_ones_time_out() {
        assert_eq!(timeout(Duration::from_millis(10), async { 7 }).await.unwrap(), 7);
        let started = Instant::now();
        assert!(timeout(Duration::from_millis(10), std::future::pending::<()>()).await.is_err());
        assert!(started.elapsed() >= Duration::from_millis(10));
        assert!(timeout_at(started + Duration::from_millis(30), std::future::pending::<()>()).await.is_err());
        assert!(started.elapsed() >= Duration::from_millis(30));
        // A future that waits once, then finishes, is not cut short.
        let mut polled = false;
        let once = poll_fn(|cx| {
            if polled {
                Poll::Ready(1)
            } else {
                polled = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        });
        assert_eq!(timeout(Duration::from_millis(10), once).await.unwrap(), 1);
    }

    #[test]
    fn the_future_and_its_timer_are_stored_once() {
        let held = [1u8; 200];
        let fut = async move {
            std::future::pending::<()>().await;
            held
        };
        let inner = size_of_val(&fut);
        let f = timeout(Duration::from_secs(1), fut);
        assert!(size_of_val(&f) <= inner + size_of::<Sleep>() + 8, "{} around {inner}", size_of_val(&f));
    }
}
