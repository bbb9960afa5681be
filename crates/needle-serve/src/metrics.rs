//! Counters and a latency histogram, rendered in Prometheus' text format at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0];

#[derive(Default)]
struct Histogram {
    /// Non-cumulative counts per bucket; the last slot is +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let slot = BUCKETS.iter().position(|&b| s <= b).unwrap_or(BUCKETS.len());
        self.counts[slot].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// Writes the series of histogram `name` (buckets, sum, count) with `label`.
    fn render(&self, out: &mut String, name: &str, label: &str) {
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.counts[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{label},le=\"{b}\"}} {cum}");
        }
        cum += self.counts[BUCKETS.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{label},le=\"+Inf\"}} {cum}");
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{label}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{label}}} {cum}");
    }
}

/// Recalls one served version answered, by status class, and their latency.
#[derive(Default)]
pub struct VersionStats {
    /// 2xx, 4xx, 5xx.
    by_class: [AtomicU64; 3],
    latency: Histogram,
}

impl VersionStats {
    pub fn record(&self, status: u16, took: Duration) {
        let class = match status {
            ..=399 => 0,
            400..=499 => 1,
            _ => 2,
        };
        self.by_class[class].fetch_add(1, Relaxed);
        self.latency.observe(took);
    }
}

/// What `/metrics` shows of one served version.
pub struct VersionView<'a> {
    pub name: &'a str,
    pub run_id: &'a str,
    pub kind: &'a str,
    pub index_items: usize,
    pub index_params: &'a str,
    pub weight: u32,
    pub stats: &'a VersionStats,
}

#[derive(Default)]
pub struct Metrics {
    /// (route, status) → count.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Per route.
    latency: Mutex<BTreeMap<&'static str, &'static Histogram>>,
    pub popularity_fallbacks: AtomicU64,
    pub store_errors: AtomicU64,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    pub events: AtomicU64,
    pub items_published: AtomicU64,
    pub items_deleted: AtomicU64,
    /// Catalogue changes announced by other servers and applied here.
    pub changes_followed: AtomicU64,
    /// Full re-reads of the store's catalogue changes after a missed announcement.
    pub resyncs: AtomicU64,
    /// Requests turned away with 503 because `max_in_flight` were being handled.
    pub shed: AtomicU64,
}

impl Metrics {
    pub fn record(&self, route: &'static str, status: u16, took: Duration) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((route, status)).or_default() += 1;
        }
        let hist = match self.latency.lock() {
            // Histograms live as long as the process; leaking one per route keeps the hot path
            // lock-free after the first request.
            Ok(mut m) => *m.entry(route).or_insert_with(|| Box::leak(Box::default())),
            Err(_) => return,
        };
        hist.observe(took);
    }

    /// The text exposition, with the served versions' own series.
    pub fn render(&self, versions: &[VersionView<'_>]) -> String {
        let mut out = String::new();
        out.push_str("# HELP needle_requests_total HTTP requests by route and status code.\n");
        out.push_str("# TYPE needle_requests_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((route, status), n) in m.iter() {
                let _ = writeln!(out, "needle_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
            }
        }
        out.push_str("# HELP needle_request_errors_total Requests answered with a 5xx status.\n");
        out.push_str("# TYPE needle_request_errors_total counter\n");
        let errors: u64 =
            self.requests.lock().map(|m| m.iter().filter(|((_, s), _)| *s >= 500).map(|(_, n)| n).sum()).unwrap_or(0);
        let _ = writeln!(out, "needle_request_errors_total {errors}");
        out.push_str("# HELP needle_request_duration_seconds Time from request to response, by route.\n");
        out.push_str("# TYPE needle_request_duration_seconds histogram\n");
        if let Ok(m) = self.latency.lock() {
            for (route, h) in m.iter() {
                h.render(&mut out, "needle_request_duration_seconds", &format!("route=\"{route}\""));
            }
        }
        let counters = [
            (
                "needle_popularity_fallbacks_total",
                "Recalls answered by popularity (nothing known about the user).",
                &self.popularity_fallbacks,
            ),
            ("needle_store_errors_total", "Store calls that failed.", &self.store_errors),
            ("needle_events_total", "Events appended to user histories.", &self.events),
            ("needle_items_published_total", "Items published or updated through POST /v1/items.", &self.items_published),
            ("needle_items_deleted_total", "Items deleted through DELETE /v1/items.", &self.items_deleted),
            ("needle_changes_followed_total", "Catalogue changes announced by other servers on the store and applied here.", &self.changes_followed),
            ("needle_resyncs_total", "Full re-reads of the store's catalogue changes after a missed announcement.", &self.resyncs),
            ("needle_reloads_total", "Successful model reloads.", &self.reloads),
            ("needle_shed_total", "Requests turned away (503) over capacity: --max-in-flight in flight, or a compute queue longer than --max-queue-wait.", &self.shed),
            (
                "needle_reload_failures_total",
                "Reloads that failed (the old model kept serving).",
                &self.reload_failures,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Relaxed));
        }
        if let Some(rss) = resident_bytes() {
            let _ = writeln!(out, "# HELP process_resident_memory_bytes Resident memory size in bytes.");
            let _ = writeln!(out, "# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {rss}");
        }
        if let Some(fds) = open_fds() {
            let _ = writeln!(out, "# HELP process_open_fds Open file descriptors.");
            let _ = writeln!(out, "# TYPE process_open_fds gauge\nprocess_open_fds {fds}");
        }
        let _ = writeln!(
            out,
            "# HELP needle_index_items Items in the serving index, by version.\n# TYPE needle_index_items gauge"
        );
        for v in versions {
            let _ = writeln!(out, "needle_index_items{{version=\"{}\"}} {}", v.name, v.index_items);
        }
        let _ = writeln!(out, "# HELP needle_model_info The models being served.\n# TYPE needle_model_info gauge");
        for v in versions {
            let _ = writeln!(
                out,
                "needle_model_info{{version=\"{}\",run=\"{}\",kind=\"{}\",index=\"{}\"}} 1",
                v.name, v.run_id, v.kind, v.index_params
            );
        }
        let _ = writeln!(
            out,
            "# HELP needle_traffic_weight Each version's share of recall traffic, relative to the others (0: drained).\n# TYPE needle_traffic_weight gauge"
        );
        for v in versions {
            let _ = writeln!(out, "needle_traffic_weight{{version=\"{}\"}} {}", v.name, v.weight);
        }
        let _ = writeln!(
            out,
            "# HELP needle_version_recalls_total Recalls answered by each version, by status class.\n# TYPE needle_version_recalls_total counter"
        );
        for v in versions {
            for (i, class) in ["2xx", "4xx", "5xx"].iter().enumerate() {
                let n = v.stats.by_class[i].load(Relaxed);
                let _ = writeln!(out, "needle_version_recalls_total{{version=\"{}\",class=\"{class}\"}} {n}", v.name);
            }
        }
        let _ = writeln!(
            out,
            "# HELP needle_version_recall_duration_seconds Recall latency by version.\n# TYPE needle_version_recall_duration_seconds histogram"
        );
        for v in versions {
            v.stats.latency.render(
                &mut out,
                "needle_version_recall_duration_seconds",
                &format!("version=\"{}\"", v.name),
            );
        }
        out
    }
}

/// This process's open file descriptors, from `/proc/self/fd` (Linux).
pub fn open_fds() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count())
}

/// This process's resident set size, from `/proc/self/statm` (Linux).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_counts_add_up() {
        let m = Metrics::default();
        for us in [100u64, 800, 1_500, 4_000, 30_000, 5_000_000] {
            m.record("recall", 200, Duration::from_micros(us));
        }
        m.record("recall", 400, Duration::from_micros(50));
        m.record("recall", 503, Duration::from_micros(50));
        let stats = VersionStats::default();
        stats.record(200, Duration::from_micros(700));
        stats.record(503, Duration::from_micros(90));
        let view = VersionView {
            name: "a",
            run_id: "r:1",
            kind: "youtubednn",
            index_items: 10,
            index_params: "exact",
            weight: 9,
            stats: &stats,
        };
        let text = m.render(&[view]);
        assert!(text.contains("needle_requests_total{route=\"recall\",status=\"200\"} 6"), "{text}");
        assert!(text.contains("needle_request_errors_total 1"), "{text}");
        assert!(text.contains("le=\"0.0005\"} 3\n"), "{text}");
        assert!(text.contains("le=\"0.002\"} 5\n"), "{text}");
        assert!(text.contains("le=\"2\"} 7\n"), "{text}");
        assert!(text.contains("le=\"+Inf\"} 8\n"), "{text}");
        assert!(text.contains("needle_request_duration_seconds_count{route=\"recall\"} 8"), "{text}");
        assert!(text.contains("needle_index_items{version=\"a\"} 10"), "{text}");
        assert!(text.contains("needle_traffic_weight{version=\"a\"} 9"), "{text}");
        assert!(text.contains("needle_version_recalls_total{version=\"a\",class=\"5xx\"} 1"), "{text}");
        assert!(
            text.contains("needle_version_recall_duration_seconds_bucket{version=\"a\",le=\"0.0005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("needle_version_recall_duration_seconds_bucket{version=\"a\",le=\"0.001\"} 2\n"),
            "{text}"
        );
    }
}
