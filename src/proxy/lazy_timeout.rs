//! Timeouts for I/O that usually completes on its first poll. tokio's `timeout` reads the clock
//! and builds a timer entry before it polls; on the request path most reads (after readiness)
//! and writes (into an empty socket buffer) finish at once, so these poll first and only arm
//! the timer when the operation has to wait. An idle timeout therefore counts from the first
//! poll that found nothing to do, which is what "idle" means.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;
use tokio::time::error::Elapsed;

/// `fut`, unless it has made no progress for `limit` since its first poll.
pub async fn timeout<F: Future>(limit: Duration, fut: F) -> Result<F::Output, Elapsed> {
    let mut fut = pin!(fut);
    match poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        Poll::Ready(out) => Ok(out),
        Poll::Pending => tokio::time::timeout(limit, fut).await,
    }
}

/// `fut`, unless `deadline` passes first.
pub async fn timeout_at<F: Future>(deadline: Instant, fut: F) -> Result<F::Output, Elapsed> {
    let mut fut = pin!(fut);
    match poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        Poll::Ready(out) => Ok(out),
        Poll::Pending => tokio::time::timeout_at(deadline, fut).await,
    }
}

#[cfg(test)]
mod tests {
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
}
