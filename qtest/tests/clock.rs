//! The qtest protocol against a real `aiod --qtest`.

use qtest::{Daemon, Error};

#[test]
fn the_virtual_clock_moves_only_when_told() {
    let mut d = Daemon::spawn(&[]).unwrap();
    assert_eq!(d.qtest.clock_get().unwrap(), 0);
    // Real time passes; virtual time does not.
    d.qmp.execute("query-jobs", serde_json::json!({})).unwrap();
    assert_eq!(d.qtest.clock_get().unwrap(), 0);
    assert_eq!(d.qtest.clock_step(Some(1_000)).unwrap(), 1_000);
    assert_eq!(d.qtest.clock_set(5_000).unwrap(), 5_000);
    // Never backwards.
    assert_eq!(d.qtest.clock_set(10).unwrap(), 5_000);
    // Nothing pending: clock_step without an argument cannot advance.
    match d.qtest.clock_step(None) {
        Err(Error::Qtest(why)) => assert!(why.contains("no virtual-clock timer"), "{why}"),
        other => panic!("expected FAIL, got {other:?}"),
    }
    assert_eq!(d.qtest.clock_get().unwrap(), 5_000);
}

#[test]
fn malformed_lines_fail_and_the_connection_goes_on() {
    let mut d = Daemon::spawn(&[]).unwrap();
    for (line, expect) in [
        ("clock_step abc", "FAIL invalid number 'abc'"),
        ("clock_set -5", "FAIL invalid number '-5'"),
        (
            "frobnicate",
            "FAIL unknown or malformed command 'frobnicate'",
        ),
        (
            "clock_get extra",
            "FAIL unknown or malformed command 'clock_get'",
        ),
    ] {
        assert_eq!(d.qtest.raw(line).unwrap(), expect, "{line}");
    }
    assert_eq!(d.qtest.raw("clock_get").unwrap(), "OK 0");
}
