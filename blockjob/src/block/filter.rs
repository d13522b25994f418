//! The filter nodes a block job puts above the node it works on, for the
//! job's lifetime, as QEMU does: `copy-on-read` (block-stream, `file`
//! child), `commit_top` (intermediate block-commit, `backing` child,
//! read-only), `mirror_top` (blockdev-mirror and active commit, `backing`
//! child) and `copy-before-write` (blockdev-backup, `file` child).
//!
//! A filter forwards every request to its child. The `copy-on-read`
//! filter also copies, before a read, what its child does not hold but a
//! layer above the stream's base does into the child (QEMU's `bottom`
//! option), so that reading through it populates the top.
//!
//! The filter is a node of the graph, named `filter-node-name` or, if
//! that is absent, with a generated `#blockN` name (QEMU's implicit
//! node); `blockdev-del` of it is refused as QEMU refuses it (a stream
//! holds its filter as a `root` user, `Node X is in use`; the other jobs
//! op-block theirs) and the job removes it from the graph when it ends.
//! Parents of the filtered node keep pointing at it: the graph queries
//! see the filter where QEMU shows it, and guest reads (exports) are sent
//! through it ([`BlockNode::guest_read`]); other I/O goes to the node.

use std::sync::Arc;

use super::graph::GraphRef;
use super::PermGuard;
use super::{BlockDriver, BlockGraph, BlockNode, BlockStatus, BoxFuture, Buffer, ImageInfo, Perm};
use crate::{Error, Result};

/// Which filter a job inserts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FilterKind {
    /// `copy-on-read` above a stream's top.
    CopyOnRead,
    /// `commit_top` above an intermediate commit's top.
    CommitTop,
    /// `mirror_top` above a mirror's source (and an active commit's top).
    MirrorTop,
    /// `copy-before-write` above a backup's source.
    CopyBeforeWrite,
}

impl FilterKind {
    /// QEMU's driver name.
    pub fn driver_name(self) -> &'static str {
        match self {
            FilterKind::CopyOnRead => "copy-on-read",
            FilterKind::CommitTop => "commit_top",
            FilterKind::MirrorTop => "mirror_top",
            FilterKind::CopyBeforeWrite => "copy-before-write",
        }
    }

    /// Whether the child is the filter's `backing` child (else `file`).
    fn backing_child(self) -> bool {
        matches!(self, FilterKind::CommitTop | FilterKind::MirrorTop)
    }

    /// Whether QEMU's error texts for this filter's creation start with
    /// `Could not create node: ` (filters made by `bdrv_insert_node`).
    fn inserted(self) -> bool {
        matches!(self, FilterKind::CopyOnRead | FilterKind::CopyBeforeWrite)
    }
}

/// Whether `driver` is one of the job filters.
pub fn is_job_filter(driver: &str) -> bool {
    matches!(
        driver,
        "copy-on-read" | "commit_top" | "mirror_top" | "copy-before-write"
    )
}

/// The node a job filter filters, if `node` is one.
pub fn filtered_child(node: &BlockNode) -> Option<Arc<BlockNode>> {
    if !is_job_filter(node.driver_name()) {
        return None;
    }
    node.backing().or_else(|| node.file_child())
}

/// QEMU's `id_wellformed`: a letter, then letters, digits, `-`, `.`, `_`.
fn well_formed(name: &str) -> bool {
    let mut c = name.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '.' | '_'))
}

/// The filter driver: forwards to its child.
struct FilterDriver {
    kind: FilterKind,
    child: PermGuard,
    filename: String,
    /// For `copy-on-read`: the layers below the child whose data a read
    /// copies up (above the stream's base).
    cor_layers: Vec<Arc<BlockNode>>,
}

impl FilterDriver {
    fn child(&self) -> &Arc<BlockNode> {
        self.child.node()
    }

    /// Copies into the child what it lacks in `[offset, offset+len)` and
    /// a layer of `cor_layers` holds.
    async fn copy_on_read(&self, offset: u64, len: u64) -> Result<()> {
        let child = self.child();
        let end = offset + len;
        let mut off = offset;
        while off < end {
            let (st, n) = child.block_status(off, end - off).await?;
            let n = n.clamp(1, end - off);
            if !st.allocated && self.below_allocated(off, n).await? {
                // Aligned: on an `O_DIRECT` file it goes through unbounced.
                let buf = Buffer::aligned(n as usize).map_err(|e| Error::io(&self.filename, e))?;
                let buf = child.read(off, buf).await?;
                child.write_unchanged(off, buf).await?;
            }
            off += n;
        }
        Ok(())
    }

    /// Whether any layer of `cor_layers` has `[off, off+n)` allocated
    /// (the status of its first byte decides, as block status does).
    async fn below_allocated(&self, off: u64, n: u64) -> Result<bool> {
        for l in &self.cor_layers {
            if l.block_status(off, n).await?.0.allocated {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

impl BlockDriver for FilterDriver {
    fn driver_name(&self) -> &'static str {
        self.kind.driver_name()
    }
    fn filename(&self) -> &str {
        &self.filename
    }
    fn len(&self) -> u64 {
        self.child().len()
    }
    fn file_child(&self) -> Option<Arc<BlockNode>> {
        (!self.kind.backing_child()).then(|| self.child().clone())
    }
    fn backing(&self) -> Option<Arc<BlockNode>> {
        self.kind.backing_child().then(|| self.child().clone())
    }
    fn read<'a>(&'a self, offset: u64, buf: Buffer) -> BoxFuture<'a, Result<Buffer>> {
        Box::pin(async move {
            if self.kind == FilterKind::CopyOnRead {
                self.copy_on_read(offset, buf.len() as u64).await?;
            }
            self.child().read(offset, buf).await
        })
    }
    fn write<'a>(&'a self, offset: u64, buf: Buffer) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.child().write(offset, buf))
    }
    fn write_keep<'a>(&'a self, offset: u64, buf: Buffer) -> BoxFuture<'a, Result<Buffer>> {
        Box::pin(self.child().write_keep(offset, buf))
    }
    fn write_zeroes<'a>(&'a self, offset: u64, len: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.child().write_zeroes(offset, len))
    }
    fn discard<'a>(&'a self, offset: u64, len: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.child().discard(offset, len))
    }
    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.child().flush())
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
        // The child belongs to the graph, not to the filter.
        Box::pin(async { Ok(()) })
    }
    fn info(&self) -> ImageInfo {
        let c = self.child().info();
        ImageInfo {
            format: self.kind.driver_name().into(),
            filename: self.filename.clone(),
            virtual_size: self.len(),
            cluster_size: c.cluster_size,
            dirty: Some(false),
            ..Default::default()
        }
    }
}

/// What a job asks for when it inserts its filter.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct FilterOptions {
    /// The filter.
    pub kind: FilterKind,
    /// `filter-node-name`; `None`: an implicit `#blockN` name.
    pub node_name: Option<String>,
    /// The job's permission user name, whose restrictions on the child
    /// the filter (part of the job) is not held to.
    pub job_user: String,
    /// For `copy-on-read`: the layers a read copies up from.
    pub cor_layers: Vec<Arc<BlockNode>>,
}

impl FilterOptions {
    /// Options for `kind` with an implicit name.
    pub fn new(kind: FilterKind, job_user: impl Into<String>) -> Self {
        FilterOptions {
            kind,
            node_name: None,
            job_user: job_user.into(),
            cor_layers: Vec::new(),
        }
    }
    /// The filter's node name (`filter-node-name`).
    pub fn node_name(mut self, name: Option<String>) -> Self {
        self.node_name = name;
        self
    }
    /// The layers a `copy-on-read` filter copies up from.
    pub fn cor_layers(mut self, layers: Vec<Arc<BlockNode>>) -> Self {
        self.cor_layers = layers;
        self
    }
}

/// A job's filter in the graph; dropping it takes the filter out of the
/// graph and releases its hold on the child.
pub struct FilterGuard {
    node: Arc<BlockNode>,
    graph: GraphRef,
    root: Option<PermGuard>,
}

impl std::fmt::Debug for FilterGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilterGuard")
            .field("node", &self.node.name())
            .finish()
    }
}

impl FilterGuard {
    /// The filter node.
    pub fn node(&self) -> &Arc<BlockNode> {
        &self.node
    }
}

impl Drop for FilterGuard {
    fn drop(&mut self) {
        log::debug!("removing filter node '{}'", self.node.name());
        self.root.take();
        if let Some(c) = filtered_child(&self.node) {
            c.set_read_filter(None);
        }
        self.graph.remove_node(&self.node);
    }
}

/// Inserts a job filter above `child` in `graph`.
///
/// # Errors
///
/// QEMU's texts: `Invalid node-name: 'X'`, `Duplicate nodes with
/// node-name='X'` (with `Could not create node: ` in front for
/// `copy-on-read` and `copy-before-write`), or a permission conflict on
/// the child.
pub fn insert_filter(
    graph: &BlockGraph,
    child: &Arc<BlockNode>,
    opts: FilterOptions,
) -> Result<FilterGuard> {
    let prefix = if opts.kind.inserted() {
        "Could not create node: "
    } else {
        ""
    };
    let name = match &opts.node_name {
        Some(n) if !well_formed(n) => {
            return Err(Error::Job(format!("{prefix}Invalid node-name: '{n}'")));
        }
        Some(n) => {
            if graph.nodes().iter().any(|x| x.name() == n) {
                return Err(Error::Job(format!(
                    "{prefix}Duplicate nodes with node-name='{n}'"
                )));
            }
            n.clone()
        }
        None => graph.auto_name(),
    };
    // QEMU names an implicit filter, and mirror_top, commit_top and
    // copy-before-write always, by the child's file name; a named
    // copy-on-read gets a `json:` name from its options.
    let filename = if opts.kind == FilterKind::CopyOnRead && opts.node_name.is_some() {
        format!(
            "json:{}",
            qemu_json(&serde_json::json!({"driver": "copy-on-read", "file": node_json(child)}))
        )
    } else {
        child.filename().to_string()
    };
    // copy-on-read writes what it copies into its child; the others
    // only pass requests on (a read-only child stays usable, as for
    // `aio-img commit` of a read-only top).
    let (perm, shared) = match opts.kind {
        FilterKind::CopyOnRead => (Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED, Perm::ALL),
        _ => (Perm::CONSISTENT_READ, Perm::ALL),
    };
    let role = if opts.kind.backing_child() {
        "backing"
    } else {
        "file"
    };
    let guard = child.attach_ignoring(
        &name,
        role,
        perm,
        shared,
        std::slice::from_ref(&opts.job_user),
    )?;
    let driver = FilterDriver {
        kind: opts.kind,
        child: guard,
        filename,
        cor_layers: opts.cor_layers,
    };
    let read_only = opts.kind == FilterKind::CommitTop;
    let node = BlockNode::new(name, Box::new(driver), read_only);
    // A stream's block backend is on its filter (`blockdev-del`: `Node X
    // is in use`); the other jobs' filters are op-blocked instead.
    let root = if opts.kind == FilterKind::CopyOnRead {
        Some(node.attach(&opts.job_user, "root", Perm::NONE, Perm::ALL)?)
    } else {
        None
    };
    let node = graph.add(node)?;
    child.set_read_filter(Some(Arc::downgrade(&node)));
    log::debug!(
        "inserted {} filter '{}' above '{}'",
        opts.kind.driver_name(),
        node.name(),
        child.name()
    );
    Ok(FilterGuard {
        node,
        graph: graph.handle(),
        root,
    })
}

/// A node's options as QEMU's `json:` file names show them: the driver,
/// and the `file` child's (a protocol node: its `filename`).
fn node_json(node: &BlockNode) -> serde_json::Value {
    match node.file_child() {
        Some(f) => serde_json::json!({"driver": node.driver_name(), "file": node_json(&f)}),
        None => serde_json::json!({"driver": node.driver_name(), "filename": node.filename()}),
    }
}

/// `node` and the nodes below it as QEMU's graph queries walk its
/// backing chain (top first): a job filter's next node is its child, and
/// a node whose backing node has a job filter above it continues with the
/// filter (QEMU moved the backing link onto the filter).
pub fn query_chain(graph: &BlockGraph, node: &Arc<BlockNode>) -> Vec<Arc<BlockNode>> {
    let filters: Vec<(Arc<BlockNode>, Arc<BlockNode>)> = graph
        .nodes()
        .into_iter()
        .filter_map(|f| filtered_child(&f).map(|c| (f, c)))
        .collect();
    let mut out = vec![node.clone()];
    while let Some(cur) = out.last() {
        let next = match filtered_child(cur) {
            Some(c) => Some(c),
            None => cur.backing().map(|b| {
                filters
                    .iter()
                    .find(|(_, c)| Arc::ptr_eq(c, &b))
                    .map_or(b, |(f, _)| f.clone())
            }),
        };
        // A cycle cannot happen in a well-formed graph; stop anyway.
        match next {
            Some(n) if !out.iter().any(|o| Arc::ptr_eq(o, &n)) => out.push(n),
            _ => break,
        }
    }
    out
}

/// JSON as QEMU prints a `json:` file name: `", "` between members,
/// `": "` after keys, members in insertion order.
fn qemu_json(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(o) => {
            let members: Vec<String> = o
                .iter()
                .map(|(k, x)| format!("{}: {}", serde_json::Value::from(k.as_str()), qemu_json(x)))
                .collect();
            format!("{{{}}}", members.join(", "))
        }
        other => other.to_string(),
    }
}
