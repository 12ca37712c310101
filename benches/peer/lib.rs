//! The comparison with the `idempotent` crate lives in the bench target `memory.rs`; see
//! BENCHMARKS.md at the workspace root. Nothing here.
