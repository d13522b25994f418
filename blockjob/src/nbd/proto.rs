//! The NBD wire format: magics, option and command numbers, flags, and the
//! fixed-size headers of the transmission phase, as in the NBD protocol
//! specification (`doc/proto.md` of NetworkBlockDevice/nbd). Shared by the
//! export server and the client driver.
//!
//! Everything on the wire is big-endian. Encoders write into a caller's
//! buffer; decoders take exactly the header's bytes and check its magic, so
//! a peer sending garbage gets a clear error rather than a misparse.

use std::fmt;

/// `NBDMAGIC`: the first eight bytes the server sends.
pub const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the prefix of every client option.
pub const OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
/// The prefix of every option reply.
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The prefix of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server may omit the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client wants no zero padding after `EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option: select an export, old-fashioned (no error path).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end negotiation without an export.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export without selecting it.
pub const OPT_INFO: u32 = 6;
/// Option: describe and select an export.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list the metadata contexts matching queries.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts for `BLOCK_STATUS`.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: use extended (64-bit) headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: done, success.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a `LIST`.
pub const REP_SERVER: u32 = 2;
/// Option reply: one `NBD_INFO_*` item of `INFO`/`GO`.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Error replies have this bit set.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Error: the option is not supported.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Error: syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Error: not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// Error: TLS is required first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Error: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// Error: the client must honour block sizes (send `NBD_INFO_BLOCK_SIZE`).
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// Error: the request or option is too big.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// Info item: size and transmission flags (mandatory in `GO` replies).
pub const INFO_EXPORT: u16 = 0;
/// Info item: the export's canonical name.
pub const INFO_NAME: u16 = 1;
/// Info item: a human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Info item: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the other flags are valid (always set).
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `FLUSH` is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: the `FUA` command flag is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: rotational media (schedule accordingly).
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: `TRIM` is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `WRITE_ZEROES` is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: the `DF` (don't fragment) flag is supported.
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections see each other's writes.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `RESIZE` is supported.
pub const TFLAG_SEND_RESIZE: u16 = 1 << 9;
/// Transmission flag: `CACHE` is supported.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: the `FAST_ZERO` flag is supported.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: flush to stable storage.
pub const CMD_FLUSH: u16 = 3;
/// Command: discard.
pub const CMD_TRIM: u16 = 4;
/// Command: prefetch.
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status for the selected metadata contexts.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access (durable before the reply).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (`WRITE_ZEROES`): do not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag (`READ`): reply in one data chunk, no holes.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag (`BLOCK_STATUS`): one extent per context is enough.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag (`WRITE_ZEROES`): fail rather than be slow.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: the last chunk of this request.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured chunk: no payload (only to end a request).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Structured chunk: offset + data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured chunk: offset + length of a hole that reads as zeroes.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Structured chunk: context id + extents (length, flags).
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Structured chunk: an error (errno, message).
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// Structured chunk: an error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// `base:allocation` extent flag: unallocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` extent flag: reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// Error on the wire: operation not permitted (e.g. write to read-only).
pub const EPERM: u32 = 1;
/// Error on the wire: I/O error.
pub const EIO: u32 = 5;
/// Error on the wire: out of memory.
pub const ENOMEM: u32 = 12;
/// Error on the wire: invalid argument (e.g. past the end of the export).
pub const EINVAL: u32 = 22;
/// Error on the wire: no space left.
pub const ENOSPC: u32 = 28;
/// Error on the wire: request too large.
pub const EOVERFLOW: u32 = 75;
/// Error on the wire: not supported (e.g. `FAST_ZERO` that would be slow).
pub const ENOTSUP: u32 = 95;
/// Error on the wire: the server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// The metadata context of allocation status every server offers.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// Prefix of QEMU's dirty-bitmap metadata contexts.
pub const META_QEMU_DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";

/// The longest string (export name, message) the spec allows.
pub const MAX_STRING: usize = 4096;
/// The largest payload of one request this implementation accepts or sends
/// (32 MiB, QEMU's limit too).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// The largest option payload a server accepts before replying
/// `ERR_TOO_BIG` and dropping the connection.
pub const MAX_OPTION: u32 = 64 << 10;

/// The size of an option header after the magic: option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// The size of a request header.
pub const REQUEST_LEN: usize = 28;
/// The size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// The size of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;

/// A header did not start with the magic it must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadMagic {
    /// What the header should have been.
    pub what: &'static str,
    /// The magic received.
    pub got: u64,
}

impl fmt::Display for BadMagic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad {} magic {:#x}", self.what, self.got)
    }
}

impl std::error::Error for BadMagic {}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// A client option header: `IHAVEOPT`, option number, payload length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// `OPT_*`.
    pub option: u32,
    /// The payload bytes that follow.
    pub len: u32,
}

impl OptionHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[..8].copy_from_slice(&OPTS_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Decodes the header.
    ///
    /// # Errors
    ///
    /// [`BadMagic`] if it does not start with `IHAVEOPT`.
    pub fn decode(b: &[u8; OPTION_HEADER_LEN]) -> Result<Self, BadMagic> {
        let magic = be64(b, 0);
        if magic != OPTS_MAGIC {
            return Err(BadMagic {
                what: "option",
                got: magic,
            });
        }
        Ok(Self {
            option: be32(b, 8),
            len: be32(b, 12),
        })
    }
}

/// An option reply header: magic, option, reply type, payload length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReply {
    /// The option answered.
    pub option: u32,
    /// `REP_*`.
    pub reply: u32,
    /// The payload bytes that follow.
    pub len: u32,
}

impl OptionReply {
    /// The encoded size.
    pub const LEN: usize = 20;

    /// Encodes the header.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&REP_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.reply.to_be_bytes());
        b[16..20].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Decodes the header.
    ///
    /// # Errors
    ///
    /// [`BadMagic`] if the magic is wrong.
    pub fn decode(b: &[u8; Self::LEN]) -> Result<Self, BadMagic> {
        let magic = be64(b, 0);
        if magic != REP_MAGIC {
            return Err(BadMagic {
                what: "option reply",
                got: magic,
            });
        }
        Ok(Self {
            option: be32(b, 8),
            reply: be32(b, 12),
            len: be32(b, 16),
        })
    }
}

/// A transmission request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// `CMD_FLAG_*`.
    pub flags: u16,
    /// `CMD_*`.
    pub kind: u16,
    /// Opaque to the server, echoed in the reply.
    pub cookie: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Byte count (for `WRITE`, the payload that follows).
    pub len: u32,
}

impl Request {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Decodes the header.
    ///
    /// # Errors
    ///
    /// [`BadMagic`] if the magic is wrong (the connection cannot be
    /// resynchronised and must be dropped).
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Self, BadMagic> {
        let magic = be32(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(BadMagic {
                what: "request",
                got: magic.into(),
            });
        }
        Ok(Self {
            flags: be16(b, 4),
            kind: be16(b, 6),
            cookie: be64(b, 8),
            offset: be64(b, 16),
            len: be32(b, 24),
        })
    }
}

/// A simple reply header (data, for a successful `READ`, follows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    /// 0 or an `E*` error number.
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

impl SimpleReply {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b
    }
}

/// A structured reply chunk header (payload of `len` bytes follows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StructuredReply {
    /// `REPLY_FLAG_*`.
    pub flags: u16,
    /// `REPLY_TYPE_*`.
    pub kind: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// Payload length.
    pub len: u32,
}

impl StructuredReply {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; STRUCTURED_REPLY_LEN] {
        let mut b = [0u8; STRUCTURED_REPLY_LEN];
        b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..20].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// The first four bytes of any reply decide its kind; the rest of the
/// header follows. The client reads 16 bytes, decodes with this, and reads
/// four more for a structured chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A complete simple reply header.
    Simple(SimpleReply),
    /// A structured chunk: flags, type, cookie known; the length is in the
    /// next four bytes.
    Structured {
        /// `REPLY_FLAG_*`.
        flags: u16,
        /// `REPLY_TYPE_*`.
        kind: u16,
        /// The request's cookie.
        cookie: u64,
    },
}

impl ReplyHeader {
    /// Decodes the first 16 bytes of a reply.
    ///
    /// # Errors
    ///
    /// [`BadMagic`] for anything that is neither reply magic.
    pub fn decode(b: &[u8; 16]) -> Result<Self, BadMagic> {
        match be32(b, 0) {
            SIMPLE_REPLY_MAGIC => Ok(ReplyHeader::Simple(SimpleReply {
                error: be32(b, 4),
                cookie: be64(b, 8),
            })),
            STRUCTURED_REPLY_MAGIC => Ok(ReplyHeader::Structured {
                flags: be16(b, 4),
                kind: be16(b, 6),
                cookie: be64(b, 8),
            }),
            m => Err(BadMagic {
                what: "reply",
                got: m.into(),
            }),
        }
    }
}

/// Reads a big-endian `u32` length-prefixed string from `b` at `*at`,
/// advancing `*at`. `None` if it runs past `b`, exceeds [`MAX_STRING`] or
/// is not UTF-8.
pub fn take_string(b: &[u8], at: &mut usize) -> Option<String> {
    let len = take_u32(b, at)? as usize;
    if len > MAX_STRING {
        return None;
    }
    let end = at.checked_add(len)?;
    let s = std::str::from_utf8(b.get(*at..end)?).ok()?.to_owned();
    *at = end;
    Some(s)
}

/// Reads a big-endian `u32` at `*at`, advancing it.
pub fn take_u32(b: &[u8], at: &mut usize) -> Option<u32> {
    let end = at.checked_add(4)?;
    let v = b.get(*at..end)?;
    *at = end;
    Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
}

/// Reads a big-endian `u16` at `*at`, advancing it.
pub fn take_u16(b: &[u8], at: &mut usize) -> Option<u16> {
    let end = at.checked_add(2)?;
    let v = b.get(*at..end)?;
    *at = end;
    Some(u16::from_be_bytes([v[0], v[1]]))
}

/// Reads a big-endian `u64` at `*at`, advancing it.
pub fn take_u64(b: &[u8], at: &mut usize) -> Option<u64> {
    let end = at.checked_add(8)?;
    let v = b.get(*at..end)?;
    *at = end;
    let mut x = [0u8; 8];
    x.copy_from_slice(v);
    Some(u64::from_be_bytes(x))
}

/// Appends a `u32`-length-prefixed string.
pub fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The payload of `OPT_GO`/`OPT_INFO`: an export name and the info items
/// the client asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoRequest {
    /// The export name ("" = the default export).
    pub name: String,
    /// Requested `INFO_*` items.
    pub info: Vec<u16>,
}

impl GoRequest {
    /// Parses the payload; `None` if it is malformed (reply `ERR_INVALID`).
    pub fn parse(b: &[u8]) -> Option<Self> {
        let mut at = 0;
        let name = take_string(b, &mut at)?;
        let n = take_u16(b, &mut at)?;
        let info = (0..n)
            .map(|_| take_u16(b, &mut at))
            .collect::<Option<Vec<_>>>()?;
        (at == b.len()).then_some(Self { name, info })
    }

    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_string(&mut out, &self.name);
        out.extend_from_slice(&(self.info.len() as u16).to_be_bytes());
        for i in &self.info {
            out.extend_from_slice(&i.to_be_bytes());
        }
        out
    }
}

/// The payload of `OPT_SET_META_CONTEXT` / `OPT_LIST_META_CONTEXT`: an
/// export name and context queries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// The export the contexts are for.
    pub export: String,
    /// The queries (full names or namespace prefixes like `qemu:`).
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Parses the payload; `None` if it is malformed.
    pub fn parse(b: &[u8]) -> Option<Self> {
        let mut at = 0;
        let export = take_string(b, &mut at)?;
        let n = take_u32(b, &mut at)?;
        let mut queries = Vec::new();
        for _ in 0..n {
            queries.push(take_string(b, &mut at)?);
        }
        (at == b.len()).then_some(Self { export, queries })
    }

    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_string(&mut out, &self.export);
        out.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            put_string(&mut out, q);
        }
        out
    }
}

/// The name of a command, for logs and errors.
pub fn command_name(kind: u16) -> &'static str {
    match kind {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown",
    }
}

/// The wire error number for an OS error number from the block layer:
/// the spec's errors pass through, everything else is `EIO`.
pub fn errno_of(os: Option<i32>) -> u32 {
    const PASS: [u32; 6] = [EPERM, ENOSPC, EINVAL, ENOMEM, EOVERFLOW, ENOTSUP];
    match os.and_then(|n| u32::try_from(n).ok()) {
        Some(n) if PASS.contains(&n) => n,
        _ => EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_layout_matches_the_spec() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 0x1000,
            len: 512,
        };
        let b = r.encode();
        assert_eq!(&b[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..8], &[0, 1, 0, 1]);
        assert_eq!(&b[24..], &[0, 0, 2, 0]);
        assert_eq!(Request::decode(&b), Ok(r));
    }

    #[test]
    fn request_with_wrong_magic_is_refused() {
        let mut b = [0u8; REQUEST_LEN];
        b[0] = 0x12;
        assert_eq!(
            Request::decode(&b),
            Err(BadMagic {
                what: "request",
                got: 0x1200_0000
            })
        );
    }

    #[test]
    fn reply_header_tells_simple_from_structured() {
        let s = SimpleReply {
            error: EINVAL,
            cookie: 9,
        };
        let mut b = [0u8; 16];
        b.copy_from_slice(&s.encode());
        assert_eq!(ReplyHeader::decode(&b), Ok(ReplyHeader::Simple(s)));
        let c = StructuredReply {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_OFFSET_HOLE,
            cookie: 7,
            len: 12,
        }
        .encode();
        b.copy_from_slice(&c[..16]);
        assert_eq!(
            ReplyHeader::decode(&b),
            Ok(ReplyHeader::Structured {
                flags: REPLY_FLAG_DONE,
                kind: REPLY_TYPE_OFFSET_HOLE,
                cookie: 7
            })
        );
        assert!(ReplyHeader::decode(&[0xff; 16]).is_err());
    }

    #[test]
    fn go_request_rejects_trailing_and_short_payloads() {
        let g = GoRequest {
            name: "disk".into(),
            info: vec![INFO_BLOCK_SIZE],
        };
        let mut b = g.encode();
        assert_eq!(GoRequest::parse(&b), Some(g));
        b.push(0);
        assert_eq!(GoRequest::parse(&b), None);
        assert_eq!(GoRequest::parse(&[0, 0, 0, 9, b'a']), None);
        assert_eq!(GoRequest::parse(&[0xff, 0xff, 0xff, 0xff]), None);
    }

    proptest! {
        #[test]
        fn request_round_trips(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) {
            let r = Request { flags, kind, cookie, offset, len };
            prop_assert_eq!(Request::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn option_parsers_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = GoRequest::parse(&b);
            let _ = MetaContextRequest::parse(&b);
            let mut h = [0u8; OPTION_HEADER_LEN];
            let n = b.len().min(OPTION_HEADER_LEN);
            h[..n].copy_from_slice(&b[..n]);
            let _ = OptionHeader::decode(&h);
        }

        #[test]
        fn meta_context_round_trips(export in "[a-z]{0,8}", queries in proptest::collection::vec("[a-z:]{0,12}", 0..4)) {
            let m = MetaContextRequest { export, queries };
            prop_assert_eq!(MetaContextRequest::parse(&m.encode()), Some(m));
        }
    }
}
