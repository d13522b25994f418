//! `blockdev-reopen {options: [BlockdevOptions]}`: changes nodes'
//! `read-only` together, all or none (`BlockGraph::blockdev_reopen`).

use serde_json::{json, Value};

use crate::block_qmp::{on, BlockState};
use crate::qmp::{QmpError, QmpServer, ServerError};

crate::qmp_args! {
    /// `blockdev-reopen`.
    pub struct BlockdevReopenArgs {
        /// Each node's options, as at `blockdev-add`, with `read-only`
        /// (absent: read-write) and children named by node name.
        pub options: Vec<Value>,
    }
}

/// Registers `blockdev-reopen` on `server`.
pub fn register_reopen_commands(server: &QmpServer, state: &BlockState) -> Result<(), ServerError> {
    let s = state.clone();
    server.register_async("blockdev-reopen", move |a: BlockdevReopenArgs| {
        let s = s.clone();
        async move {
            let ctx = s.ctx.clone();
            on(&ctx, async move {
                s.graph
                    .blockdev_reopen(&a.options)
                    .await
                    .map(|()| json!({}))
                    .map_err(|e| QmpError::generic(e.to_string()))
            })
            .await
        }
    })?;
    Ok(())
}
