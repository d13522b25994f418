//! The `blkdebug` filter driver (QEMU's, the part tests use): passes every
//! request to its `image` child, except those matching an `inject-error`
//! rule, which fail with the rule's errno. This is how error policies are
//! tested against a real image: `{"driver": "blkdebug", "image": {...},
//! "inject-error": [{"event": "write_aio", "errno": 28, "once": true}]}`
//! makes the next write fail with ENOSPC.
//!
//! Rules (QAPI's `BlkdebugInjectErrorOptions`): `event` — `read_aio`
//! (reads), `write_aio` (writes, zero writes, discards) or
//! `flush_to_disk`; `errno` (default 5, EIO); `sector` — only requests
//! covering that 512-byte sector; `once` — the rule goes away after
//! failing one request. QEMU's state machine (`state`, `set-state`), the
//! other events and `immediately` are not implemented: such options are
//! refused.
//!
//! One difference in meaning: QEMU's events are the ones a format driver
//! above signals on its `file` child (qcow2's `write_aio` before a data
//! write), so QEMU's rule fires only below a format node; here the event
//! is the kind of request reaching this node, so the filter works on top
//! of an image too (how the job tests use it).

use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::{BlockDriver, BlockNode, BlockStatus, BoxFuture, Buffer, ImageInfo, PermGuard};
use crate::{Error, Result};

/// The requests a rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    Read,
    Write,
    Flush,
}

#[derive(Clone, Debug)]
struct Rule {
    event: Event,
    errno: i32,
    sector: Option<u64>,
    once: bool,
}

/// Parses `inject-error` (absent: no rules).
pub(crate) fn parse_rules(v: Option<&Value>) -> Result<Vec<RuleSet>> {
    let bad = |m: String| Error::InvalidArgument(m);
    let list = match v {
        None => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(bad(
                "Invalid parameter type for 'inject-error', expected: array".into(),
            ))
        }
    };
    let mut out = Vec::new();
    for (i, r) in list.iter().enumerate() {
        let o = r.as_object().ok_or_else(|| {
            bad(format!(
                "Invalid parameter type for 'inject-error[{i}]', expected: object"
            ))
        })?;
        if let Some(k) = o
            .keys()
            .find(|k| !matches!(k.as_str(), "event" | "errno" | "sector" | "once"))
        {
            return Err(bad(format!(
                "Parameter 'inject-error[{i}].{k}' is not supported by this blkdebug"
            )));
        }
        let event = match o.get("event").and_then(Value::as_str) {
            Some("read_aio") => Event::Read,
            Some("write_aio") => Event::Write,
            Some("flush_to_disk") => Event::Flush,
            Some(e) => {
                return Err(bad(format!(
                    "Parameter 'inject-error[{i}].event' does not accept value '{e}'"
                )))
            }
            None => {
                return Err(bad(format!(
                    "Parameter 'inject-error[{i}].event' is missing"
                )))
            }
        };
        let int = |k: &str| -> Result<Option<i64>> {
            match o.get(k) {
                None => Ok(None),
                Some(v) => v.as_i64().map(Some).ok_or_else(|| {
                    bad(format!(
                        "Invalid parameter type for 'inject-error[{i}].{k}', expected: integer"
                    ))
                }),
            }
        };
        let errno = int("errno")?.unwrap_or(5);
        let errno = i32::try_from(errno)
            .ok()
            .filter(|e| *e > 0)
            .ok_or_else(|| bad(format!("Invalid errno {errno}")))?;
        let sector = match int("sector")? {
            Some(s) if s < 0 => None,
            Some(s) => Some(s as u64),
            None => None,
        };
        let once = match o.get("once") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(bad(format!(
                    "Invalid parameter type for 'inject-error[{i}].once', expected: boolean"
                )))
            }
        };
        out.push(RuleSet(Rule {
            event,
            errno,
            sector,
            once,
        }));
    }
    Ok(out)
}

/// One parsed rule (opaque outside this module).
pub(crate) struct RuleSet(Rule);

/// A `blkdebug` node over its `image` child.
pub(crate) struct BlkdebugDriver {
    image: PermGuard,
    rules: Mutex<Vec<Rule>>,
}

impl BlkdebugDriver {
    pub(crate) fn new(image: PermGuard, rules: Vec<RuleSet>) -> Self {
        BlkdebugDriver {
            image,
            rules: Mutex::new(rules.into_iter().map(|r| r.0).collect()),
        }
    }

    fn child(&self) -> &Arc<BlockNode> {
        self.image.node()
    }

    /// The error to fail a request with, if a rule matches it.
    fn check(&self, event: Event, offset: u64, len: u64) -> Result<()> {
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        let hit = rules.iter().position(|r| {
            r.event == event
                && r.sector
                    .is_none_or(|s| s * 512 < offset + len.max(1) && offset < (s + 1) * 512)
        });
        let Some(i) = hit else {
            return Ok(());
        };
        let errno = rules[i].errno;
        if rules[i].once {
            rules.remove(i);
        }
        Err(Error::io(
            self.child().filename(),
            aio::Error::Io {
                context: format!("blkdebug: injected error at offset {offset}"),
                source: std::io::Error::from_raw_os_error(errno),
            },
        ))
    }
}

impl BlockDriver for BlkdebugDriver {
    fn driver_name(&self) -> &'static str {
        "blkdebug"
    }
    fn filename(&self) -> &str {
        self.child().filename()
    }
    fn len(&self) -> u64 {
        self.child().len()
    }
    fn file_child(&self) -> Option<Arc<BlockNode>> {
        Some(self.child().clone())
    }
    fn read<'a>(&'a self, offset: u64, buf: Buffer) -> BoxFuture<'a, Result<Buffer>> {
        Box::pin(async move {
            self.check(Event::Read, offset, buf.len() as u64)?;
            self.child().read(offset, buf).await
        })
    }
    fn write<'a>(&'a self, offset: u64, buf: Buffer) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check(Event::Write, offset, buf.len() as u64)?;
            self.child().write(offset, buf).await
        })
    }
    fn write_keep<'a>(&'a self, offset: u64, buf: Buffer) -> BoxFuture<'a, Result<Buffer>> {
        Box::pin(async move {
            self.check(Event::Write, offset, buf.len() as u64)?;
            self.child().write_keep(offset, buf).await
        })
    }
    fn write_zeroes<'a>(&'a self, offset: u64, len: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check(Event::Write, offset, len)?;
            self.child().write_zeroes(offset, len).await
        })
    }
    fn discard<'a>(&'a self, offset: u64, len: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check(Event::Write, offset, len)?;
            self.child().discard(offset, len).await
        })
    }
    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.check(Event::Flush, 0, 0)?;
            self.child().flush().await
        })
    }
    fn truncate(&self, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.child().truncate(len))
    }
    fn block_status<'a>(
        &'a self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<(BlockStatus, u64)>> {
        Box::pin(self.child().block_status(offset, len))
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn info(&self) -> ImageInfo {
        ImageInfo {
            format: "blkdebug".into(),
            filename: self.filename().to_string(),
            virtual_size: self.len(),
            ..Default::default()
        }
    }
}
