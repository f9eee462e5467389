//! Histograms with their buckets fixed up front: recording a sample is two relaxed atomic
//! adds, and the series are rendered here, after the exporter's counters and gauges.
//!
//! The Prometheus exporter's histograms keep every sample in an epoch-protected list until
//! its next upkeep sorts them into buckets. On the request path (two samples per request)
//! that cost more than the rest of the metrics together, and samples piled up between
//! upkeeps. With the buckets known, a sample is counted where it lands at once.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::HistogramFn;

/// One series of a histogram of seconds: a count per bucket (not cumulative; the last one is
/// `+Inf`) and the sum in nanoseconds.
pub struct Buckets {
    bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl Buckets {
    fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_nanos: AtomicU64::new(0) }
    }
}

impl HistogramFn for Buckets {
    fn record(&self, seconds: f64) {
        let bucket = self.bounds.iter().position(|&bound| seconds <= bound).unwrap_or(self.bounds.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        // rounded to the nearest nanosecond; the cast saturates, so NaN and negative samples
        // add nothing
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        self.sum_nanos.fetch_add((seconds * 1e9 + 0.5) as u64, Ordering::Relaxed);
    }
}

struct Series {
    name: &'static str,
    /// `k="v",...`, escaped for the exposition.
    labels: String,
    buckets: Arc<Buckets>,
}

/// Every histogram series of an app. Registering is rare (pools and databases being built)
/// and takes a lock; recording does not.
#[derive(Default)]
pub struct Histograms {
    series: Mutex<Vec<Series>>,
}

impl Histograms {
    /// The series `name` with `labels`: the same one each time they are asked for again (a
    /// reload rebuilding a database's handles keeps counting where it was).
    pub fn series(&self, name: &'static str, labels: &[(&str, &str)], bounds: &'static [f64]) -> Arc<Buckets> {
        let labels = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect::<Vec<_>>().join(",");
        let mut series = self.series.lock().expect("histograms lock");
        if let Some(known) = series.iter().find(|s| s.name == name && s.labels == labels) {
            return Arc::clone(&known.buckets);
        }
        let buckets = Arc::new(Buckets::new(bounds));
        series.push(Series { name, labels, buckets: Arc::clone(&buckets) });
        buckets
    }

    /// Appends every series to `out` in the Prometheus text format, each histogram's series
    /// together under its HELP (from `help`) and TYPE lines.
    pub fn render(&self, help: impl Fn(&str) -> Option<&'static str>, out: &mut String) {
        let series = self.series.lock().expect("histograms lock");
        let mut names: Vec<&str> = Vec::new();
        for s in series.iter() {
            if !names.contains(&s.name) {
                names.push(s.name);
            }
        }
        for name in names {
            if let Some(help) = help(name) {
                let _ = writeln!(out, "# HELP {name} {help}");
            }
            let _ = writeln!(out, "# TYPE {name} histogram");
            for s in series.iter().filter(|s| s.name == name) {
                let sep = if s.labels.is_empty() { "" } else { "," };
                let mut cumulative = 0u64;
                for (i, count) in s.buckets.counts.iter().enumerate() {
                    cumulative += count.load(Ordering::Relaxed);
                    let le = s.buckets.bounds.get(i).map_or_else(|| "+Inf".to_owned(), f64::to_string);
                    let _ = writeln!(out, "{name}_bucket{{{}{sep}le=\"{le}\"}} {cumulative}", s.labels);
                }
                let labels = if s.labels.is_empty() { String::new() } else { format!("{{{}}}", s.labels) };
                #[allow(clippy::cast_precision_loss)]
                let sum = s.buckets.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
                let _ = writeln!(out, "{name}_sum{labels} {sum}");
                let _ = writeln!(out, "{name}_count{labels} {cumulative}");
            }
        }
    }
}

/// A label value escaped for the text format: backslash, double quote and newline.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: &[f64] = &[0.25, 0.5, 1.0];

    #[test]
    fn samples_land_in_cumulative_buckets_with_sum_and_count() {
        let h = Histograms::default();
        let a = h.series("x_seconds", &[("database", "app"), ("route", "primary")], BOUNDS);
        for s in [0.125, 0.25, 0.375, 2.0] {
            a.record(s);
        }
        let mut out = String::new();
        h.render(|_| Some("help text"), &mut out);
        let expected = "# HELP x_seconds help text\n# TYPE x_seconds histogram\n\
            x_seconds_bucket{database=\"app\",route=\"primary\",le=\"0.25\"} 2\n\
            x_seconds_bucket{database=\"app\",route=\"primary\",le=\"0.5\"} 3\n\
            x_seconds_bucket{database=\"app\",route=\"primary\",le=\"1\"} 3\n\
            x_seconds_bucket{database=\"app\",route=\"primary\",le=\"+Inf\"} 4\n\
            x_seconds_sum{database=\"app\",route=\"primary\"} 2.75\n\
            x_seconds_count{database=\"app\",route=\"primary\"} 4\n";
        assert_eq!(out, expected);
    }

    #[test]
    fn a_series_asked_for_again_is_the_same_and_labels_are_escaped() {
        let h = Histograms::default();
        h.series("y_seconds", &[], BOUNDS).record(0.5);
        h.series("y_seconds", &[], BOUNDS).record(0.5);
        h.series("y_seconds", &[("database", "a\"b\\c")], BOUNDS).record(f64::NAN);
        let mut out = String::new();
        h.render(|_| None, &mut out);
        assert!(out.starts_with("# TYPE y_seconds histogram\n"), "{out}");
        assert!(out.contains("y_seconds_count 2\n"), "{out}");
        assert!(out.contains("y_seconds_sum 1\n"), "{out}");
        // NaN is past every bound: counted in +Inf, adds nothing to the sum
        assert!(out.contains("y_seconds_bucket{database=\"a\\\"b\\\\c\",le=\"+Inf\"} 1\n"), "{out}");
        assert!(out.contains("y_seconds_sum{database=\"a\\\"b\\\\c\"} 0\n"), "{out}");
        assert_eq!(out.matches("# TYPE").count(), 1);
    }
}
