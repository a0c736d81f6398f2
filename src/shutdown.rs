//! A shutdown signal shared by every task: triggered once, observed by many.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::watch;

/// Triggers shutdown.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// Observes shutdown; cheap to clone.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

/// A new, untriggered signal.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }

    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    /// Whether the signal may have moved since this handle was made: false only while it has
    /// not (one atomic load, no lock), so that a waiter already registered can skip polling.
    #[inline]
    pub fn may_have_changed(&self) -> bool {
        !matches!(self.0.has_changed(), Ok(false))
    }

    /// Resolves once shutdown is triggered (or the trigger is gone).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|v| *v).await;
    }
}

/// A wait for shutdown that lasts across many waits (a connection's keep-alive waits, an accept
/// loop's accepts). Its first poll puts it among the signal's waiters, where it stays (the task
/// polling it is the one woken); later polls look at the signal only once it has moved, a
/// single atomic load, where a wait made or polled afresh each time would take the waiters'
/// lock every time.
pub struct LastingWait {
    wait: Pin<Box<dyn Future<Output = ()> + Send>>,
    registered: bool,
}

impl LastingWait {
    pub fn new(mut signal: Shutdown) -> Self {
        LastingWait { wait: Box::pin(async move { signal.wait().await }), registered: false }
    }

    /// Resolves once shutdown is triggered; `signal` is the one this wait was made from.
    pub fn triggered<'a>(&'a mut self, signal: &'a Shutdown) -> impl Future<Output = ()> + 'a {
        std::future::poll_fn(move |cx| {
            if self.registered && !signal.may_have_changed() {
                return std::task::Poll::Pending;
            }
            self.registered = true;
            self.wait.as_mut().poll(cx)
        })
    }
}
