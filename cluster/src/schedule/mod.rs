//! Schedules: tasks that run once at a given time or repeat on a calendar or cron rule.
//!
//! [`when`] holds the time rules (pure logic): how a schedule repeats, its next run after
//! a given instant, and how a time given on the command line is read.

pub mod when;
