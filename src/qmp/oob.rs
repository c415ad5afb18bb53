//! Out-of-band execution: `exec-oob` requests run at once on the session's
//! thread, never waiting for the control thread, so they answer even while
//! a long in-band command (a resize waiting for a frontend, a slow flush)
//! holds it. Only commands whose answer depends on nothing the control
//! thread changes may run this way; the schema marks them `allow-oob`.

use crate::error::QmpError;
use crate::qapi;
use serde_json::Value;

/// Runs one out-of-band command.
pub fn execute(name: &str, args: &Value) -> Result<Value, QmpError> {
    if !qapi::OOB_COMMANDS.contains(&name) {
        return Err(if qapi::IMPLEMENTED_COMMANDS.contains(&name) {
            QmpError::generic(format!("The command {name} does not support OOB"))
        } else {
            QmpError::command_not_found(name)
        });
    }
    if let Some(key) = args.as_object().and_then(|a| a.keys().next()) {
        return Err(QmpError::generic(format!(
            "Parameter '{key}' is unexpected"
        )));
    }
    let result = match name {
        "query-version" => serde_json::to_value(super::commands::version_info()),
        "query-commands" => serde_json::to_value(super::commands::command_list()),
        "query-qmp-schema" => serde_json::to_value(super::commands::qmp_schema()?),
        _ => return Err(QmpError::command_not_found(name)),
    };
    result.map_err(|e| QmpError::generic(format!("cannot encode the reply: {e}")))
}
