//! The plugin host: which connector libraries are loaded (`registry`), the channel
//! instances running on them (`supervisor`, with its paced `liveness` check), and what
//! their events become (`events`).

pub mod events;
pub mod liveness;
pub mod registry;
pub mod supervisor;
