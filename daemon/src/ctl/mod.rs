//! patchbayctl's pieces: `client` speaks to the control socket, `commands` maps the
//! command line onto methods, `render` prints results as tables or JSON.

pub mod client;
pub mod commands;
pub mod render;
pub mod watch;
