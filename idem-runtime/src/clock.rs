//! Clock arithmetic that cannot overflow.

use std::time::Duration;

use tokio::time::Instant;

/// The longest span added to a clock reading: about a century. A ttl, lease or timeout beyond it
/// is as good as forever, and `Duration::MAX` added to an `Instant` would overflow and panic.
pub(crate) const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// `now + span`, with `span` capped at [`FOREVER`], so that no ttl, lease or timeout a caller
/// passes can panic.
pub(crate) fn after(now: Instant, span: Duration) -> Instant {
    // A century past a clock reading fits every platform's `Instant`; if it ever did not, the
    // reading itself is the only safe answer left.
    now.checked_add(span.min(FOREVER)).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_spans_do_not_overflow() {
        let now = Instant::now();
        assert_eq!(after(now, Duration::MAX), after(now, FOREVER));
        assert_eq!(
            after(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
    }
}
