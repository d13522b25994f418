//! Timers: one ordered list per clock, deadlines in nanoseconds.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Weak;

use parking_lot::Mutex;
use slab::Slab;

use crate::clock::ClockType;
use crate::context::{notify_inner, Inner};
use crate::handler::Callback;

struct Entry {
    clock: ClockType,
    /// Creation order: ties between equal deadlines go to the older timer.
    id: u64,
    deadline: Option<i64>,
    /// Bumped on every arm/disarm, so a pass can tell a timer that was
    /// re-armed while the pass ran from the one it snapshotted.
    arm_seq: u64,
    cb: Option<Callback>,
    /// Expired while its own callback was running (nested poll): re-arm at
    /// this deadline when the callback returns, unless re-armed meanwhile.
    rearm_after: Option<i64>,
}

/// All timers of one context.
#[derive(Default)]
pub(crate) struct TimerLists {
    state: Mutex<State>,
    /// Number of armed timers, readable without the lock.
    armed: AtomicUsize,
}

#[derive(Default)]
struct State {
    entries: Slab<Entry>,
    /// Per clock: (deadline, creation id, slab key).
    queues: [BTreeSet<(i64, u64, usize)>; 3],
    next_id: u64,
    arm_seq: u64,
}

impl State {
    fn disarm(&mut self, key: usize) {
        let e = &mut self.entries[key];
        if let Some(d) = e.deadline.take() {
            self.queues[e.clock.index()].remove(&(d, e.id, key));
        }
        self.arm_seq += 1;
        e.arm_seq = self.arm_seq;
    }

    /// Arms `key` for `deadline`; returns whether it became its clock's
    /// earliest timer.
    fn arm(&mut self, key: usize, deadline: i64) -> bool {
        self.disarm(key);
        let e = &mut self.entries[key];
        e.deadline = Some(deadline);
        let q = &mut self.queues[e.clock.index()];
        q.insert((deadline, e.id, key));
        q.first().map(|f| f.2) == Some(key)
    }

    fn armed_count(&self) -> usize {
        self.queues.iter().map(BTreeSet::len).sum()
    }
}

impl TimerLists {
    pub(crate) fn insert(&self, clock: ClockType, cb: Callback) -> (usize, u64) {
        let mut s = self.state.lock();
        s.next_id += 1;
        let id = s.next_id;
        let key = s.entries.insert(Entry {
            clock,
            id,
            deadline: None,
            arm_seq: 0,
            cb: Some(cb),
            rearm_after: None,
        });
        (key, id)
    }

    /// The earliest deadline on `clock`, if any timer is armed there.
    pub(crate) fn earliest(&self, clock: ClockType) -> Option<i64> {
        if self.armed.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.state.lock().queues[clock.index()].first().map(|f| f.0)
    }

    /// Whether any timer is armed at all.
    pub(crate) fn any_armed(&self) -> bool {
        self.armed.load(Ordering::Acquire) > 0
    }

    /// Runs the timers of `clock` whose deadline is at or before `now`, in
    /// deadline order (creation order on ties). Timers armed by these
    /// callbacks wait for the next pass, so a timer that re-arms itself in
    /// the past cannot loop forever within one iteration.
    pub(crate) fn run_expired(&self, clock: ClockType, now: i64, ctx: &crate::AioContext) -> usize {
        if self.armed.load(Ordering::Acquire) == 0 {
            return 0;
        }
        let expired: Vec<(usize, u64, u64)> = {
            let s = self.state.lock();
            s.queues[clock.index()]
                .iter()
                .take_while(|(d, _, _)| *d <= now)
                .map(|&(_, id, key)| (key, id, s.entries[key].arm_seq))
                .collect()
        };
        let mut ran = 0;
        for (key, id, seq) in expired {
            let mut cb = {
                let mut s = self.state.lock();
                match s.entries.get(key) {
                    Some(e) if e.id == id && e.arm_seq == seq && e.deadline.is_some() => {}
                    _ => continue, // deleted, disarmed or re-armed meanwhile
                }
                let deadline = s.entries[key].deadline;
                s.disarm(key);
                self.armed.store(s.armed_count(), Ordering::Release);
                match s.entries[key].cb.take() {
                    Some(cb) => cb,
                    None => {
                        // Its callback is running further up the stack.
                        s.entries[key].rearm_after = deadline;
                        continue;
                    }
                }
            };
            cb(ctx);
            ran += 1;
            let mut s = self.state.lock();
            if let Some(e) = s.entries.get_mut(key).filter(|e| e.id == id) {
                e.cb = Some(cb);
                if let Some(d) = e.rearm_after.take() {
                    if e.deadline.is_none() {
                        s.arm(key, d);
                        self.armed.store(s.armed_count(), Ordering::Release);
                    }
                }
            } else {
                drop(s);
                drop(cb);
            }
        }
        ran
    }
}

/// A timer on one of a context's clocks.
///
/// Arm it with [`mod_ns`](Timer::mod_ns) (an absolute deadline on its
/// clock), disarm it with [`del`](Timer::del); dropping it deletes it. The
/// callback runs on the context's home thread at the first iteration after
/// the deadline. Timers with equal deadlines fire in creation order. A timer
/// may be re-armed from its own callback. All methods may be called from
/// any thread; arming a timer that becomes the earliest wakes the loop.
///
/// ```
/// use aio::{AioContext, ClockType};
/// use std::sync::{Arc, atomic::{AtomicBool, Ordering}};
///
/// let ctx = AioContext::new()?;
/// let fired = Arc::new(AtomicBool::new(false));
/// let f = fired.clone();
/// let t = ctx.timer_new(ClockType::Virtual, move |_| f.store(true, Ordering::Relaxed));
/// t.mod_ns(1_000);
/// ctx.virtual_step(999);
/// assert!(!fired.load(Ordering::Relaxed));
/// ctx.virtual_step(1);
/// assert!(fired.load(Ordering::Relaxed));
/// # Ok::<(), aio::Error>(())
/// ```
pub struct Timer {
    ctx: Weak<Inner>,
    key: usize,
    id: u64,
    clock: ClockType,
}

impl Timer {
    pub(crate) fn new(ctx: Weak<Inner>, key: usize, id: u64, clock: ClockType) -> Self {
        Self {
            ctx,
            key,
            id,
            clock,
        }
    }

    /// The clock the timer runs on.
    pub fn clock(&self) -> ClockType {
        self.clock
    }

    /// Arms (or re-arms) the timer for the absolute time `deadline_ns` on its
    /// clock. A deadline in the past fires on the next iteration.
    pub fn mod_ns(&self, deadline_ns: i64) {
        let Some(ctx) = self.ctx.upgrade() else {
            return;
        };
        let head = {
            let mut s = ctx.timers.state.lock();
            let head = s.arm(self.key, deadline_ns.max(0));
            s.entries[self.key].rearm_after = None;
            ctx.timers.armed.store(s.armed_count(), Ordering::Release);
            head
        };
        if head {
            notify_inner(&ctx);
        }
    }

    /// Arms the timer `delta_ns` after its clock's current time.
    pub fn mod_in_ns(&self, delta_ns: i64) {
        if let Some(ctx) = self.ctx.upgrade() {
            let now = ctx.clock_now(self.clock);
            self.mod_ns(now.saturating_add(delta_ns.max(0)));
        }
    }

    /// Disarms the timer. Does not wait for a callback that is running.
    pub fn del(&self) {
        if let Some(ctx) = self.ctx.upgrade() {
            let mut s = ctx.timers.state.lock();
            s.disarm(self.key);
            s.entries[self.key].rearm_after = None;
            ctx.timers.armed.store(s.armed_count(), Ordering::Release);
        }
    }

    /// The armed deadline, or `None` when the timer is not pending.
    pub fn expire_time_ns(&self) -> Option<i64> {
        let ctx = self.ctx.upgrade()?;
        let s = ctx.timers.state.lock();
        s.entries[self.key].deadline
    }

    /// Whether the timer is armed.
    pub fn is_pending(&self) -> bool {
        self.expire_time_ns().is_some()
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        if let Some(ctx) = self.ctx.upgrade() {
            let entry = {
                let mut s = ctx.timers.state.lock();
                s.disarm(self.key);
                ctx.timers.armed.store(s.armed_count(), Ordering::Release);
                s.entries.remove(self.key)
            };
            // The callback (if not running) is dropped outside the lock.
            drop(entry);
        }
    }
}

impl fmt::Debug for Timer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Timer")
            .field("clock", &self.clock)
            .field("id", &self.id)
            .finish()
    }
}
