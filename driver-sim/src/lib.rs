//! `cotal-driver-sim`: the deterministic simulator driver.
//!
//! Not built yet (issue 6): this crate will hold a seeded, single-threaded model of the NATS
//! features the core machines rely on, a fault scheduler and the delivery oracle.
