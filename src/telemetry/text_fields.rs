//! The fields of a text log line (and of the spans it names), written without going through
//! `nu-ansi-term` when the line has no colours.
//!
//! `tracing-subscriber`'s `DefaultFields` paints every field name and `=` with an ANSI style even
//! when colours are off (the style is then empty, but each paint is a trip through `fmt`): about
//! 10 000 instructions of the request line's 20 000 (`bench/instructions.sh`). [`PlainFields`]
//! writes exactly the same bytes directly; with colours on, or for an error value, it hands the
//! field to `DefaultFields`' own visitor. `plain_fields_write_what_default_fields_write` holds it
//! to that, byte for byte.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{DefaultFields, DefaultVisitor, Writer};

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
    }

    fn capture(ansi: bool, plain: bool) -> String {
        let buf = Buf::default();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(buf.clone())
            .with_ansi(ansi)
            .without_time();
        if plain {
            let subscriber =
                tracing_subscriber::registry().with(layer.fmt_fields(PlainFields::new()));
            tracing::subscriber::with_default(subscriber, emit);
        } else {
            let subscriber = tracing_subscriber::registry().with(layer);
            tracing::subscriber::with_default(subscriber, emit);
        }
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn plain_fields_write_what_default_fields_write() {
        let default = capture(false, false);
        // The events above all made it (so a match is not two empty logs).
        assert_eq!(default.lines().count(), 7, "{default}");
        assert!(default.contains("request finished"), "{default}");
        assert_eq!(capture(false, true), default);
    }

    #[test]
    fn plain_fields_with_colours_are_default_fields() {
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
