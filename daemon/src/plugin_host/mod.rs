//! The plugin host: which connector libraries are loaded (`registry`), the channel
//! instances running on them (`supervisor`; each one's `watch` with its paced
//! `liveness` check; plugin calls on `blocking` threads), and what their events become
//! (`events`).

mod blocking;
pub mod events;
pub mod liveness;
pub mod registry;
pub mod supervisor;
mod watch;
