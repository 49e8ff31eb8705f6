//! Job names with the date in them: `--job 'nightly-{date}'`.
//!
//! A scheduled run (a Kubernetes CronJob, cron) passes the same command line
//! every night yet needs a job of its own each night, or the second night
//! would find the first night's results and skip everything. quire expands
//! `{date}` (`YYYY-MM-DD`) and `{time}` (`HHMM`) in a job name, in UTC, from
//! `--job-time` (`QUIRE_JOB_TIME`, an RFC 3339 timestamp) when given, else
//! from the clock when the command starts. `{{` and `}}` stand for literal
//! braces; any other `{...}` is a usage error.

use chrono::{DateTime, Utc};

/// The time job names are expanded with: `job_time` (RFC 3339, any offset) or now.
pub fn job_clock(job_time: Option<&str>) -> Result<DateTime<Utc>, String> {
    match job_time {
        None => Ok(Utc::now()),
        Some(t) => DateTime::parse_from_rfc3339(t.trim())
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| format!("--job-time {t:?}: {e} (give an RFC 3339 time such as 2026-11-29T02:00:00Z)")),
    }
}

/// Replaces `{date}` and `{time}` in `pattern` with the UTC date
/// (`2026-11-29`) and hour and minute (`0200`) of `at`.
pub fn expand_job_name(pattern: &str, at: DateTime<Utc>) -> Result<String, String> {
    if !pattern.contains(['{', '}']) {
        return Ok(pattern.to_string());
    }
    let (date, time) = (at.format("%Y-%m-%d").to_string(), at.format("%H%M").to_string());
    let mut out = String::with_capacity(pattern.len() + 8);
    let mut rest = pattern;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("{{") {
            out.push('{');
            rest = t;
        } else if let Some(t) = tail.strip_prefix("}}") {
            out.push('}');
            rest = t;
        } else if let Some(t) = tail.strip_prefix("{date}") {
            out.push_str(&date);
            rest = t;
        } else if let Some(t) = tail.strip_prefix("{time}") {
            out.push_str(&time);
            rest = t;
        } else {
            let bad: String = tail.chars().take_while(|&c| c != '}').chain(tail.contains('}').then_some('}')).collect();
            return Err(format!(
                "--job {pattern:?}: unknown placeholder {bad:?} (known: {{date}} = YYYY-MM-DD and {{time}} = HHMM, both UTC; write {{{{ and }}}} for literal braces)"
            ));
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        job_clock(Some(s)).unwrap()
    }

    #[test]
    fn date_and_time_expand_in_utc() {
        let t = at("2026-11-29T02:05:09Z");
        assert_eq!(expand_job_name("nightly-{date}", t).unwrap(), "nightly-2026-11-29");
        assert_eq!(expand_job_name("scans-{date}-{time}", t).unwrap(), "scans-2026-11-29-0205");
        // An offset is converted to UTC: 00:30 in Berlin is the evening before.
        let t = at("2026-11-29T00:30:00+01:00");
        assert_eq!(expand_job_name("n-{date}-{time}", t).unwrap(), "n-2026-11-28-2330");
    }

    #[test]
    fn names_without_placeholders_stay_as_they_are() {
        let t = at("2026-11-29T02:05:09Z");
        assert_eq!(expand_job_name("scans-2026", t).unwrap(), "scans-2026");
        assert_eq!(expand_job_name("a{{date}}b}}", t).unwrap(), "a{date}b}");
    }

    #[test]
    fn unknown_placeholders_and_bad_times_are_usage_errors() {
        let t = at("2026-11-29T02:05:09Z");
        let e = expand_job_name("nightly-{day}", t).unwrap_err();
        assert!(e.contains("\"{day}\"") && e.contains("{date}"), "{e}");
        assert!(expand_job_name("nightly-{date", t).is_err());
        assert!(expand_job_name("nightly-}", t).is_err());
        let e = job_clock(Some("last night")).unwrap_err();
        assert!(e.contains("RFC 3339"), "{e}");
    }
}
