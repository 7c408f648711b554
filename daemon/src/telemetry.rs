//! Logs (tracing) and the small Prometheus text-format writer every domain
//! renders its metrics with.
use std::fmt::Write as _;

use tracing_subscriber::{fmt, EnvFilter};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `level`.
pub fn init_logging(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // try_init: a second call (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
}

/// Appends one metric family: HELP, TYPE, then one sample per label set
/// (`labels` is the inside of the braces, e.g. `kind="bind"`, or empty).
pub fn write_metric(out: &mut String, name: &str, help: &str, kind: MetricKind, samples: &[(String, f64)]) {
    let kind = match kind {
        MetricKind::Counter => "counter",
        MetricKind::Gauge => "gauge",
    };
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_prometheus_text() {
        let mut out = String::new();
        write_metric(&mut out, "x_total", "X.", MetricKind::Counter, &[("a=\"b\"".into(), 2.0), (String::new(), 1.5)]);
        assert_eq!(out, "# HELP x_total X.\n# TYPE x_total counter\nx_total{a=\"b\"} 2\nx_total 1.5\n");
    }
}
