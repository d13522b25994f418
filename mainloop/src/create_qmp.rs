//! QMP `blockdev-create {job-id, options}`: creates an image in a job of
//! type `create` (`blockjob::jobs::create`). Drivers `file` and `qcow2`;
//! qcow2 options our creator does not support are refused before the job
//! is created, with the option named.

use blockjob::block::CreateOptions;
use blockjob::jobs::{CreateSpec, Preallocation};
use serde_json::{json, Map, Value};

use crate::block_qmp::BlockState;
use crate::qmp::{ArgType, IntKind, QmpError, QmpServer, Schema, ServerError};

fn prealloc() -> ArgType {
    ArgType::enumeration(["off", "metadata", "falloc", "full"])
}

fn file_schema() -> Schema {
    Schema::new()
        .required("filename", ArgType::Str)
        .required("size", ArgType::Int(IntKind::U64))
        .optional("preallocation", prealloc())
        .optional("nocow", ArgType::Bool)
        .optional("extent-size-hint", ArgType::Int(IntKind::U64))
}

fn qcow2_schema() -> Schema {
    let blockdev_ref = ArgType::Alternate {
        name: "BlockdevRef".into(),
        branches: vec![ArgType::object(Schema::open()), ArgType::Str],
    };
    Schema::new()
        .required("file", blockdev_ref.clone())
        .optional("data-file", blockdev_ref)
        .optional("data-file-raw", ArgType::Bool)
        .optional("extended-l2", ArgType::Bool)
        .required("size", ArgType::Int(IntKind::U64))
        .optional("version", ArgType::enumeration(["v2", "v3"]))
        .optional("backing-file", ArgType::Str)
        .optional("backing-fmt", ArgType::Str)
        .optional("encrypt", ArgType::object(Schema::open()))
        .optional("cluster-size", ArgType::Int(IntKind::U64))
        .optional("preallocation", prealloc())
        .optional("lazy-refcounts", ArgType::Bool)
        .optional("refcount-bits", ArgType::Int(IntKind::I64))
        .optional("compression-type", ArgType::enumeration(["zlib", "zstd"]))
}

fn create_schema() -> Schema {
    let options = Schema::new()
        .required("driver", ArgType::enumeration(["file", "qcow2"]))
        .union(
            "driver",
            [("file", file_schema()), ("qcow2", qcow2_schema())],
        );
    Schema::new()
        .required("job-id", ArgType::Str)
        .required("options", ArgType::object(options))
}

fn str_of<'a>(o: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    o.get(k).and_then(Value::as_str)
}

fn u64_of(o: &Map<String, Value>, k: &str) -> Option<u64> {
    o.get(k).and_then(Value::as_u64)
}

fn preallocation(o: &Map<String, Value>) -> Preallocation {
    match str_of(o, "preallocation") {
        Some("metadata") => Preallocation::Metadata,
        Some("falloc") => Preallocation::Falloc,
        Some("full") => Preallocation::Full,
        _ => Preallocation::Off,
    }
}

fn unsupported(what: &str) -> QmpError {
    QmpError::generic(format!("qcow2 creation: {what} is not supported"))
}

/// The qcow2 options, or a refusal naming the first unsupported one.
fn qcow2_spec(o: &Map<String, Value>) -> Result<CreateSpec, QmpError> {
    let file = match o.get("file") {
        Some(Value::String(n)) => n.clone(),
        _ => {
            return Err(QmpError::generic(
                "qcow2 creation: 'file' must name an opened node (blockdev-add it first)",
            ))
        }
    };
    if o.contains_key("data-file") || o.get("data-file-raw") == Some(&Value::Bool(true)) {
        return Err(unsupported("an external data file"));
    }
    if o.contains_key("encrypt") {
        return Err(unsupported("encryption"));
    }
    if str_of(o, "compression-type") == Some("zstd") {
        return Err(unsupported("compression-type=zstd"));
    }
    let backing_fmt = str_of(o, "backing-fmt");
    let mut opts = CreateOptions::new(u64_of(o, "size").unwrap_or(0))
        .preallocation(preallocation(o))
        .lazy_refcounts(o.get("lazy-refcounts") == Some(&Value::Bool(true)))
        .extended_l2(o.get("extended-l2") == Some(&Value::Bool(true)));
    if let Some(b) = o.get("refcount-bits").and_then(Value::as_i64) {
        // Out-of-range widths get the creator's error, like QEMU's.
        opts = opts.refcount_bits(u32::try_from(b).unwrap_or(u32::MAX));
    }
    match (str_of(o, "backing-file"), backing_fmt) {
        (Some(f), fmt) => opts = opts.backing(f, fmt),
        (None, Some(_)) => {
            return Err(QmpError::generic(
                "Backing format cannot be used without backing file",
            ))
        }
        (None, None) => {}
    }
    if let Some(cs) = u64_of(o, "cluster-size") {
        opts = opts.cluster_size(cs);
    }
    if str_of(o, "version") == Some("v2") {
        opts = opts.version(2);
    }
    Ok(CreateSpec::Qcow2 {
        file,
        options: opts,
    })
}

/// Registers `blockdev-create`.
///
/// # Errors
///
/// A name clash with a command already registered.
pub fn register_create_commands(server: &QmpServer, state: &BlockState) -> Result<(), ServerError> {
    let s = state.clone();
    server.register_with_schema("blockdev-create", create_schema(), move |a| {
        let id = str_of(&a, "job-id").unwrap_or_default().to_string();
        let Some(Value::Object(o)) = a.get("options") else {
            return Err(QmpError::generic("Parameter 'options' is missing"));
        };
        let spec = match str_of(o, "driver") {
            Some("qcow2") => qcow2_spec(o)?,
            _ => {
                if o.get("nocow") == Some(&Value::Bool(true)) {
                    return Err(QmpError::generic(
                        "file creation: nocow=on is not supported",
                    ));
                }
                CreateSpec::File {
                    filename: str_of(o, "filename").unwrap_or_default().to_string(),
                    size: u64_of(o, "size").unwrap_or(0),
                    preallocation: preallocation(o),
                }
            }
        };
        blockjob::jobs::start_create(&s.ctx, &s.graph, &s.jobs, &id, spec)
            .map(|_| json!({}))
            .map_err(|e| QmpError::generic(e.to_string()))
    })
}
