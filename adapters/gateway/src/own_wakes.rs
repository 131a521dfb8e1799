//! A connection's wake-ups of itself, kept inside its own poll.
//!
//! hyper's HTTP/1.1 server runs the request handler inside the connection's task, and taking
//! the request body out of hyper's body channel wakes the channel's sender — the connection
//! itself (hyper keeps the sender's waker even once the whole body is sent). tokio takes a task
//! that wakes itself while it is being polled for one that is ready again: it queues the task
//! and may wake an idle worker thread to come and take it, a `futex` call and a context switch
//! per request at one request at a time (README, issue 21). So a connection is polled with a
//! waker of its own, [`OwnWakes`]: a wake that comes while the connection is being polled only
//! marks it, and the connection is polled again at once (a few times at most; then it wakes
//! its task and yields, as it would have); a wake at any other time goes to the task.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

/// Polls again after a wake during the poll at most this many times in one poll of the task.
const ROUNDS: usize = 4;

/// Not being polled: a wake goes to the task.
const IDLE: u8 = 0;
/// Being polled.
const POLLING: u8 = 1;
/// Being polled, and woken since the poll began: poll again.
const WOKEN: u8 = 2;

/// What the connection's own waker shares with its poll.
#[derive(Default)]
struct Relay {
    state: AtomicU8,
    /// The waker of the task the connection runs in, as of its latest poll.
    task: Mutex<Option<Waker>>,
}

impl Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut state = self.state.load(Ordering::Acquire);
        while state != IDLE {
            if state == WOKEN {
                return;
            }
            match self
                .state
                .compare_exchange_weak(POLLING, WOKEN, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(now) => state = now,
            }
        }
        // A wake that raced the start of a poll may wake the task once for nothing: harmless.
        let task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

/// A future polled with its own waker, so that it re-polls itself instead of waking its task
/// while it is being polled (see the module docs).
pub(crate) struct OwnWakes<F> {
    inner: F,
    relay: Arc<Relay>,
    waker: Waker,
}

impl<F: Future + Unpin> OwnWakes<F> {
    pub(crate) fn new(inner: F) -> Self {
        let relay = Arc::new(Relay::default());
        Self {
            inner,
            waker: Waker::from(relay.clone()),
            relay,
        }
    }
}

impl<F: Future + Unpin> Future for OwnWakes<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        {
            let mut task = this.relay.task.lock().unwrap_or_else(PoisonError::into_inner);
            if !task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        let mut own = Context::from_waker(&this.waker);
        for _ in 0..ROUNDS {
            this.relay.state.store(POLLING, Ordering::Release);
            if let Poll::Ready(output) = Pin::new(&mut this.inner).poll(&mut own) {
                this.relay.state.store(IDLE, Ordering::Release);
                return Poll::Ready(output);
            }
            if this
                .relay
                .state
                .compare_exchange(POLLING, IDLE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Poll::Pending;
            }
            // Woken while being polled: go round again.
        }
        this.relay.state.store(IDLE, Ordering::Release);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Counts the wakes of the task.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Pending `n` times, waking itself during each of those polls, then ready.
    struct SelfWaking {
        left: usize,
        polls: usize,
    }

    impl Future for SelfWaking {
        type Output = usize;

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
            self.polls += 1;
            if self.left == 0 {
                return Poll::Ready(self.polls);
            }
            self.left -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    fn poll_once<F: Future + Unpin>(f: &mut OwnWakes<F>, task: &Arc<Count>) -> Poll<F::Output> {
        let waker = Waker::from(task.clone());
        Pin::new(f).poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn a_wake_during_the_poll_polls_again_without_waking_the_task() {
        let task = Arc::new(Count::default());
        let mut f = OwnWakes::new(SelfWaking { left: 2, polls: 0 });
        assert_eq!(poll_once(&mut f, &task), Poll::Ready(3));
        assert_eq!(task.0.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn too_many_wakes_during_one_poll_yield_to_the_task() {
        let task = Arc::new(Count::default());
        let mut f = OwnWakes::new(SelfWaking {
            left: ROUNDS + 1,
            polls: 0,
        });
        assert_eq!(poll_once(&mut f, &task), Poll::Pending);
        assert_eq!(
            task.0.load(Ordering::Relaxed),
            1,
            "yielded with a wake of the task"
        );
        assert_eq!(poll_once(&mut f, &task), Poll::Ready(ROUNDS + 2));
    }

    #[test]
    fn a_wake_between_polls_goes_to_the_task() {
        /// Pending once, keeping its waker; ready after.
        #[derive(Default)]
        struct Later {
            waker: Option<Waker>,
        }
        impl Future for Later {
            type Output = ();
            fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
                if self.waker.is_some() {
                    return Poll::Ready(());
                }
                self.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
        let task = Arc::new(Count::default());
        let mut f = OwnWakes::new(Later::default());
        assert_eq!(poll_once(&mut f, &task), Poll::Pending);
        assert_eq!(task.0.load(Ordering::Relaxed), 0);
        let kept = f.inner.waker.clone().unwrap();
        kept.wake_by_ref();
        assert_eq!(task.0.load(Ordering::Relaxed), 1);
        // From another thread too.
        std::thread::spawn(move || kept.wake()).join().unwrap();
        assert_eq!(task.0.load(Ordering::Relaxed), 2);
        assert_eq!(poll_once(&mut f, &task), Poll::Ready(()));
    }
}
