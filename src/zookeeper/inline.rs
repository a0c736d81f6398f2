//! An executor that polls a task on the thread that wakes it, in the wake itself.
//!
//! zookeeper-client does its socket I/O through async-io, whose own thread waits on the sockets
//! and wakes whoever waits for them. Under the runtime, a change to a watched node therefore wakes
//! two threads, twice (the notification, then the read's answer): async-io's, which hands the
//! readiness over, and the runtime's, which runs the session and the discovery tasks. Spawned
//! here, the session and the tasks that follow it run on async-io's thread as soon as it sees the
//! bytes, and the runtime's thread is not woken at all (docs/PERFORMANCE.md, "A fleet of sidecars
//! on one ensemble").
//!
//! A task woken while this thread already runs one is queued and run after it, so that a wake
//! never polls a task inside another's poll. A task woken on one thread while another polls it is
//! polled again by that other thread. Each poll runs inside the runtime's context (tokio timers
//! and channels work as in a spawned task) and sends zookeeper-client's own spawns here too.
//!
//! What that asks of the code around these tasks: a wake runs the task before it returns, so
//! whoever wakes one must not hold a lock the task takes (tokio's and futures' channels, asyncs'
//! and async-io's reactor all wake after letting theirs go); and a task holds up the thread that
//! woke it for as long as its poll runs, as it held up the runtime's thread before.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use tokio::runtime::Handle as Runtime;

/// Not queued and not running: a wake queues it.
const IDLE: u8 = 0;
/// Waiting in a thread's queue.
const QUEUED: u8 = 1;
/// Being polled.
const RUNNING: u8 = 2;
/// Woken while being polled: the poller polls it again.
const NOTIFIED: u8 = 3;
/// Finished or aborted: wakes do nothing.
const DONE: u8 = 4;

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

struct Task {
    state: AtomicU8,
    aborted: AtomicBool,
    future: Mutex<Option<BoxFuture>>,
    runtime: Runtime,
    /// Whoever awaits the [`Handle`].
    joiner: Mutex<Option<Waker>>,
}

thread_local! {
    /// Tasks this thread will poll before it returns from the wake that started it.
    static QUEUE: RefCell<VecDeque<Arc<Task>>> = const { RefCell::new(VecDeque::new()) };
    static DRAINING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `future` here, until it ends or its [`Handle`] is dropped. Must be called inside the
/// runtime.
pub fn spawn(future: impl Future<Output = ()> + Send + 'static) -> Handle {
    Handle(start(Box::pin(future)))
}

fn start(future: BoxFuture) -> Arc<Task> {
    let task = Arc::new(Task {
        state: AtomicU8::new(IDLE),
        aborted: AtomicBool::new(false),
        future: Mutex::new(Some(future)),
        runtime: Runtime::current(),
        joiner: Mutex::new(None),
    });
    schedule(task.clone());
    task
}

/// A task spawned here: await it for its end. Dropping it aborts the task, as aborting a tokio
/// task that awaits it does.
pub struct Handle(Arc<Task>);

impl Drop for Handle {
    /// Drops the task's future: here and now, unless this thread is running one of these tasks
    /// (then after it) or another thread is polling this one (then that thread, after the poll).
    fn drop(&mut self) {
        self.0.aborted.store(true, Ordering::Release);
        schedule(self.0.clone());
    }
}

impl Future for Handle {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.state.load(Ordering::Acquire) == DONE {
            return Poll::Ready(());
        }
        *self.0.joiner.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        if self.0.state.load(Ordering::Acquire) == DONE { Poll::Ready(()) } else { Poll::Pending }
    }
}

impl Wake for Task {
    fn wake(self: Arc<Self>) {
        schedule(self);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        schedule(self.clone());
    }
}

/// Sends zookeeper-client's spawns (its session loop) here while one of these tasks is polled.
struct Spawner;

impl spawns_core::Spawn for Spawner {
    fn spawn(&self, task: spawns_core::Task) {
        // Detached: it ends with the client.
        start(Box::into_pin(task.future));
    }
}

fn schedule(task: Arc<Task>) {
    // Read-modify-writes only, even where the state stays: a wake that finds the task already
    // queued or running then happens-before the poll that follows it, which sees what the waker
    // did before waking.
    let next = |state| match state {
        IDLE => QUEUED,
        RUNNING => NOTIFIED,
        other => other,
    };
    let previous =
        task.state.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| Some(next(s))).unwrap_or_else(|s| s);
    if previous != IDLE {
        return;
    }
    QUEUE.with_borrow_mut(|q| q.push_back(task));
    if !DRAINING.get() {
        drain();
    }
}

/// Runs this thread's queue until it is empty.
fn drain() {
    struct Draining;
    impl Drop for Draining {
        fn drop(&mut self) {
            DRAINING.set(false);
        }
    }
    DRAINING.set(true);
    let _draining = Draining;
    while let Some(task) = QUEUE.with_borrow_mut(VecDeque::pop_front) {
        run(task);
    }
}

fn run(task: Arc<Task>) {
    task.state.swap(RUNNING, Ordering::AcqRel);
    let _runtime = task.runtime.enter();
    let mut slot = task.future.lock().unwrap_or_else(|e| e.into_inner());
    let finished = match slot.as_mut() {
        Some(_) if task.aborted.load(Ordering::Acquire) => true,
        Some(future) => {
            let waker = Waker::from(task.clone());
            let _spawns = spawns_core::enter(&Spawner);
            // Unwinding (tests; releases abort), a panicking task ends and the thread that woke
            // it goes on.
            catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(&mut Context::from_waker(&waker))))
                .map_or(true, |p| p.is_ready())
        }
        None => true,
    };
    if finished {
        *slot = None;
        drop(slot);
        task.state.swap(DONE, Ordering::AcqRel);
        if let Some(joiner) = task.joiner.lock().unwrap_or_else(|e| e.into_inner()).take() {
            joiner.wake();
        }
        return;
    }
    drop(slot);
    if task.state.compare_exchange(RUNNING, IDLE, Ordering::AcqRel, Ordering::Acquire).is_err() {
        // Woken while it ran: once more, after what is already queued.
        task.state.swap(QUEUED, Ordering::AcqRel);
        QUEUE.with_borrow_mut(|q| q.push_back(task));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_task_woken_by_async_io_runs_on_async_io_thread() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = spawn(async move {
            async_io::Timer::after(Duration::from_millis(5)).await;
            let _ = tx.send(std::thread::current().name().map(str::to_owned));
        });
        assert_eq!(rx.await.unwrap().as_deref(), Some("async-io"));
        task.await;
    }

    #[tokio::test]
    async fn a_task_woken_while_it_runs_is_polled_again() {
        let polls = Arc::new(AtomicUsize::new(0));
        let counted = polls.clone();
        let task = spawn(std::future::poll_fn(move |cx| {
            if counted.fetch_add(1, Ordering::Relaxed) == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(())
        }));
        task.await;
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn dropping_the_handle_drops_the_future() {
        struct Dropped(Arc<AtomicBool>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let guard = Dropped(dropped.clone());
        let task = spawn(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        });
        assert!(!dropped.load(Ordering::Acquire));
        drop(task);
        assert!(dropped.load(Ordering::Acquire));
    }

    #[tokio::test]
    async fn a_task_woken_from_another_thread_while_it_runs_is_polled_again() {
        // The first poll waits, inside itself, for another thread to wake the task and to say
        // so: that wake finds the task running here, and must lead to a second poll.
        let polls = Arc::new(AtomicUsize::new(0));
        let counted = polls.clone();
        let (waker_tx, waker_rx) = std::sync::mpsc::channel::<Waker>();
        let (woke_tx, woke_rx) = std::sync::mpsc::channel::<()>();
        let waker_thread = std::thread::spawn(move || {
            waker_rx.recv().unwrap().wake();
            woke_tx.send(()).unwrap();
        });
        let task = spawn(std::future::poll_fn(move |cx| {
            if counted.fetch_add(1, Ordering::AcqRel) == 0 {
                waker_tx.send(cx.waker().clone()).unwrap();
                woke_rx.recv().unwrap();
                return Poll::Pending;
            }
            Poll::Ready(())
        }));
        waker_thread.join().unwrap();
        tokio::time::timeout(Duration::from_secs(10), task).await.expect("the wake was lost");
        assert_eq!(polls.load(Ordering::Acquire), 2);
    }

    #[tokio::test]
    async fn a_wake_inside_a_poll_runs_the_woken_task_after_it() {
        // B is woken by A's poll: it must not run inside it.
        let a_done = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(None));
        let (b_waker_tx, b_waker_rx) = std::sync::mpsc::channel::<Waker>();
        let (s, done) = (seen.clone(), a_done.clone());
        let b = spawn(std::future::poll_fn(move |cx| {
            if let Some(first) = s.lock().unwrap().as_mut() {
                *first = done.load(Ordering::Acquire);
                return Poll::Ready(());
            }
            *s.lock().unwrap() = Some(false);
            b_waker_tx.send(cx.waker().clone()).unwrap();
            Poll::Pending
        }));
        let waker = b_waker_rx.recv().unwrap();
        let done = a_done.clone();
        let a = spawn(async move {
            waker.wake();
            done.store(true, Ordering::Release);
        });
        a.await;
        b.await;
        assert_eq!(*seen.lock().unwrap(), Some(true), "B ran after A's poll");
    }
}
