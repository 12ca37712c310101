//! The benchmarks of idem live in this package's bench targets (`memory.rs`, `quick.rs`,
//! `expiry.rs`, `codec.rs`, `redis.rs`, `postgres.rs`); see BENCHMARKS.md at the workspace root.
//! Nothing here.
