//! Read criterion's results of *this* run back, to print the ratios the
//! targets are stated in (ratios within one run; absolute times across runs
//! and machines are not comparable).

use std::path::PathBuf;
use std::time::SystemTime;

/// Criterion's output folder and the time this run started.
pub(crate) struct Results {
    dir: Option<PathBuf>,
    since: SystemTime,
}

impl Results {
    /// Call before the benchmarks run.
    pub(crate) fn start() -> Self {
        Results {
            dir: criterion_home(),
            since: SystemTime::now(),
        }
    }

    /// Median time per iteration of `group`/`function` in nanoseconds, if it
    /// was measured in this run (not filtered out, not a stale result).
    pub(crate) fn median_ns(&self, group: &str, function: &str) -> Option<f64> {
        let file = self
            .dir
            .as_ref()?
            .join(safe(group))
            .join(safe(function))
            .join("new")
            .join("estimates.json");
        let fresh = std::fs::metadata(&file).ok()?.modified().ok()? >= self.since;
        if !fresh {
            return None;
        }
        point_estimate(&std::fs::read_to_string(file).ok()?, "median")
    }
}

/// Where criterion writes (same order of preference as criterion 0.8):
/// `$CRITERION_HOME`, `$CARGO_TARGET_DIR/criterion`, else the target folder
/// this bench binary was built in (`<target>/<profile>/deps/<bench>`).
fn criterion_home() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return Some(home.into());
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return Some(PathBuf::from(target).join("criterion"));
    }
    let exe = std::env::current_exe().ok()?;
    Some(exe.ancestors().nth(3)?.join("criterion"))
}

/// Criterion's directory-name escaping.
fn safe(name: &str) -> String {
    name.replace(['?', '"', '/', '\\', '*', '<', '>', ':', '|', '^'], "_")
}

/// `estimates.json` → `<key>.point_estimate`.
fn point_estimate(json: &str, key: &str) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v.get(key)?.get("point_estimate")?.as_f64()
}

/// `a ÷ b` formatted as a ratio, or `-` when either side is missing.
pub(crate) fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "-".to_string(),
    }
}

/// A time in ns, or `-`.
pub(crate) fn ns(t: Option<f64>) -> String {
    t.map_or_else(|| "-".to_string(), |t| format!("{t:.2}"))
}
