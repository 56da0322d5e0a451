//! What the metrics of the daemon and the agent share: core counters into `prometheus-client`
//! counters, gauge values, a lock.

use prometheus_client::metrics::counter::Counter;

/// Reads one core counter from its counters struct.
pub(crate) type Read<T> = fn(&T) -> u64;

/// A core counter exported one to one: its name (under the registry's prefix, without the
/// `_total` the encoder adds), its help, and how to read it.
pub(crate) type Exported<T> = (&'static str, &'static str, Read<T>);

/// Brings `counter` up to `value`, a count the core keeps (monotonic for the life of the
/// machine): a `prometheus-client` counter only goes up, by the difference. A lower value (it
/// cannot happen for one machine) leaves it as it is.
pub(crate) fn catch_up(counter: &Counter, value: u64) {
    let now = counter.get();
    if value > now {
        counter.inc_by(value - now);
    }
}

/// `true` → 1, `false` → 0, for a gauge.
pub(crate) fn flag(b: bool) -> i64 {
    i64::from(b)
}

/// A count as a gauge value (saturating).
pub(crate) fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Locks a mutex whose holders never panic while holding it (if one did, the state is still
/// consistent: every update is one insert or remove).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
