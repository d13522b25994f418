//! The NBD export commands, over [`blockjob::nbd::server`]:
//! `nbd-server-start`, `nbd-server-stop`, `nbd-server-add`,
//! `nbd-server-remove`, `block-export-add` (type `nbd`), `block-export-del`,
//! `query-block-exports`, and the `BLOCK_EXPORT_DELETED` event, with
//! qemu-storage-daemon's error texts and orders of checks.
//!
//! The server listens on the main context (its listener and negotiating
//! clients are external clients there); each export serves its clients on
//! its node's context ([`BlockState::context_of`]), an iothread's if the
//! node was added with one.

use std::sync::Arc;

use blockjob::block::BlockNode;
use blockjob::nbd::server::{DeleteMode, ExportOptions, NbdAddress, NbdServer, ServerOptions};
use parking_lot::Mutex;
use serde_json::{json, Map, Value};

use crate::block_qmp::BlockState;
use crate::qmp::{EventEmitter, QmpError, QmpServer, ServerError};

crate::qmp_enum! {
    /// `block-export-del` / `nbd-server-remove` `mode`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    #[non_exhaustive]
    pub enum ExportDelMode {
        /// Refuse while clients are connected.
        Safe = "safe",
        /// Disconnect the clients.
        Hard = "hard",
    }
}

crate::qmp_enum! {
    /// The export types `block-export-add` knows.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    #[non_exhaustive]
    pub enum ExportType {
        /// An NBD export.
        Nbd = "nbd",
    }
}

crate::qmp_args! {
    /// `block-export-add` with `type: nbd`.
    #[derive(Debug)]
    pub struct BlockExportAddArgs {
        /// Always `nbd`.
        pub r#type: ExportType,
        /// The export id.
        pub id: String,
        /// The node to export.
        pub node_name: String,
        /// The NBD export name (default: the node name).
        pub name: Option<String>,
        /// Shown to `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
        pub description: Option<String>,
        /// Accept writes (default false).
        pub writable: Option<bool>,
        /// Flush after every write (default false).
        pub writethrough: Option<bool>,
        /// Dirty bitmaps of the node offered as `qemu:dirty-bitmap:NAME`.
        pub bitmaps: Option<Vec<String>>,
    }
}

crate::qmp_args! {
    /// `nbd-server-add` (the older spelling of `block-export-add`).
    #[derive(Debug)]
    pub struct NbdServerAddArgs {
        /// The node to export; also the default name and id.
        pub device: String,
        /// The export name, and id.
        pub name: Option<String>,
        /// Shown to `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
        pub description: Option<String>,
        /// Accept writes (default false).
        pub writable: Option<bool>,
    }
}

crate::qmp_args! {
    /// `block-export-del`.
    #[derive(Debug)]
    pub struct BlockExportDelArgs {
        /// The export id.
        pub id: String,
        /// `safe` (default): refuse while clients are connected.
        pub mode: Option<ExportDelMode>,
    }
}

crate::qmp_args! {
    /// `nbd-server-remove`.
    #[derive(Debug)]
    pub struct NbdServerRemoveArgs {
        /// The export id (for `nbd-server-add` exports, its name).
        pub name: String,
        /// `safe` (default): refuse while clients are connected.
        pub mode: Option<ExportDelMode>,
    }
}

/// The daemon's NBD server, shared by the commands and the daemon's
/// command line and shutdown.
#[derive(Clone)]
pub struct Exports {
    state: BlockState,
    server: Arc<Mutex<Option<NbdServer>>>,
    emitter: Option<EventEmitter>,
}

impl std::fmt::Debug for Exports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exports")
            .field("running", &self.server.lock().is_some())
            .finish()
    }
}

fn generic(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(e.to_string())
}

fn not_running() -> QmpError {
    QmpError::generic("NBD server not running")
}

fn missing(name: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{name}' is missing"))
}

fn string_member(obj: &Map<String, Value>, key: &str, path: &str) -> Result<String, QmpError> {
    match obj.get(key) {
        None => Err(missing(&format!("{path}.{key}"))),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(QmpError::generic(format!(
            "Invalid parameter type for '{path}.{key}', expected: string"
        ))),
    }
}

/// A socket address: QMP's legacy `{type, data: {...}}` (what
/// `nbd-server-start` takes in QEMU) or the flat `{type, path}` /
/// `{type, host, port}` of the command line.
pub fn parse_address(addr: &Value) -> Result<NbdAddress, QmpError> {
    let Some(obj) = addr.as_object() else {
        return Err(QmpError::generic(
            "Invalid parameter type for 'addr', expected: object",
        ));
    };
    let kind = string_member(obj, "type", "addr")?;
    let (fields, path) = match obj.get("data") {
        Some(Value::Object(d)) => (d, "addr.data"),
        Some(_) => {
            return Err(QmpError::generic(
                "Invalid parameter type for 'addr.data', expected: object",
            ))
        }
        None if obj.len() == 1 => return Err(missing("addr.data")),
        None => (obj, "addr"),
    };
    match kind.as_str() {
        "unix" => Ok(NbdAddress::Unix(
            string_member(fields, "path", path)?.into(),
        )),
        "inet" => {
            let host = string_member(fields, "host", path)?;
            let port = match fields.get("port") {
                Some(Value::String(s)) => s.parse::<u16>().ok(),
                Some(Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                Some(_) => None,
                None => return Err(missing(&format!("{path}.port"))),
            }
            .ok_or_else(|| QmpError::generic(format!("Invalid value for '{path}.port'")))?;
            Ok(NbdAddress::Inet { host, port })
        }
        "vsock" | "fd" => Err(QmpError::generic(format!(
            "Socket address type '{kind}' is not supported"
        ))),
        other => Err(QmpError::generic(format!(
            "Parameter 'type' does not accept value '{other}'"
        ))),
    }
}

/// `max-connections`: a JSON integer, or a decimal string from the
/// command line.
fn max_connections(v: Option<&Value>) -> Result<Option<u32>, QmpError> {
    v.map(|v| {
        v.as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| QmpError::generic("Parameter 'max-connections' expects uint32"))
    })
    .transpose()
}

/// A boolean given as JSON or as QEMU's `on`/`off` command-line text.
fn flag(v: Option<&Value>, name: &str) -> Result<Option<bool>, QmpError> {
    match v {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) if matches!(s.as_str(), "on" | "true" | "yes") => Ok(Some(true)),
        Some(Value::String(s)) if matches!(s.as_str(), "off" | "false" | "no") => Ok(Some(false)),
        Some(_) => Err(QmpError::generic(format!(
            "Parameter '{name}' expects 'on' or 'off'"
        ))),
    }
}

impl Exports {
    /// No server yet; events go to `emitter` if there is one.
    pub fn new(state: BlockState, emitter: Option<EventEmitter>) -> Self {
        Self {
            state,
            server: Arc::default(),
            emitter,
        }
    }

    /// `nbd-server-start` / `--nbd-server`.
    ///
    /// # Errors
    ///
    /// `NBD server already running`, or the bind error.
    pub fn start(&self, addr: &NbdAddress, max_connections: Option<u32>) -> Result<(), QmpError> {
        let mut srv = self.server.lock();
        if srv.is_some() {
            return Err(QmpError::generic("NBD server already running"));
        }
        let emitter = self.emitter.clone();
        let mut opts = ServerOptions::new().on_export_deleted(move |id| {
            if let Some(e) = &emitter {
                e.emit("BLOCK_EXPORT_DELETED", json!({ "id": id }));
            }
        });
        opts.max_connections = max_connections;
        *srv = Some(NbdServer::start(&self.state.ctx, addr, opts).map_err(generic)?);
        Ok(())
    }

    /// `nbd-server-stop`: every export goes (hard), the socket closes.
    ///
    /// # Errors
    ///
    /// `NBD server not running`.
    pub fn stop(&self) -> Result<(), QmpError> {
        let server = self.server.lock().take();
        match server {
            Some(mut s) => {
                s.stop();
                Ok(())
            }
            None => Err(not_running()),
        }
    }

    /// Live NBD connections (0 without a server).
    pub fn connection_count(&self) -> usize {
        self.server
            .lock()
            .as_ref()
            .map_or(0, NbdServer::connection_count)
    }

    fn node(&self, name: &str) -> Option<Arc<BlockNode>> {
        self.state
            .graph
            .nodes()
            .into_iter()
            .find(|n| n.name() == name)
    }

    /// `block-export-add` (type nbd), in QEMU's order of checks.
    ///
    /// # Errors
    ///
    /// QEMU's texts for a duplicate id, a missing node, a writable export
    /// of a read-only node, no server, a duplicate name, a permission
    /// conflict.
    pub fn add(&self, a: &BlockExportAddArgs) -> Result<(), QmpError> {
        let srv = self.server.lock();
        if let Some(s) = srv.as_ref() {
            if s.exports().iter().any(|e| e.id == a.id) {
                return Err(QmpError::generic(format!(
                    "Block export id '{}' is already in use",
                    a.id
                )));
            }
        }
        let node = self.node(&a.node_name).ok_or_else(|| {
            QmpError::generic(format!(
                "Cannot find device='' nor node-name='{}'",
                a.node_name
            ))
        })?;
        let writable = a.writable.unwrap_or(false);
        if writable && node.read_only() {
            return Err(QmpError::generic(
                "Cannot export read-only node as writable",
            ));
        }
        let s = srv.as_ref().ok_or_else(not_running)?;
        let mut opts = ExportOptions::new(a.id.clone())
            .writable(writable)
            .writethrough(a.writethrough.unwrap_or(false))
            .bitmaps(a.bitmaps.clone().unwrap_or_default());
        opts.name = a.name.clone();
        opts.description = a.description.clone();
        let ctx = self.state.context_of(node.name());
        s.add_export(node, &ctx, &opts).map_err(generic)
    }

    /// `block-export-del`.
    ///
    /// # Errors
    ///
    /// `Export 'x' is not found`, `export 'x' still in use`.
    pub fn del(&self, id: &str, mode: Option<ExportDelMode>) -> Result<(), QmpError> {
        let mode = match mode {
            Some(ExportDelMode::Hard) => DeleteMode::Hard,
            _ => DeleteMode::Safe,
        };
        let srv = self.server.lock();
        let Some(s) = srv.as_ref() else {
            return Err(QmpError::generic(format!("Export '{id}' is not found")));
        };
        s.remove_export(id, mode).map_err(generic)
    }

    /// `query-block-exports`.
    pub fn query(&self) -> Value {
        let srv = self.server.lock();
        let list = srv.as_ref().map(NbdServer::exports).unwrap_or_default();
        Value::Array(
            list.iter()
                .map(|e| {
                    json!({"type": "nbd", "id": e.id, "node-name": e.node_name,
                        "shutting-down": e.shutting_down})
                })
                .collect(),
        )
    }

    /// `--nbd-server addr.type=unix,addr.path=P[,max-connections=N]` (or
    /// `addr.type=inet,addr.host=H,addr.port=P`), as parsed key=value.
    ///
    /// # Errors
    ///
    /// A bad address, an unknown key, or the bind error.
    pub fn start_from_options(&self, opts: &Value) -> Result<(), QmpError> {
        let obj = opts.as_object().ok_or_else(|| missing("addr"))?;
        if let Some(k) = obj
            .keys()
            .find(|k| !matches!(k.as_str(), "addr" | "max-connections"))
        {
            return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
        }
        let addr = parse_address(obj.get("addr").ok_or_else(|| missing("addr"))?)?;
        self.start(&addr, max_connections(obj.get("max-connections"))?)
    }

    /// `--export type=nbd,id=ID,node-name=N[,name=X][,description=D]
    /// [,writable=on][,writethrough=on][,bitmaps=B | ,bitmaps.0=B...]`, as
    /// parsed key=value.
    ///
    /// # Errors
    ///
    /// As [`add`](Self::add), or a bad option.
    pub fn add_from_options(&self, opts: &Value) -> Result<(), QmpError> {
        let mut obj = opts.as_object().cloned().unwrap_or_default();
        for key in ["writable", "writethrough"] {
            if let Some(b) = flag(obj.get(key), key)? {
                obj.insert(key.to_string(), Value::Bool(b));
            }
        }
        // `bitmaps=b0` (one) or `bitmaps.0=b0,bitmaps.1=b1` (a list).
        match obj.get("bitmaps") {
            Some(Value::String(b)) => {
                let list = json!([b]);
                obj.insert("bitmaps".into(), list);
            }
            Some(Value::Object(m)) => {
                let mut items: Vec<(usize, Value)> = m
                    .iter()
                    .map(|(k, v)| (k.parse().unwrap_or(usize::MAX), v.clone()))
                    .collect();
                items.sort_by_key(|(i, _)| *i);
                let list = Value::Array(items.into_iter().map(|(_, v)| v).collect());
                obj.insert("bitmaps".into(), list);
            }
            _ => {}
        }
        let mut args = Value::Object(obj);
        <BlockExportAddArgs as crate::qmp::QmpArgs>::schema()
            .validate(args.as_object_mut().ok_or_else(|| missing("type"))?)?;
        let a: BlockExportAddArgs = serde_json::from_value(args).map_err(generic)?;
        self.add(&a)
    }
}

/// Registers the export commands on `server` and returns the handle the
/// daemon uses for its command line and shutdown.
///
/// # Errors
///
/// A name clash with a command already registered.
pub fn register_export_commands(
    server: &QmpServer,
    state: BlockState,
) -> Result<Exports, ServerError> {
    let exports = Exports::new(state, Some(server.emitter()));

    let x = exports.clone();
    server.register("nbd-server-start", move |a: Map<String, Value>| {
        if let Some(k) = a.keys().find(|k| {
            !matches!(
                k.as_str(),
                "addr" | "max-connections" | "tls-creds" | "tls-authz"
            )
        }) {
            return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
        }
        let addr = parse_address(a.get("addr").ok_or_else(|| missing("addr"))?)?;
        if a.contains_key("tls-creds") || a.contains_key("tls-authz") {
            return Err(QmpError::generic("TLS is not supported"));
        }
        x.start(&addr, max_connections(a.get("max-connections"))?)
            .map(|()| json!({}))
    })?;

    let x = exports.clone();
    server.register("nbd-server-stop", move |_: crate::qmp::NoArgs| {
        x.stop().map(|()| json!({}))
    })?;

    let x = exports.clone();
    server.register("block-export-add", move |a: BlockExportAddArgs| {
        x.add(&a).map(|()| json!({}))
    })?;

    let x = exports.clone();
    server.register("nbd-server-add", move |a: NbdServerAddArgs| {
        // QEMU looks the device up before anything else.
        if x.node(&a.device).is_none() {
            return Err(QmpError::generic(format!(
                "Cannot find device='{0}' nor node-name='{0}'",
                a.device
            )));
        }
        if x.server.lock().is_none() {
            return Err(not_running());
        }
        let id = a.name.clone().unwrap_or_else(|| a.device.clone());
        x.add(&BlockExportAddArgs {
            r#type: ExportType::Nbd,
            id,
            node_name: a.device,
            name: a.name,
            description: a.description,
            writable: a.writable,
            writethrough: None,
            bitmaps: None,
        })
        .map(|()| json!({}))
    })?;

    let x = exports.clone();
    server.register("block-export-del", move |a: BlockExportDelArgs| {
        x.del(&a.id, a.mode).map(|()| json!({}))
    })?;

    let x = exports.clone();
    server.register("nbd-server-remove", move |a: NbdServerRemoveArgs| {
        x.del(&a.name, a.mode).map(|()| json!({}))
    })?;

    let x = exports.clone();
    server.register("query-block-exports", move |_: crate::qmp::NoArgs| {
        Ok(x.query())
    })?;

    Ok(exports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_in_legacy_and_flat_spelling() {
        let inet = NbdAddress::Inet {
            host: "127.0.0.1".into(),
            port: 10809,
        };
        let legacy = json!({"type": "inet", "data": {"host": "127.0.0.1", "port": "10809"}});
        assert_eq!(parse_address(&legacy).unwrap(), inet);
        let flat = json!({"type": "inet", "host": "127.0.0.1", "port": "10809"});
        assert_eq!(parse_address(&flat).unwrap(), inet);
        let unix = json!({"type": "unix", "path": "/tmp/s"});
        assert_eq!(
            parse_address(&unix).unwrap(),
            NbdAddress::Unix("/tmp/s".into())
        );
        let err = |v: Value| parse_address(&v).unwrap_err().desc;
        assert_eq!(
            err(json!({"type": "unix"})),
            "Parameter 'addr.data' is missing"
        );
        assert_eq!(
            err(json!({"type": "unix", "data": {}})),
            "Parameter 'addr.data.path' is missing"
        );
        assert_eq!(
            err(json!({"type": "bogus", "path": "x"})),
            "Parameter 'type' does not accept value 'bogus'"
        );
        assert_eq!(
            err(json!({"type": "inet", "host": "h", "port": "http"})),
            "Invalid value for 'addr.port'"
        );
    }

    #[test]
    fn command_line_flags_and_numbers() {
        assert_eq!(flag(Some(&json!("on")), "w").unwrap(), Some(true));
        assert_eq!(flag(Some(&json!(false)), "w").unwrap(), Some(false));
        assert!(flag(Some(&json!("maybe")), "w").is_err());
        assert_eq!(max_connections(Some(&json!("4"))).unwrap(), Some(4));
        assert_eq!(max_connections(None).unwrap(), None);
        assert!(max_connections(Some(&json!(-1))).is_err());
    }
}
