//! fd handlers and the client types that group them.

use std::fmt;

use crate::AioContext;

/// A callback run on the context's home thread.
pub(crate) type Callback = Box<dyn FnMut(&AioContext) + Send>;
/// A busy-poll callback: returns whether there is work to do.
pub(crate) type PollCallback = Box<dyn FnMut(&AioContext) -> bool + Send>;

/// The kind of client an fd handler belongs to.
///
/// Client types let a caller stop one class of handlers from being
/// dispatched while it runs a nested poll (see
/// [`AioContext::disable_clients`]). Two types are predefined; embedders can
/// define up to 29 more with [`ClientType::custom`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientType(u8);

impl ClientType {
    /// The block layer's own fds (file I/O completions, thread-pool
    /// notifiers): always needed to make progress inside a drain.
    pub const INTERNAL: ClientType = ClientType(0);
    /// fds through which an outside party starts new work: a guest's
    /// ioeventfd, an NBD or vhost-user export socket.
    pub const EXTERNAL: ClientType = ClientType(1);

    /// The number of distinct client types.
    pub const COUNT: usize = 32;

    /// The bridge to an attached child context (see
    /// [`AioContext::attach_child`](crate::AioContext::attach_child)):
    /// reserved, always outermost-only.
    pub(crate) const CHILD: ClientType = ClientType(31);

    /// An embedder-defined client type, `n` in `2..31`.
    ///
    /// ```
    /// use aio::ClientType;
    /// assert!(ClientType::custom(5).is_some());
    /// assert!(ClientType::custom(1).is_none()); // 0 and 1 are predefined
    /// ```
    pub const fn custom(n: u8) -> Option<ClientType> {
        if n >= 2 && (n as usize) < Self::COUNT - 1 {
            Some(ClientType(n))
        } else {
            None
        }
    }

    pub(crate) fn index(self) -> usize {
        self.0 as usize
    }

    /// The mask holding only this type.
    pub const fn mask(self) -> ClientMask {
        ClientMask(1 << self.0)
    }
}

impl fmt::Debug for ClientType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ClientType::INTERNAL => f.write_str("INTERNAL"),
            ClientType::EXTERNAL => f.write_str("EXTERNAL"),
            ClientType::CHILD => f.write_str("CHILD"),
            ClientType(n) => write!(f, "custom({n})"),
        }
    }
}

/// A set of [`ClientType`]s.
///
/// ```
/// use aio::{ClientMask, ClientType};
/// let m = ClientType::EXTERNAL.mask() | ClientType::custom(3).unwrap().mask();
/// assert!(m.contains(ClientType::EXTERNAL));
/// assert!(!m.contains(ClientType::INTERNAL));
/// assert!(ClientMask::ALL.contains(ClientType::INTERNAL));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ClientMask(u32);

impl ClientMask {
    /// No client type.
    pub const NONE: ClientMask = ClientMask(0);
    /// Every client type.
    pub const ALL: ClientMask = ClientMask(u32::MAX);

    /// Whether `client` is in the set.
    pub const fn contains(self, client: ClientType) -> bool {
        self.0 & (1 << client.0) != 0
    }

    pub(crate) const fn bits(self) -> u32 {
        self.0
    }

    pub(crate) const fn from_bits(bits: u32) -> ClientMask {
        ClientMask(bits)
    }

    /// The mask of every type whose disable count is non-zero.
    pub(crate) fn from_counts(counts: &[u32; ClientType::COUNT]) -> ClientMask {
        let mut bits = 0u32;
        for (i, &n) in counts.iter().enumerate() {
            if n > 0 {
                bits |= 1 << i;
            }
        }
        ClientMask(bits)
    }

    pub(crate) fn types(self) -> impl Iterator<Item = ClientType> {
        (0..ClientType::COUNT as u8)
            .map(ClientType)
            .filter(move |c| self.contains(*c))
    }
}

impl std::ops::BitOr for ClientMask {
    type Output = ClientMask;
    fn bitor(self, rhs: ClientMask) -> ClientMask {
        ClientMask(self.0 | rhs.0)
    }
}

impl From<ClientType> for ClientMask {
    fn from(c: ClientType) -> ClientMask {
        c.mask()
    }
}

impl fmt::Debug for ClientMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.types()).finish()
    }
}

/// The callbacks for one fd, built with chained setters.
///
/// * `read` runs when the fd is readable, hung up or in error;
/// * `write` runs when it is writable or in error (both may run in one
///   dispatch, read first);
/// * `poll` is a busy-poll check run instead of sleeping while adaptive
///   polling is active (see [`PollParams`](crate::PollParams)); when it returns
///   `true`, `poll_ready` runs (or `read`, if there is no `poll_ready`).
///
/// Handlers are level-triggered: a readable fd is dispatched again on the
/// next iteration until its callback drains it.
///
/// ```
/// use aio::{ClientType, FdHandler};
/// let h = FdHandler::new(ClientType::EXTERNAL)
///     .on_read(|_ctx| { /* read the fd */ })
///     .on_poll(|_ctx| false);
/// # drop(h);
/// ```
pub struct FdHandler {
    pub(crate) client: ClientType,
    pub(crate) read: Option<Callback>,
    pub(crate) write: Option<Callback>,
    pub(crate) poll: Option<PollCallback>,
    pub(crate) poll_ready: Option<Callback>,
}

impl FdHandler {
    /// A handler with no callbacks yet, belonging to `client`.
    pub fn new(client: ClientType) -> Self {
        Self {
            client,
            read: None,
            write: None,
            poll: None,
            poll_ready: None,
        }
    }

    /// Sets the read callback.
    pub fn on_read(mut self, f: impl FnMut(&AioContext) + Send + 'static) -> Self {
        self.read = Some(Box::new(f));
        self
    }

    /// Sets the write callback.
    pub fn on_write(mut self, f: impl FnMut(&AioContext) + Send + 'static) -> Self {
        self.write = Some(Box::new(f));
        self
    }

    /// Sets the busy-poll check.
    pub fn on_poll(mut self, f: impl FnMut(&AioContext) -> bool + Send + 'static) -> Self {
        self.poll = Some(Box::new(f));
        self
    }

    /// Sets the callback run when the busy-poll check found work.
    pub fn on_poll_ready(mut self, f: impl FnMut(&AioContext) + Send + 'static) -> Self {
        self.poll_ready = Some(Box::new(f));
        self
    }
}

impl fmt::Debug for FdHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FdHandler")
            .field("client", &self.client)
            .field("read", &self.read.is_some())
            .field("write", &self.write.is_some())
            .field("poll", &self.poll.is_some())
            .field("poll_ready", &self.poll_ready.is_some())
            .finish()
    }
}
