//! Seeded exploration of unspecified dispatch orders: every order shows up,
//! a failing order is found, and its seed replays the same run.

use std::sync::{Arc, Mutex};

use aio::testing::explore;
use aio::{AioContext, ClientType, ContextOptions, EventNotifier, FdHandler};

/// Makes `n` notifiers ready at once and returns the order they ran in.
fn dispatch_order(opts: ContextOptions, n: usize) -> Vec<usize> {
    let ctx = AioContext::with_options(opts).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let ns: Vec<Arc<EventNotifier>> = (0..n)
        .map(|_| Arc::new(EventNotifier::new().unwrap()))
        .collect();
    for (i, note) in ns.iter().enumerate() {
        let (n2, l) = (note.clone(), log.clone());
        ctx.set_event_notifier(
            note,
            Some(FdHandler::new(ClientType::INTERNAL).on_read(move |_| {
                n2.test_and_clear().unwrap();
                l.lock().unwrap().push(i);
            })),
        )
        .unwrap();
        note.set().unwrap();
    }
    ctx.poll(false);
    let out = log.lock().unwrap().clone();
    for note in &ns {
        ctx.set_event_notifier(note, None).unwrap();
    }
    out
}

#[test]
fn seeds_explore_every_order_of_three_ready_fds() {
    let mut seen = std::collections::HashSet::new();
    for seed in 0..200 {
        let order = dispatch_order(ContextOptions::new().dispatch_seed(Some(seed)), 3);
        assert_eq!(order.len(), 3);
        seen.insert(order);
    }
    assert_eq!(seen.len(), 6, "all 3! orders reached: {seen:?}");
}

#[test]
fn the_same_seed_gives_the_same_order() {
    for seed in [1, 7, 42, 1234] {
        let a = dispatch_order(ContextOptions::new().dispatch_seed(Some(seed)), 5);
        let b = dispatch_order(ContextOptions::new().dispatch_seed(Some(seed)), 5);
        assert_eq!(a, b, "seed {seed}");
    }
}

#[test]
fn explore_finds_an_order_dependent_bug_and_its_seed_replays() {
    // A "bug": the scenario assumes fd 0 is always dispatched first.
    let scenario = |opts: ContextOptions| {
        let order = dispatch_order(opts, 2);
        if order[0] == 0 {
            Ok(())
        } else {
            Err(format!("ran in order {order:?}"))
        }
    };
    if std::env::var_os("AIO_SEED").is_some() {
        return; // replay mode is for humans
    }
    let failure = explore(0..64, scenario).unwrap_err();
    assert!(failure.message.contains("[1, 0]"), "{failure}");
    assert!(failure
        .to_string()
        .contains(&format!("AIO_SEED={}", failure.seed)));
    // Replaying the seed fails the same way, every time.
    for _ in 0..3 {
        let again = scenario(ContextOptions::new().dispatch_seed(Some(failure.seed)));
        assert_eq!(again, Err(failure.message.clone()));
    }
}
