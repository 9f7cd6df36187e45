//! What the benches of this crate read from their environment and command line.

/// A count from the environment variable `var`, else `default`.
pub fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The backends named on the command line (flags such as cargo's `--bench` skipped), else
/// `defaults`.
pub fn backends(defaults: &[&str]) -> Vec<String> {
    let named: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if named.is_empty() {
        defaults.iter().map(|d| (*d).to_owned()).collect()
    } else {
        named
    }
}
