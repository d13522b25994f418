//! The wire protocol: greeting, negotiation, framing, malformed input and
//! the built-in commands, checked against QEMU's exact replies
//! (shared/reference/qsd-measure.md, "Bad input" and "Protocol-level
//! malformed input").

mod util;

use mainloop::qmp::{QmpServerOptions, QmpVersion};
use serde_json::{json, Value};
use util::{error_of, generic, not_found, TestServer};

fn server() -> TestServer {
    TestServer::start(QmpServerOptions::new(), |_| {})
}

#[test]
fn greeting_has_qemu_shape_and_no_capabilities() {
    let s = server();
    let mut c = util::QmpClient::connect_raw(&s.addr);
    let line = c.recv_line();
    assert_eq!(
        line,
        format!(
            "{{\"QMP\": {{\"version\": {{\"qemu\": {{\"micro\": 0, \"minor\": 0, \"major\": 10}}, \
             \"package\": \"aio-runtime {}\"}}, \"capabilities\": []}}}}\r\n",
            env!("CARGO_PKG_VERSION")
        )
    );
}

#[test]
fn greeting_and_query_version_report_configured_version() {
    let s = TestServer::start(
        QmpServerOptions::new().version(QmpVersion::new(9, 2, 4, "embedder 1.0")),
        |_| {},
    );
    let mut c = s.connect();
    let version = json!({"qemu": {"micro": 4, "minor": 2, "major": 9}, "package": "embedder 1.0"});
    assert_eq!(
        c.greeting,
        json!({"QMP": {"version": version.clone(), "capabilities": []}})
    );
    c.negotiate();
    assert_eq!(c.ok("query-version", Value::Null), version);
}

#[test]
fn commands_before_negotiation_are_refused() {
    let s = server();
    let mut c = s.connect();
    let expecting = not_found("Expecting capabilities negotiation with 'qmp_capabilities'");
    assert_eq!(c.err("query-version", Value::Null), expecting);
    assert_eq!(c.err("no-such-command", Value::Null), expecting);
    assert_eq!(c.err("quit", Value::Null), expecting);
    // Malformed requests still get their own errors.
    c.send(&json!({"execute": 42}));
    assert_eq!(
        error_of(&c.recv()).unwrap(),
        generic("QMP input member 'execute' must be a string")
    );
    c.negotiate();
    assert_eq!(c.ok("query-version", Value::Null)["qemu"]["major"], 10);
}

#[test]
fn negotiation_rules_match_qemu() {
    let s = server();
    let mut c = s.connect();
    // We offer no capabilities; asking for one fails and leaves the client
    // in negotiation mode.
    assert_eq!(
        c.err("qmp_capabilities", json!({"enable": ["oob"]})),
        generic("Capability oob not available")
    );
    assert_eq!(
        c.err("qmp_capabilities", json!({"enable": ["x"]})),
        generic("Parameter 'null' does not accept value 'x'")
    );
    assert_eq!(
        c.err("qmp_capabilities", json!({"enable": "oob"})),
        generic("Invalid parameter type for 'enable', expected: array")
    );
    assert_eq!(
        c.err("qmp_capabilities", json!({"bogus": 1})),
        generic("Parameter 'bogus' is unexpected")
    );
    assert_eq!(
        c.err("query-version", Value::Null).0,
        "CommandNotFound",
        "still negotiating"
    );
    assert_eq!(c.ok("qmp_capabilities", json!({"enable": []})), json!({}));
    assert_eq!(
        c.err("qmp_capabilities", Value::Null),
        not_found("Capabilities negotiation is already complete, command ignored")
    );
    // Each connection negotiates on its own.
    let mut d = s.connect();
    assert_eq!(d.err("query-version", Value::Null).0, "CommandNotFound");
    d.negotiate();
}

#[test]
fn id_is_echoed_whatever_its_shape() {
    let s = server();
    let mut c = s.client();
    for id in [
        json!({"nested": [1, "x"]}),
        json!(7),
        json!("abc"),
        json!(null),
        json!([{"a": {"b": [true, 1.5]}}]),
    ] {
        c.send(&json!({"execute": "query-version", "id": id}));
        let r = c.recv();
        assert_eq!(r["id"], id, "{r}");
        assert!(r.get("return").is_some());
    }
    // Errors echo it too, including malformed requests that are objects.
    c.send(&json!({"execute": "nope", "id": {"n": 1}}));
    assert_eq!(c.recv()["id"], json!({"n": 1}));
    c.send(&json!({"execute": 1, "id": "x"}));
    assert_eq!(c.recv()["id"], "x");
    // QEMU's exact output for the reference case.
    c.send_raw(b"{\"execute\": \"query-version\", \"id\": {\"nested\": [1, \"x\"]}}");
    let line = c.recv_line();
    assert!(
        line.ends_with(", \"id\": {\"nested\": [1, \"x\"]}}\r\n"),
        "{line}"
    );
}

/// Every row of qsd-measure.md's protocol-level table, plus the generic
/// rows of the bad-input table that do not need block commands.
#[test]
fn malformed_input_gets_qemu_class_and_desc() {
    let s = server();
    let mut c = s.connect();
    c.send_raw(b"{\"execute\": \"query-version\"}\n");
    assert_eq!(
        c.recv_line(),
        "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \
         \"Expecting capabilities negotiation with 'qmp_capabilities'\"}}\r\n"
    );
    c.negotiate();
    let cases: &[(&[u8], &str, &str)] = &[
        (
            b"{\"execute\": \"query-version\", \"arguments\": }",
            "GenericError",
            "JSON parse error, expecting value",
        ),
        (b"[1, 2]", "GenericError", "QMP input must be a JSON object"),
        (
            b"{\"execute\": 42}",
            "GenericError",
            "QMP input member 'execute' must be a string",
        ),
        (
            b"{\"arguments\": {}}",
            "GenericError",
            "QMP input lacks member 'execute'",
        ),
        (
            b"{\"execute\": \"query-version\", \"bogus\": 1}",
            "GenericError",
            "QMP input member 'bogus' is unexpected",
        ),
        (
            b"{\"execute\": \"no-such-command\"}",
            "CommandNotFound",
            "The command no-such-command has not been found",
        ),
        (
            b"{\"execute\": \"qmp_capabilities\"}",
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored",
        ),
        (
            b"{\"execute\": \"query-commands\", \"arguments\": {\"bogus\": 1}}",
            "GenericError",
            "Parameter 'bogus' is unexpected",
        ),
        (
            b"{\"execute\": \"query-version\", \"arguments\": [1]}",
            "GenericError",
            "QMP input member 'arguments' must be an object",
        ),
        (
            b"{\"exec-oob\": \"query-version\"}",
            "GenericError",
            "QMP input member 'exec-oob' is unexpected",
        ),
        (
            b"\"just a string\"",
            "GenericError",
            "QMP input must be a JSON object",
        ),
        (b"42\n", "GenericError", "QMP input must be a JSON object"),
        (
            b"{\"execute\": hello}",
            "GenericError",
            "JSON parse error, invalid keyword 'hello'",
        ),
        (b"}", "GenericError", "JSON parse error, expecting value"),
    ];
    for (input, class, desc) in cases {
        c.send_raw(input);
        let r = c.recv();
        assert_eq!(
            error_of(&r),
            Some((class.to_string(), desc.to_string())),
            "input {:?}",
            String::from_utf8_lossy(input)
        );
        assert!(r.get("id").is_none());
    }
    // The connection is still usable.
    assert_eq!(c.ok("query-version", Value::Null)["qemu"]["major"], 10);
}

#[test]
fn oversized_value_gets_one_error_and_connection_goes_on() {
    let s = server();
    let mut c = s.client();
    let big = "x".repeat(3 << 20);
    let req = format!(
        "{{\"execute\": \"query-version\", \"arguments\": {{\"pad\": \"{big}\"}}, \"id\": 1}}\n"
    );
    c.send_raw(req.as_bytes());
    c.send_raw(b"{\"execute\": \"query-version\", \"id\": 2}\n");
    let (class, desc) = error_of(&c.recv()).expect("an error for the big value");
    assert_eq!(class, "GenericError");
    assert_eq!(
        desc,
        "JSON token size limit exceeded (a value may be at most 1048576 bytes)"
    );
    let r = c.recv();
    assert_eq!(r["id"], 2, "next reply is for the next request: {r}");
    assert!(r.get("return").is_some());
}

#[test]
fn value_just_under_the_limit_is_accepted() {
    let s = TestServer::start(QmpServerOptions::new().max_value_bytes(4096), |_| {});
    let mut c = s.client();
    let prefix = "{\"execute\": \"query-version\", \"id\": \"";
    let pad = "y".repeat(4096 - prefix.len() - 2);
    c.send_raw(format!("{prefix}{pad}\"}}").as_bytes());
    let r = c.recv();
    assert!(r.get("return").is_some(), "{r}");
    c.send_raw(format!("{prefix}{pad}y\"}}").as_bytes());
    assert!(error_of(&c.recv())
        .unwrap()
        .1
        .starts_with("JSON token size limit exceeded"));
}

#[test]
fn deep_nesting_is_refused_and_connection_goes_on() {
    let s = server();
    let mut c = s.client();
    let deep = format!("{}{}", "[".repeat(500), "]".repeat(500));
    c.send_raw(deep.as_bytes());
    assert_eq!(
        error_of(&c.recv()).unwrap(),
        generic("JSON nesting depth limit exceeded (at most 100 levels)")
    );
    assert!(c.ok("query-version", Value::Null).is_object());
}

#[test]
fn input_split_anywhere_or_batched_without_newlines_works() {
    let s = server();
    let mut c = s.connect();
    let input =
        b"{\"execute\": \"qmp_capabilities\", \"id\": 1}{\"execute\":\"query-version\",\"id\":2}  \
                  {\"execute\": \"query-commands\", \"id\": 3}\n";
    for b in input.iter() {
        c.send_raw(std::slice::from_ref(b));
    }
    for id in 1..=3 {
        assert_eq!(c.recv()["id"], id);
    }
    // Many requests in one write, answered in order.
    let mut batch = Vec::new();
    for id in 0..100 {
        batch.extend_from_slice(
            format!("{{\"execute\": \"query-version\", \"id\": {id}}}").as_bytes(),
        );
    }
    c.send_raw(&batch);
    for id in 0..100 {
        let r = c.recv();
        assert_eq!(r["id"], id);
        assert!(r.get("return").is_some());
    }
}

#[test]
fn single_quoted_strings_are_accepted() {
    let s = server();
    let mut c = s.connect();
    c.send_raw(b"{'execute': 'qmp_capabilities', 'id': 'it\\'s \"q\"'}");
    let r = c.recv();
    assert_eq!(r, json!({"return": {}, "id": "it's \"q\""}));
}

#[test]
fn control_character_resets_the_parser() {
    let s = server();
    let mut c = s.client();
    // A half-sent request, abandoned with a control character (the spec's
    // recovery), then a good one.
    c.send_raw(b"{\"execute\": \"query-version\", \"arguments\": {\"a\": [1, ");
    c.send_raw(b"\x0c{\"execute\": \"query-version\", \"id\": 5}");
    assert_eq!(
        error_of(&c.recv()).unwrap(),
        generic("JSON parse error, stray '\u{c}'")
    );
    assert_eq!(c.recv()["id"], 5);
    // 0xFF, for old clients.
    c.send_raw(b"{\"execute\": \"query-ver\xff{\"execute\": \"query-version\", \"id\": 6}");
    assert_eq!(
        error_of(&c.recv()).unwrap(),
        generic("JSON parse error, stray '\u{fffd}'")
    );
    assert_eq!(c.recv()["id"], 6);
}

#[test]
fn output_is_ascii_with_non_ascii_escaped() {
    let s = server();
    let mut c = s.client();
    c.send_raw("{\"execute\": \"query-version\", \"id\": \"h\u{e9}\u{1F600}\"}".as_bytes());
    let line = c.recv_line();
    assert!(
        line.contains("\"id\": \"h\\u00E9\\uD83D\\uDE00\""),
        "{line}"
    );
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["id"], "h\u{e9}\u{1F600}");
}

#[test]
fn query_commands_lists_every_command() {
    let s = TestServer::start(QmpServerOptions::new(), |srv| {
        srv.register("x-test", |_: mainloop::qmp::NoArgs| Ok(()))
            .unwrap();
    });
    let mut c = s.client();
    let list = c.ok("query-commands", Value::Null);
    let mut names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "qmp_capabilities",
            "query-commands",
            "query-version",
            "quit",
            "x-test"
        ]
    );
    assert_eq!(list[0].as_object().unwrap().len(), 1, "only 'name'");
}
