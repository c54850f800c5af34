//! Where the records live: rotated file names, chain-order discovery, line reading.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::AuditError;

const SEQ_DIGITS: usize = 20;

/// `audit.jsonl` + first seq 51 → `audit.jsonl.00000000000000000051`.
pub fn rotated_file_name(base: &Path, first_seq: u64) -> PathBuf {
    let name = base
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    base.with_file_name(format!("{name}.{first_seq:0SEQ_DIGITS$}"))
}

/// `dir/audit.jsonl.00000000000000000051` → (`dir/audit.jsonl`, 51).
fn split_rotated(path: &Path) -> Option<(PathBuf, u64)> {
    let name = path.file_name()?.to_str()?;
    let (stem, digits) = name.rsplit_once('.')?;
    if stem.is_empty() || digits.len() != SEQ_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    Some((path.with_file_name(stem), digits.parse().ok()?))
}

#[derive(Default)]
struct Chain {
    rotated: BTreeMap<u64, PathBuf>,
    current: Option<PathBuf>,
}

impl Chain {
    fn into_files(self) -> Vec<PathBuf> {
        self.rotated.into_values().chain(self.current).collect()
    }
}

/// The chains named by `paths`, each in chain order (rotated files by first seq, then the
/// current file). A folder contributes every `*.jsonl` file and every rotated file in it; a
/// single base file also brings in its rotated siblings; several files are only put in order.
pub(crate) fn discover(paths: &[PathBuf]) -> Result<Vec<Vec<PathBuf>>, AuditError> {
    let mut chains: BTreeMap<PathBuf, Chain> = BTreeMap::new();
    let single = paths.len() == 1;
    for p in paths {
        let meta = match fs::metadata(p) {
            Ok(m) => m,
            // The current file may be gone (or not yet created) while rotated ones exist.
            Err(e) if single && e.kind() == io::ErrorKind::NotFound => {
                let rotated = rotated_siblings(p).unwrap_or_default();
                if rotated.is_empty() {
                    return Err(AuditError::io(p, e));
                }
                chains.entry(p.clone()).or_default().rotated.extend(rotated);
                continue;
            }
            Err(e) => return Err(AuditError::io(p, e)),
        };
        if meta.is_dir() {
            for entry in fs::read_dir(p).map_err(|e| AuditError::io(p, e))? {
                let path = entry.map_err(|e| AuditError::io(p, e))?.path();
                if !path.is_file() {
                    continue;
                }
                if let Some((base, seq)) = split_rotated(&path) {
                    chains.entry(base).or_default().rotated.insert(seq, path);
                } else if path.extension().is_some_and(|e| e == "jsonl") {
                    let chain = chains.entry(path.clone()).or_default();
                    chain.current = Some(path);
                }
            }
        } else if let Some((base, seq)) = split_rotated(p) {
            chains
                .entry(base)
                .or_default()
                .rotated
                .insert(seq, p.clone());
        } else {
            let chain = chains.entry(p.clone()).or_default();
            chain.current = Some(p.clone());
            if single {
                for (seq, path) in rotated_siblings(p).map_err(|e| AuditError::io(p, e))? {
                    chain.rotated.insert(seq, path);
                }
            }
        }
    }
    if chains.is_empty() {
        let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(AuditError::Io {
            path: paths.first().cloned().unwrap_or_default(),
            message: format!("no audit files found in {}", shown.join(", ")),
        });
    }
    Ok(chains.into_values().map(Chain::into_files).collect())
}

/// Every file of the chains named by `paths`, in chain order (see [`crate::audit::verify`]).
pub fn chain_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, AuditError> {
    Ok(discover(paths)?.into_iter().flatten().collect())
}

/// Rotated files of `base`, ordered by first seq.
pub(crate) fn rotated_siblings(base: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let dir = match base.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut out = Vec::new();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    let base_name = base.file_name();
    for entry in entries {
        let path = entry?.path();
        if let Some((stem, seq)) = split_rotated(&path)
            && stem.file_name() == base_name
            && path.is_file()
        {
            out.push((
                seq,
                base.with_file_name(path.file_name().unwrap_or_default()),
            ));
        }
    }
    out.sort();
    Ok(out)
}

/// One line of a chain of files.
pub(crate) struct Line {
    /// Index into the file list.
    pub file: usize,
    /// 1-based, per file.
    pub line: usize,
    /// Without the `\n`.
    pub bytes: Vec<u8>,
    pub terminated: bool,
}

/// Reads the lines of several files in order.
pub(crate) struct ChainLines<'a> {
    files: &'a [PathBuf],
    file: usize,
    reader: Option<BufReader<File>>,
    line: usize,
}

impl<'a> ChainLines<'a> {
    pub(crate) fn new(files: &'a [PathBuf]) -> Self {
        ChainLines {
            files,
            file: 0,
            reader: None,
            line: 0,
        }
    }
}

impl Iterator for ChainLines<'_> {
    type Item = Result<Line, AuditError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let path = self.files.get(self.file)?;
            let reader = match &mut self.reader {
                Some(r) => r,
                None => match File::open(path) {
                    Ok(f) => {
                        self.line = 0;
                        self.reader.insert(BufReader::with_capacity(256 * 1024, f))
                    }
                    Err(e) => {
                        self.file = self.files.len();
                        return Some(Err(AuditError::io(path, e)));
                    }
                },
            };
            let mut bytes = Vec::new();
            match reader.read_until(b'\n', &mut bytes) {
                Ok(0) => {
                    self.reader = None;
                    self.file += 1;
                }
                Ok(_) => {
                    self.line += 1;
                    let terminated = bytes.last() == Some(&b'\n');
                    if terminated {
                        bytes.pop();
                    }
                    return Some(Ok(Line {
                        file: self.file,
                        line: self.line,
                        bytes,
                        terminated,
                    }));
                }
                Err(e) => {
                    self.file = self.files.len();
                    return Some(Err(AuditError::io(path, e)));
                }
            }
        }
    }
}

/// The end of a file: its last complete line and where an unterminated tail starts.
pub(crate) struct Tail {
    pub last_line: Option<Vec<u8>>,
    pub torn_at: Option<u64>,
}

/// Reads backwards from the end (a growing window) so a 100 MiB file costs one small read.
pub(crate) fn scan_tail(f: &mut File, len: u64) -> io::Result<Tail> {
    let mut window: u64 = 64 * 1024;
    loop {
        let start = len.saturating_sub(window);
        let mut buf = Vec::with_capacity(usize::try_from(len - start).unwrap_or(0));
        f.seek(SeekFrom::Start(start))?;
        f.by_ref().take(len - start).read_to_end(&mut buf)?;
        let complete_end = if buf.ends_with(b"\n") {
            Some(buf.len())
        } else {
            match buf.iter().rposition(|&b| b == b'\n') {
                Some(p) => Some(p + 1),
                None if start == 0 => Some(0),
                None => None,
            }
        };
        let Some(complete_end) = complete_end else {
            window = window.saturating_mul(2);
            continue;
        };
        let torn_at = (complete_end < buf.len()).then_some(start + complete_end as u64);
        if complete_end == 0 {
            return Ok(Tail {
                last_line: None,
                torn_at,
            });
        }
        let body = &buf[..complete_end - 1];
        let line_start = match body.iter().rposition(|&b| b == b'\n') {
            Some(q) => q + 1,
            None if start == 0 => 0,
            None => {
                window = window.saturating_mul(2);
                continue;
            }
        };
        return Ok(Tail {
            last_line: Some(body[line_start..].to_vec()),
            torn_at,
        });
    }
}

/// The first line of a file, if it has a complete one.
pub(crate) fn first_line(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let mut reader = BufReader::new(File::open(path)?);
    let mut buf = Vec::new();
    reader.read_until(b'\n', &mut buf)?;
    if buf.pop() == Some(b'\n') {
        Ok(Some(buf))
    } else {
        Ok(None)
    }
}
