//! Input framing: cutting a client's byte stream into JSON values.
//!
//! QEMU's JSON streamer needs no newlines: it counts braces and brackets and
//! hands every complete top-level value to the parser. [`JsonSplitter`] does
//! the same one byte at a time, so a value may arrive split across any
//! number of reads and one read may carry many values. It tracks strings
//! (with escapes) so that brackets inside them do not count, and it rewrites
//! QMP's input extensions into standard JSON for `serde_json`:
//! `'single-quoted'` strings become double-quoted, and `\'` becomes `'`.
//!
//! Errors, and how the stream recovers from them (as QEMU's lexer does):
//!
//! * a *stray* byte — an ASCII control character other than `\t`, `\r`,
//!   `\n` anywhere, a control character or `0xFE`/`0xFF` inside a string, or
//!   a non-ASCII byte outside a string — drops the value in progress and
//!   reports `JSON parse error, stray '…'`. Input is then skipped up to the
//!   next structural character (`{ } [ ] , :`) or control character. This is
//!   the spec's way for a client to force the parser into a known state.
//! * a value longer than the size limit reports an error as soon as the
//!   limit is crossed; the rest of that value is then *skipped without being
//!   buffered* (brackets and strings are still tracked to find its end), so
//!   memory stays bounded and the next value is read normally.
//! * nesting deeper than the depth limit is reported and skipped the same
//!   way.
//!
//! Syntax errors inside a well-bracketed value (`{"a": }`) are not the
//! splitter's business: the value is handed on and `serde_json` reports it.

use super::error::QmpError;

/// Default limit on the size of one JSON value, in bytes.
pub(crate) const DEFAULT_MAX_VALUE_BYTES: usize = 1 << 20;
/// Limit on nesting depth. `serde_json` refuses 128 levels; QEMU allows 1024.
pub(crate) const MAX_NESTING: usize = 100;

/// One item cut from the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A complete top-level value, rewritten as standard JSON.
    Value(Vec<u8>),
    /// A lexical error or a limit; the value in progress (if any) is dropped.
    Error(FrameError),
}

/// A framing error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// A byte that cannot appear where it did.
    Stray(u8),
    /// A value exceeded `limit` bytes.
    TooLarge { limit: usize },
    /// A value nested deeper than `limit` levels.
    TooDeep { limit: usize },
}

impl FrameError {
    /// The error reply for this framing error (QEMU's texts; the limits are
    /// named).
    pub(crate) fn to_qmp(self) -> QmpError {
        match self {
            FrameError::Stray(b) => {
                let c = if b < 0x80 { b as char } else { '\u{fffd}' };
                QmpError::generic(format!("JSON parse error, stray '{c}'"))
            }
            FrameError::TooLarge { limit } => QmpError::generic(format!(
                "JSON token size limit exceeded (a value may be at most {limit} bytes)"
            )),
            FrameError::TooDeep { limit } => QmpError::generic(format!(
                "JSON nesting depth limit exceeded (at most {limit} levels)"
            )),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lex {
    /// Between tokens.
    Normal,
    /// Inside a string opened by `quote`; `escape` after a backslash.
    Str { quote: u8, escape: bool },
    /// Inside a number or keyword that is itself the top-level value.
    Bare,
    /// After a stray byte: skipping to a resynchronisation point.
    Recover,
}

/// Splits a byte stream into top-level JSON values; see the module docs.
#[derive(Debug)]
pub(crate) struct JsonSplitter {
    buf: Vec<u8>,
    /// Bytes of the current value seen so far (kept or skipped).
    size: usize,
    depth: usize,
    lex: Lex,
    /// The current value broke a limit: track its end, keep nothing.
    discarding: bool,
    max_size: usize,
    max_depth: usize,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn is_structural(b: u8) -> bool {
    matches!(b, b'{' | b'}' | b'[' | b']' | b',' | b':')
}

impl JsonSplitter {
    /// A splitter with the given value size limit and depth limit.
    pub(crate) fn new(max_size: usize, max_depth: usize) -> Self {
        Self {
            buf: Vec::new(),
            size: 0,
            depth: 0,
            lex: Lex::Normal,
            discarding: false,
            max_size: max_size.max(1),
            max_depth: max_depth.clamp(1, MAX_NESTING),
        }
    }

    /// Whether a value is partly read (for diagnostics at disconnect).
    pub(crate) fn in_value(&self) -> bool {
        self.depth > 0 || matches!(self.lex, Lex::Str { .. } | Lex::Bare)
    }

    /// Feeds `data`; appends every value completed and every error found.
    pub(crate) fn feed(&mut self, data: &[u8], out: &mut Vec<Frame>) {
        for &b in data {
            self.byte(b, out);
        }
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Frame>) {
        match self.lex {
            Lex::Recover => {
                if is_structural(b) || (b < 0x20 && b != b'\t') || b >= 0xfe {
                    self.lex = Lex::Normal;
                    self.normal(b, out);
                }
            }
            Lex::Str { quote, escape } => self.string(b, quote, escape, out),
            Lex::Bare => {
                if is_ws(b)
                    || is_structural(b)
                    || b == b'"'
                    || b == b'\''
                    || !(0x20..0x80).contains(&b)
                {
                    self.finish(out);
                    self.normal(b, out);
                } else {
                    self.push(b, out);
                }
            }
            Lex::Normal => self.normal(b, out),
        }
    }

    fn normal(&mut self, b: u8, out: &mut Vec<Frame>) {
        if is_ws(b) {
            if self.depth > 0 {
                self.push(b, out);
            }
            return;
        }
        if !(0x20..0x80).contains(&b) {
            self.stray(b, out);
            return;
        }
        match b {
            b'{' | b'[' => {
                self.depth += 1;
                self.push(b, out);
                if self.depth > self.max_depth && !self.discarding {
                    self.start_discarding();
                    out.push(Frame::Error(FrameError::TooDeep {
                        limit: self.max_depth,
                    }));
                }
            }
            b'}' | b']' => {
                self.push(b, out);
                if self.depth <= 1 {
                    // The end of a value, or a closer with nothing open:
                    // handed on alone, serde_json says "expected value".
                    self.finish(out);
                } else {
                    self.depth -= 1;
                }
            }
            b'"' | b'\'' => {
                self.push(b'"', out);
                self.lex = Lex::Str {
                    quote: b,
                    escape: false,
                };
            }
            b',' | b':' if self.depth == 0 => {
                // A separator where a value should start: a value of its
                // own, which the parser rejects.
                self.push(b, out);
                self.finish(out);
            }
            _ => {
                self.push(b, out);
                if self.depth == 0 {
                    self.lex = Lex::Bare;
                }
            }
        }
    }

    fn string(&mut self, b: u8, quote: u8, escape: bool, out: &mut Vec<Frame>) {
        if !(0x20..0xfe).contains(&b) {
            self.stray(b, out);
            return;
        }
        if escape {
            self.lex = Lex::Str {
                quote,
                escape: false,
            };
            if b == b'\'' {
                self.push(b'\'', out);
            } else {
                self.push(b'\\', out);
                self.push(b, out);
            }
            return;
        }
        match b {
            b'\\' => {
                self.lex = Lex::Str {
                    quote,
                    escape: true,
                };
            }
            _ if b == quote => {
                self.push(b'"', out);
                self.lex = Lex::Normal;
                if self.depth == 0 {
                    self.finish(out);
                }
            }
            b'"' => {
                // A double quote inside a single-quoted string.
                self.push(b'\\', out);
                self.push(b'"', out);
            }
            _ => self.push(b, out),
        }
    }

    /// Appends a byte of the current value, enforcing the size limit.
    fn push(&mut self, b: u8, out: &mut Vec<Frame>) {
        self.size += 1;
        if self.discarding {
            return;
        }
        if self.size > self.max_size {
            let e = FrameError::TooLarge {
                limit: self.max_size,
            };
            self.start_discarding();
            out.push(Frame::Error(e));
            return;
        }
        self.buf.push(b);
    }

    fn start_discarding(&mut self) {
        self.discarding = true;
        // Give the memory back: a 1 MiB buffer per idle client adds up.
        self.buf = Vec::new();
    }

    /// The current value is complete: emit it (unless it broke a limit).
    fn finish(&mut self, out: &mut Vec<Frame>) {
        if !self.discarding {
            out.push(Frame::Value(std::mem::take(&mut self.buf)));
        }
        self.reset();
    }

    fn stray(&mut self, b: u8, out: &mut Vec<Frame>) {
        out.push(Frame::Error(FrameError::Stray(b)));
        self.buf.clear();
        self.reset();
        self.lex = Lex::Recover;
    }

    fn reset(&mut self) {
        self.size = 0;
        self.depth = 0;
        self.discarding = false;
        self.lex = Lex::Normal;
    }
}

/// The error reply for input that `serde_json` rejected, worded like QEMU's
/// parser where the cases correspond (`JSON parse error, expecting value`).
pub(crate) fn parse_error(err: &serde_json::Error, input: &[u8]) -> QmpError {
    let full = err.to_string();
    let msg = match full.rfind(" at line ") {
        Some(i) => &full[..i],
        None => full.as_str(),
    };
    let keyword = || {
        word_at(input, err.line(), err.column())
            .filter(|w| w.starts_with(|c: char| c.is_ascii_alphabetic()))
            .map(|w| format!("invalid keyword '{w}'"))
    };
    let detail = match msg {
        "expected value" => keyword().unwrap_or_else(|| "expecting value".into()),
        "expected ident" => keyword().unwrap_or_else(|| "invalid keyword".into()),
        "trailing comma" => "expecting value".into(),
        "key must be a string" => "key is not a string in object".into(),
        "expected `:`" => "missing : in object pair".into(),
        "expected `,` or `}`" => "expected separator in dict".into(),
        "expected `,` or `]`" => "expected separator in list".into(),
        "invalid escape" => "invalid escape sequence in string".into(),
        m if m.starts_with("EOF while parsing") => "premature EOI".into(),
        m => m.to_string(),
    };
    QmpError::generic(format!("JSON parse error, {detail}"))
}

/// The run of ASCII letters and digits around (1-based) `line`:`column`.
fn word_at(input: &[u8], line: usize, column: usize) -> Option<String> {
    let start_of_line = if line <= 1 {
        0
    } else {
        input
            .iter()
            .enumerate()
            .filter(|&(_, &b)| b == b'\n')
            .nth(line - 2)
            .map(|(i, _)| i + 1)?
    };
    let pos = (start_of_line + column.saturating_sub(1)).min(input.len().checked_sub(1)?);
    let is_word = |b: u8| b.is_ascii_alphanumeric();
    let mut lo = pos;
    if !is_word(input[lo]) {
        // serde_json reports the column after the offending character.
        lo = lo.checked_sub(1).filter(|&p| is_word(input[p]))?;
    }
    while lo > 0 && is_word(input[lo - 1]) {
        lo -= 1;
    }
    let mut hi = lo;
    while hi < input.len() && is_word(input[hi]) {
        hi += 1;
    }
    Some(String::from_utf8_lossy(&input[lo..hi]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(input: &[u8]) -> Vec<Frame> {
        let mut s = JsonSplitter::new(DEFAULT_MAX_VALUE_BYTES, MAX_NESTING);
        let mut out = Vec::new();
        s.feed(input, &mut out);
        out
    }

    fn values(frames: &[Frame]) -> Vec<String> {
        frames
            .iter()
            .map(|f| match f {
                Frame::Value(v) => String::from_utf8(v.clone()).unwrap(),
                Frame::Error(e) => format!("ERR {e:?}"),
            })
            .collect()
    }

    #[test]
    fn split_when_several_values_in_one_read_then_each_is_emitted() {
        let f = split(b"{\"a\": 1}{\"b\": [2, {}]}\n  {\"c\": \"}\"}");
        assert_eq!(
            values(&f),
            ["{\"a\": 1}", "{\"b\": [2, {}]}", "{\"c\": \"}\"}"]
        );
    }

    #[test]
    fn split_when_value_spans_reads_then_emitted_once_complete() {
        let mut s = JsonSplitter::new(1024, 10);
        let mut out = Vec::new();
        s.feed(b"{\"execute\": \"qu", &mut out);
        assert!(out.is_empty());
        assert!(s.in_value());
        s.feed(b"it\"}", &mut out);
        assert_eq!(values(&out), ["{\"execute\": \"quit\"}"]);
        assert!(!s.in_value());
    }

    #[test]
    fn split_when_brackets_and_escapes_inside_strings_then_ignored() {
        let f = split(br#"{"a": "[{\"}\\"}"#);
        assert_eq!(values(&f), [r#"{"a": "[{\"}\\"}"#]);
    }

    #[test]
    fn split_when_single_quoted_then_rewritten_as_standard_json() {
        let f = split(br#"{'execute': 'say "hi"', 'x': 'it\'s', "y": "\'"}"#);
        let v: serde_json::Value = match &f[..] {
            [Frame::Value(v)] => serde_json::from_slice(v).unwrap(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            v,
            serde_json::json!({"execute": "say \"hi\"", "x": "it's", "y": "'"})
        );
    }

    #[test]
    fn split_when_top_level_scalars_then_each_is_a_value() {
        let f = split(b"42 \"str\" true\n[1]");
        assert_eq!(values(&f), ["42", "\"str\"", "true", "[1]"]);
    }

    #[test]
    fn split_when_bare_token_split_across_reads_then_joined() {
        let mut s = JsonSplitter::new(1024, 10);
        let mut out = Vec::new();
        s.feed(b"12", &mut out);
        s.feed(b"34\n", &mut out);
        assert_eq!(values(&out), ["1234"]);
    }

    #[test]
    fn split_when_closer_without_opener_then_handed_on_alone() {
        let f = split(b"} ] ,");
        assert_eq!(values(&f), ["}", "]", ","]);
    }

    #[test]
    fn split_when_control_char_mid_value_then_stray_and_resync() {
        let f = split(b"{\"execute\": \x01 \"x\"}{\"a\": 1}");
        assert_eq!(
            f,
            [
                Frame::Error(FrameError::Stray(1)),
                // Recovery skips to the next structural character: the '}'.
                Frame::Value(b"}".to_vec()),
                Frame::Value(b"{\"a\": 1}".to_vec()),
            ]
        );
    }

    #[test]
    fn split_when_0xff_inside_string_then_stray() {
        let f = split(b"{\"a\": \"x\xff\ny\"}\n{}");
        assert_eq!(f[0], Frame::Error(FrameError::Stray(0xff)));
        assert_eq!(f.last().unwrap(), &Frame::Value(b"{}".to_vec()));
    }

    #[test]
    fn split_when_utf8_inside_string_then_kept() {
        let f = split("{\"a\": \"h\u{e9}llo \u{1F600}\"}".as_bytes());
        assert_eq!(values(&f), ["{\"a\": \"h\u{e9}llo \u{1F600}\"}"]);
    }

    #[test]
    fn split_when_non_ascii_outside_string_then_one_stray() {
        let f = split("\u{e9}{}".as_bytes());
        assert_eq!(
            f,
            [
                Frame::Error(FrameError::Stray(0xc3)),
                Frame::Value(b"{}".to_vec())
            ]
        );
    }

    #[test]
    fn split_when_value_too_large_then_one_error_and_rest_skipped() {
        let mut s = JsonSplitter::new(16, 10);
        let mut out = Vec::new();
        s.feed(b"{\"a\": \"0123456789", &mut out);
        assert_eq!(out, [Frame::Error(FrameError::TooLarge { limit: 16 })]);
        assert_eq!(s.buf.capacity(), 0, "nothing of the skipped value is kept");
        s.feed(b"0123456789\", \"b\": [1, \"}\", {}]}", &mut out);
        s.feed(b"{\"b\": 2}", &mut out);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[1], Frame::Value(b"{\"b\": 2}".to_vec()));
    }

    #[test]
    fn split_when_too_deep_then_error_and_skipped() {
        let mut s = JsonSplitter::new(1024, 3);
        let mut out = Vec::new();
        s.feed(b"[[[[[]]]]] [[[]]]", &mut out);
        assert_eq!(
            out,
            [
                Frame::Error(FrameError::TooDeep { limit: 3 }),
                Frame::Value(b"[[[]]]".to_vec())
            ]
        );
    }

    #[test]
    fn split_when_stray_while_discarding_then_reset() {
        let mut s = JsonSplitter::new(4, 10);
        let mut out = Vec::new();
        s.feed(b"{\"aaaaaa\x01{}", &mut out);
        assert_eq!(
            out,
            [
                Frame::Error(FrameError::TooLarge { limit: 4 }),
                Frame::Error(FrameError::Stray(1)),
                Frame::Value(b"{}".to_vec()),
            ]
        );
    }

    #[test]
    fn frame_errors_use_qemu_wording() {
        assert_eq!(
            FrameError::Stray(0x0c).to_qmp().desc,
            "JSON parse error, stray '\u{c}'"
        );
        assert_eq!(
            FrameError::Stray(0xff).to_qmp().desc,
            "JSON parse error, stray '\u{fffd}'"
        );
        assert!(FrameError::TooLarge { limit: 1048576 }
            .to_qmp()
            .desc
            .starts_with("JSON token size limit exceeded (a value may be at most 1048576 bytes"));
    }

    fn parse_desc(input: &str) -> String {
        let err = serde_json::from_slice::<serde_json::Value>(input.as_bytes()).unwrap_err();
        parse_error(&err, input.as_bytes()).desc
    }

    #[test]
    fn parse_error_when_value_missing_then_expecting_value() {
        assert_eq!(
            parse_desc(r#"{"execute": "query-version", "arguments": }"#),
            "JSON parse error, expecting value"
        );
        assert_eq!(parse_desc("}"), "JSON parse error, expecting value");
        assert_eq!(parse_desc("[1, ]"), "JSON parse error, expecting value");
    }

    #[test]
    fn parse_error_when_bad_keyword_then_named() {
        assert_eq!(
            parse_desc(r#"{"a": hello}"#),
            "JSON parse error, invalid keyword 'hello'"
        );
        assert_eq!(
            parse_desc("{\"a\":\n  tru}"),
            "JSON parse error, invalid keyword 'tru'"
        );
    }

    #[test]
    fn parse_error_when_structure_wrong_then_qemu_words() {
        assert_eq!(
            parse_desc(r#"{1: 2}"#),
            "JSON parse error, key is not a string in object"
        );
        assert_eq!(
            parse_desc(r#"{"a" 2}"#),
            "JSON parse error, missing : in object pair"
        );
        assert_eq!(
            parse_desc(r#"{"a": 2 "b": 3}"#),
            "JSON parse error, expected separator in dict"
        );
        assert_eq!(
            parse_desc(r#"[1 2]"#),
            "JSON parse error, expected separator in list"
        );
        assert_eq!(
            parse_desc(r#"{"a": "\q"}"#),
            "JSON parse error, invalid escape sequence in string"
        );
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            // Exactly representable floats: serde_json's default float
            // parser is not always correctly rounded.
            (-1_000_000i32..1_000_000).prop_map(|n| Value::from(f64::from(n) / 8.0)),
            // Brackets, quotes and escapes inside strings must not confuse
            // the splitter.
            "[a-z{}\\[\\]\"'\\\\ \u{e9}\u{1F600}\n\t]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-z\"{}]{0,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Serialised values separated by whitespace (or nothing between
    /// containers), plus the cut points.
    fn stream() -> impl Strategy<Value = (Vec<Value>, Vec<u8>, Vec<usize>)> {
        prop::collection::vec((json_value(), "[ \n\r\t]{0,3}", any::<bool>()), 1..6).prop_flat_map(
            |items| {
                let mut bytes = Vec::new();
                let mut values = Vec::new();
                for (v, sep, pretty) in items {
                    let text = if pretty {
                        serde_json::to_vec_pretty(&v).unwrap()
                    } else {
                        serde_json::to_vec(&v).unwrap()
                    };
                    bytes.extend_from_slice(&text);
                    // Scalars need a delimiter; containers do not.
                    if sep.is_empty() && !(v.is_object() || v.is_array()) {
                        bytes.push(b' ');
                    }
                    bytes.extend_from_slice(sep.as_bytes());
                    values.push(v);
                }
                // Bare scalars at the very end need a delimiter too.
                bytes.push(b'\n');
                let len = bytes.len();
                (
                    Just(values),
                    Just(bytes),
                    prop::collection::vec(0..=len, 0..8),
                )
            },
        )
    }

    fn feed_in_pieces(input: &[u8], cuts: &[usize], max: usize) -> Vec<Frame> {
        let mut cuts = cuts.to_vec();
        cuts.sort_unstable();
        let mut s = JsonSplitter::new(max, MAX_NESTING);
        let mut out = Vec::new();
        let mut prev = 0;
        for c in cuts.into_iter().chain(std::iter::once(input.len())) {
            s.feed(&input[prev..c], &mut out);
            prev = c;
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_split_of_valid_input_yields_the_same_values((values, bytes, cuts) in stream()) {
            let frames = feed_in_pieces(&bytes, &cuts, DEFAULT_MAX_VALUE_BYTES);
            let parsed: Vec<Value> = frames
                .iter()
                .map(|f| match f {
                    Frame::Value(v) => serde_json::from_slice(v).expect("valid JSON out"),
                    Frame::Error(e) => panic!("unexpected {e:?}"),
                })
                .collect();
            prop_assert_eq!(parsed, values);
        }

        #[test]
        fn garbage_never_panics_and_splits_do_not_matter(
            garbage in prop::collection::vec(any::<u8>(), 0..400),
            cuts in prop::collection::vec(0..400usize, 0..8),
        ) {
            let cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(garbage.len())).collect();
            let whole = feed_in_pieces(&garbage, &[], 64);
            let pieces = feed_in_pieces(&garbage, &cuts, 64);
            prop_assert_eq!(whole, pieces);
        }

        #[test]
        fn parse_error_texts_never_panic(input in prop::collection::vec(any::<u8>(), 0..64)) {
            if let Err(e) = serde_json::from_slice::<Value>(&input) {
                prop_assert!(parse_error(&e, &input).desc.starts_with("JSON parse error, "));
            }
        }

        #[test]
        fn after_garbage_a_control_char_resynchronises(
            garbage in prop::collection::vec(any::<u8>(), 0..400),
        ) {
            let mut input = garbage;
            input.extend_from_slice(b"\x01{\"execute\": \"query-version\", \"id\": 1}");
            let frames = feed_in_pieces(&input, &[], 64);
            prop_assert_eq!(
                frames.last(),
                Some(&Frame::Value(b"{\"execute\": \"query-version\", \"id\": 1}".to_vec()))
            );
            // Every value handed on is bounded by the limit.
            for f in &frames {
                if let Frame::Value(v) = f {
                    prop_assert!(v.len() <= 64);
                }
            }
        }
    }
}
