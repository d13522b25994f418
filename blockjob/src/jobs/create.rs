//! `blockdev-create` (QEMU's `block/create.c`): creating an image as a job
//! of type `create`. It is not a block job: it emits only
//! `JOB_STATUS_CHANGE`, is not listed by `query-block-jobs`, and, as in
//! QEMU, is not dismissed automatically (the client sends `job-dismiss`).
//! Progress is 0 of 1 while it runs and 1 of 1 once it has finished,
//! successfully or not, as in QEMU.
//!
//! Drivers: `file` (a host file of `size` bytes, preallocation `off`,
//! `falloc` or `full`) and `qcow2` (written into an opened `file` node:
//! version, cluster size, backing file and format, refcount width, lazy
//! refcounts, preallocation).

use std::sync::Arc;

use aio::file::{File, OpenOptions as FileOpen};
use aio::AioContext;
use parking_lot::Mutex;

use crate::block::{create_qcow2, BlockGraph, CreateOptions, Perm, PermGuard};
use crate::job::{BoxFuture, Job, JobControl, JobDriver, JobOptions, JobRegistry, JobType};
use crate::{Error, Result};

pub use crate::block::Preallocation;

/// What to create (QAPI's `BlockdevCreateOptions`, the drivers we have).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum CreateSpec {
    /// `driver: file`: a host file.
    File {
        /// Its name (created or truncated).
        filename: String,
        /// Its size in bytes.
        size: u64,
        /// How to allocate it.
        preallocation: Preallocation,
    },
    /// `driver: qcow2`: an image written into an opened `file` node.
    Qcow2 {
        /// The node name of the protocol node to write the image into.
        file: String,
        /// Size, cluster size, version, backing file.
        options: CreateOptions,
    },
}

struct CreateJob {
    spec: CreateSpec,
    graph: Arc<BlockGraph>,
    perm: Mutex<Option<PermGuard>>,
    user: String,
}

impl CreateJob {
    async fn create(&self) -> Result<()> {
        match &self.spec {
            CreateSpec::File {
                filename,
                size,
                preallocation,
            } => create_file(filename, *size, *preallocation).await,
            CreateSpec::Qcow2 { file, options } => {
                let node = self.graph.lookup(Some(file), Some(file))?;
                if node.driver_name() != "file" {
                    return Err(Error::InvalidArgument(format!(
                        "Node '{file}' is not a protocol node (driver 'file'): \
                         create the image on its file node"
                    )));
                }
                let guard =
                    node.attach(&self.user, "create", Perm::WRITE | Perm::RESIZE, Perm::ALL)?;
                *self.perm.lock() = Some(guard);
                create_qcow2(node.filename(), options).await?;
                // The image was written through its path; make the node see
                // the new size (same file, same size: no change on disk).
                let len = std::fs::metadata(node.filename())
                    .map_err(|e| Error::open(node.filename(), crate::error::io_text(&e)))?
                    .len();
                node.truncate(len).await
            }
        }
    }
}

impl JobDriver for CreateJob {
    fn job_type(&self) -> JobType {
        JobType::Create
    }
    fn run<'a>(&'a self, job: &'a JobControl) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            job.set_total(1);
            let r = self.create().await;
            job.add_progress(1);
            r
        })
    }
    fn clean(&self) {
        self.perm.lock().take();
    }
}

/// Creates (or truncates) a host file of `size` bytes.
async fn create_file(filename: &str, size: u64, prealloc: Preallocation) -> Result<()> {
    let opts = FileOpen::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true);
    let file = File::open(filename, &opts).map_err(|e| match e {
        aio::Error::Io { source, .. } => Error::InvalidArgument(format!(
            "Could not create '{filename}': {}",
            crate::error::io_text(&source)
        )),
        e => Error::io(filename, e),
    })?;
    let io = |e| Error::io(filename, e);
    match prealloc {
        Preallocation::Off => file.set_len(size).await.map_err(io)?,
        // ZERO_RANGE allocates the range, like posix_fallocate.
        Preallocation::Falloc => {
            file.set_len(size).await.map_err(io)?;
            if size > 0 {
                file.write_zeroes(0, size).await.map_err(io)?;
            }
        }
        Preallocation::Full => {
            const ZEROES: u64 = 1 << 20;
            let mut off = 0;
            while off < size {
                let n = ZEROES.min(size - off);
                file.write_at(vec![0u8; n as usize], off)
                    .await
                    .map_err(io)?;
                off += n;
            }
            file.set_len(size).await.map_err(io)?;
        }
        Preallocation::Metadata => {
            return Err(Error::InvalidArgument(
                "Unsupported preallocation mode 'metadata'".into(),
            ))
        }
    }
    file.flush().await.map_err(io)
}

/// `blockdev-create {job-id, options}`: creates the job (status
/// `created`), starts it, and returns it. Errors of the creation itself
/// (a missing directory, a missing or busy `file` node, a bad cluster
/// size) fail the job, as in QEMU; only a bad or duplicate job id is
/// refused here.
///
/// # Errors
///
/// `Invalid job ID 'X'`, `Job ID 'X' already in use`.
pub fn start_create(
    ctx: &AioContext,
    graph: &Arc<BlockGraph>,
    registry: &JobRegistry,
    job_id: &str,
    spec: CreateSpec,
) -> Result<Job> {
    let driver = Arc::new(CreateJob {
        spec,
        graph: graph.clone(),
        perm: Mutex::new(None),
        user: format!("job '{job_id}'"),
    });
    let job = registry.create(ctx, JobOptions::new(job_id).auto_dismiss(false), driver)?;
    job.start();
    Ok(job)
}
