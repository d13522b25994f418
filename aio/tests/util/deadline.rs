//! Turning a hang into a failure.

use std::sync::mpsc;
use std::time::Duration;

/// Runs `f` on its own thread and fails (instead of hanging) if it takes
/// more than a minute: a lost wake-up shows as a failure.
pub fn within_a_minute(f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    let th = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => th.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The thread panicked: surface its panic.
            th.join().unwrap();
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("the loop never woke: lost wake-up"),
    }
}
