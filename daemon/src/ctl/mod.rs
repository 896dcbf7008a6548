//! patchbayctl's pieces: `client` speaks to the control socket, `commands` maps the
//! command line onto methods, `output` picks the format and writes it, `render` and
//! `columns` turn results into tables (`status_view` the status summary, `crate::time_text`
//! the times), `top` is the live view, `watch` the deletion progress bar, `generated`
//! the completions and man page.

pub mod client;
pub mod columns;
pub mod commands;
pub mod generated;
pub mod output;
pub mod render;
pub mod status_view;
pub mod top;
pub mod watch;
