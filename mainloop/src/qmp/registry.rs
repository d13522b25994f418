//! The command table: names, schemas and type-erased handlers.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::Serialize;
use serde_json::{Map, Value};

use super::error::QmpError;
use super::schema::{ArgType, QmpArgs, Schema};

/// What an async handler returns, once erased.
pub(crate) type BoxFuture = Pin<Box<dyn Future<Output = Result<Value, QmpError>> + Send>>;

type SyncFn = dyn Fn(Map<String, Value>) -> Result<Value, QmpError> + Send + Sync;
type AsyncFn = dyn Fn(Map<String, Value>) -> Result<BoxFuture, QmpError> + Send + Sync;

/// The commands the server itself implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Builtin {
    Capabilities,
    QueryVersion,
    QueryCommands,
    Quit,
}

pub(crate) enum Handler {
    Sync(Box<SyncFn>),
    Async(Box<AsyncFn>),
    Builtin(Builtin),
}

/// One registered command.
pub(crate) struct Command {
    pub(crate) schema: Schema,
    pub(crate) handler: Handler,
}

/// Name → command. Sorted, so `query-commands` is stable.
#[derive(Default)]
pub(crate) struct Registry {
    commands: BTreeMap<String, Arc<Command>>,
}

impl Registry {
    /// A registry holding the built-in commands.
    pub(crate) fn with_builtins() -> Self {
        let mut r = Self::default();
        let caps = Schema::new().optional("enable", ArgType::array(ArgType::enumeration(["oob"])));
        r.insert(
            "qmp_capabilities",
            caps,
            Handler::Builtin(Builtin::Capabilities),
        );
        for (name, b) in [
            ("query-version", Builtin::QueryVersion),
            ("query-commands", Builtin::QueryCommands),
            ("quit", Builtin::Quit),
        ] {
            r.insert(name, Schema::new(), Handler::Builtin(b));
        }
        r
    }

    /// Adds a command; false if the name is taken.
    pub(crate) fn insert(&mut self, name: &str, schema: Schema, handler: Handler) -> bool {
        if self.commands.contains_key(name) {
            return false;
        }
        self.commands
            .insert(name.to_string(), Arc::new(Command { schema, handler }));
        true
    }

    /// Removes a command; `qmp_capabilities` cannot be removed.
    pub(crate) fn remove(&mut self, name: &str) -> bool {
        name != "qmp_capabilities" && self.commands.remove(name).is_some()
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<Command>> {
        self.commands.get(name).cloned()
    }

    /// Every command name, sorted.
    pub(crate) fn names(&self) -> Vec<String> {
        self.commands.keys().cloned().collect()
    }
}

/// Deserialises validated arguments.
fn decode<A: QmpArgs>(args: Map<String, Value>) -> Result<A, QmpError> {
    // The schema has been checked, so this fails only if the schema and the
    // type disagree (a bug in the command's definition).
    serde_json::from_value(Value::Object(args))
        .map_err(|e| QmpError::generic(format!("Invalid arguments: {e}")))
}

fn encode_result<R: Serialize>(r: Result<R, QmpError>) -> Result<Value, QmpError> {
    let r = r?;
    serde_json::to_value(r)
        .map_err(|e| QmpError::generic(format!("internal error: cannot serialise the result: {e}")))
}

/// Erases a synchronous handler.
pub(crate) fn sync_handler<A, R, F>(f: F) -> Handler
where
    A: QmpArgs,
    R: Serialize + 'static,
    F: Fn(A) -> Result<R, QmpError> + Send + Sync + 'static,
{
    Handler::Sync(Box::new(move |args| encode_result(f(decode::<A>(args)?))))
}

/// Erases an asynchronous handler.
pub(crate) fn async_handler<A, R, F, Fut>(f: F) -> Handler
where
    A: QmpArgs,
    R: Serialize + 'static,
    F: Fn(A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, QmpError>> + Send + 'static,
{
    Handler::Async(Box::new(move |args| {
        let fut = f(decode::<A>(args)?);
        Ok(Box::pin(async move { encode_result(fut.await) }) as BoxFuture)
    }))
}

/// The reply for a handler that panicked: the loop goes on.
pub(crate) fn panic_error(name: &str, payload: &(dyn std::any::Any + Send)) -> QmpError {
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    log::error!("QMP command '{name}' panicked: {msg}");
    QmpError::generic(format!("internal error: command '{name}' failed: {msg}"))
}

/// Runs a synchronous handler, turning a panic into an error reply.
pub(crate) fn call_sync(
    name: &str,
    f: &SyncFn,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    catch_unwind(AssertUnwindSafe(|| f(args))).unwrap_or_else(|p| Err(panic_error(name, &*p)))
}

/// Runs an async handler's constructor, turning a panic into an error.
pub(crate) fn call_async(
    name: &str,
    f: &AsyncFn,
    args: Map<String, Value>,
) -> Result<BoxFuture, QmpError> {
    catch_unwind(AssertUnwindSafe(|| f(args))).unwrap_or_else(|p| Err(panic_error(name, &*p)))
}

/// Polls a command's future, turning a panic into an error reply, so that a
/// panicking command still answers and frees its client for the next one.
pub(crate) struct CatchPanic {
    pub(crate) name: String,
    pub(crate) fut: BoxFuture,
}

impl Future for CatchPanic {
    type Output = Result<Value, QmpError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        match catch_unwind(AssertUnwindSafe(|| this.fut.as_mut().poll(cx))) {
            Ok(p) => p,
            Err(p) => Poll::Ready(Err(panic_error(&this.name, &*p))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::NoArgs;

    #[test]
    fn builtins_present_and_capabilities_not_removable() {
        let mut r = Registry::with_builtins();
        assert_eq!(
            r.names(),
            [
                "qmp_capabilities",
                "query-commands",
                "query-version",
                "quit"
            ]
        );
        assert!(!r.remove("qmp_capabilities"));
        assert!(r.remove("quit"));
        assert!(r.get("quit").is_none());
    }

    #[test]
    fn insert_when_duplicate_then_refused() {
        let mut r = Registry::default();
        assert!(r.insert("x", Schema::new(), sync_handler(|_: NoArgs| Ok(1))));
        assert!(!r.insert("x", Schema::new(), sync_handler(|_: NoArgs| Ok(2))));
    }

    #[test]
    fn call_sync_when_handler_panics_then_generic_error() {
        let Handler::Sync(f) = sync_handler(|_: NoArgs| -> Result<(), QmpError> { panic!("boom") })
        else {
            unreachable!()
        };
        let e = call_sync("x", &*f, Map::new()).unwrap_err();
        assert_eq!(e.desc, "internal error: command 'x' failed: boom");
    }

    #[test]
    fn sync_handler_encodes_result() {
        let Handler::Sync(f) = sync_handler(|_: NoArgs| Ok(vec![1, 2])) else {
            unreachable!()
        };
        assert_eq!(
            call_sync("x", &*f, Map::new()).unwrap(),
            serde_json::json!([1, 2])
        );
    }
}
