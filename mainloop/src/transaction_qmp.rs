//! QMP `transaction`: several actions applied all or nothing (QEMU's
//! `qmp_transaction` in `blockdev.c`).
//!
//! Each action type is registered by name in a [`TransactionActions`]
//! table (the one in [`BlockState::actions`]) with its argument schema and
//! a *prepare* function. `transaction` checks every action's arguments
//! first (QEMU's texts, e.g. `Parameter 'actions[0].data.node' is
//! missing`), then prepares the actions in order; if one fails, the ones
//! already prepared are aborted in reverse order and its error is the
//! reply; otherwise all are committed, in order. Prepare does everything
//! that can fail; commit cannot fail. A command that is also an action
//! (`blockdev-snapshot`, ...) runs as a transaction of that one action,
//! as in QEMU.
//!
//! To add an action type (internal snapshots, dirty bitmaps), call
//! [`TransactionActions::register`] from your module's register function.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::{json, Map, Value};

use crate::block_qmp::{on, BlockState};
use crate::qmp::{ArgType, QmpArgs, QmpError, QmpServer, Schema, ServerError};

/// The action types that support `completion-mode: grouped` (they start
/// jobs, which join the transaction's `JobTxn`).
const GROUPED: &[&str] = &["blockdev-backup"];

/// A boxed `Send` future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// An action that has been prepared: everything that can fail is done,
/// and it can still be undone.
pub trait PreparedAction: Send {
    /// Makes the action permanent. Cannot fail.
    fn commit(self: Box<Self>);
    /// [`commit`](Self::commit) with follow-up work that needs I/O (an
    /// external snapshot reopens the old node read-only); awaited before
    /// the reply. Cannot fail either: problems are logged.
    fn commit_async(self: Box<Self>) -> BoxFuture<()> {
        self.commit();
        Box::pin(async {})
    }
    /// Undoes what prepare did. Failures are logged: the transaction's
    /// reply is the error that caused the abort.
    fn abort(self: Box<Self>) -> BoxFuture<()>;
}

/// What a prepare function returns.
pub type PrepareResult = Result<Box<dyn PreparedAction>, QmpError>;

type PrepareFn =
    Arc<dyn Fn(BlockState, Map<String, Value>) -> BoxFuture<PrepareResult> + Send + Sync>;

#[derive(Clone)]
struct Action {
    schema: Schema,
    prepare: PrepareFn,
}

/// The action types `transaction` accepts, by name (QAPI's
/// `TransactionAction` union). Cheap to clone; clones share the table.
#[derive(Clone, Default)]
pub struct TransactionActions {
    table: Arc<Mutex<BTreeMap<String, Action>>>,
}

impl std::fmt::Debug for TransactionActions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.table.lock().keys()).finish()
    }
}

impl TransactionActions {
    /// Registers action type `name`: its `data` is checked against `A`'s
    /// schema and deserialized, then `prepare` runs on the main context.
    ///
    /// # Errors
    ///
    /// `name` is already registered.
    pub fn register<A, F, Fut>(&self, name: &str, prepare: F) -> Result<(), ServerError>
    where
        A: QmpArgs,
        F: Fn(BlockState, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = PrepareResult> + Send + 'static,
    {
        let prepare = Arc::new(prepare);
        self.register_with_schema(name, A::schema(), move |s, args| {
            let prepare = prepare.clone();
            async move {
                let a: A = serde_json::from_value(Value::Object(args))
                    .map_err(|e| QmpError::generic(e.to_string()))?;
                prepare(s, a).await
            }
        })
    }

    /// Registers action type `name` whose `data` is checked against
    /// `schema` and handed to `prepare` as it is (for actions whose
    /// command has a hand-written schema, like `blockdev-backup`).
    ///
    /// # Errors
    ///
    /// `name` is already registered.
    pub fn register_with_schema<F, Fut>(
        &self,
        name: &str,
        schema: Schema,
        prepare: F,
    ) -> Result<(), ServerError>
    where
        F: Fn(BlockState, Map<String, Value>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = PrepareResult> + Send + 'static,
    {
        let prepare = Arc::new(prepare);
        let erased: PrepareFn = Arc::new(move |s, args| {
            let prepare = prepare.clone();
            Box::pin(async move { prepare(s, args).await })
        });
        let mut t = self.table.lock();
        if t.contains_key(name) {
            return Err(ServerError::DuplicateCommand(name.to_string()));
        }
        t.insert(
            name.to_string(),
            Action {
                schema,
                prepare: erased,
            },
        );
        Ok(())
    }

    /// The registered type names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.table.lock().keys().cloned().collect()
    }

    fn get(&self, name: &str) -> Option<Action> {
        self.table.lock().get(name).cloned()
    }

    /// The schema of `transaction`'s arguments with the actions registered
    /// now: `actions` is a list of `{type, data}` (a union on `type`).
    fn schema(&self) -> Schema {
        let t = self.table.lock();
        let variants: Vec<(String, Schema)> = t
            .iter()
            .map(|(n, a)| {
                (
                    n.clone(),
                    Schema::new().required("data", ArgType::object(a.schema.clone())),
                )
            })
            .collect();
        let action = Schema::new()
            .required("type", ArgType::enumeration(t.keys().cloned()))
            .union("type", variants);
        let props = Schema::new().optional(
            "completion-mode",
            ArgType::enumeration(["individual", "grouped"]),
        );
        Schema::new()
            .required("actions", ArgType::array(ArgType::object(action)))
            .optional("properties", ArgType::object(props))
    }
}

/// Prepares `actions` (name, checked arguments) in order, then commits all
/// or, on the first error, aborts those prepared (in reverse order) and
/// returns that error. Run it on the main context.
async fn apply(
    state: BlockState,
    actions: Vec<(Action, Map<String, Value>)>,
) -> Result<(), QmpError> {
    let mut prepared: Vec<Box<dyn PreparedAction>> = Vec::new();
    for (action, data) in actions {
        match (action.prepare)(state.clone(), data).await {
            Ok(p) => prepared.push(p),
            Err(e) => {
                while let Some(p) = prepared.pop() {
                    p.abort().await;
                }
                return Err(e);
            }
        }
    }
    for p in prepared {
        p.commit_async().await;
    }
    Ok(())
}

/// Runs one action as a command (QEMU's `blockdev_do_action`): `args`
/// checked against the action's schema (errors name the members without a
/// prefix, as for any command), then prepared and committed.
///
/// # Errors
///
/// An unknown action, bad arguments, or the action's own error.
pub async fn run_single(
    state: BlockState,
    name: &str,
    mut args: Map<String, Value>,
) -> Result<Value, QmpError> {
    let action = state
        .actions
        .get(name)
        .ok_or_else(|| QmpError::generic(format!("Unknown transaction action '{name}'")))?;
    action.schema.validate(&mut args)?;
    let ctx = state.ctx.clone();
    on(&ctx, async move {
        apply(state, vec![(action, args)]).await.map(|()| json!({}))
    })
    .await
}

/// Registers `transaction` on `server`; the action types are those in
/// `state.actions` when it runs.
///
/// # Errors
///
/// A name clash with a command already registered.
pub fn register_transaction(server: &QmpServer, state: &BlockState) -> Result<(), ServerError> {
    let s = state.clone();
    server.register_async("transaction", move |mut args: Map<String, Value>| {
        let s = s.clone();
        async move {
            s.actions.schema().validate(&mut args)?;
            let grouped = args
                .get("properties")
                .and_then(|p| p.get("completion-mode"))
                .and_then(Value::as_str)
                == Some("grouped");
            let mut actions = Vec::new();
            if let Some(Value::Array(list)) = args.remove("actions") {
                for a in list {
                    let Value::Object(mut a) = a else { continue };
                    let name = a
                        .get("type")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    let action = s.actions.get(&name).ok_or_else(|| {
                        QmpError::generic(format!(
                            "Parameter 'type' does not accept value '{name}'"
                        ))
                    })?;
                    if grouped && !GROUPED.contains(&name.as_str()) {
                        return Err(QmpError::generic(format!(
                            "Action '{name}' does not support transaction property \
                             completion-mode = grouped"
                        )));
                    }
                    let data = match a.remove("data") {
                        Some(Value::Object(d)) => d,
                        _ => Map::new(),
                    };
                    actions.push((action, data));
                }
            }
            let ctx = s.ctx.clone();
            let mut s = s.clone();
            // Grouped: the jobs the actions create complete together.
            s.txn = grouped.then(blockjob::job::JobTxn::new);
            on(
                &ctx,
                async move { apply(s, actions).await.map(|()| json!({})) },
            )
            .await
        }
    })
}
