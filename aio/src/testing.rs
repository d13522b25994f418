//! Deterministic-test helpers: explore the orders the loop leaves
//! unspecified, reproducibly.
//!
//! What the loop specifies is fixed: bottom halves run FIFO, tasks in wake
//! order, timers by deadline then creation. What it does not specify is the
//! order in which fds that became ready in the same wait are dispatched
//! (the kernel's order). A context built with
//! [`ContextOptions::dispatch_seed`] shuffles that order with a seeded
//! PRNG; [`explore`] runs a scenario under many seeds and reports the first
//! seed that fails, which replays exactly (set `AIO_SEED=<seed>` to run only
//! that one).
//!
//! Combined with the virtual clock ([`AioContext::virtual_step`]), a test
//! controls both time and ordering.
//!
//! ```
//! use aio::{testing, AioContext, ClientType, EventNotifier, FdHandler};
//! use std::sync::{Arc, Mutex};
//!
//! // Two fds ready at once: the scenario must not depend on their order.
//! let result = testing::explore(0..32, |opts| {
//!     let ctx = AioContext::with_options(opts).map_err(|e| e.to_string())?;
//!     let log = Arc::new(Mutex::new(Vec::new()));
//!     let ns: Vec<Arc<EventNotifier>> =
//!         (0..2).map(|_| Arc::new(EventNotifier::new().unwrap())).collect();
//!     for (i, n) in ns.iter().enumerate() {
//!         let (n2, l) = (n.clone(), log.clone());
//!         ctx.set_event_notifier(n, Some(FdHandler::new(ClientType::INTERNAL).on_read(move |_| {
//!             n2.test_and_clear().unwrap();
//!             l.lock().unwrap().push(i);
//!         }))).map_err(|e| e.to_string())?;
//!         n.set().unwrap();
//!     }
//!     ctx.poll(false);
//!     let mut seen = log.lock().unwrap().clone();
//!     seen.sort();
//!     (seen == vec![0, 1]).then_some(()).ok_or_else(|| format!("{seen:?}"))
//! });
//! assert!(result.is_ok());
//! ```

use std::fmt;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::ContextOptions;

/// The first seed under which a scenario failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExploreFailure {
    /// The seed; pass it to [`ContextOptions::dispatch_seed`] (or set
    /// `AIO_SEED`) to replay the failing run.
    pub seed: u64,
    /// What the scenario reported (or its panic message).
    pub message: String,
}

impl fmt::Display for ExploreFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "scenario failed with dispatch seed {}: {} (replay with AIO_SEED={})",
            self.seed, self.message, self.seed
        )
    }
}

impl std::error::Error for ExploreFailure {}

/// Runs `scenario` once per seed, each time with options whose dispatch
/// order is shuffled by that seed, and returns the first failure. A panic in
/// the scenario counts as a failure. With the environment variable
/// `AIO_SEED` set, only that seed runs.
pub fn explore<F>(seeds: Range<u64>, mut scenario: F) -> Result<(), ExploreFailure>
where
    F: FnMut(ContextOptions) -> std::result::Result<(), String>,
{
    let only = std::env::var("AIO_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    let seeds: Vec<u64> = match only {
        Some(s) => vec![s],
        None => seeds.collect(),
    };
    for seed in seeds {
        let opts = ContextOptions::new().dispatch_seed(Some(seed));
        let outcome = catch_unwind(AssertUnwindSafe(|| scenario(opts)));
        let message = match outcome {
            Ok(Ok(())) => continue,
            Ok(Err(m)) => m,
            Err(p) => p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".to_string()),
        };
        let failure = ExploreFailure { seed, message };
        eprintln!("{failure}");
        return Err(failure);
    }
    Ok(())
}
