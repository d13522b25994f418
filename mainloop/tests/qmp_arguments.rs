//! Commands registered by the embedder: argument validation with QEMU's
//! texts, typed arguments, results, errors, panics, and async commands.

mod util;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use aio::ClockType;
use mainloop::qmp::{ArgType, ErrorClass, NoArgs, QmpError, QmpServer, QmpServerOptions, Schema};
use serde_json::{json, Value};
use util::{generic, TestServer};

mainloop::qmp_enum! {
    /// QAPI's MirrorSyncMode.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum SyncMode {
        /// Top.
        Top = "top",
        /// Full.
        Full = "full",
        /// None.
        None = "none",
        /// Incremental.
        Incremental = "incremental",
    }
}

mainloop::qmp_args! {
    /// `file` of blockdev-add, simplified.
    #[derive(Debug)]
    pub struct FileOpts {
        /// The driver.
        pub driver: String,
        /// The path.
        pub filename: String,
    }
}

mainloop::qmp_args! {
    /// A blockdev-add-like command.
    #[derive(Debug)]
    pub struct AddArgs {
        /// Format driver.
        pub driver: String,
        /// Node name.
        pub node_name: String,
        /// The protocol layer.
        pub file: FileOpts,
    }
}

mainloop::qmp_args! {
    /// `block-stream`-like.
    pub struct StreamArgs {
        /// Job id.
        pub job_id: Option<String>,
        /// Top node.
        pub device: String,
        /// Base node.
        pub base_node: Option<String>,
    }
}

mainloop::qmp_args! {
    /// `block-job-set-speed`.
    pub struct SetSpeedArgs {
        /// Job.
        pub device: String,
        /// Bytes per second.
        pub speed: i64,
    }
}

mainloop::qmp_args! {
    /// `blockdev-backup`-like.
    pub struct BackupArgs {
        /// Job id.
        pub job_id: Option<String>,
        /// Source.
        pub device: String,
        /// Target.
        pub target: String,
        /// Mode.
        pub sync: SyncMode,
        /// Compress.
        pub compress: Option<bool>,
        /// Ratio.
        pub ratio: Option<f64>,
        /// Sizes.
        pub sizes: Option<Vec<u32>>,
    }
}

mainloop::qmp_args! {
    /// `delay`: waits `ms` milliseconds, then returns `tag`.
    pub struct DelayArgs {
        /// Milliseconds.
        pub ms: u32,
        /// Returned.
        pub tag: Value,
    }
}

fn register_block_like(s: &QmpServer) {
    s.register("block-stream", |a: StreamArgs| {
        Ok(json!({"job-id": a.job_id, "device": a.device, "base-node": a.base_node}))
    })
    .unwrap();
    s.register("block-job-set-speed", |a: SetSpeedArgs| {
        if a.speed < 0 {
            return Err(QmpError::generic(
                "Parameter 'speed' expects a non-negative value",
            ));
        }
        Ok(json!({"device": a.device, "speed": a.speed}))
    })
    .unwrap();
    s.register("query-block-jobs", |_: NoArgs| Ok(Vec::<Value>::new()))
        .unwrap();
    s.register("blockdev-backup", |a: BackupArgs| {
        Ok(json!({
            "sync": a.sync.as_str(),
            "device": a.device,
            "target": a.target,
            "job-id": a.job_id,
            "compress": a.compress,
            "ratio": a.ratio,
            "sizes": a.sizes,
        }))
    })
    .unwrap();
    s.register("blockdev-add", |a: AddArgs| {
        Ok(json!({"node-name": a.node_name, "driver": a.driver, "filename": a.file.filename, "file-driver": a.file.driver}))
    })
    .unwrap();
    s.register(
        "block-job-pause",
        |a: SetSpeedArgsDevice| -> Result<(), QmpError> {
            Err(QmpError::device_not_active(format!(
                "Block job '{}' not found",
                a.device
            )))
        },
    )
    .unwrap();
}

mainloop::qmp_args! {
    /// Just a device.
    pub struct SetSpeedArgsDevice {
        /// Job.
        pub device: String,
    }
}

fn block_server() -> TestServer {
    TestServer::start(QmpServerOptions::new(), register_block_like)
}

/// The argument rows of qsd-measure.md's bad-input table, with the same
/// commands and arguments.
#[test]
fn argument_errors_match_qemu() {
    let s = block_server();
    let mut c = s.client();
    assert_eq!(
        c.err("block-stream", json!({})),
        generic("Parameter 'device' is missing")
    );
    assert_eq!(
        c.err(
            "block-job-set-speed",
            json!({"device": "x", "speed": "fast"})
        ),
        generic("Invalid parameter type for 'speed', expected: integer")
    );
    assert_eq!(
        c.err("query-block-jobs", json!({"bogus": 1})),
        generic("Parameter 'bogus' is unexpected")
    );
    assert_eq!(
        c.err(
            "blockdev-backup",
            json!({"job-id": "j", "device": "top", "target": "t", "sync": "sideways"})
        ),
        generic("Parameter 'sync' does not accept value 'sideways'")
    );
    assert_eq!(
        c.err(
            "block-job-set-speed",
            json!({"device": "busy0", "speed": -1})
        ),
        generic("Parameter 'speed' expects a non-negative value")
    );
    assert_eq!(
        c.err("block-job-pause", json!({"device": "nosuchjob"})),
        (
            "DeviceNotActive".to_string(),
            "Block job 'nosuchjob' not found".to_string()
        )
    );
}

#[test]
fn wrong_types_name_the_expected_type() {
    let s = block_server();
    let mut c = s.client();
    let base = json!({"device": "d", "target": "t", "sync": "full"});
    let with = |k: &str, v: Value| {
        let mut a = base.clone();
        a[k] = v;
        a
    };
    let cases = [
        (
            with("device", json!(1)),
            "Invalid parameter type for 'device', expected: string",
        ),
        (
            with("sync", json!(true)),
            "Invalid parameter type for 'sync', expected: string",
        ),
        (
            with("compress", json!("yes")),
            "Invalid parameter type for 'compress', expected: boolean",
        ),
        (
            with("ratio", json!("1")),
            "Invalid parameter type for 'ratio', expected: number",
        ),
        (
            with("sizes", json!({})),
            "Invalid parameter type for 'sizes', expected: array",
        ),
        (
            with("sizes", json!([1, "2"])),
            "Parameter 'sizes[1]' expects uint64",
        ),
        (
            with("sizes", json!([1, 1u64 << 33])),
            "Parameter 'null' expects uint32",
        ),
        (
            with("job-id", json!(null)),
            "Invalid parameter type for 'job-id', expected: string",
        ),
    ];
    for (args, desc) in cases {
        assert_eq!(
            c.err("blockdev-backup", args.clone()),
            generic(desc),
            "{args}"
        );
    }
    assert_eq!(
        c.err(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "n", "file": "f"})
        ),
        generic("Invalid parameter type for 'file', expected: object")
    );
}

#[test]
fn valid_arguments_reach_the_handler_typed() {
    let s = block_server();
    let mut c = s.client();
    assert_eq!(
        c.ok(
            "blockdev-backup",
            json!({"device": "d", "target": "t", "sync": "incremental", "compress": true,
                   "ratio": 0.5, "sizes": [1, 2]})
        ),
        json!({"sync": "incremental", "device": "d", "target": "t", "job-id": null,
               "compress": true, "ratio": 0.5, "sizes": [1, 2]})
    );
    assert_eq!(
        c.ok(
            "block-stream",
            json!({"device": "top", "base-node": "base"})
        ),
        json!({"job-id": null, "device": "top", "base-node": "base"})
    );
    assert_eq!(c.ok("query-block-jobs", Value::Null), json!([]));
    assert_eq!(c.ok("query-block-jobs", json!({})), json!([]));
}

#[test]
fn nested_arguments_report_their_path() {
    let s = block_server();
    let mut c = s.client();
    let cases = [
        (
            json!({"driver": "qcow2", "node-name": "n", "file": {"driver": "file"}}),
            "Parameter 'file.filename' is missing",
        ),
        (
            json!({"driver": "qcow2", "node-name": "n", "file": {"driver": "file", "filename": 7}}),
            "Invalid parameter type for 'file.filename', expected: string",
        ),
        (
            json!({"driver": "qcow2", "node-name": "n", "file": {"driver": "file", "filename": "f", "aio": "native"}}),
            "Parameter 'file.aio' is unexpected",
        ),
        (
            json!({"driver": "qcow2", "file": {"driver": "file", "filename": "f"}}),
            "Parameter 'node-name' is missing",
        ),
    ];
    for (args, desc) in cases {
        assert_eq!(c.err("blockdev-add", args.clone()), generic(desc), "{args}");
    }
    assert_eq!(
        c.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "n", "file": {"driver": "file", "filename": "/f"}})
        ),
        json!({"node-name": "n", "driver": "qcow2", "filename": "/f", "file-driver": "file"})
    );
}

#[test]
fn schema_registered_commands_validate_unions() {
    let s = TestServer::start(QmpServerOptions::new(), |srv| {
        let schema = Schema::new()
            .required("driver", ArgType::enumeration(["file", "null-co"]))
            .required("node-name", ArgType::Str)
            .union(
                "driver",
                [
                    ("file", Schema::new().required("filename", ArgType::Str)),
                    ("null-co", Schema::new()),
                ],
            );
        srv.register_with_schema("x-add", schema, |args| Ok(Value::Object(args)))
            .unwrap();
    });
    let mut c = s.client();
    assert_eq!(
        c.err("x-add", json!({"driver": "file", "node-name": "n"})),
        generic("Parameter 'filename' is missing")
    );
    assert_eq!(
        c.err(
            "x-add",
            json!({"driver": "null-co", "node-name": "n", "filename": "f"})
        ),
        generic("Parameter 'filename' is unexpected")
    );
    assert_eq!(
        c.err("x-add", json!({"driver": "nbd", "node-name": "n"})),
        generic("Parameter 'driver' does not accept value 'nbd'")
    );
    assert_eq!(
        c.ok(
            "x-add",
            json!({"driver": "file", "node-name": "n", "filename": "f"})
        ),
        json!({"driver": "file", "node-name": "n", "filename": "f"})
    );
}

#[test]
fn handler_errors_keep_their_class_and_duplicates_are_refused() {
    let s = TestServer::start(QmpServerOptions::new(), |srv| {
        srv.register("fail-kvm", |_: NoArgs| -> Result<(), QmpError> {
            Err(QmpError::new(ErrorClass::KVMMissingCap, "no KVM"))
        })
        .unwrap();
        assert!(matches!(
            srv.register("fail-kvm", |_: NoArgs| Ok(())),
            Err(mainloop::qmp::ServerError::DuplicateCommand(n)) if n == "fail-kvm"
        ));
        assert!(srv.register("quit", |_: NoArgs| Ok(())).is_err());
    });
    let mut c = s.client();
    assert_eq!(
        c.err("fail-kvm", Value::Null),
        ("KVMMissingCap".to_string(), "no KVM".to_string())
    );
}

#[test]
fn panicking_command_answers_and_the_connection_goes_on() {
    let s = TestServer::start(QmpServerOptions::new(), |srv| {
        srv.register("boom", |_: NoArgs| -> Result<(), QmpError> {
            panic!("kaboom")
        })
        .unwrap();
        srv.register_async("async-boom", |_: NoArgs| async {
            aio::yield_now().await;
            if true {
                panic!("async kaboom");
            }
            Ok(())
        })
        .unwrap();
    });
    let mut c = s.client();
    assert_eq!(
        c.err("boom", Value::Null),
        generic("internal error: command 'boom' failed: kaboom")
    );
    assert_eq!(
        c.err("async-boom", Value::Null),
        generic("internal error: command 'async-boom' failed: async kaboom")
    );
    assert!(c.ok("query-version", Value::Null).is_object());
}

fn delay_server(running: Arc<AtomicUsize>) -> TestServer {
    TestServer::start(QmpServerOptions::new(), move |srv| {
        srv.register_async("delay", move |a: DelayArgs| {
            let running = running.clone();
            async move {
                running.fetch_add(1, Ordering::SeqCst);
                aio::sleep_ns(ClockType::Realtime, i64::from(a.ms) * 1_000_000).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(a.tag)
            }
        })
        .unwrap();
    })
}

#[test]
fn async_commands_of_one_client_run_in_order_one_at_a_time() {
    let running = Arc::new(AtomicUsize::new(0));
    let s = delay_server(running.clone());
    let mut c = s.client();
    // Pipelined: a slow async command, a sync one, a fast async one.
    c.send_raw(
        b"{\"execute\": \"delay\", \"arguments\": {\"ms\": 60, \"tag\": \"slow\"}, \"id\": 1}\
          {\"execute\": \"query-version\", \"id\": 2}\
          {\"execute\": \"delay\", \"arguments\": {\"ms\": 0, \"tag\": \"fast\"}, \"id\": 3}",
    );
    let r1 = c.recv();
    assert_eq!(
        (r1["id"].clone(), r1["return"].clone()),
        (json!(1), json!("slow"))
    );
    assert_eq!(c.recv()["id"], 2);
    let r3 = c.recv();
    assert_eq!(
        (r3["id"].clone(), r3["return"].clone()),
        (json!(3), json!("fast"))
    );
    assert_eq!(running.load(Ordering::SeqCst), 0);
}

#[test]
fn async_command_of_one_client_does_not_block_another() {
    let gate = Arc::new(AtomicBool::new(false));
    let g = gate.clone();
    let s = TestServer::start(QmpServerOptions::new(), move |srv| {
        srv.register_async("wait-gate", move |_: NoArgs| {
            let g = g.clone();
            async move {
                while !g.load(Ordering::SeqCst) {
                    aio::sleep_ns(ClockType::Realtime, 1_000_000).await;
                }
                Ok("opened")
            }
        })
        .unwrap();
    });
    let mut a = s.client();
    let mut b = s.client();
    a.send(&json!({"execute": "wait-gate", "id": "a"}));
    for i in 0..20 {
        assert_eq!(
            b.execute("query-version", Value::Null)["return"]["qemu"]["major"],
            10,
            "{i}"
        );
    }
    assert!(a
        .try_recv_within(std::time::Duration::from_millis(50))
        .is_none());
    gate.store(true, Ordering::SeqCst);
    assert_eq!(a.recv(), json!({"return": "opened", "id": "a"}));
}

#[test]
fn unit_result_is_an_empty_object_and_any_serialize_works() {
    #[derive(serde::Serialize)]
    struct Info {
        name: &'static str,
        size: u64,
    }
    let s = TestServer::start(QmpServerOptions::new(), |srv| {
        srv.register("unit", |_: NoArgs| Ok(())).unwrap();
        srv.register("info", |_: NoArgs| {
            Ok(vec![Info {
                name: "n",
                size: 1 << 40,
            }])
        })
        .unwrap();
        srv.register("raw", |a: serde_json::Map<String, Value>| {
            Ok(Value::Object(a))
        })
        .unwrap();
    });
    let mut c = s.client();
    assert_eq!(c.execute("unit", Value::Null), json!({"return": {}}));
    assert_eq!(
        c.ok("info", Value::Null),
        json!([{"name": "n", "size": 1u64 << 40}])
    );
    assert_eq!(
        c.ok("raw", json!({"anything": [1, {"goes": true}]})),
        json!({"anything": [1, {"goes": true}]})
    );
}
