//! The column-list macros the concept files' queries use, from the domain crate (whose
//! types decode rows for every backend), and its `decode`.

pub(crate) use patchbay_jobs::store::rows::decode;
pub(crate) use patchbay_jobs::{
    account_columns, channel_columns, chat_columns, field_columns, job_columns, ledger_columns,
    message_columns, run_columns, user_columns,
};
