//! Logs (tracing) and the glue of `/metrics` to the Prometheus client
//! (`prometheus-client`), which owns the exposition format: names, `_total`
//! suffixes, label escaping, number formatting.
//!
//! The daemon keeps its counters as atomics inside the domains, and some
//! values are absolute counts read from the kernel, so nothing is
//! instrumented through the client's own metric types: each domain is a
//! [`Collector`] that encodes const samples from its state when scraped.
//! A [`Registry`] is built per scrape by [`encode`], one collector per domain:
//! the collectors are cheap clones of the handles the HTTP sink already
//! holds, so no registry needs to live in the shared state, and a domain that
//! is absent (the Kubernetes side in standalone mode) is simply not
//! registered.
//!
//! The encoding is the Prometheus text format 0.0.4 ([`CONTENT_TYPE`]), not
//! OpenMetrics: OpenMetrics names a counter's family without `_total`, which
//! `promtool check metrics` (Prometheus 2.x) reads as families without HELP,
//! and the 0.0.4 text is what the daemon exposed before.
use std::fmt;

use prometheus_client::{
    collector::Collector,
    encoding::{prometheus_text, DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric as _, NoLabelSet},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};
use tracing_subscriber::{fmt as log_fmt, EnvFilter};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `level`.
pub fn init_logging(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = log_fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // try_init: a second call (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The `Content-Type` of what [`encode`] returns.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Encodes the collectors, in order, into one exposition. Errors only if a
/// collector does.
pub fn encode(collectors: impl IntoIterator<Item = Box<dyn Collector>>) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    for c in collectors {
        registry.register_collector(c);
    }
    let mut out = String::with_capacity(8192);
    prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

/// A domain's metrics as a [`Collector`]: `encode` renders them from the
/// domain's own state at each scrape. `name` is only for `Debug`.
pub fn collector<F>(name: &'static str, encode: F) -> Box<dyn Collector>
where
    F: Fn(&mut DescriptorEncoder<'_>) -> fmt::Result + Send + Sync + 'static,
{
    Box::new(FnCollector { name, encode })
}

struct FnCollector<F> {
    name: &'static str,
    encode: F,
}

impl<F> fmt::Debug for FnCollector<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnCollector").field("name", &self.name).finish_non_exhaustive()
    }
}

impl<F> Collector for FnCollector<F>
where
    F: Fn(&mut DescriptorEncoder<'_>) -> fmt::Result + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        (self.encode)(&mut encoder)
    }
}

/// `polarstack_build_info{version="…"} 1`.
pub fn encode_build_info(e: &mut DescriptorEncoder<'_>) -> fmt::Result {
    gauge_by(e, "polarstack_build_info", "Build information.", [([("version", env!("CARGO_PKG_VERSION"))], 1u64)])
}

/// The family name the client wants for a counter exposed as `name`: it
/// appends `_total` itself. Callers pass the exposed name, so the names in
/// the code are the ones dashboards and rules use.
fn counter_family(name: &str) -> &str {
    name.strip_suffix("_total").unwrap_or(name)
}

/// A counter family without labels, exposed as `name` (with its `_total`).
pub fn counter(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> fmt::Result {
    let metric = e.encode_descriptor(counter_family(name), help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(metric)
}

/// A counter family with one sample per label set (labels in the order
/// given), exposed as `name` (with its `_total`). No samples still writes
/// HELP and TYPE.
pub fn counter_by<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut metric = e.encode_descriptor(counter_family(name), help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A gauge family without labels. Integers are written as integers, `f64`
/// as the client formats floats.
pub fn gauge<V: EncodeGaugeValue>(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: V) -> fmt::Result {
    let metric = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
}

/// A gauge family with one sample per label set (labels in the order given).
pub fn gauge_by<L: EncodeLabelSet, V: EncodeGaugeValue>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut metric = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// `name_sum` and `name_count` of one family, so `rate(_sum) / rate(_count)`
/// is a mean. The client has no summary type, so this is a histogram whose
/// only bucket is the implicit `le="+Inf"` (equal to `_count`).
pub fn sum_count(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, sum: f64, count: u64) -> fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Histogram)?.encode_histogram::<NoLabelSet>(sum, count, &[], None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(f: impl Fn(&mut DescriptorEncoder<'_>) -> fmt::Result + Send + Sync + 'static) -> String {
        encode([collector("test", f)]).expect("encodes")
    }

    #[test]
    fn writes_prometheus_text() {
        let out = text(|e| {
            counter_by(e, "x_total", "X.", [([("a", "b")], 2)])?;
            counter(e, "y_total", "Y.", 0)?;
            gauge(e, "z_seconds", "Z.", 1.5)?;
            gauge_by(e, "w", "W.", [([("b", "1"), ("a", "2")], 1u64)])
        });
        assert_eq!(
            out,
            "# HELP x_total X.\n# TYPE x_total counter\nx_total{a=\"b\"} 2\n\
             # HELP y_total Y.\n# TYPE y_total counter\ny_total 0\n\
             # HELP z_seconds Z.\n# TYPE z_seconds gauge\nz_seconds 1.5\n\
             # HELP w W.\n# TYPE w gauge\nw{b=\"1\",a=\"2\"} 1\n"
        );
    }

    #[test]
    fn escapes_label_values() {
        let out = text(|e| gauge_by(e, "g", "G.", [([("path", "/a\"b\\c\nd".to_string())], 1u64)]));
        assert!(out.contains("g{path=\"/a\\\"b\\\\c\\nd\"} 1\n"), "{out}");
    }

    #[test]
    fn sum_and_count() {
        let out = text(|e| sum_count(e, "d_seconds", "D.", 0.25, 2));
        assert_eq!(
            out,
            "# HELP d_seconds D.\n# TYPE d_seconds histogram\nd_seconds_bucket{le=\"+Inf\"} 2\n\
             d_seconds_sum 0.25\nd_seconds_count 2\n"
        );
    }
}
