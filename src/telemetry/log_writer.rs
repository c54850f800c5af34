//! Where log lines go: standard error, gathered. Lines at `info` and below (the one line per
//! request among them) are appended to a buffer that is written out at most
//! [`FLUSH_INTERVAL`] later, or at once when it holds [`FLUSH_BYTES`]; a warning or an error is
//! written at once, after everything gathered before it, so lines keep their order and a problem
//! shows without delay. Under load this turns a `write(2)` per request into one per interval.
//!
//! What a crash can cost: the info lines of the last interval (a panic is logged as an error,
//! which writes everything before it). [`flush`] writes what is gathered; the process calls it
//! before it exits.

use std::io::{self, Write};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// The longest an info line waits in the buffer.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// A buffer this full is written out by the line that filled it (so memory stays bounded, and a
/// standard error that does not drain slows logging down instead of growing the buffer).
pub const FLUSH_BYTES: usize = 64 * 1024;

/// The gathered lines, and the right to write to the destination (held while writing, so
/// writes keep the order in which lines were gathered; never held by an info line's append).
struct Gathered<W> {
    lines: Mutex<Vec<u8>>,
    out: Mutex<W>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<W: Write> Gathered<W> {
    fn new(out: W) -> Self {
        Gathered {
            lines: Mutex::new(Vec::new()),
            out: Mutex::new(out),
        }
    }

    /// Appends `line`; writes everything out when `urgent` or when the buffer is full.
    fn append(&self, line: &[u8], urgent: bool) -> io::Result<()> {
        let full = {
            let mut lines = lock(&self.lines);
            lines.extend_from_slice(line);
            lines.len() >= FLUSH_BYTES
        };
        if urgent || full {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes out what is gathered. The buffer is taken (appends go on into a new one while the
    /// write is under way).
    fn flush(&self) -> io::Result<()> {
        let mut out = lock(&self.out);
        let batch = std::mem::take(&mut *lock(&self.lines));
        if batch.is_empty() {
            return Ok(());
        }
        out.write_all(&batch)?;
        out.flush()
    }
}

fn stderr_lines() -> &'static Gathered<io::Stderr> {
    static GATHERED: OnceLock<Gathered<io::Stderr>> = OnceLock::new();
    GATHERED.get_or_init(|| {
        let _ = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(FLUSH_INTERVAL);
                    let _ = stderr_lines().flush();
                }
            });
        Gathered::new(io::stderr())
    })
}

/// Writes what is gathered for standard error now.
pub fn flush() {
    let _ = stderr_lines().flush();
}

/// The `tracing_subscriber` writer for standard error, gathering as described above.
#[derive(Clone, Copy, Debug, Default)]
pub struct GatheredStderr;

/// One log line's writer: the formatter writes a whole line, then drops it.
pub struct Line {
    urgent: bool,
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        stderr_lines().append(buf, self.urgent)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for GatheredStderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line { urgent: true }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        // In `tracing`, more verbose levels compare greater: WARN and ERROR are the urgent ones.
        Line {
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A destination that records each `write` call.
    #[derive(Clone, Default)]
    struct Calls(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Calls {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            lock(&self.0).push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn written(calls: &Calls) -> Vec<String> {
        lock(&calls.0)
            .iter()
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect()
    }

    #[test]
    fn info_lines_are_written_together_on_flush_and_not_before() {
        let calls = Calls::default();
        let g = Gathered::new(calls.clone());
        g.append(b"one\n", false).unwrap();
        g.append(b"two\n", false).unwrap();
        assert!(written(&calls).is_empty());
        g.flush().unwrap();
        assert_eq!(written(&calls), ["one\ntwo\n"]);
        g.flush().unwrap();
        assert_eq!(
            written(&calls).len(),
            1,
            "nothing gathered, nothing written"
        );
    }

    #[test]
    fn an_urgent_line_is_written_at_once_after_the_lines_gathered_before_it() {
        let calls = Calls::default();
        let g = Gathered::new(calls.clone());
        g.append(b"info\n", false).unwrap();
        g.append(b"warn\n", true).unwrap();
        assert_eq!(written(&calls), ["info\nwarn\n"]);
    }

    #[test]
    fn a_full_buffer_is_written_by_the_line_that_filled_it() {
        let calls = Calls::default();
        let g = Gathered::new(calls.clone());
        let line = vec![b'x'; 1000];
        let mut appended = 0;
        while written(&calls).is_empty() {
            g.append(&line, false).unwrap();
            appended += line.len();
            assert!(appended <= FLUSH_BYTES + line.len(), "never written");
        }
        assert!(appended >= FLUSH_BYTES);
        assert_eq!(written(&calls)[0].len(), appended);
    }

    #[test]
    fn warnings_and_errors_are_urgent_and_info_and_debug_are_not() {
        let urgent = |level: Level| {
            struct Cs;
            impl tracing::Callsite for Cs {
                fn set_interest(&self, _: tracing::subscriber::Interest) {}
                fn metadata(&self) -> &Metadata<'_> {
                    unreachable!()
                }
            }
            static CS: Cs = Cs;
            let meta = Metadata::new(
                "line",
                "test",
                level,
                None,
                None,
                None,
                tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&CS)),
                tracing::metadata::Kind::EVENT,
            );
            GatheredStderr.make_writer_for(&meta).urgent
        };
        assert!(urgent(Level::ERROR));
        assert!(urgent(Level::WARN));
        assert!(!urgent(Level::INFO));
        assert!(!urgent(Level::DEBUG));
    }
}
