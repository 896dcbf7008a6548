//! The job queue on its own, both backends: bulk drains (100,000 jobs on Redis, far
//! past apalis-redis 1.0's ~8,000-job wedge), delays, graceful shutdown, redelivery
//! after a crashed consumer. Each test owns its redis-server or SQLite file.

mod common;
mod redis;
mod sqlite;
