//! Opening hours for `open_now`: a service's weekly [`Schedule`]s as the intervals the catalog indexes, and the
//! local weekday and minute of an instant in a time zone, which a search matches against them.
//!
//! Which zone a schedule's times are in, first match wins:
//! 1. a fixed UTC offset the schedule states itself (HSDS: a `Z` or `±HH:MM` suffix on `opens_at`/`closes_at`,
//!    or its numeric `timezone`, in hours). A fixed offset has no DST, so its intervals are normalised to UTC
//!    when they are written, under the zone [`UTC_ZONE`];
//! 2. the IANA zone of the source (`[[directories]] time_zone`), kept in local time: the DST rule is applied
//!    when a search turns its instant into local time, so 09:00 stays 09:00 in summer and in winter;
//! 3. none: the schedule cannot say whether the service is open, and gives no interval. A service whose
//!    schedules all lack a zone never matches `open_now`.
//!
//! Rules: an interval is `[opens, closes)` in whole minutes; closing at or before the opening time passes
//! midnight into the next day (equal times: 24 hours); `24:00`, and `23:59` (the usual way of writing "until
//! midnight"), close at the end of the day; a schedule without both times gives no interval. Only the weekly
//! pattern is read: HSDS `freq`, `interval`, `valid_from`/`valid_to` and holidays are not. The zone database is
//! jiff's bundled copy of the IANA tz database, the same on every machine.

use time::OffsetDateTime;

use super::{CatalogService, Schedule};

/// The zone of intervals normalised from fixed UTC offsets.
pub const UTC_ZONE: &str = "UTC";

/// Version of the rules that turn schedules into intervals. The store notes it with each service's intervals and
/// writes them again for an unchanged service kept under another version: bump it when the rules change.
pub const RULES_VERSION: i64 = 2;

/// Minutes in a day.
const DAY: i32 = 1440;

/// Minutes in a week.
const WEEK: i32 = 7 * DAY;

/// Largest UTC offset a schedule may state, in minutes (UTC+14:00, Kiribati).
const MAX_OFFSET: i32 = 14 * 60;

/// One weekday's opening interval in a zone's local time: a row of the catalog's hours index.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct OpeningInterval {
    /// IANA zone name, or [`UTC_ZONE`] for schedules with a fixed offset.
    pub zone: String,
    /// Weekday, 0 = Monday … 6 = Sunday.
    pub day: i32,
    /// Opening minute from local midnight (inclusive).
    pub opens_min: i32,
    /// Closing minute from local midnight (exclusive), at most 1440.
    pub closes_min: i32,
}

/// The local weekday and minute of an instant in one zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalMoment {
    /// IANA zone name (or [`UTC_ZONE`]).
    pub zone: String,
    /// Weekday, 0 = Monday … 6 = Sunday.
    pub day: i32,
    /// Minute from local midnight, 0 … 1439.
    pub minute: i32,
}

/// A time of day as a source writes it, split from its UTC offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClockTime {
    /// The time without its offset, as written (`HH:MM` or `HH:MM:SS`).
    pub local: String,
    /// The offset it states, in minutes east of UTC (`Z` is 0).
    pub utc_offset_minutes: Option<i32>,
}

/// Parses `HH:MM[:SS[.fff]]` with an optional `Z` or `±HH:MM` offset; `24:00` is the end of a day.
///
/// # Errors
/// A sentence saying what a time should look like (the caller names the field).
pub fn parse_clock(text: &str) -> Result<ClockTime, String> {
    const EXPECTED: &str = "expected a time HH:MM or HH:MM:SS, optionally with Z or ±HH:MM";
    let text = text.trim();
    let (local, offset) = if let Some(local) = text.strip_suffix(['Z', 'z']) {
        (local, Some(0))
    } else if let Some(at) = text.rfind(['+', '-']) {
        let (sign, digits) = text[at..].split_at(1);
        let minutes = two_part(digits, 23).ok_or(EXPECTED)?;
        let minutes = if sign == "-" { -minutes } else { minutes };
        if minutes.abs() > MAX_OFFSET {
            return Err("its UTC offset is beyond ±14:00".into());
        }
        (&text[..at], Some(minutes))
    } else {
        (text, None)
    };
    minute_floor(local).ok_or(EXPECTED)?;
    Ok(ClockTime { local: local.to_owned(), utc_offset_minutes: offset })
}

/// A UTC offset given in hours (HSDS `timezone`, e.g. `-7` or `5.5`) in minutes.
///
/// # Errors
/// When it is not a whole number of minutes within ±14 hours.
pub fn offset_from_hours(hours: f64) -> Result<i32, String> {
    let minutes = hours * 60.0;
    if !minutes.is_finite() || minutes.abs() > f64::from(MAX_OFFSET) || (minutes - minutes.round()).abs() > 1e-6 {
        return Err("expected a UTC offset in hours between -14 and 14".into());
    }
    // In range and whole: the conversion is exact.
    Ok(minutes.round() as i32)
}

/// `local` (a time at `from` minutes east of UTC) as `HH:MM` at `to` minutes east of UTC.
#[must_use]
pub fn shift_clock(local: &str, from: i32, to: i32) -> Option<String> {
    let minute = (minute_floor(local)? - from + to).rem_euclid(DAY);
    Some(format!("{:02}:{:02}", minute / 60, minute % 60))
}

/// `HH:MM` with `HH` ≤ `max_hours` as minutes.
fn two_part(text: &str, max_hours: i32) -> Option<i32> {
    let (h, m) = text.split_once(':')?;
    let (h, m) = (two_digits(h)?, two_digits(m)?);
    (h <= max_hours && m <= 59).then_some(h * 60 + m)
}

/// Exactly two ASCII digits as a number.
fn two_digits(s: &str) -> Option<i32> {
    if s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit()) { s.parse().ok() } else { None }
}

/// Minutes and seconds of `HH:MM[:SS[.fff]]` (`24:00` allowed), or `None` when malformed.
fn hms(local: &str) -> Option<(i32, i32)> {
    let (hm, seconds) = match local.get(5..) {
        None | Some("") => (local, 0),
        Some(rest) => {
            let rest = rest.strip_prefix(':')?;
            let (whole, fraction) = rest.split_once('.').unwrap_or((rest, "0"));
            if fraction.is_empty() || !fraction.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (&local[..5], two_digits(whole).filter(|s| *s <= 59)?)
        }
    };
    let minutes = two_part(hm, 24)?;
    (minutes < DAY || (minutes == DAY && seconds == 0)).then_some((minutes, seconds))
}

/// The minute a service opens at: seconds are dropped.
fn minute_floor(local: &str) -> Option<i32> {
    hms(local).map(|(m, _)| m)
}

/// The minute a service closes at: `23:59` means midnight, and a started minute counts as open.
fn closing_minute(local: &str) -> Option<i32> {
    let (minutes, seconds) = hms(local)?;
    Some(if minutes == DAY - 1 {
        DAY
    } else if seconds > 0 {
        minutes + 1
    } else {
        minutes
    })
}

/// Weekday number (0 = Monday) of a day as the catalog writes it (`MO`, or a name such as `Monday`).
fn weekday(day: &str) -> Option<i32> {
    let day = day.trim().to_ascii_uppercase();
    ["MO", "TU", "WE", "TH", "FR", "SA", "SU"]
        .iter()
        .zip(["MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY", "SATURDAY", "SUNDAY"])
        .zip(0..)
        .find(|((code, name), _)| day == **code || (day.len() >= 3 && name.starts_with(&day)))
        .map(|(_, n)| n)
}

/// Every interval of a service's hours, split at local midnight, sorted and without duplicates; empty when no
/// schedule has both times, a known day and a known zone.
///
/// The service's own schedules when it has usable ones; else, location by location, the hours of the service
/// at that location (HSDS `service_at_location` schedules), else the location's own: a service with hours only
/// on its locations is open when one of them is.
#[must_use]
pub fn weekly_intervals(service: &CatalogService) -> Vec<OpeningInterval> {
    let zone = service.time_zone.as_deref();
    let mut out = Vec::new();
    for schedule in &service.schedules {
        intervals_of(schedule, zone, &mut out);
    }
    if out.is_empty() {
        for location in &service.locations {
            let mut here = Vec::new();
            for schedule in location.service_at_location.iter().flat_map(|a| &a.schedules) {
                intervals_of(schedule, zone, &mut here);
            }
            if here.is_empty() {
                for schedule in &location.schedules {
                    intervals_of(schedule, zone, &mut here);
                }
            }
            out.append(&mut here);
        }
    }
    out.sort();
    out.dedup();
    out
}

fn intervals_of(schedule: &Schedule, source_zone: Option<&str>, out: &mut Vec<OpeningInterval>) {
    let (zone, offset) = match (schedule.utc_offset_minutes, source_zone) {
        (Some(offset), _) => (UTC_ZONE, offset),
        (None, Some(zone)) => (zone, 0),
        (None, None) => return,
    };
    let opens = schedule.opens_at.as_deref().and_then(minute_floor);
    let closes = schedule.closes_at.as_deref().and_then(closing_minute);
    let (Some(opens), Some(closes)) = (opens, closes) else { return };
    let length = if closes > opens { closes - opens } else { closes + DAY - opens };
    for day in schedule.days.iter().filter_map(|d| weekday(d)) {
        // Minutes of the week in the zone (UTC for a fixed offset), then cut at each midnight.
        let mut start = (day * DAY + opens - offset).rem_euclid(WEEK);
        let end = start + length;
        while start < end {
            let midnight = start - start.rem_euclid(DAY);
            let stop = end.min(midnight + DAY);
            out.push(OpeningInterval {
                zone: zone.to_owned(),
                day: (midnight / DAY).rem_euclid(7),
                opens_min: start - midnight,
                closes_min: stop - midnight,
            });
            start = stop;
        }
    }
}

/// Checks that `name` is a zone of the IANA tz database (as bundled in this build).
///
/// # Errors
/// A sentence saying what is expected.
pub fn check_time_zone(name: &str) -> Result<(), String> {
    // jiff answers `Etc/Unknown` with a placeholder zone that behaves as UTC: no source is in it.
    if name.trim().is_empty() || name.eq_ignore_ascii_case("Etc/Unknown") || jiff::tz::TimeZone::get(name).is_err() {
        return Err(format!("`{name}` is not a time zone of the IANA database (e.g. America/Los_Angeles)"));
    }
    Ok(())
}

/// The local weekday and minute of `at` in `zone`; `None` when the zone is unknown to this build.
#[must_use]
pub fn local_moment(zone: &str, at: OffsetDateTime) -> Option<LocalMoment> {
    let tz = jiff::tz::TimeZone::get(zone).ok()?;
    let local = tz.to_datetime(jiff::Timestamp::from_second(at.unix_timestamp()).ok()?);
    Some(LocalMoment {
        zone: zone.to_owned(),
        day: i32::from(local.weekday().to_monday_zero_offset()),
        minute: i32::from(local.hour()) * 60 + i32::from(local.minute()),
    })
}

/// Whether `intervals` hold `at`: the rule the store applies in SQL, for tests and callers holding a service.
#[must_use]
pub fn is_open(intervals: &[OpeningInterval], at: OffsetDateTime) -> bool {
    intervals.iter().any(|i| {
        local_moment(&i.zone, at).is_some_and(|m| m.day == i.day && i.opens_min <= m.minute && m.minute < i.closes_min)
    })
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    fn schedule(days: &[&str], opens: &str, closes: &str, offset: Option<i32>) -> Schedule {
        Schedule {
            id: None,
            days: days.iter().map(|d| (*d).to_owned()).collect(),
            opens_at: Some(opens.to_owned()),
            closes_at: Some(closes.to_owned()),
            utc_offset_minutes: offset,
        }
    }

    fn service(zone: Option<&str>, schedules: Vec<Schedule>) -> CatalogService {
        CatalogService {
            id: "s.1".into(),
            source: "s".into(),
            source_id: "1".into(),
            name: "Clinic".into(),
            description: String::new(),
            status: "active".into(),
            url: None,
            email: None,
            eligibility: None,
            minimum_age: None,
            maximum_age: None,
            organization: None,
            locations: Vec::new(),
            terms: Vec::new(),
            languages: Vec::new(),
            schedules,
            phones: Vec::new(),
            source_modified: None,
            time_zone: zone.map(str::to_owned),
            ..CatalogService::default()
        }
    }

    fn open(zone: Option<&str>, schedules: Vec<Schedule>, at: OffsetDateTime) -> bool {
        is_open(&weekly_intervals(&service(zone, schedules)), at)
    }

    const LA: Option<&str> = Some("America/Los_Angeles");

    #[test]
    fn a_service_without_hours_of_its_own_is_open_when_one_of_its_locations_is() {
        use crate::directories::{CatalogLocation, ServiceAtLocation};
        // Monday 2026-07-13 17:30 UTC is 10:30 in Los Angeles; Saturday 2026-07-18 18:00 UTC is 11:00.
        let monday = datetime!(2026-07-13 17:30 UTC);
        let saturday = datetime!(2026-07-18 18:00 UTC);
        let location = |schedules: Vec<Schedule>, at: Vec<Schedule>| CatalogLocation {
            id: "s.l".into(),
            schedules,
            service_at_location: Some(ServiceAtLocation { schedules: at, ..ServiceAtLocation::default() }),
            ..CatalogLocation::default()
        };
        let mut s = service(LA, Vec::new());
        s.locations = (0..5).map(|_| location(Vec::new(), Vec::new())).collect();
        s.locations[3] = location(vec![schedule(&["MO"], "09:00", "17:00", None)], Vec::new());
        assert!(is_open(&weekly_intervals(&s), monday), "a location's hours count");
        // The hours of the service at a location come before the location's own.
        s.locations[3] =
            location(vec![schedule(&["MO"], "09:00", "17:00", None)], vec![schedule(&["SA"], "10:00", "14:00", None)]);
        let intervals = weekly_intervals(&s);
        assert!(is_open(&intervals, saturday) && !is_open(&intervals, monday));
        // Hours of the service's own win over every location's.
        s.schedules = vec![schedule(&["TU"], "09:00", "17:00", None)];
        let intervals = weekly_intervals(&s);
        assert!(!is_open(&intervals, saturday) && !is_open(&intervals, monday));
    }

    #[test]
    fn los_angeles_hours_follow_daylight_saving_time() {
        let weekdays = || vec![schedule(&["MO", "TU", "WE", "TH", "FR"], "09:00", "17:00", None)];
        // Wednesday 1 July 2026, 16:30 UTC is 09:30 PDT (UTC-7): open.
        assert!(open(LA, weekdays(), datetime!(2026-07-01 16:30 UTC)));
        // Wednesday 14 January 2026, 16:30 UTC is 08:30 PST (UTC-8): not yet open.
        assert!(!open(LA, weekdays(), datetime!(2026-01-14 16:30 UTC)));
        assert!(open(LA, weekdays(), datetime!(2026-01-14 17:00 UTC)), "09:00 PST opens");
        // Closing is exclusive: 17:00 PDT is 00:00 UTC on Thursday.
        assert!(open(LA, weekdays(), datetime!(2026-07-01 23:59:59 UTC)));
        assert!(!open(LA, weekdays(), datetime!(2026-07-02 00:00 UTC)));
        // Saturday is closed.
        assert!(!open(LA, weekdays(), datetime!(2026-07-04 18:00 UTC)));
        // The intervals themselves stay in local time: the DST rule is applied at search time.
        let rows = weekly_intervals(&service(LA, weekdays()));
        assert_eq!(rows.len(), 5);
        assert!(rows.iter().all(|r| (r.zone.as_str(), r.opens_min, r.closes_min) == (LA.unwrap_or(""), 540, 1020)));
    }

    #[test]
    fn an_interval_past_midnight_continues_into_the_next_day_and_sunday_wraps_to_monday() {
        let night = || vec![schedule(&["FR", "SU"], "22:00", "02:00", None)];
        let rows = weekly_intervals(&service(LA, night()));
        let cut: Vec<(i32, i32, i32)> = rows.iter().map(|r| (r.day, r.opens_min, r.closes_min)).collect();
        assert_eq!(cut, [(0, 0, 120), (4, 1320, 1440), (5, 0, 120), (6, 1320, 1440)]);
        // Saturday 01:30 PDT (08:30 UTC) is still Friday night's shift; 02:00 PDT is closed.
        assert!(open(LA, night(), datetime!(2026-07-04 08:30 UTC)));
        assert!(!open(LA, night(), datetime!(2026-07-04 09:00 UTC)));
        // Monday 00:30 PDT is Sunday night's shift; Tuesday 00:30 is not.
        assert!(open(LA, night(), datetime!(2026-07-06 07:30 UTC)));
        assert!(!open(LA, night(), datetime!(2026-07-07 07:30 UTC)));
        // Equal times are a whole day from the opening time.
        let rows = weekly_intervals(&service(LA, vec![schedule(&["MO"], "08:00", "08:00", None)]));
        assert_eq!(
            rows.iter().map(|r| (r.day, r.opens_min, r.closes_min)).collect::<Vec<_>>(),
            [(0, 480, 1440), (1, 0, 480)]
        );
    }

    #[test]
    fn a_24_00_or_23_59_close_is_the_end_of_the_day() {
        for closes in ["24:00", "23:59", "24:00:00", "23:59:59"] {
            let rows = weekly_intervals(&service(LA, vec![schedule(&["SA"], "00:00", closes, None)]));
            assert_eq!(rows.iter().map(|r| (r.day, r.opens_min, r.closes_min)).collect::<Vec<_>>(), [(5, 0, 1440)]);
        }
        let all_day = || vec![schedule(&["SA"], "00:00", "24:00", None)];
        // Saturday 23:59:30 PDT is Sunday 06:59:30 UTC: open; Sunday 00:00 PDT is not.
        assert!(open(LA, all_day(), datetime!(2026-07-05 06:59:30 UTC)));
        assert!(!open(LA, all_day(), datetime!(2026-07-05 07:00 UTC)));
        // Seconds: an opening drops them, a closing counts the started minute.
        let rows = weekly_intervals(&service(LA, vec![schedule(&["MO"], "09:00:30", "16:59:10", None)]));
        assert_eq!((rows[0].opens_min, rows[0].closes_min), (540, 1020));
    }

    #[test]
    fn a_fixed_offset_wins_over_the_source_zone_and_is_stored_in_utc() {
        // 09:00-17:00 at UTC-07:00 (as Boise in summer, or a `-07:00` suffix, or `timezone: -7`) whatever the
        // source zone says: 16:00-24:00 UTC, the same in January as in July.
        let fixed = || vec![schedule(&["MO"], "09:00", "17:00", Some(-7 * 60))];
        let rows = weekly_intervals(&service(LA, fixed()));
        assert_eq!(
            rows.iter().map(|r| (r.zone.as_str(), r.day, r.opens_min, r.closes_min)).collect::<Vec<_>>(),
            [(UTC_ZONE, 0, 960, 1440)]
        );
        assert!(open(LA, fixed(), datetime!(2026-01-12 16:30 UTC)), "09:30 at UTC-7 in January");
        assert!(open(LA, fixed(), datetime!(2026-07-06 16:30 UTC)), "09:30 at UTC-7 in July");
        assert!(!open(LA, fixed(), datetime!(2026-07-06 15:59 UTC)));
        // East of UTC, Monday morning is Sunday in UTC: 06:00-10:00 at +08:00 is Sunday 22:00 - Monday 02:00 UTC.
        let east = weekly_intervals(&service(None, vec![schedule(&["MO"], "06:00", "10:00", Some(8 * 60))]));
        assert_eq!(
            east.iter().map(|r| (r.day, r.opens_min, r.closes_min)).collect::<Vec<_>>(),
            [(0, 0, 120), (6, 1320, 1440)]
        );
        assert!(open(None, vec![schedule(&["MO"], "06:00", "10:00", Some(8 * 60))], datetime!(2026-07-05 23:00 UTC)));
    }

    #[test]
    fn a_schedule_in_no_known_zone_is_never_open() {
        let weekdays = || vec![schedule(&["MO", "TU", "WE", "TH", "FR", "SA", "SU"], "00:00", "24:00", None)];
        assert!(weekly_intervals(&service(None, weekdays())).is_empty());
        assert!(!open(None, weekdays(), datetime!(2026-07-01 12:00 UTC)));
        assert!(open(LA, weekdays(), datetime!(2026-07-01 12:00 UTC)), "the same hours with a zone are open");
        // A zone this build does not know (stored by another version) answers nothing rather than guessing.
        assert!(!open(Some("Mars/Olympus_Mons"), weekdays(), datetime!(2026-07-01 12:00 UTC)));
        assert_eq!(local_moment("Mars/Olympus_Mons", datetime!(2026-07-01 12:00 UTC)), None);
        // Schedules without both times, or with days that are not weekdays, say nothing either.
        let mut half = schedule(&["MO"], "09:00", "17:00", None);
        half.closes_at = None;
        assert!(weekly_intervals(&service(LA, vec![half, schedule(&["1MO"], "09:00", "17:00", None)])).is_empty());
    }

    #[test]
    fn clock_times_split_their_offsets_and_bad_ones_are_refused() {
        let clock = |t: &str| parse_clock(t).map(|c| (c.local, c.utc_offset_minutes));
        assert_eq!(clock("09:00"), Ok(("09:00".into(), None)));
        assert_eq!(clock("10:00:00"), Ok(("10:00:00".into(), None)));
        assert_eq!(clock("09:00Z"), Ok(("09:00".into(), Some(0))));
        assert_eq!(clock("09:00:00.000-07:00"), Ok(("09:00:00.000".into(), Some(-420))));
        assert_eq!(clock("17:30+05:30"), Ok(("17:30".into(), Some(330))));
        assert_eq!(clock("24:00"), Ok(("24:00".into(), None)));
        for bad in ["9am", "25:00", "09:60", "24:01", "9:00", "09:00-7", "09:00+15:00", "", "09:00:61", "09:00:5"] {
            assert!(parse_clock(bad).is_err(), "{bad} should be refused");
        }
        assert_eq!(offset_from_hours(-7.0), Ok(-420));
        assert_eq!(offset_from_hours(5.5), Ok(330));
        assert!(
            offset_from_hours(15.0).is_err()
                && offset_from_hours(1.33).is_err()
                && offset_from_hours(f64::NAN).is_err()
        );
        assert_eq!(shift_clock("17:00", -420, -480).as_deref(), Some("16:00"));
        assert_eq!(shift_clock("00:30", 0, -60).as_deref(), Some("23:30"));
    }

    #[test]
    fn source_zones_are_checked_against_the_bundled_database() {
        assert!(check_time_zone("America/Los_Angeles").is_ok());
        assert!(check_time_zone("America/Boise").is_ok());
        for bad in ["Mars/Olympus_Mons", "", "Etc/Unknown", "PST8PDT-ish"] {
            let e = check_time_zone(bad).expect_err("unknown zone");
            assert!(e.contains("IANA"), "{e}");
        }
        assert_eq!(
            local_moment("America/Boise", datetime!(2026-01-14 16:30 UTC)),
            Some(LocalMoment { zone: "America/Boise".into(), day: 2, minute: 9 * 60 + 30 })
        );
    }
}
