//! Logging: human lines or one JSON object per line (with `job_id` at the top level),
//! filtered by `C3_AGENT_LOG`.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Info for the agent; object_store's own per-request retry lines (hundreds in an outage)
/// only from warn: the agent logs one line when an outage starts and one when it ends.
const DEFAULT_FILTER: &str = "info,object_store=warn";

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("C3_AGENT_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    // A closed stderr (journald restarted, `2>&- `, a reader that went away) loses log lines,
    // never the agent: tracing-subscriber's own error report would `eprintln!` and panic.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match format {
        LogFormat::Human => {
            use std::io::IsTerminal;
            builder
                .with_target(false)
                .with_ansi(std::io::stderr().is_terminal())
                .init()
        }
        LogFormat::Json => builder
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .init(),
    }
}

/// Like tracing-subscriber's JSON format, but span fields (`job_id`, `attempt`) are
/// lifted to the top level so that `jq 'select(.job_id == "…")'` just works.
struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut map = serde_json::Map::new();
        map.insert(
            "timestamp".into(),
            c3_runtime::display::now_rfc3339().into(),
        );
        map.insert("level".into(), event.metadata().level().as_str().into());
        map.insert("target".into(), event.metadata().target().into());
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>() {
                    if let Ok(serde_json::Value::Object(obj)) = serde_json::from_str(fields) {
                        map.extend(obj);
                    }
                }
            }
        }
        event.record(&mut Visitor(&mut map));
        writeln!(writer, "{}", serde_json::Value::Object(map))
    }
}

struct Visitor<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
}
