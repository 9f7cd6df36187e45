//! Cluster queue names to SQS queue names.
//!
//! SQS takes 1 to 80 characters of `[A-Za-z0-9_-]`, plus `.fifo` at the end of a FIFO queue's
//! name. A cluster queue name that fits (leaving room for the `-dead` suffix) is used as it is;
//! any other is cut to the allowed characters and given a hash of the whole name, so that two
//! different cluster names never share an SQS queue.

/// The suffix of a FIFO queue's name.
pub(crate) const FIFO_SUFFIX: &str = ".fifo";
/// The suffix of a managed dead-letter queue's base name.
pub(crate) const DEAD_SUFFIX: &str = "-dead";
/// Longest SQS queue name.
const SQS_MAX_NAME: usize = 80;
/// Longest base name: room for `-dead` and `.fifo`.
const MAX_BASE: usize = SQS_MAX_NAME - DEAD_SUFFIX.len() - FIFO_SUFFIX.len();

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// FNV-1a, 64 bits: stable across builds and platforms (the std hasher is not).
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The SQS queue names for a cluster queue: `(queue, managed dead-letter queue, fifo)`.
pub(crate) fn sqs_names(queue: &str) -> (String, String, bool) {
    let (base, fifo) = match queue.strip_suffix(FIFO_SUFFIX) {
        Some(b) => (b, true),
        None => (queue, false),
    };
    let base = if !base.is_empty() && base.len() <= MAX_BASE && base.chars().all(allowed) {
        base.to_owned()
    } else {
        let hash = format!("{:016x}", fnv1a(queue));
        let keep: String = base
            .chars()
            .map(|c| if allowed(c) { c } else { '_' })
            .take(MAX_BASE - hash.len() - 1)
            .collect();
        format!("{keep}-{hash}")
    };
    let suffix = if fifo { FIFO_SUFFIX } else { "" };
    (
        format!("{base}{suffix}"),
        format!("{base}{DEAD_SUFFIX}{suffix}"),
        fifo,
    )
}

/// Whether `name` is a valid SQS queue name as given (for an explicit `sqs.queue`).
pub(crate) fn valid(name: &str) -> bool {
    let base = name.strip_suffix(FIFO_SUFFIX).unwrap_or(name);
    !base.is_empty() && name.len() <= SQS_MAX_NAME && base.chars().all(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_are_kept() {
        assert_eq!(
            sqs_names("default"),
            ("default".into(), "default-dead".into(), false)
        );
        assert_eq!(
            sqs_names("jobs.fifo"),
            ("jobs.fifo".into(), "jobs-dead.fifo".into(), true)
        );
    }

    #[test]
    fn odd_names_are_mapped_without_collisions() {
        let (a, da, _) = sqs_names("x'; DROP TABLE q; --\"`\\");
        let (b, _, _) = sqs_names("x'; DROP TABLE q; --\"`/");
        assert_ne!(a, b);
        assert!(valid(&a) && valid(&da), "{a} {da}");
        let long = "q".repeat(200);
        let (l, dl, _) = sqs_names(&long);
        assert!(valid(&l) && valid(&dl) && dl.len() <= 80, "{dl}");
        let (f, df, fifo) = sqs_names(&format!("{long}.fifo"));
        assert!(fifo && f.ends_with(".fifo") && df.ends_with("-dead.fifo") && df.len() <= 80);
    }
}
