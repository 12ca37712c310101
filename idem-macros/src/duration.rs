//! Duration literals: `"250ms"`, `"30s"`, `"1h30m"`, `"7d"`.
//!
//! Not `humantime::parse_duration` (weighed for issue 17; maintained again since RUSTSEC-2025-0014
//! was withdrawn): it also accepts fractions, `"2 hours"`, and months and years of averaged
//! length (a `"1month"` ttl would be 30.44 days), which a ttl or lease written in an attribute
//! should not silently mean; and its errors cannot say what the attribute accepts. This parser is
//! fifty lines with the exact grammar the docs state, checked at compile time.

/// Parses a duration literal into nanoseconds, or says what is wrong with it.
pub(crate) fn parse(text: &str) -> Result<u64, String> {
    const HELP: &str = "a duration is a whole number and a unit, such as \"250ms\", \"30s\", \"15m\", \"24h\" or \"7d\"; units: ns, us, ms, s, m, h, d";
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("empty duration: {HELP}"));
    }
    let mut rest = text;
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("`{text}` is not a duration: {HELP}"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{text}` is too large a duration"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = rest[..unit_len].trim();
        rest = &rest[unit_len..];
        let nanos_per: u64 = match unit {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            "d" => 86_400 * 1_000_000_000,
            "" => return Err(format!("`{text}` has a number without a unit: {HELP}")),
            other => {
                return Err(format!(
                    "unknown duration unit `{other}` in `{text}`: {HELP}"
                ));
            }
        };
        total = number
            .checked_mul(nanos_per)
            .and_then(|n| total.checked_add(n))
            .ok_or_else(|| format!("`{text}` is too large a duration (at most about 584 years)"))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_units_and_sums() {
        assert_eq!(parse("250ms"), Ok(250_000_000));
        assert_eq!(parse("30s"), Ok(30_000_000_000));
        assert_eq!(parse("24h"), Ok(86_400_000_000_000));
        assert_eq!(parse("7d"), Ok(7 * 86_400_000_000_000));
        assert_eq!(parse("1h30m"), Ok(5_400_000_000_000));
        assert_eq!(parse("0s"), Ok(0));
    }

    #[test]
    fn rejects_nonsense() {
        assert!(
            parse("5 parsecs")
                .unwrap_err()
                .contains("unknown duration unit `parsecs`")
        );
        assert!(parse("ms").is_err());
        assert!(parse("10").unwrap_err().contains("without a unit"));
        assert!(parse("").is_err());
        assert!(parse("99999999999999999999d").is_err());
    }
}
