//! The ping-pong and timer waits on peer event loops, measured in the same
//! runs as ours: Smithay's calloop, rust-vmm's event-manager, tokio's
//! timers, and glib's main loop (with the `glib` feature).
//!
//! Each fixture does what a user of that loop would write: the idle fds
//! and the active eventfd are registered as the loop's own sources
//! (level-triggered where the loop offers it), one iteration writes the
//! active eventfd and runs one blocking dispatch, whose callback reads it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::{sys, Result};

/// Writes 1 to an eventfd.
fn signal(f: &File) -> bool {
    (&*f).write_all(&1u64.to_ne_bytes()).is_ok()
}

/// Reads (and so clears) an eventfd.
fn clear(f: &File) -> bool {
    let mut buf = [0u8; 8];
    (&*f).read_exact(&mut buf).is_ok()
}

/// `idle` fresh eventfds.
fn eventfds(idle: usize) -> Result<Vec<OwnedFd>> {
    (0..idle)
        .map(|_| sys::eventfd().map_err(Into::into))
        .collect()
}

// ----- calloop -------------------------------------------------------------

/// The ping-pong on calloop: every eventfd a level-triggered `Generic`
/// source; the active one's callback reads it and counts.
pub struct CalloopPingPong {
    ev: calloop::EventLoop<'static, u64>,
    active: File,
    hits: u64,
    idle: usize,
}

impl std::fmt::Debug for CalloopPingPong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CalloopPingPong")
            .field("idle", &self.idle)
            .finish()
    }
}

impl CalloopPingPong {
    /// Builds the fixture with `idle` never-signalled eventfds.
    ///
    /// # Errors
    ///
    /// When the loop, an eventfd or a registration fails.
    pub fn new(idle: usize) -> Result<Self> {
        use calloop::generic::Generic;
        use calloop::{Interest, Mode, PostAction};
        let ev = calloop::EventLoop::<u64>::try_new()?;
        let h = ev.handle();
        for fd in eventfds(idle)? {
            h.insert_source(Generic::new(fd, Interest::READ, Mode::Level), |_, _, _| {
                Ok(PostAction::Continue)
            })
            .map_err(|e| format!("calloop insert_source: {}", e.error))?;
        }
        let active = File::from(sys::eventfd()?);
        let reader = active.try_clone()?;
        h.insert_source(
            Generic::new(active.try_clone()?, Interest::READ, Mode::Level),
            move |_, _, hits: &mut u64| {
                if clear(&reader) {
                    *hits += 1;
                }
                Ok(PostAction::Continue)
            },
        )
        .map_err(|e| format!("calloop insert_source: {}", e.error))?;
        Ok(Self {
            ev,
            active,
            hits: 0,
            idle,
        })
    }

    /// One ping-pong; whether the active source's callback ran.
    #[inline]
    pub fn iteration(&mut self) -> bool {
        let before = self.hits;
        signal(&self.active)
            && self.ev.dispatch(None, &mut self.hits).is_ok()
            && self.hits == before + 1
    }

    /// The number of idle eventfds.
    pub fn idle_count(&self) -> usize {
        self.idle
    }
}

// ----- event-manager -------------------------------------------------------

/// The subscriber owning every eventfd of the event-manager fixture.
struct Subscriber {
    idle: Vec<OwnedFd>,
    active: File,
}

impl event_manager::MutEventSubscriber for Subscriber {
    fn init(&mut self, ops: &mut event_manager::EventOps<'_>) {
        use event_manager::{EventSet, Events};
        for fd in &self.idle {
            if let Err(e) = ops.add(Events::new(fd, EventSet::IN)) {
                eprintln!("event-manager add: {e:?}");
            }
        }
        if let Err(e) = ops.add(Events::new(&self.active, EventSet::IN)) {
            eprintln!("event-manager add: {e:?}");
        }
    }

    fn process(&mut self, events: event_manager::Events, _ops: &mut event_manager::EventOps<'_>) {
        if events.fd() == self.active.as_raw_fd() {
            clear(&self.active);
        }
    }
}

/// The ping-pong on rust-vmm's event-manager (epoll, level-triggered,
/// one subscriber holding every fd).
pub struct EventManagerPingPong {
    mgr: event_manager::EventManager<Subscriber>,
    active: File,
    idle: usize,
}

impl std::fmt::Debug for EventManagerPingPong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventManagerPingPong")
            .field("idle", &self.idle)
            .finish()
    }
}

impl EventManagerPingPong {
    /// Builds the fixture with `idle` never-signalled eventfds.
    ///
    /// # Errors
    ///
    /// When the manager or an eventfd cannot be created.
    pub fn new(idle: usize) -> Result<Self> {
        use event_manager::SubscriberOps;
        let mut mgr =
            event_manager::EventManager::new().map_err(|e| format!("event-manager: {e:?}"))?;
        let active = File::from(sys::eventfd()?);
        mgr.add_subscriber(Subscriber {
            idle: eventfds(idle)?,
            active: active.try_clone()?,
        });
        Ok(Self { mgr, active, idle })
    }

    /// One ping-pong; whether exactly one event was dispatched.
    #[inline]
    pub fn iteration(&mut self) -> bool {
        signal(&self.active) && matches!(self.mgr.run(), Ok(1))
    }

    /// The number of idle eventfds.
    pub fn idle_count(&self) -> usize {
        self.idle
    }
}

// ----- glib ----------------------------------------------------------------

#[cfg(feature = "glib")]
mod glib_impl {
    use super::*;

    /// The ping-pong on a glib `MainContext`: unix fd sources, one
    /// `iteration(true)` per ping-pong.
    pub(super) struct GlibPingPong {
        ctx: glib::MainContext,
        _sources: Vec<glib::Source>,
        _idle: Vec<OwnedFd>,
        active: File,
    }

    impl GlibPingPong {
        pub(crate) fn new(idle: usize) -> Result<Self> {
            let ctx = glib::MainContext::new();
            let idle_fds = eventfds(idle)?;
            let mut sources = Vec::with_capacity(idle + 1);
            for fd in &idle_fds {
                let s = glib::unix_fd_source_new(
                    fd.as_raw_fd(),
                    glib::IOCondition::IN,
                    None,
                    glib::Priority::DEFAULT,
                    |_, _| glib::ControlFlow::Continue,
                );
                s.attach(Some(&ctx));
                sources.push(s);
            }
            let active = File::from(sys::eventfd()?);
            let reader = active.try_clone()?;
            let s = glib::unix_fd_source_new(
                active.as_raw_fd(),
                glib::IOCondition::IN,
                None,
                glib::Priority::DEFAULT,
                move |_, _| {
                    clear(&reader);
                    glib::ControlFlow::Continue
                },
            );
            s.attach(Some(&ctx));
            sources.push(s);
            Ok(Self {
                ctx,
                _sources: sources,
                _idle: idle_fds,
                active,
            })
        }

        pub(crate) fn iteration(&mut self) -> bool {
            if !signal(&self.active) {
                return false;
            }
            self.ctx.iteration(true)
        }
    }
}

/// The ping-pong on glib's main loop (a `MainContext` with unix fd
/// sources). Needs the `glib` cargo feature (and libglib2.0-dev); without
/// it, [`GlibPingPong::new`] fails with "not built".
pub struct GlibPingPong {
    #[cfg(feature = "glib")]
    inner: glib_impl::GlibPingPong,
    idle: usize,
}

impl std::fmt::Debug for GlibPingPong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlibPingPong")
            .field("idle", &self.idle)
            .finish()
    }
}

impl GlibPingPong {
    /// Whether this build has the glib peer.
    pub const AVAILABLE: bool = cfg!(feature = "glib");

    /// Builds the fixture with `idle` never-signalled eventfds.
    ///
    /// # Errors
    ///
    /// Without the `glib` feature; when an eventfd cannot be created.
    pub fn new(idle: usize) -> Result<Self> {
        #[cfg(feature = "glib")]
        {
            Ok(Self {
                inner: glib_impl::GlibPingPong::new(idle)?,
                idle,
            })
        }
        #[cfg(not(feature = "glib"))]
        {
            let _ = idle;
            Err("the glib peer is not built (cargo feature `glib`)".into())
        }
    }

    /// One ping-pong; whether a source was dispatched.
    #[inline]
    pub fn iteration(&mut self) -> bool {
        #[cfg(feature = "glib")]
        {
            self.inner.iteration()
        }
        #[cfg(not(feature = "glib"))]
        {
            false
        }
    }

    /// The number of idle eventfds.
    pub fn idle_count(&self) -> usize {
        self.idle
    }
}

// ----- timers --------------------------------------------------------------

/// Lateness of tokio's `sleep_until` on a current-thread runtime (timer
/// wheel with 1 ms resolution): each sample sleeps until an absolute
/// deadline `period_ns` ahead; the sample is wake time minus deadline.
///
/// # Errors
///
/// When the runtime cannot be built.
pub fn tokio_lateness(period_ns: i64, warmup: usize, samples: usize) -> Result<Vec<i64>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let period = Duration::from_nanos(period_ns.max(0) as u64);
    Ok(rt.block_on(async move {
        let mut out = Vec::with_capacity(samples);
        for i in 0..warmup + samples {
            let deadline = Instant::now() + period;
            tokio::time::sleep_until(deadline.into()).await;
            let late = late_ns(deadline);
            if i >= warmup {
                out.push(late);
            }
        }
        out
    }))
}

/// Lateness of calloop's `Timer` source (deadline-based, millisecond
/// `epoll_wait` timeouts underneath).
///
/// # Errors
///
/// When the loop cannot be created or a dispatch fails.
pub fn calloop_lateness(period_ns: i64, warmup: usize, samples: usize) -> Result<Vec<i64>> {
    use calloop::timer::{TimeoutAction, Timer};
    let mut ev = calloop::EventLoop::<Option<i64>>::try_new()?;
    let period = Duration::from_nanos(period_ns.max(0) as u64);
    let mut out = Vec::with_capacity(samples);
    for i in 0..warmup + samples {
        let deadline = Instant::now() + period;
        let mut fired = None;
        ev.handle()
            .insert_source(Timer::from_deadline(deadline), move |_, _, f| {
                *f = Some(late_ns(deadline));
                TimeoutAction::Drop
            })
            .map_err(|e| format!("calloop timer: {}", e.error))?;
        let late = loop {
            ev.dispatch(None, &mut fired)?;
            if let Some(l) = fired {
                break l;
            }
        };
        if i >= warmup {
            out.push(late);
        }
    }
    Ok(out)
}

/// ns from `deadline` to now (negative if early).
fn late_ns(deadline: Instant) -> i64 {
    let now = Instant::now();
    match now.checked_duration_since(deadline) {
        Some(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        None => -i64::try_from((deadline - now).as_nanos()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_fixtures_dispatch_every_iteration() {
        let mut c = CalloopPingPong::new(16).unwrap();
        let mut e = EventManagerPingPong::new(16).unwrap();
        for i in 0..32 {
            assert!(c.iteration(), "calloop iteration {i}");
            assert!(e.iteration(), "event-manager iteration {i}");
        }
        assert_eq!(GlibPingPong::new(1).is_ok(), GlibPingPong::AVAILABLE);
    }

    #[test]
    fn peer_timers_never_fire_early() {
        for v in [
            tokio_lateness(200_000, 1, 5).unwrap(),
            calloop_lateness(200_000, 1, 5).unwrap(),
        ] {
            assert_eq!(v.len(), 5);
            assert!(v.iter().all(|&l| l >= 0), "{v:?}");
        }
    }
}
