//! The block graph: opening images and chains, naming nodes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aio::file::Engine;
use serde_json::Value;

use super::file::{FileDriver, FileOpenOptions};
use super::nbd::{NbdDriver, NbdOptions};
use super::node::{DetectZeroes, RequestPolicy};
use super::null::NullDriver;
use super::qcow2::header::MAGIC;
use super::qcow2::Qcow2;
use super::raw::RawDriver;
use super::{BlockNode, BoxFuture, Perm};
use crate::{Error, Result};

/// The deepest backing chain we follow.
const MAX_CHAIN: usize = 64;

/// Options for [`BlockGraph::open_image`].
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct OpenOptions {
    /// Open read-only (backing files always are).
    pub read_only: bool,
    /// The format (`qcow2`, `raw`); `None` probes.
    pub format: Option<String>,
    /// The top node's name; `None` generates `#blockN`.
    pub node_name: Option<String>,
    /// Do not open the backing file named in the image.
    pub no_backing: bool,
    /// The file I/O engine.
    pub engine: Engine,
    /// Bypass the host page cache (`O_DIRECT`, QEMU's `cache.direct`);
    /// the backing chain inherits it.
    pub direct: bool,
    /// The qcow2 L2 table cache's size in bytes (QEMU's `l2-cache-size`);
    /// `None`: 8 MiB. At least two tables are cached. Not inherited by
    /// the backing chain.
    pub l2_cache_size: Option<u64>,
}

impl OpenOptions {
    /// Read-only, probed format, generated name.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets read-only.
    pub fn read_only(mut self, on: bool) -> Self {
        self.read_only = on;
        self
    }
    /// Sets the format instead of probing.
    pub fn format(mut self, f: impl Into<String>) -> Self {
        self.format = Some(f.into());
        self
    }
    /// Names the top node.
    pub fn node_name(mut self, n: impl Into<String>) -> Self {
        self.node_name = Some(n.into());
        self
    }
    /// Skips the backing chain.
    pub fn no_backing(mut self, on: bool) -> Self {
        self.no_backing = on;
        self
    }
    /// Sets the I/O engine.
    pub fn engine(mut self, e: Engine) -> Self {
        self.engine = e;
        self
    }
    /// Opens the files `O_DIRECT` (`cache.direct=on`).
    pub fn direct(mut self, on: bool) -> Self {
        self.direct = on;
        self
    }
    /// Sets the qcow2 L2 cache size in bytes (`l2-cache-size`).
    pub fn l2_cache_size(mut self, bytes: u64) -> Self {
        self.l2_cache_size = Some(bytes);
        self
    }
}

/// How a format node gets its backing child.
enum Backing {
    /// From the image header (opened read-only, recursively).
    FromHeader,
    /// None.
    Nothing,
    /// This node.
    Node(Arc<BlockNode>),
}

/// A set of named nodes: what `blockdev-add` adds to and what node names
/// and file names are looked up in.
#[derive(Default)]
pub struct BlockGraph {
    nodes: Arc<Mutex<Vec<Arc<BlockNode>>>>,
    next: AtomicU64,
    /// The clock drivers time their waits on (NBD `reconnect-delay`);
    /// `None`: realtime.
    clock: Mutex<Option<aio::ClockType>>,
}

impl std::fmt::Debug for BlockGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.nodes().iter().map(|n| n.name().to_string()))
            .finish()
    }
}

impl BlockGraph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the clock that drivers time their waits on (the NBD driver's
    /// `reconnect-delay` and backoff), for nodes added from now on. The
    /// default is [`ClockType::Realtime`](aio::ClockType::Realtime); a
    /// daemon under qtest uses the virtual clock.
    pub fn set_clock(&self, clock: aio::ClockType) {
        *self.clock.lock().unwrap_or_else(|e| e.into_inner()) = Some(clock);
    }

    fn clock(&self) -> aio::ClockType {
        self.clock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or(aio::ClockType::Realtime)
    }

    /// A handle on the node list that outlives a borrow of the graph (jobs
    /// drop nodes when they finish).
    pub(crate) fn handle(&self) -> GraphRef {
        GraphRef(self.nodes.clone())
    }

    /// Every node, in the order added (children before parents).
    pub fn nodes(&self) -> Vec<Arc<BlockNode>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Finds a node by node name, or else by file name (of a format node
    /// first, then of a protocol node).
    pub fn find(&self, name: &str) -> Option<Arc<BlockNode>> {
        let nodes = self.nodes();
        if let Some(n) = nodes.iter().find(|n| n.name() == name) {
            return Some(n.clone());
        }
        let canon = std::fs::canonicalize(name).ok();
        let same = |n: &Arc<BlockNode>| {
            n.filename() == name
                || (canon.is_some() && std::fs::canonicalize(n.filename()).ok() == canon)
        };
        nodes
            .iter()
            .rev()
            .find(|n| {
                n.driver_name() != "file" && !super::is_job_filter(n.driver_name()) && same(n)
            })
            .or_else(|| nodes.iter().find(|n| same(n)))
            .cloned()
    }

    pub(super) fn auto_name(&self) -> String {
        format!("#block{}", self.next.fetch_add(1, Ordering::Relaxed))
    }

    pub(super) fn add(&self, node: Arc<BlockNode>) -> Result<Arc<BlockNode>> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if nodes.iter().any(|n| n.name() == node.name()) {
            return Err(Error::InvalidArgument(format!(
                "Duplicate nodes with node-name='{}'",
                node.name()
            )));
        }
        nodes.push(node.clone());
        Ok(node)
    }

    fn check_name(&self, name: &str) -> Result<()> {
        if self.nodes().iter().any(|n| n.name() == name) {
            return Err(Error::InvalidArgument(format!(
                "Duplicate nodes with node-name='{name}'"
            )));
        }
        Ok(())
    }

    /// Removes a node and (if unused elsewhere) nothing else; the caller
    /// closes it first.
    pub fn remove(&self, name: &str) -> Option<Arc<BlockNode>> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let i = nodes.iter().position(|n| n.name() == name)?;
        Some(nodes.remove(i))
    }

    /// QMP `blockdev-del`: refuses a missing node, a node in use by a
    /// `root` user (an export), a node with an op blocker (a job) and a node that another node uses as a child;
    /// otherwise closes it and its children and removes from the graph
    /// every node below it that no remaining node uses.
    pub async fn blockdev_del(&self, name: &str) -> Result<()> {
        let node = self
            .nodes()
            .into_iter()
            .find(|n| n.name() == name)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("Failed to find node with node-name='{name}'"))
            })?;
        // A user in the `root` role is a block backend, e.g. an export.
        if node.users().iter().any(|(_, role, _, _)| role == "root") {
            return Err(Error::InvalidArgument(format!("Node {name} is in use")));
        }
        node.check_op_blockers()?;
        let children = |n: &Arc<BlockNode>| -> Vec<Arc<BlockNode>> {
            n.file_child().into_iter().chain(n.backing()).collect()
        };
        if let Some((p, role)) = self.parent_of(&node) {
            return Err(Error::InvalidArgument(format!(
                "Node '{name}' is busy: node is used as {role} of '{}'",
                p.name()
            )));
        }
        node.close().await?;
        // The node goes, and with it each descendant that no remaining node
        // uses (a shared backing image stays).
        let mut gone = vec![node.clone()];
        let mut i = 0;
        while i < gone.len() {
            for c in children(&gone[i]) {
                let used_elsewhere = self.nodes().iter().any(|p| {
                    !gone.iter().any(|g| Arc::ptr_eq(g, p))
                        && children(p).iter().any(|pc| Arc::ptr_eq(pc, &c))
                });
                if !used_elsewhere && !gone.iter().any(|g| Arc::ptr_eq(g, &c)) {
                    gone.push(c);
                }
            }
            i += 1;
        }
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.retain(|n| !gone.iter().any(|g| Arc::ptr_eq(g, n)));
        Ok(())
    }

    /// Closes every node, parents first, once no request runs on any of
    /// them (QEMU's `bdrv_close_all` drains first too): a request still in
    /// flight finishes before its node flushes and clears its dirty bit.
    /// A caller that must not hang on a stuck device bounds the wait
    /// itself (`aiod` gives up after a timeout and leaves the images
    /// dirty, to be repaired on their next open).
    pub async fn close_all(&self) -> Result<()> {
        let nodes = self.nodes();
        super::drain::wait_all_idle(&nodes).await;
        let mut first_err = None;
        for n in nodes.iter().rev() {
            if let Err(e) = n.close().await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Opens an image and, unless told not to, its backing chain:
    /// backing file names relative to the image's directory, formats from
    /// the backing format extension or probed, like QEMU.
    pub async fn open_image(
        &self,
        path: impl AsRef<Path>,
        opts: &OpenOptions,
    ) -> Result<Arc<BlockNode>> {
        let path = path.as_ref().to_path_buf();
        let mut seen = Vec::new();
        self.open_chain(path, opts.clone(), &mut seen).await
    }

    fn open_chain<'a>(
        &'a self,
        path: PathBuf,
        opts: OpenOptions,
        seen: &'a mut Vec<PathBuf>,
    ) -> BoxFuture<'a, Result<Arc<BlockNode>>> {
        Box::pin(async move {
            let name = path.display().to_string();
            let canon = std::fs::canonicalize(&path)
                .map_err(|e| Error::open(&name, crate::error::io_text(&e)))?;
            if seen.contains(&canon) {
                let chain: Vec<String> = seen.iter().map(|p| p.display().to_string()).collect();
                return Err(Error::open(
                    &name,
                    format!(
                        "Backing file loop: {} -> {}",
                        chain.join(" -> "),
                        canon.display()
                    ),
                ));
            }
            if seen.len() >= MAX_CHAIN {
                return Err(Error::open(&name, "Too many backing files (more than 64)"));
            }
            seen.push(canon);
            if let Some(n) = &opts.node_name {
                self.check_name(n)?;
            }
            let fopts = FileOpenOptions {
                direct: opts.direct,
                ..FileOpenOptions::new(!opts.read_only, opts.engine)
            };
            let file = self.open_file(&name, &fopts, None)?;
            let backing = if opts.no_backing {
                Backing::Nothing
            } else {
                Backing::FromHeader
            };
            let format = match &opts.format {
                Some(f) => f.clone(),
                None => probe(&file).await?,
            };
            let node_name = opts.node_name.clone();
            self.open_format_inner(
                file,
                &format,
                node_name,
                !opts.read_only,
                backing,
                &path,
                fopts,
                opts.l2_cache_size,
                seen,
            )
            .await
        })
    }

    fn open_file(
        &self,
        path: &str,
        opts: &FileOpenOptions,
        name: Option<String>,
    ) -> Result<Arc<BlockNode>> {
        let d = FileDriver::open(path, opts)?;
        let writable = d.writable();
        let name = match name {
            Some(n) => {
                self.check_name(&n)?;
                n
            }
            None => self.auto_name(),
        };
        self.add(BlockNode::new(name, Box::new(d), !writable))
    }

    #[allow(clippy::too_many_arguments)]
    async fn open_format_inner(
        &self,
        file: Arc<BlockNode>,
        format: &str,
        node_name: Option<String>,
        writable: bool,
        backing: Backing,
        path: &Path,
        file_opts: FileOpenOptions,
        l2_cache_size: Option<u64>,
        seen: &mut Vec<PathBuf>,
    ) -> Result<Arc<BlockNode>> {
        let name = node_name.unwrap_or_else(|| self.auto_name());
        self.check_name(&name)?;
        let mut perm = Perm::CONSISTENT_READ;
        if writable {
            perm |= Perm::WRITE | Perm::RESIZE;
        }
        let shared = Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED;
        let file_perm = file.attach(&name, "file", perm, shared)?;
        match format {
            "raw" => {
                let d = RawDriver::new(file_perm);
                self.add(BlockNode::new(name, Box::new(d), !writable))
            }
            "qcow2" => {
                let header = Qcow2::read_header(&file, writable).await?;
                let bnode = match backing {
                    Backing::Nothing => None,
                    Backing::Node(n) => Some(n),
                    Backing::FromHeader => match &header.backing_file {
                        None => None,
                        Some(b) => {
                            let bpath = resolve_backing(path, b);
                            let bopts = OpenOptions {
                                read_only: true,
                                format: header.backing_format().map(str::to_string),
                                node_name: None,
                                no_backing: false,
                                engine: file_opts.engine,
                                direct: file_opts.direct,
                                l2_cache_size: None,
                            };
                            let n =
                                self.open_chain(bpath, bopts, seen)
                                    .await
                                    .map_err(|e| match e {
                                        Error::Open { file, reason } => {
                                            Error::open(file.as_str(), reason)
                                        }
                                        e => e,
                                    })?;
                            Some(n)
                        }
                    },
                };
                let bperm = match bnode {
                    Some(b) => Some(b.attach(
                        &name,
                        "backing",
                        Perm::CONSISTENT_READ,
                        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED | Perm::GRAPH_MOD,
                    )?),
                    None => None,
                };
                let d = Qcow2::open(file_perm, header, bperm, writable, l2_cache_size).await?;
                self.add(BlockNode::new(name, Box::new(d), !writable))
            }
            other => Err(Error::open(
                file.filename(),
                format!("Unknown driver '{other}'"),
            )),
        }
    }

    /// Adds a node from QMP `blockdev-add` arguments, e.g.
    /// `{"driver":"qcow2","node-name":"top","file":{"driver":"file","filename":"t.qcow2"},"backing":"mid"}`.
    /// `file` may name an existing node; `backing` may name one, be
    /// `null` (no backing) or be absent (from the image header).
    pub async fn blockdev_add(&self, args: &Value) -> Result<Arc<BlockNode>> {
        let node = self.blockdev_add_inner(args).await?;
        node.set_added_by_user();
        Ok(node)
    }

    pub(crate) fn blockdev_add_inner<'a>(
        &'a self,
        args: &'a Value,
    ) -> BoxFuture<'a, Result<Arc<BlockNode>>> {
        Box::pin(async move {
            let node = self.blockdev_add_node(args).await?;
            if let Some(obj) = args.as_object() {
                let kept = obj
                    .iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "file" | "backing" | "read-only"))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                node.set_add_options(kept);
            }
            Ok(node)
        })
    }

    /// The child `key` of `blockdev-add` options `obj` (`file`, `image`):
    /// an existing node by name, or an inline object added now, which
    /// takes `read-only` and the `inherit` options of its parent unless it
    /// sets them itself.
    async fn child_arg(
        &self,
        obj: &serde_json::Map<String, Value>,
        key: &str,
        read_only: bool,
        inherit: &[&str],
    ) -> Result<Arc<BlockNode>> {
        match obj.get(key) {
            Some(Value::String(n)) => self.find(n).ok_or_else(|| {
                Error::InvalidArgument(format!("Cannot find device='{n}' nor node-name='{n}'"))
            }),
            Some(v @ Value::Object(_)) => {
                let mut v = v.clone();
                if let Some(o) = v.as_object_mut() {
                    if read_only {
                        o.entry("read-only").or_insert(Value::Bool(true));
                    }
                    for k in inherit {
                        if let Some(x) = obj.get(*k) {
                            o.entry(*k).or_insert(x.clone());
                        }
                    }
                }
                self.blockdev_add_inner(&v).await
            }
            _ => Err(Error::InvalidArgument(format!(
                "Parameter '{key}' is missing"
            ))),
        }
    }

    fn blockdev_add_node<'a>(&'a self, args: &'a Value) -> BoxFuture<'a, Result<Arc<BlockNode>>> {
        Box::pin(async move {
            let obj = args.as_object().ok_or_else(|| {
                Error::InvalidArgument("blockdev-add arguments must be an object".into())
            })?;
            let s = |k: &str| -> Result<Option<String>> {
                match obj.get(k) {
                    None => Ok(None),
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    Some(_) => Err(Error::InvalidArgument(format!(
                        "Invalid parameter type for '{k}', expected: string"
                    ))),
                }
            };
            let driver = s("driver")?
                .ok_or_else(|| Error::InvalidArgument("Parameter 'driver' is missing".into()))?;
            let node_name = s("node-name")?;
            let read_only = match obj.get("read-only") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(Error::InvalidArgument(
                        "Invalid parameter type for 'read-only', expected: boolean".into(),
                    ))
                }
            };
            let allowed: &[&str] = match driver.as_str() {
                "file" => &["filename", "aio"],
                "null-co" => &["size", "latency-ns", "read-zeroes"],
                "raw" => &["file"],
                "qcow2" => &["file", "backing", "l2-cache-size"],
                "blkdebug" => &["image", "inject-error"],
                "nbd" => &["server", "export", "reconnect-delay"],
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "Parameter 'driver' does not accept value '{other}'"
                    )))
                }
            };
            if let Some(k) = obj
                .keys()
                .find(|k| !allowed.contains(&k.as_str()) && !COMMON_OPTIONS.contains(&k.as_str()))
            {
                return Err(Error::InvalidArgument(format!(
                    "Parameter '{k}' is unexpected"
                )));
            }
            let common = CommonOptions::parse(obj)?;
            match driver.as_str() {
                "file" => {
                    let filename = s("filename")?.ok_or_else(|| {
                        Error::InvalidArgument("Parameter 'filename' is missing".into())
                    })?;
                    let engine = match s("aio")?.as_deref() {
                        None | Some("threads") => Engine::Threads,
                        Some("io_uring") => Engine::IoUring,
                        // Linux AIO's job (asynchronous O_DIRECT I/O) is
                        // done by io_uring here.
                        Some("native") if common.direct => Engine::IoUring,
                        Some("native") => {
                            return Err(Error::InvalidArgument(
                                "aio=native was specified, but it requires cache.direct=on, which was not specified."
                                    .into(),
                            ))
                        }
                        Some(o) => {
                            return Err(Error::InvalidArgument(format!(
                                "Parameter 'aio' does not accept value '{o}'"
                            )))
                        }
                    };
                    let fopts = FileOpenOptions {
                        direct: common.direct,
                        no_flush: common.no_flush,
                        auto_read_only: common.auto_read_only,
                        ..FileOpenOptions::new(!read_only, engine)
                    };
                    let node = self.open_file(&filename, &fopts, node_name)?;
                    node.set_request_policy(common.policy);
                    Ok(node)
                }
                "nbd" => {
                    let opts = NbdOptions::from_json(obj)?;
                    let name = node_name.unwrap_or_else(|| self.auto_name());
                    self.check_name(&name)?;
                    let d = NbdDriver::open(opts, read_only, self.clock()).await?;
                    let ro = d.read_only();
                    let node = self.add(BlockNode::new(name, Box::new(d), ro))?;
                    node.set_request_policy(common.policy);
                    Ok(node)
                }
                "null-co" => {
                    let size = match obj.get("size") {
                        None => 1 << 30,
                        Some(v) => v.as_u64().ok_or_else(|| {
                            Error::InvalidArgument(
                                "Invalid parameter type for 'size', expected: integer".into(),
                            )
                        })?,
                    };
                    let latency_ns = match obj.get("latency-ns") {
                        None => 0,
                        Some(v) => v.as_u64().ok_or_else(|| {
                            Error::InvalidArgument(
                                "Invalid parameter type for 'latency-ns', expected: integer".into(),
                            )
                        })?,
                    };
                    // Reads always return zeroes here; QEMU's
                    // `read-zeroes: false` leaves the buffer as it was,
                    // which zeroes are one valid instance of.
                    if obj.get("read-zeroes").is_some_and(|v| !v.is_boolean()) {
                        return Err(Error::InvalidArgument(
                            "Invalid parameter type for 'read-zeroes', expected: boolean".into(),
                        ));
                    }
                    let name = node_name.unwrap_or_else(|| self.auto_name());
                    self.check_name(&name)?;
                    let node = self.add(BlockNode::new(
                        name,
                        Box::new(NullDriver::new(size, latency_ns, self.clock())),
                        read_only,
                    ))?;
                    node.set_request_policy(common.policy);
                    Ok(node)
                }
                "blkdebug" => {
                    let rules = super::blkdebug::parse_rules(obj.get("inject-error"))?;
                    let image = self.child_arg(obj, "image", read_only, &[]).await?;
                    let name = node_name.unwrap_or_else(|| self.auto_name());
                    self.check_name(&name)?;
                    let writable = !read_only && !image.read_only();
                    let mut perm = Perm::CONSISTENT_READ;
                    if writable {
                        perm |= Perm::WRITE | Perm::RESIZE;
                    }
                    let guard = image.attach(&name, "image", perm, Perm::ALL)?;
                    let d = super::blkdebug::BlkdebugDriver::new(guard, rules);
                    let node = self.add(BlockNode::new(name, Box::new(d), !writable))?;
                    node.set_request_policy(common.policy);
                    Ok(node)
                }
                fmt => {
                    // Checked before an inline `file` is added.
                    let l2_cache_size = match obj.get("l2-cache-size") {
                        None => None,
                        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => {
                            Some(n.as_u64().ok_or_else(|| {
                                Error::InvalidArgument("l2-cache-size must not be negative".into())
                            })?)
                        }
                        Some(_) => {
                            return Err(Error::InvalidArgument(
                                "Invalid parameter type for 'l2-cache-size', expected: integer"
                                    .into(),
                            ))
                        }
                    };
                    // Inline children inherit these, as in QEMU.
                    let file = self
                        .child_arg(obj, "file", read_only, &["cache", "auto-read-only"])
                        .await?;
                    let backing = match obj.get("backing") {
                        None => Backing::FromHeader,
                        Some(Value::Null) => Backing::Nothing,
                        Some(Value::String(n)) => Backing::Node(self.find(n).ok_or_else(|| {
                            Error::InvalidArgument(format!(
                                "Cannot find device='{n}' nor node-name='{n}'"
                            ))
                        })?),
                        Some(v @ Value::Object(_)) => {
                            Backing::Node(self.blockdev_add_inner(v).await?)
                        }
                        Some(_) => {
                            return Err(Error::InvalidArgument(
                                "Invalid parameter type for 'backing', expected: string or null"
                                    .into(),
                            ))
                        }
                    };
                    if fmt == "raw" && !matches!(backing, Backing::FromHeader) {
                        return Err(Error::InvalidArgument(
                            "Parameter 'backing' is unexpected".into(),
                        ));
                    }
                    let path = PathBuf::from(file.filename());
                    let mut seen = Vec::new();
                    if let Ok(c) = std::fs::canonicalize(&path) {
                        seen.push(c);
                    }
                    let inline_file = matches!(obj.get("file"), Some(Value::Object(_)));
                    // `auto-read-only`: a file that could only be opened
                    // read-only makes the format node read-only too.
                    let fallback = common.auto_read_only && file.read_only();
                    let writable = !read_only && !fallback;
                    let file_opts = FileOpenOptions {
                        direct: common.direct,
                        no_flush: common.no_flush,
                        ..FileOpenOptions::new(false, Engine::Threads)
                    };
                    let r = self
                        .open_format_inner(
                            file.clone(),
                            fmt,
                            node_name,
                            writable,
                            backing,
                            &path,
                            file_opts,
                            l2_cache_size,
                            &mut seen,
                        )
                        .await;
                    if let Ok(n) = &r {
                        n.set_request_policy(common.policy);
                    }
                    if r.is_err() && inline_file {
                        // A failed blockdev-add leaves nothing behind, not
                        // even the protocol node it added for `file`.
                        self.remove(file.name());
                    }
                    r
                }
            }
        })
    }
}

/// A shared handle on a graph's node list.
#[derive(Clone)]
pub(crate) struct GraphRef(Arc<Mutex<Vec<Arc<BlockNode>>>>);

impl GraphRef {
    /// Every node, in the order added.
    pub(crate) fn nodes(&self) -> Vec<Arc<BlockNode>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces `from` by `to` for their users, as QEMU's
    /// `bdrv_replace_node` does at a mirror's or an active commit's pivot:
    /// every root on `from` (an export) moves to `to`, synchronously, and
    /// then every node whose backing child is `from` gets `to` instead (in
    /// memory; its image still names the old file, as in QEMU, until a
    /// management layer rewrites it). `to` itself and the nodes below it
    /// keep their links (a target backed by its source would otherwise
    /// become its own backing file).
    ///
    /// # Errors
    ///
    /// A root or parent that cannot take its permissions on `to`; the
    /// roots move all or none.
    pub(crate) async fn replace_node(
        &self,
        from: &Arc<BlockNode>,
        to: &Arc<BlockNode>,
    ) -> Result<()> {
        super::move_roots(from, to)?;
        let below_to = to.chain();
        for n in self.nodes() {
            let relink = n.backing().is_some_and(|b| Arc::ptr_eq(&b, from))
                && !Arc::ptr_eq(&n, to)
                && !below_to.iter().any(|c| Arc::ptr_eq(c, &n));
            if relink {
                n.set_backing(Some(to), false, None).await?;
            }
        }
        Ok(())
    }

    /// Removes `node` from the graph (not closing it).
    pub(crate) fn remove_node(&self, node: &Arc<BlockNode>) {
        let mut nodes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        nodes.retain(|n| !Arc::ptr_eq(n, node));
    }
}

/// A backing file name as QEMU resolves it: absolute as is, relative to
/// the directory of the image that names it.
fn resolve_backing(image: &Path, backing: &str) -> PathBuf {
    let b = Path::new(backing);
    if b.is_absolute() {
        return b.to_path_buf();
    }
    match image.parent() {
        Some(dir) => dir.join(b),
        None => b.to_path_buf(),
    }
}

/// The format of the image in `file`: `qcow2` by magic, else `raw`.
async fn probe(file: &BlockNode) -> Result<String> {
    if file.len() < 4 {
        return Ok("raw".into());
    }
    let b = file.read(0, vec![0; 4]).await?;
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Ok(if magic == MAGIC { "qcow2" } else { "raw" }.into())
}

/// Options every `blockdev-add` driver takes (QAPI's
/// `BlockdevOptionsBase`) besides `driver`, `node-name` and `read-only`.
const COMMON_OPTIONS: &[&str] = &[
    "driver",
    "node-name",
    "read-only",
    "cache",
    "discard",
    "detect-zeroes",
    "auto-read-only",
    "force-share",
];

/// The parsed [`COMMON_OPTIONS`].
struct CommonOptions {
    /// `cache.direct`.
    direct: bool,
    /// `cache.no-flush`.
    no_flush: bool,
    /// `auto-read-only`.
    auto_read_only: bool,
    /// `discard` and `detect-zeroes`.
    policy: RequestPolicy,
}

impl CommonOptions {
    fn parse(obj: &serde_json::Map<String, Value>) -> Result<CommonOptions> {
        let bad_type = |k: &str, want: &str| {
            Error::InvalidArgument(format!(
                "Invalid parameter type for '{k}', expected: {want}"
            ))
        };
        let flag = |o: &serde_json::Map<String, Value>, k: &str, path: &str| match o.get(k) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(bad_type(path, "boolean")),
        };
        let (mut direct, mut no_flush) = (false, false);
        match obj.get("cache") {
            None => {}
            Some(Value::Object(c)) => {
                if let Some(k) = c.keys().find(|k| *k != "direct" && *k != "no-flush") {
                    return Err(Error::InvalidArgument(format!(
                        "Parameter 'cache.{k}' is unexpected"
                    )));
                }
                direct = flag(c, "direct", "cache.direct")?;
                no_flush = flag(c, "no-flush", "cache.no-flush")?;
            }
            Some(_) => return Err(bad_type("cache", "object")),
        }
        let auto_read_only = flag(obj, "auto-read-only", "auto-read-only")?;
        // There are no image locks here, so nothing for force-share to
        // relax; only its type is checked.
        flag(obj, "force-share", "force-share")?;
        let word = |k: &str, values: &[&str]| -> Result<Option<usize>> {
            match obj.get(k) {
                None => Ok(None),
                Some(Value::String(v)) => {
                    values.iter().position(|x| x == v).map(Some).ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "Parameter '{k}' does not accept value '{v}'"
                        ))
                    })
                }
                Some(_) => Err(bad_type(k, "string")),
            }
        };
        // QEMU: `ignore`/`off` drop discard requests, `unmap`/`on` pass
        // them down. Without the option discards pass down here (QEMU's
        // default is `ignore`).
        let discard = word("discard", &["ignore", "off", "unmap", "on"])?.is_none_or(|i| i >= 2);
        let detect_zeroes = match word("detect-zeroes", &["off", "on", "unmap"])? {
            None | Some(0) => DetectZeroes::Off,
            Some(1) => DetectZeroes::On,
            Some(_) if discard => DetectZeroes::Unmap,
            // QEMU: `unmap` without discard=unmap acts as `on`.
            Some(_) => DetectZeroes::On,
        };
        Ok(CommonOptions {
            direct,
            no_flush,
            auto_read_only,
            policy: RequestPolicy {
                discard,
                detect_zeroes,
            },
        })
    }
}
