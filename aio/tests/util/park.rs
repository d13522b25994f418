//! A test-only `block_on`: polls a future on the calling thread and parks
//! the thread between polls; the future's `Waker` unparks it.
//!
//! It exists so the thread-pool and file tests do not depend on the crate's
//! executor; they should switch to `AioContext::block_on` once it lands.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};

struct ParkWaker {
    thread: Thread,
    woken: AtomicBool,
}

impl Wake for ParkWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// Runs `fut` to completion on this thread, parking while it is pending.
pub fn park_block_on<F: Future>(fut: F) -> F::Output {
    let state = Arc::new(ParkWaker {
        thread: thread::current(),
        woken: AtomicBool::new(false),
    });
    let waker = Waker::from(state.clone());
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
        // `park` can return spuriously; only a wake ends the wait.
        while !state.woken.swap(false, Ordering::Acquire) {
            thread::park();
        }
    }
}

/// Awaits every future in `futs` (polling all of them on each wake-up) and
/// returns their outputs in order.
pub async fn join_all<F: Future + Unpin>(futs: Vec<F>) -> Vec<F::Output> {
    let mut slots: Vec<(F, Option<F::Output>)> = futs.into_iter().map(|f| (f, None)).collect();
    std::future::poll_fn(move |cx| {
        let mut pending = false;
        for (f, out) in slots.iter_mut() {
            if out.is_none() {
                match std::pin::Pin::new(f).poll(cx) {
                    Poll::Ready(v) => *out = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(
                slots
                    .iter_mut()
                    .map(|(_, o)| o.take().expect("ready"))
                    .collect(),
            )
        }
    })
    .await
}
