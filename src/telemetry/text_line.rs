//! A text log line written without going through `nu-ansi-term` when it has no colours.
//!
//! `tracing-subscriber`'s full format paints every field name, `=`, span name, brace, colon and
//! target with an ANSI style even when colours are off (the style is then empty, but each paint
//! is a trip through `fmt`): about 10 000 of the request line's 20 000 instructions
//! (`bench/instructions.sh`). [`PlainEvent`] and [`PlainFields`] write exactly the same bytes
//! directly; with colours on (a terminal), or for an error value, they hand over to
//! `tracing-subscriber`'s own formatters. The tests below hold them to that, byte for byte.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent as _;
use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultFields, DefaultVisitor, Format, Full, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Formats an event as `tracing-subscriber`'s default (full) format does, with its timer `T`
/// (the system clock, RFC 3339 in UTC, by default); see the module documentation.
#[derive(Debug)]
pub struct PlainEvent<T = SystemTime> {
    timer: T,
    coloured: Format<Full, T>,
}

impl PlainEvent {
    pub fn new() -> PlainEvent {
        PlainEvent::with_timer(SystemTime)
    }
}

impl Default for PlainEvent {
    fn default() -> Self {
        PlainEvent::new()
    }
}

impl<T: FormatTime + Clone> PlainEvent<T> {
    pub fn with_timer(timer: T) -> PlainEvent<T> {
        PlainEvent {
            coloured: tracing_subscriber::fmt::format().with_timer(timer.clone()),
            timer,
        }
    }
}

impl<S, N, T> FormatEvent<S, N> for PlainEvent<T>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    T: FormatTime,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if writer.has_ansi_escapes() {
            return self.coloured.format_event(ctx, writer, event);
        }
        // A `log` record's own target and level, as the default format shows them.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        if self.timer.format_time(&mut writer).is_err() {
            writer.write_str("<unknown time>")?;
        }
        writer.write_str(match *meta.level() {
            Level::TRACE => " TRACE ",
            Level::DEBUG => " DEBUG ",
            Level::INFO => "  INFO ",
            Level::WARN => "  WARN ",
            Level::ERROR => " ERROR ",
        })?;
        if let Some(scope) = ctx.event_scope() {
            let mut seen = false;
            for span in scope.from_root() {
                writer.write_str(span.metadata().name())?;
                seen = true;
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    writer.write_char('{')?;
                    writer.write_str(fields)?;
                    writer.write_char('}')?;
                }
                writer.write_char(':')?;
            }
            if seen {
                writer.write_char(' ')?;
            }
        }
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        ctx.format_fields(writer.by_ref(), event)?;
        writer.write_char('\n')
    }
}

/// Formats fields as `DefaultFields` does; see the module documentation.
#[derive(Debug, Default)]
pub struct PlainFields {
    coloured: DefaultFields,
}

impl PlainFields {
    pub fn new() -> PlainFields {
        PlainFields::default()
    }
}

impl<'writer> FormatFields<'writer> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        if writer.has_ansi_escapes() {
            return self.coloured.format_fields(writer, fields);
        }
        let mut visitor = PlainVisitor {
            sanitize: writer.sanitizes_ansi_escapes(),
            writer,
            is_empty: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct PlainVisitor<'a> {
    writer: Writer<'a>,
    sanitize: bool,
    is_empty: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    /// Writes `name=` (after a space unless first); `false` for a field `DefaultFields` skips
    /// (`log.*`: metadata of a `log` record, already in the line).
    fn start(&mut self, name: &str) -> bool {
        if self.result.is_err() || name.starts_with("log.") {
            return false;
        }
        if !std::mem::replace(&mut self.is_empty, false) {
            self.result = self.writer.write_char(' ');
        }
        if name != "message" {
            let name = name.strip_prefix("r#").unwrap_or(name);
            self.result = self
                .result
                .and_then(|()| self.writer.write_str(name))
                .and_then(|()| self.writer.write_char('='));
        }
        self.result.is_ok()
    }

    fn write(&mut self, args: fmt::Arguments<'_>) {
        self.result = self.writer.write_fmt(args);
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if !self.start(field.name()) {
            return;
        }
        if field.name() == "message" {
            // As `DefaultFields`: the text as is, with terminal control characters escaped.
            self.result = escape_controls(&mut self.writer, value, self.sanitize);
        } else if value
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
        {
            // What `{:?}` writes for a string with nothing to escape.
            self.result = self
                .writer
                .write_char('"')
                .and_then(|()| self.writer.write_str(value))
                .and_then(|()| self.writer.write_char('"'));
        } else {
            self.write(format_args!("{value:?}"));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.start(field.name()) {
            self.write(format_args!("{value}"));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.start(field.name()) {
            self.write(format_args!("{value}"));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.start(field.name()) {
            self.result = self.writer.write_str(if value { "true" } else { "false" });
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // Rare, and written with its sources: `DefaultFields`' own visitor does it.
        if self.result.is_err() {
            return;
        }
        let skipped = field.name().starts_with("log.");
        let mut default = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        default.record_error(field, value);
        self.result = default.finish();
        self.is_empty &= skipped;
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !self.start(field.name()) {
            return;
        }
        if field.name() == "message" {
            let mut escaping = Escaping {
                inner: &mut self.writer,
                sanitize: self.sanitize,
            };
            self.result = write!(escaping, "{value:?}");
        } else {
            self.write(format_args!("{value:?}"));
        }
    }
}

/// Whether `tracing-subscriber` escapes `c` in a message: the C0 controls terminals act on, DEL
/// and the C1 controls.
fn is_escaped(c: char) -> bool {
    matches!(
        c,
        '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
    )
}

/// Writes `s`, escaping as `tracing-subscriber` does (`\x1b`, `\u{9b}`), in runs.
fn escape_controls(out: &mut impl fmt::Write, s: &str, sanitize: bool) -> fmt::Result {
    if !sanitize {
        return out.write_str(s);
    }
    let mut rest = s;
    while let Some((at, c)) = rest.char_indices().find(|&(_, c)| is_escaped(c)) {
        out.write_str(&rest[..at])?;
        match c {
            '\u{80}'..='\u{9f}' => write!(out, "\\u{{{:x}}}", c as u32)?,
            c => write!(out, "\\x{:02x}", c as u32)?,
        }
        rest = &rest[at + c.len_utf8()..];
    }
    out.write_str(rest)
}

/// A writer that escapes what passes through it, for a message given as `fmt::Arguments`.
struct Escaping<'a, W> {
    inner: &'a mut W,
    sanitize: bool,
}

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        escape_controls(self.inner, s, self.sanitize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::layer::SubscriberExt as _;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    #[derive(Debug)]
    struct Inner;
    impl fmt::Display for Inner {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("inner \x1b[2J cause")
        }
    }
    impl std::error::Error for Inner {}

    #[derive(Debug)]
    struct Outer(Inner);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outer \"failure\"")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[derive(Debug)]
    #[allow(dead_code)] // read by its Debug output
    struct Shape {
        name: &'static str,
        n: u8,
    }

    /// Every kind of field and message the gateway (or a library) may log, in spans with fields,
    /// one recorded later.
    fn emit() {
        let outer = tracing::info_span!("request", request_id = %"0a1b", method = "GET", otel.kind = "server", status = tracing::field::Empty);
        let _o = outer.enter();
        outer.record("status", 200u64);
        tracing::info!(
            target: "greenhouse_gateway::access",
            request_id = %"0a1b",
            team = Some("sourcing"),
            operation = None::<&str>,
            status = 200u64,
            signed = -3i64,
            duration_ms = 1.0f64,
            upstream_ms = 0.125f64,
            big = 1e21f64,
            nan = f64::NAN,
            negative_zero = -0.0f64,
            flag = true,
            r#type = "kind",
            "request finished"
        );
        let inner = tracing::warn_span!("upstream", peer = "127.0.0.1:1");
        let _i = inner.enter();
        tracing::warn!(
            quoted = "say \"hi\" \\ there",
            unicode = "Zoë ✓",
            control = "bell\x07 tab\t nl\n esc\x1b c1\u{9b}",
            empty = "",
            shown = %"display \x1b[31m raw",
            shape = ?Shape { name: "x", n: 7 },
            error = &Outer(Inner) as &(dyn std::error::Error + 'static),
            "message {} with \x1b[31m escape and \u{85} C1 and \x7f",
            "args"
        );
        tracing::error!(error = &Inner as &(dyn std::error::Error + 'static));
        tracing::info!("");
        tracing::info!(only = 1u64);
        tracing::debug!(text = "bare {message} word");
        tracing::info!(message = "a plain str message \x08 bs", then = "x");
        drop(_i);
        drop(_o);
        // Outside any span, and a `log` record (its own target and level, `log.*` fields left out).
        tracing::trace!(target: "elsewhere", n = 1u64, "no span");
        let _ = tracing_log::LogTracer::init();
        tracing_log::log::warn!(target: "rustls::conn", "a log record with {} args", 2);
    }

    /// A clock that always says the same (so two formatters' lines can be compared).
    #[derive(Clone)]
    struct Fixed;
    impl FormatTime for Fixed {
        fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
            w.write_str("2026-12-07T14:30:00.000123Z")
        }
    }

    /// A clock that cannot tell the time.
    #[derive(Clone)]
    struct Broken;
    impl FormatTime for Broken {
        fn format_time(&self, _: &mut Writer<'_>) -> fmt::Result {
            Err(fmt::Error)
        }
    }

    /// What `emit` logs, through ours (`plain`) or `tracing-subscriber`'s formatters.
    fn capture_with<T: FormatTime + Clone + Send + Sync + 'static>(
        timer: T,
        ansi: bool,
        plain: bool,
    ) -> String {
        let buf = Buf::default();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(buf.clone())
            .with_ansi(ansi);
        if plain {
            let layer = layer
                .event_format(PlainEvent::with_timer(timer))
                .fmt_fields(PlainFields::new());
            tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), emit);
        } else {
            let layer = layer.with_timer(timer);
            tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), emit);
        }
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    fn capture(ansi: bool, plain: bool) -> String {
        capture_with(Fixed, ansi, plain)
    }

    #[test]
    fn plain_lines_are_what_the_default_format_writes() {
        let default = capture(false, false);
        // The events above all made it (so a match is not two empty logs).
        assert_eq!(default.lines().count(), 9, "{default}");
        assert!(default.contains("request finished"), "{default}");
        assert!(
            default.contains("WARN rustls::conn: a log record"),
            "{default}"
        );
        assert_eq!(capture(false, true), default);
    }

    #[test]
    fn a_clock_that_fails_is_written_as_default_writes_it() {
        let default = capture_with(Broken, false, false);
        assert!(default.starts_with("<unknown time>  INFO "), "{default}");
        assert_eq!(capture_with(Broken, false, true), default);
    }

    #[test]
    fn the_real_clock_writes_rfc_3339_then_the_line() {
        let plain = capture_with(SystemTime, false, true);
        let first = plain.lines().next().unwrap();
        // 2026-12-07T14:30:00.123456Z  INFO request{...
        let (time, rest) = first.split_once(' ').unwrap();
        assert_eq!(time.len(), 27, "{first}");
        assert!(
            time.ends_with('Z') && time.as_bytes()[10] == b'T',
            "{first}"
        );
        assert!(rest.starts_with(" INFO request{request_id=0a1b"), "{first}");
    }

    #[test]
    fn with_colours_the_default_format_writes_them() {
        let default = capture(true, false);
        assert!(default.contains('\x1b'), "{default}");
        assert_eq!(capture(true, true), default);
    }

    #[test]
    fn message_controls_are_escaped_as_tracing_escapes_them() {
        let mut out = String::new();
        escape_controls(
            &mut out,
            "a\x1bb\x07\x08\x0c\x7f\u{80}\u{9f}\u{a0}é\n",
            true,
        )
        .unwrap();
        assert_eq!(out, "a\\x1bb\\x07\\x08\\x0c\\x7f\\u{80}\\u{9f}\u{a0}é\n");
        let mut raw = String::new();
        escape_controls(&mut raw, "a\x1b", false).unwrap();
        assert_eq!(raw, "a\x1b");
    }
}
