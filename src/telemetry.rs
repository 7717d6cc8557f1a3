//! Logs and metrics: JSON (or pretty) log lines on stderr through tracing, and the process-wide Prometheus recorder.
//!
//! Log lines carry ids, codes, routes and statuses; record bodies never reach them (PHI fields are
//! [`crate::domain::Redacted`], and no code logs a body).

use std::io::IsTerminal;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Seconds buckets of the request-latency histogram: 0.5 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// What the panic hook logs instead of a panic message that was formatted at run time.
const WITHHELD: &str = "[formatted panic message withheld: it may quote caller input]";

/// Replaces the default panic hook (which writes the raw message, caller text included, to stderr, so a caller
/// could forge log lines) with one that logs the panic once, through tracing, as one line of the configured
/// format. The line carries the current span (a request's id, method and route), the source location, and the
/// message only when the program wrote it as a literal (`unwrap()` on `None`, `panic!("…")`); a formatted
/// message (`expect` on an error, `panic!("{x}")`, a slice index out of range) is withheld.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map_or_else(|| "unknown".to_owned(), |l| format!("{}:{}", l.file(), l.line()));
        let message = info.payload().downcast_ref::<&'static str>().copied().unwrap_or(WITHHELD);
        tracing::error!(%location, panic = message, "A task panicked; its request gets a 500 and the process goes on.");
    }));
}

/// Installs the log subscriber (once; later calls keep the first) and the panic hook. `RUST_LOG` overrides
/// `log.filter`.
pub fn init_logs(settings: &LogSettings) {
    install_panic_hook();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // A second init (tests build several apps in one process) fails harmlessly: the first subscriber stays.
    let _ = match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

/// The process-wide Prometheus recorder, installed on first use.
///
/// # Panics
/// When another metrics recorder was installed first, which only code outside this crate could do.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("carebridge_http_request_duration_seconds".into()),
                    LATENCY_BUCKETS,
                )
                .and_then(PrometheusBuilder::install_recorder)
                .expect("the Prometheus recorder is installed once, before any other recorder")
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_panic_is_one_json_line_with_the_request_id_and_without_the_callers_text() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_writer(move || writer.clone())
            .finish();
        install_panic_hook();
        let forged = "x\n{\"level\":\"INFO\",\"message\":\"forged\"}";
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", request_id = "req-42", route = "/fhir/HealthcareService");
            let _entered = span.enter();
            let caught = std::panic::catch_unwind(|| {
                let text = forged.to_owned();
                panic!("byte index 1 is not a char boundary of {text}");
            });
            assert!(caught.is_err());
        });
        let _ = std::panic::take_hook();
        let text = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("UTF-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let event: serde_json::Value = serde_json::from_str(lines[0]).expect("one JSON object");
        assert_eq!(event["level"], "ERROR");
        assert_eq!(event["span"]["request_id"], "req-42");
        assert_eq!(event["panic"], WITHHELD);
        assert!(event["location"].as_str().is_some_and(|l| l.contains("telemetry.rs")), "{event}");
        assert!(!text.contains("forged"), "{text}");
    }
}
