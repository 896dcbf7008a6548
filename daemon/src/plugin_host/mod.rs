//! The plugin host: which connector libraries are loaded (`registry`), the channel
//! instances running on them (`supervisor`), and what their events become (`events`).

pub mod events;
pub mod registry;
pub mod supervisor;
