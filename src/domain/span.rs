//! A length of time in the policy (a cap's window, a cool-down, a half-life):
//! whole milliseconds, never negative. Written `"50ms"`, `"30s"`, `"5m"`,
//! `"2h"`, `"7d"` (or an integer of milliseconds); the config's durations use
//! the same text.

use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span(u64);

impl Span {
    pub const fn ms(ms: u64) -> Span {
        Span(ms)
    }
    pub const fn secs(s: u64) -> Span {
        Span(s * 1_000)
    }
    pub const fn days(d: u64) -> Span {
        Span(d * 86_400_000)
    }

    /// Milliseconds, for time arithmetic on event times (saturates at `i64::MAX`).
    pub fn as_ms(self) -> i64 {
        i64::try_from(self.0).unwrap_or(i64::MAX)
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    pub fn parse(s: &str) -> Result<Span, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("`{s}` has no unit: write e.g. 50ms, 30s, 5m, 2h, 7d"))?;
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}` does not start with a whole number"))?;
        let ms = match unit.trim() {
            "ms" => Some(n),
            "s" => n.checked_mul(1_000),
            "m" => n.checked_mul(60_000),
            "h" => n.checked_mul(3_600_000),
            "d" => n.checked_mul(86_400_000),
            other => {
                return Err(format!(
                    "unknown unit `{other}` in `{s}`: use ms, s, m, h or d"
                ))
            }
        }
        .ok_or_else(|| format!("`{s}` is too large"))?;
        Ok(Span::ms(ms))
    }
}

impl From<Span> for Duration {
    fn from(s: Span) -> Duration {
        Duration::from_millis(s.0)
    }
}

/// Whole milliseconds (sub-millisecond parts dropped, saturating at `u64::MAX`).
impl From<Duration> for Span {
    fn from(d: Duration) -> Span {
        Span(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.0;
        let (n, u) = if ms == 0 {
            (0, "ms")
        } else if ms % 86_400_000 == 0 {
            (ms / 86_400_000, "d")
        } else if ms % 3_600_000 == 0 {
            (ms / 3_600_000, "h")
        } else if ms % 60_000 == 0 {
            (ms / 60_000, "m")
        } else if ms % 1_000 == 0 {
            (ms / 1_000, "s")
        } else {
            (ms, "ms")
        };
        write!(f, "{n}{u}")
    }
}

impl Serialize for Span {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Span, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Ms(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Ms(ms) => Ok(Span::ms(ms)),
            Raw::Text(t) => Span::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_parse_and_print() {
        assert_eq!(Span::parse("50ms").unwrap(), Span::ms(50));
        assert_eq!(Span::parse(" 7d ").unwrap(), Span::days(7));
        assert_eq!(Span::days(7).to_string(), "7d");
        assert_eq!(Span::secs(90).to_string(), "90s");
        assert_eq!(Span::ms(1500).to_string(), "1500ms");
        assert_eq!(Span::ms(0).to_string(), "0ms");
        assert!(Span::parse("7 weeks").is_err());
        assert!(Span::parse("d").is_err());
        assert!(Span::parse("99999999999999999999d").is_err());
        assert_eq!(Span::ms(u64::MAX).as_ms(), i64::MAX);
    }
}
