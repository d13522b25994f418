//! The QMP wire format: what a request must look like, and how replies,
//! events and the greeting are written.
//!
//! Output follows QEMU byte for byte where that is cheap: `", "` and `": "`
//! separators, members in QEMU's order, ASCII only (everything else escaped
//! as `\uXXXX`), each message followed by CRLF.

use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};

use super::error::QmpError;

/// The version a server reports in its greeting and in `query-version`.
///
/// Serialises as QEMU's `VersionInfo`:
/// `{"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct QmpVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
    /// Free-form package description (QEMU: distribution and build).
    pub package: String,
}

impl QmpVersion {
    /// A version with the given numbers and package string.
    pub fn new(major: u32, minor: u32, micro: u32, package: impl Into<String>) -> Self {
        Self {
            major,
            minor,
            micro,
            package: package.into(),
        }
    }
}

impl Default for QmpVersion {
    /// 10.0.0, package `aio-runtime <version of this crate>`: clients that
    /// check QEMU's version see a recent one.
    fn default() -> Self {
        Self::new(10, 0, 0, concat!("aio-runtime ", env!("CARGO_PKG_VERSION")))
    }
}

impl Serialize for QmpVersion {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Triple {
            micro: u32,
            minor: u32,
            major: u32,
        }
        let mut st = s.serialize_struct("VersionInfo", 2)?;
        st.serialize_field(
            "qemu",
            &Triple {
                micro: self.micro,
                minor: self.minor,
                major: self.major,
            },
        )?;
        st.serialize_field("package", &self.package)?;
        st.end()
    }
}

/// When an event happened: wall-clock time since the Unix epoch, both
/// members -1 if the host time could not be read (as the spec says).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[non_exhaustive]
pub struct Timestamp {
    /// Whole seconds.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

impl Timestamp {
    /// Now.
    pub fn now() -> Self {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => Self {
                seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                microseconds: i64::from(d.subsec_micros()),
            },
            Err(_) => Self {
                seconds: -1,
                microseconds: -1,
            },
        }
    }
}

/// An asynchronous event, as delivered to clients and subscribers.
///
/// On the wire: `{"timestamp": {...}, "event": NAME, "data": {...}}`, with
/// `data` left out when there is none.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct QmpEvent {
    /// The event name, e.g. `"BLOCK_JOB_COMPLETED"`.
    pub name: String,
    /// Event-specific data (a JSON object), if any.
    pub data: Option<Value>,
    /// When it was emitted.
    pub timestamp: Timestamp,
}

impl QmpEvent {
    /// An event stamped now; `Value::Null` data means "no data".
    pub fn new(name: impl Into<String>, data: Value) -> Self {
        Self {
            name: name.into(),
            data: (!data.is_null()).then_some(data),
            timestamp: Timestamp::now(),
        }
    }
}

impl Serialize for QmpEvent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Event", 3)?;
        st.serialize_field("timestamp", &self.timestamp)?;
        st.serialize_field("event", &self.name)?;
        if let Some(data) = &self.data {
            st.serialize_field("data", data)?;
        }
        st.end()
    }
}

/// The greeting sent on connect.
#[derive(Serialize)]
pub(crate) struct Greeting<'a> {
    #[serde(rename = "QMP")]
    qmp: GreetingBody<'a>,
}

#[derive(Serialize)]
struct GreetingBody<'a> {
    version: &'a QmpVersion,
    capabilities: &'a [&'a str],
}

impl<'a> Greeting<'a> {
    /// Our greeting: no capabilities are offered (there is no OOB).
    pub(crate) fn new(version: &'a QmpVersion) -> Self {
        Self {
            qmp: GreetingBody {
                version,
                capabilities: &[],
            },
        }
    }
}

/// A success reply.
#[derive(Serialize)]
struct ReturnReply<'a> {
    #[serde(rename = "return")]
    ret: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

/// An error reply.
#[derive(Serialize)]
struct ErrorReply<'a> {
    error: &'a QmpError,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

/// The encoded reply to a command: `return` (with `{}` for a command that
/// returns nothing) or `error`, with the request's `id` if it had one.
pub(crate) fn encode_reply(result: &Result<Value, QmpError>, id: Option<&Value>) -> Vec<u8> {
    match result {
        Ok(Value::Null) => encode(&ReturnReply {
            ret: &Value::Object(Map::new()),
            id,
        }),
        Ok(v) => encode(&ReturnReply { ret: v, id }),
        Err(e) => encode(&ErrorReply { error: e, id }),
    }
}

/// A parsed, well-formed request.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Request {
    /// The command name (`execute`).
    pub(crate) name: String,
    /// `arguments`, or an empty object.
    pub(crate) args: Map<String, Value>,
    /// `id`, echoed in the reply.
    pub(crate) id: Option<Value>,
}

/// A request that is not well-formed: the error, and the `id` to echo if
/// the input was an object with one (QEMU echoes it here too).
pub(crate) type BadRequest = (QmpError, Option<Value>);

/// Checks a parsed value the way QEMU's `qmp_dispatch_check_obj` does.
pub(crate) fn check_request(v: Value) -> Result<Request, BadRequest> {
    let Value::Object(mut obj) = v else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = obj.remove("id");
    let fail = |desc: String, id: Option<Value>| Err((QmpError::generic(desc), id));
    for (key, value) in &obj {
        match key.as_str() {
            "execute" if !value.is_string() => {
                return fail(format!("QMP input member '{key}' must be a string"), id);
            }
            "arguments" if !value.is_object() => {
                return fail("QMP input member 'arguments' must be an object".into(), id);
            }
            "execute" | "arguments" => {}
            // "exec-oob" lands here: OOB is not offered, so QEMU rejects it
            // as unexpected too.
            _ => return fail(format!("QMP input member '{key}' is unexpected"), id),
        }
    }
    let Some(Value::String(name)) = obj.remove("execute") else {
        return fail("QMP input lacks member 'execute'".into(), id);
    };
    let args = match obj.remove("arguments") {
        Some(Value::Object(args)) => args,
        _ => Map::new(),
    };
    Ok(Request { name, args, id })
}

/// Serialises one message with QEMU's formatting, followed by CRLF.
pub(crate) fn encode<T: Serialize + ?Sized>(msg: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, QmpFormatter);
    if let Err(e) = msg.serialize(&mut ser) {
        // Only a Serialize impl that fails on purpose gets here.
        log::error!("QMP: cannot serialise a message: {e}");
        out.clear();
        let err = QmpError::generic(format!("internal error: cannot serialise the reply: {e}"));
        let mut ser = serde_json::Serializer::with_formatter(&mut out, QmpFormatter);
        let _ = ErrorReply {
            error: &err,
            id: None,
        }
        .serialize(&mut ser);
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// QEMU's output style: `", "` and `": "`, ASCII only.
struct QmpFormatter;

impl serde_json::ser::Formatter for QmpFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let bytes = fragment.as_bytes();
        if bytes.iter().all(|&b| b < 0x7f) {
            return w.write_all(bytes);
        }
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if c.is_ascii() && c != '\u{7f}' {
                continue;
            }
            w.write_all(&bytes[start..i])?;
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                write!(w, "\\u{:04X}", u)?;
            }
            start = i + c.len_utf8();
        }
        w.write_all(&bytes[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn greeting_has_qemu_shape_and_order() {
        let v = QmpVersion::new(10, 0, 2, "pkg");
        assert_eq!(
            text(encode(&Greeting::new(&v))),
            "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \
             \"package\": \"pkg\"}, \"capabilities\": []}}\r\n"
        );
    }

    #[test]
    fn encode_reply_when_null_then_empty_object_and_id() {
        assert_eq!(
            text(encode_reply(
                &Ok(Value::Null),
                Some(&json!({"nested": [1, "x"]}))
            )),
            "{\"return\": {}, \"id\": {\"nested\": [1, \"x\"]}}\r\n"
        );
        assert_eq!(
            text(encode_reply(&Err(QmpError::generic("no")), None)),
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}}\r\n"
        );
    }

    #[test]
    fn encode_when_non_ascii_then_escaped() {
        assert_eq!(
            text(encode(&json!("h\u{e9}\u{1F600}\u{7f}\n"))),
            "\"h\\u00E9\\uD83D\\uDE00\\u007F\\n\"\r\n"
        );
    }

    #[test]
    fn event_has_timestamp_first_and_no_null_data() {
        let mut ev = QmpEvent::new("STOP", Value::Null);
        ev.timestamp = Timestamp {
            seconds: 1,
            microseconds: 2,
        };
        assert_eq!(
            text(encode(&ev)),
            "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"STOP\"}\r\n"
        );
        ev.data = Some(json!({"a": 1}));
        assert!(text(encode(&ev)).ends_with("\"event\": \"STOP\", \"data\": {\"a\": 1}}\r\n"));
    }

    #[test]
    fn timestamp_now_is_after_2020() {
        let t = Timestamp::now();
        assert!(t.seconds > 1_577_836_800);
        assert!((0..1_000_000).contains(&t.microseconds));
    }

    fn check(v: Value) -> Result<Request, (String, Option<Value>)> {
        check_request(v).map_err(|(e, id)| (e.desc, id))
    }

    #[test]
    fn check_request_when_well_formed_then_parts_extracted() {
        let r = check(json!({"execute": "x", "arguments": {"a": 1}, "id": [1]})).unwrap();
        assert_eq!(r.name, "x");
        assert_eq!(r.args, *json!({"a": 1}).as_object().unwrap());
        assert_eq!(r.id, Some(json!([1])));
        let r = check(json!({"execute": "y"})).unwrap();
        assert!(r.args.is_empty() && r.id.is_none());
    }

    #[test]
    fn check_request_errors_match_qemu() {
        let cases = [
            (json!([1, 2]), "QMP input must be a JSON object"),
            (
                json!({"execute": 42}),
                "QMP input member 'execute' must be a string",
            ),
            (json!({"arguments": {}}), "QMP input lacks member 'execute'"),
            (
                json!({"execute": "query-version", "bogus": 1}),
                "QMP input member 'bogus' is unexpected",
            ),
            (
                json!({"execute": "x", "arguments": [1]}),
                "QMP input member 'arguments' must be an object",
            ),
            (
                json!({"exec-oob": "x"}),
                "QMP input member 'exec-oob' is unexpected",
            ),
        ];
        for (input, desc) in cases {
            assert_eq!(check(input.clone()).unwrap_err().0, desc, "{input}");
        }
    }

    #[test]
    fn check_request_when_bad_but_object_then_id_kept() {
        let (desc, id) = check(json!({"execute": 1, "id": "a"})).unwrap_err();
        assert!(desc.contains("must be a string"));
        assert_eq!(id, Some(json!("a")));
        assert_eq!(check(json!(["id"])).unwrap_err().1, None);
    }
}
