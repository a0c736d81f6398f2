//! A shutdown signal shared by every task: triggered once, observed by many.

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
