//! `cotal-driver-tokio`: the production driver.
//!
//! Not built yet (issue 7): this crate will execute core commands with async-nats against a real
//! nats-server and host the `cotal` command.
