//! Finding records: filters across rotated files, JSON lines or an aligned table.

use std::io::Write;
use std::path::PathBuf;

use time::OffsetDateTime;

use super::files::{ChainLines, discover};
use super::record::parse_ts;
use super::{AuditError, AuditRecord, Decision};

/// Every set field must match (exact, case-sensitive); unset fields match everything.
#[derive(Clone, Debug, Default)]
pub struct QueryFilter {
    pub team: Option<String>,
    pub subject: Option<String>,
    pub operation: Option<String>,
    pub on_behalf_of: Option<String>,
    pub decision: Option<Decision>,
    pub code: Option<String>,
    pub status: Option<u16>,
    /// `ts >= since`.
    pub since: Option<OffsetDateTime>,
    /// `ts < until`.
    pub until: Option<OffsetDateTime>,
    /// One of the record's `external_ids`.
    pub external_id: Option<String>,
    /// One of the record's `candidate_ids`.
    pub candidate_id: Option<i64>,
}

impl QueryFilter {
    pub fn matches(&self, rec: &AuditRecord) -> bool {
        fn same(want: &Option<String>, have: &Option<String>) -> bool {
            want.is_none() || want == have
        }
        if !(same(&self.team, &rec.team)
            && same(&self.subject, &rec.subject)
            && same(&self.operation, &rec.operation)
            && same(&self.on_behalf_of, &rec.on_behalf_of)
            && same(&self.code, &rec.code))
        {
            return false;
        }
        if self.decision.is_some_and(|d| d != rec.decision)
            || self.status.is_some_and(|s| s != rec.status)
        {
            return false;
        }
        if let Some(id) = &self.external_id
            && !rec.external_ids.contains(id)
        {
            return false;
        }
        if let Some(id) = self.candidate_id
            && !rec.candidate_ids.contains(&id)
        {
            return false;
        }
        if self.since.is_some() || self.until.is_some() {
            // A record without a readable time cannot be shown to be inside the range.
            let Some(ts) = parse_ts(&rec.ts) else {
                return false;
            };
            if self.since.is_some_and(|s| ts < s) || self.until.is_some_and(|u| ts >= u) {
                return false;
            }
        }
        true
    }
}

/// The matching records, in chain order, across the rotated files of `files` (discovered as in
/// [`crate::audit::verify`]). Lines that are not records (a torn tail, damage) are skipped with
/// a warning: `audit verify` is the tool that judges them.
pub fn query(files: &[PathBuf], filter: &QueryFilter) -> Result<Vec<AuditRecord>, AuditError> {
    let mut out = Vec::new();
    for chain in discover(files)? {
        for line in ChainLines::new(&chain) {
            let line = line?;
            match serde_json::from_slice::<AuditRecord>(&line.bytes) {
                Ok(rec) => {
                    if filter.matches(&rec) {
                        out.push(rec);
                    }
                }
                Err(e) => tracing::warn!(
                    file = %chain[line.file].display(),
                    line = line.line,
                    error = %e,
                    "skipping a line that is not an audit record"
                ),
            }
        }
    }
    Ok(out)
}

const COLUMNS: [&str; 9] = [
    "ts",
    "team",
    "subject",
    "operation",
    "on_behalf_of",
    "decision",
    "status",
    "code",
    "request_id",
];

/// The longest cell, in characters; longer values end in `…`.
const MAX_CELL: usize = 64;

/// An aligned table (two spaces between columns, no trailing spaces), one header row, `-` for
/// absent values. Control characters are shown escaped so a value cannot drive the terminal.
pub fn render_table(records: &[AuditRecord]) -> String {
    let rows: Vec<[String; 9]> = records
        .iter()
        .map(|r| {
            let opt = |v: &Option<String>| v.as_deref().map_or_else(|| "-".to_string(), cell);
            [
                cell(&r.ts),
                opt(&r.team),
                opt(&r.subject),
                opt(&r.operation),
                opt(&r.on_behalf_of),
                r.decision.to_string(),
                r.status.to_string(),
                opt(&r.code),
                cell(&r.request_id),
            ]
        })
        .collect();
    let mut widths = COLUMNS.map(|c| c.chars().count());
    for row in &rows {
        for (w, v) in widths.iter_mut().zip(row) {
            *w = (*w).max(v.chars().count());
        }
    }
    let mut out = String::new();
    let header = COLUMNS.map(String::from);
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (v, w)) in row.iter().zip(widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(v);
            for _ in v.chars().count()..w {
                line.push(' ');
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn cell(v: &str) -> String {
    let long = v.chars().count() > MAX_CELL;
    let mut out = String::new();
    for (n, c) in v.chars().enumerate() {
        if long && n == MAX_CELL - 1 {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// `audit query`: prints the matching records as JSON lines (exactly as stored) or, with
/// `table`, as [`render_table`]. Exit code 0, or 1 when the files cannot be read.
pub fn cli_query(files: &[PathBuf], filter: &QueryFilter, table: bool) -> i32 {
    let records = match query(files, filter) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    let mut out = std::io::stdout().lock();
    if table {
        let _ = out.write_all(render_table(&records).as_bytes());
    } else {
        for rec in &records {
            let Ok(line) = serde_json::to_string(rec) else {
                continue;
            };
            // A closed pipe (`| head`) ends the output quietly.
            if writeln!(out, "{line}").is_err() {
                break;
            }
        }
    }
    let _ = out.flush();
    0
}
