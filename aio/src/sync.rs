//! Co-operative synchronisation for tasks: QEMU's `CoMutex` and `CoQueue`.
//!
//! Both are FIFO and hand off directly to the next waiter, so a task that
//! releases and immediately re-locks cannot starve the others. They work
//! across contexts and threads (wake-ups go through the waiter's `Waker`).

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;
use slab::Slab;

#[derive(Default)]
struct Waiter {
    waker: Option<Waker>,
    /// Granted the lock (CoMutex) or notified (CoQueue) but not yet polled.
    granted: bool,
}

#[derive(Default)]
struct WaitList {
    waiters: Slab<Waiter>,
    order: VecDeque<usize>,
}

impl WaitList {
    fn push(&mut self) -> usize {
        let key = self.waiters.insert(Waiter::default());
        self.order.push_back(key);
        key
    }

    /// Grants the first waiter; returns its waker (to wake outside the lock).
    fn grant_first(&mut self) -> Option<Option<Waker>> {
        let key = self.order.pop_front()?;
        let w = &mut self.waiters[key];
        w.granted = true;
        Some(w.waker.take())
    }

    /// Forgets a waiter that was not granted.
    fn cancel(&mut self, key: usize) {
        if let Some(pos) = self.order.iter().position(|&k| k == key) {
            self.order.remove(pos);
        }
        self.waiters.remove(key);
    }
}

struct MutexState<T> {
    locked: bool,
    /// The protected value while unlocked (a guard owns it while locked).
    value: Option<T>,
    list: WaitList,
}

/// An async mutex for tasks (QEMU's `CoMutex`): `lock().await` yields to the
/// loop instead of blocking the thread. FIFO with direct hand-off.
///
/// ```
/// use aio::{AioContext, CoMutex};
/// use std::sync::Arc;
///
/// let ctx = AioContext::new()?;
/// let m = Arc::new(CoMutex::new(0u32));
/// let hs: Vec<_> = (0..3).map(|_| {
///     let m = m.clone();
///     ctx.spawn(async move {
///         let mut g = m.lock().await;
///         let v = *g;
///         aio::yield_now().await; // other tasks run, none gets the lock
///         *g = v + 1;
///     })
/// }).collect();
/// for h in hs { ctx.block_on(h)?; }
/// assert_eq!(ctx.block_on(m.lock()).clone(), 3);
/// # Ok::<(), aio::Error>(())
/// ```
pub struct CoMutex<T> {
    state: Mutex<MutexState<T>>,
}

impl<T> CoMutex<T> {
    /// A new, unlocked mutex holding `value`.
    pub fn new(value: T) -> Self {
        Self {
            state: Mutex::new(MutexState {
                locked: false,
                value: Some(value),
                list: WaitList::default(),
            }),
        }
    }

    /// Locks the mutex, waiting (asynchronously) behind earlier lockers.
    pub fn lock(&self) -> CoMutexLock<'_, T> {
        CoMutexLock {
            mutex: self,
            key: None,
            done: false,
        }
    }

    /// Locks the mutex if it is free and nobody waits.
    pub fn try_lock(&self) -> Option<CoMutexGuard<'_, T>> {
        let mut s = self.state.lock();
        if s.locked || !s.list.order.is_empty() {
            return None;
        }
        s.locked = true;
        let value = s.value.take();
        Some(CoMutexGuard { mutex: self, value })
    }

    /// Whether the mutex is held.
    pub fn is_locked(&self) -> bool {
        self.state.lock().locked
    }

    fn take_value(&self) -> CoMutexGuard<'_, T> {
        let value = self.state.lock().value.take();
        CoMutexGuard { mutex: self, value }
    }

    /// Releases the lock: hands it to the first waiter, or marks it free.
    fn unlock(&self, value: Option<T>) {
        let waker = {
            let mut s = self.state.lock();
            s.value = value;
            match s.list.grant_first() {
                Some(w) => w,
                None => {
                    s.locked = false;
                    None
                }
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> fmt::Debug for CoMutex<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.state.lock();
        f.debug_struct("CoMutex")
            .field("locked", &s.locked)
            .field("waiters", &s.list.order.len())
            .finish()
    }
}

/// The future returned by [`CoMutex::lock`].
#[must_use = "futures do nothing unless awaited"]
pub struct CoMutexLock<'a, T> {
    mutex: &'a CoMutex<T>,
    key: Option<usize>,
    done: bool,
}

impl<'a, T> Future for CoMutexLock<'a, T> {
    type Output = CoMutexGuard<'a, T>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<CoMutexGuard<'a, T>> {
        let mutex = self.mutex;
        let mut s = mutex.state.lock();
        match self.key {
            None => {
                if !s.locked && s.list.order.is_empty() {
                    s.locked = true;
                    drop(s);
                    self.done = true;
                    return Poll::Ready(mutex.take_value());
                }
                let key = s.list.push();
                s.list.waiters[key].waker = Some(cx.waker().clone());
                self.key = Some(key);
                Poll::Pending
            }
            Some(key) => {
                if s.list.waiters[key].granted {
                    s.list.waiters.remove(key);
                    drop(s);
                    self.key = None;
                    self.done = true;
                    return Poll::Ready(mutex.take_value());
                }
                s.list.waiters[key].waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl<T> Drop for CoMutexLock<'_, T> {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        if self.done {
            return;
        }
        let granted = {
            let mut s = self.mutex.state.lock();
            let granted = s.list.waiters[key].granted;
            if granted {
                s.list.waiters.remove(key);
            } else {
                s.list.cancel(key);
            }
            granted
        };
        if granted {
            // We were handed the lock but never took it: pass it on.
            let value = self.mutex.state.lock().value.take();
            self.mutex.unlock(value);
        }
    }
}

/// Holds a [`CoMutex`]; dereferences to the value. Dropping it unlocks.
pub struct CoMutexGuard<'a, T> {
    mutex: &'a CoMutex<T>,
    value: Option<T>,
}

impl<T> Deref for CoMutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        match &self.value {
            Some(v) => v,
            None => unreachable!("a CoMutexGuard always holds the value"),
        }
    }
}

impl<T> DerefMut for CoMutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        match &mut self.value {
            Some(v) => v,
            None => unreachable!("a CoMutexGuard always holds the value"),
        }
    }
}

impl<T> Drop for CoMutexGuard<'_, T> {
    fn drop(&mut self) {
        self.mutex.unlock(self.value.take());
    }
}

impl<T: fmt::Debug> fmt::Debug for CoMutexGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// A FIFO queue of waiting tasks (QEMU's `CoQueue`).
///
/// A waiter is registered when [`wait`](CoQueue::wait) is *called*, not
/// when the future is first polled, so `wait_unlocking` can queue itself
/// before releasing a lock and no notification falls in between.
/// Notifications are not stored: `notify_one` with nobody waiting does
/// nothing.
#[derive(Default)]
pub struct CoQueue {
    list: Mutex<WaitList>,
}

impl CoQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits until notified.
    pub fn wait(&self) -> CoQueueWait<'_> {
        let key = self.list.lock().push();
        CoQueueWait {
            queue: self,
            key: Some(key),
        }
    }

    /// Queues, releases `guard`, waits to be notified, then locks `mutex`
    /// again (QEMU's `qemu_co_queue_wait(queue, lock)`).
    pub async fn wait_unlocking<'m, T>(&self, guard: CoMutexGuard<'m, T>) -> CoMutexGuard<'m, T> {
        let mutex = guard.mutex;
        let wait = self.wait();
        drop(guard);
        wait.await;
        mutex.lock().await
    }

    /// Wakes the first waiter; returns whether there was one.
    pub fn notify_one(&self) -> bool {
        let waker = self.list.lock().grant_first();
        match waker {
            Some(w) => {
                if let Some(w) = w {
                    w.wake();
                }
                true
            }
            None => false,
        }
    }

    /// Wakes every waiter (QEMU's `qemu_co_queue_restart_all`); returns how
    /// many.
    pub fn notify_all(&self) -> usize {
        let wakers: Vec<Option<Waker>> = {
            let mut l = self.list.lock();
            std::iter::from_fn(|| l.grant_first()).collect()
        };
        let n = wakers.len();
        for w in wakers.into_iter().flatten() {
            w.wake();
        }
        n
    }

    /// Whether nobody waits.
    pub fn is_empty(&self) -> bool {
        self.list.lock().order.is_empty()
    }
}

impl fmt::Debug for CoQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoQueue")
            .field("waiters", &self.list.lock().order.len())
            .finish()
    }
}

/// The future returned by [`CoQueue::wait`].
#[must_use = "futures do nothing unless awaited"]
pub struct CoQueueWait<'a> {
    queue: &'a CoQueue,
    key: Option<usize>,
}

impl Future for CoQueueWait<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(key) = self.key else {
            return Poll::Ready(());
        };
        let mut l = self.queue.list.lock();
        if l.waiters[key].granted {
            l.waiters.remove(key);
            drop(l);
            self.key = None;
            return Poll::Ready(());
        }
        l.waiters[key].waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for CoQueueWait<'_> {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        let granted = {
            let mut l = self.queue.list.lock();
            let granted = l.waiters[key].granted;
            if granted {
                l.waiters.remove(key);
            } else {
                l.cancel(key);
            }
            granted
        };
        if granted {
            // A notification meant for a waiter that went away goes to the
            // next one, so it is not lost.
            self.queue.notify_one();
        }
    }
}
