//! The dedicated writer: a bounded queue, group commit, rotation, continuation after restart.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::oneshot;

use super::chain::{self, ChainKey, GENESIS_PREV_HASH};
use super::files::{self, rotated_file_name, rotated_siblings};
use super::record::format_ts;
use super::{AuditError, AuditRecord, AuditSettings, Fsync, OnError};

type Ack = oneshot::Sender<Result<(), AuditError>>;

enum Msg {
    Record(Box<AuditRecord>, Ack),
    Shutdown(oneshot::Sender<()>),
}

/// What the writer and the handles share.
struct Shared {
    failed: AtomicBool,
    closed: AtomicBool,
    pending: AtomicUsize,
    capacity: usize,
    written: AtomicU64,
    errors: AtomicU64,
}

struct Inner {
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
    on_error: OnError,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The audit log of a running gateway. Cloning is cheap (one `Arc`).
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("healthy", &self.healthy())
            .field("records_written", &self.records_written())
            .field("errors", &self.errors())
            .finish()
    }
}

/// The most records committed by one `write(2)`.
const MAX_GROUP: usize = 1024;

impl AuditLog {
    /// Opens the log (creating folders), continues the chain of the newest file (a torn last
    /// line is moved aside to `<file>.torn-<unix ms>` and logged), and starts the writer thread.
    ///
    /// Fails when the file cannot be created or opened, when the last complete line of the
    /// newest file is not a record (the chain cannot be continued: look at it with
    /// `audit verify`), or when the settings are unusable.
    pub fn open(settings: AuditSettings) -> Result<AuditLog, AuditError> {
        if settings.queue_capacity == 0 {
            return Err(AuditError::Settings(
                "queue_capacity must be at least 1".into(),
            ));
        }
        let key = ChainKey::new(settings.hmac_key.as_ref())?;
        let base = settings.path.clone();
        if let Some(parent) = base.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|e| AuditError::io(parent, e))?;
        }
        let (next_seq, prev_hash) = match recover_chain(&base, &key)? {
            Some(last) => (last.seq.saturating_add(1), last.hash),
            None => (1, GENESIS_PREV_HASH.to_string()),
        };
        let base_first_seq = first_seq_of(&base)?;
        let shared = Arc::new(Shared {
            failed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            pending: AtomicUsize::new(0),
            capacity: settings.queue_capacity,
            written: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        });
        let mut writer = Writer {
            base,
            file: None,
            regular: true,
            file_len: 0,
            file_first_seq: base_first_seq,
            next_seq,
            prev_hash: prev_hash.clone(),
            committed: (next_seq, prev_hash),
            needs_truncate: false,
            key,
            fsync: settings.fsync,
            rotate_bytes: settings.rotate_bytes,
            batch_interval: settings.batch_interval,
            last_sync: Instant::now(),
            dirty: false,
            buf: Vec::with_capacity(64 * 1024),
            canon: Vec::with_capacity(4096),
            shared: shared.clone(),
        };
        writer
            .open_current()
            .map_err(|e| AuditError::io(&writer.base, e))?;
        let (tx, rx) = mpsc::sync_channel(settings.queue_capacity);
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| AuditError::Write(format!("cannot start the audit writer: {e}")))?;
        Ok(AuditLog {
            inner: Arc::new(Inner {
                tx,
                shared,
                on_error: settings.on_error,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// Queues the record and resolves when it is durable per the fsync mode: with
    /// [`Fsync::Always`] after the fsync of the group that contains it, otherwise after its
    /// `write(2)`. Fails at once when the queue is full or the log is shut down, and when the
    /// group could not be written. Dropping the future does not withdraw the record.
    ///
    /// With [`Fsync::Always`] a failed fsync fails the waiters of records that did reach the
    /// file (the chain goes on from them): such a record may still be found in the log.
    pub async fn write(&self, rec: AuditRecord) -> Result<(), AuditError> {
        let shared = &self.inner.shared;
        if shared.closed.load(Ordering::Acquire) {
            return Err(AuditError::Closed);
        }
        let (ack, done) = oneshot::channel();
        shared.pending.fetch_add(1, Ordering::AcqRel);
        match self.inner.tx.try_send(Msg::Record(Box::new(rec), ack)) {
            Ok(()) => {}
            Err(e) => {
                shared.pending.fetch_sub(1, Ordering::AcqRel);
                shared.errors.fetch_add(1, Ordering::Relaxed);
                return Err(match e {
                    TrySendError::Full(_) => AuditError::QueueFull(shared.capacity),
                    TrySendError::Disconnected(_) => AuditError::Closed,
                });
            }
        }
        done.await.unwrap_or(Err(AuditError::Closed))
    }

    /// False after a write error until a write succeeds again, while the queue is full, and
    /// after shutdown.
    pub fn healthy(&self) -> bool {
        let s = &self.inner.shared;
        !s.failed.load(Ordering::Acquire)
            && !s.closed.load(Ordering::Acquire)
            && s.pending.load(Ordering::Acquire) < s.capacity
    }

    pub fn on_error(&self) -> OnError {
        self.inner.on_error
    }

    /// Records written (acknowledged as durable per the fsync mode).
    pub fn records_written(&self) -> u64 {
        self.inner.shared.written.load(Ordering::Relaxed)
    }

    /// Records refused (queue full) or not written (I/O error), plus failed periodic fsyncs.
    pub fn errors(&self) -> u64 {
        self.inner.shared.errors.load(Ordering::Relaxed)
    }

    /// Writes and fsyncs everything queued, then stops the writer. Later writes fail with
    /// [`AuditError::Closed`]. Waits (blocking this thread) for a queue slot when the queue is
    /// full.
    pub async fn shutdown(&self) {
        self.inner.shared.closed.store(true, Ordering::Release);
        // Every caller waits for the flush; once the writer has stopped, the send fails or the
        // answer is dropped, and that is the answer.
        let (ack, done) = oneshot::channel();
        if self.inner.tx.send(Msg::Shutdown(ack)).is_ok() {
            let _ = done.await;
        }
        let handle = self
            .inner
            .thread
            .lock()
            .ok()
            .and_then(|mut guard| guard.take());
        if let Some(handle) = handle {
            // The writer has answered and only returns from `run` now.
            let _ = handle.join();
        }
    }
}

/// The last record of the newest non-empty file of the chain at `base`, after repairing a torn
/// tail there.
fn recover_chain(base: &Path, key: &ChainKey) -> Result<Option<AuditRecord>, AuditError> {
    let mut files: Vec<PathBuf> = rotated_siblings(base)
        .map_err(|e| AuditError::io(base, e))?
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    files.push(base.to_path_buf());
    for path in files.iter().rev() {
        if let Some(last) = recover_file(path, key)? {
            return Ok(Some(last));
        }
    }
    Ok(None)
}

fn recover_file(path: &Path, key: &ChainKey) -> Result<Option<AuditRecord>, AuditError> {
    let io_err = |e: io::Error| AuditError::io(path, e);
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    if !meta.is_file() || meta.len() == 0 {
        return Ok(None);
    }
    let len = meta.len();
    // Read-only unless a repair is needed: older files may have been made read-only.
    let mut f = File::open(path).map_err(io_err)?;
    let tail = files::scan_tail(&mut f, len).map_err(io_err)?;
    let mut last =
        match &tail.last_line {
            Some(line) => Some(serde_json::from_slice::<AuditRecord>(line).map_err(|e| {
                AuditError::Corrupt {
                    path: path.to_path_buf(),
                    line: 0,
                    message: format!(
                        "the last complete line is not an audit record ({e}); run `audit verify`"
                    ),
                }
            })?),
            None => None,
        };
    if let Some(last) = &last {
        let mut check = last.clone();
        let mut canon = Vec::new();
        if chain::canonical_into(&mut check, &mut canon).is_err()
            || key.digest(&check.prev_hash, &canon) != check.hash
        {
            tracing::warn!(
                file = %path.display(),
                seq = last.seq,
                "the last audit record does not verify with the configured key; continuing its chain"
            );
        }
    }
    if let Some(torn_at) = tail.torn_at {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err)?;
        let mut torn = Vec::new();
        f.seek(SeekFrom::Start(torn_at)).map_err(io_err)?;
        Read::by_ref(&mut f)
            .read_to_end(&mut torn)
            .map_err(io_err)?;
        if let Some(rec) = complete_record(&torn, last.as_ref(), key) {
            f.seek(SeekFrom::End(0)).map_err(io_err)?;
            f.write_all(b"\n").map_err(io_err)?;
            f.sync_all().map_err(io_err)?;
            tracing::warn!(
                file = %path.display(),
                seq = rec.seq,
                "the last audit record had lost its newline; terminated it"
            );
            last = Some(rec);
        } else {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let millis = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
            let aside = path.with_file_name(format!("{name}.torn-{millis}"));
            fs::write(&aside, &torn).map_err(|e| AuditError::io(&aside, e))?;
            f.set_len(torn_at).map_err(io_err)?;
            f.sync_all().map_err(io_err)?;
            tracing::warn!(
                file = %path.display(),
                bytes = torn.len(),
                moved_to = %aside.display(),
                "torn last audit line (an interrupted write) moved aside; the chain continues from the last complete record"
            );
        }
    }
    Ok(last)
}

/// `bytes` as a record that is canonical, correctly hashed and follows `prev`.
fn complete_record(
    bytes: &[u8],
    prev: Option<&AuditRecord>,
    key: &ChainKey,
) -> Option<AuditRecord> {
    let mut rec: AuditRecord = serde_json::from_slice(bytes).ok()?;
    let mut canon = Vec::new();
    chain::canonical_into(&mut rec, &mut canon).ok()?;
    let mut line = Vec::new();
    chain::push_line(&canon, &rec.hash, &mut line);
    let follows = match prev {
        Some(p) => rec.seq == p.seq.saturating_add(1) && rec.prev_hash == p.hash,
        None => true,
    };
    (line == bytes && follows && key.digest(&rec.prev_hash, &canon) == rec.hash).then_some(rec)
}

/// The seq of the first record of the current file, when it has one.
fn first_seq_of(path: &Path) -> Result<Option<u64>, AuditError> {
    match fs::metadata(path) {
        Ok(m) if m.is_file() && m.len() > 0 => {}
        _ => return Ok(None),
    }
    #[derive(serde::Deserialize)]
    struct SeqOnly {
        seq: u64,
    }
    let line = files::first_line(path).map_err(|e| AuditError::io(path, e))?;
    match line.map(|l| serde_json::from_slice::<SeqOnly>(&l)) {
        Some(Ok(s)) => Ok(Some(s.seq)),
        Some(Err(e)) => Err(AuditError::Corrupt {
            path: path.to_path_buf(),
            line: 1,
            message: format!("not an audit record ({e})"),
        }),
        None => Ok(None),
    }
}

struct Writer {
    base: PathBuf,
    file: Option<File>,
    /// False for devices and pipes: no rotation, no truncation.
    regular: bool,
    /// Bytes known to be good in the current file.
    file_len: u64,
    file_first_seq: Option<u64>,
    next_seq: u64,
    prev_hash: String,
    /// The chain position after the last record that reached the file.
    committed: (u64, String),
    /// A failed write may have left part of a line: cut back to `file_len` before writing.
    needs_truncate: bool,
    key: ChainKey,
    fsync: Fsync,
    rotate_bytes: u64,
    batch_interval: Duration,
    last_sync: Instant,
    /// Written but not yet fsynced.
    dirty: bool,
    buf: Vec<u8>,
    canon: Vec<u8>,
    shared: Arc<Shared>,
}

struct Pending {
    rec: Box<AuditRecord>,
    ack: Ack,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            let first = if self.dirty && self.fsync == Fsync::Batch {
                let deadline = self.last_sync + self.batch_interval;
                let now = Instant::now();
                if now >= deadline {
                    self.periodic_sync();
                    continue;
                }
                match rx.recv_timeout(deadline - now) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => {
                        self.periodic_sync();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(m) => m,
                    Err(_) => break,
                }
            };
            let mut group = Vec::new();
            let mut shutdown = self.take(first, &mut group);
            while shutdown.is_none() && group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(m) => shutdown = self.take(m, &mut group),
                    Err(_) => break,
                }
            }
            self.commit_group(group);
            if let Some(ack) = shutdown {
                // Nothing new is accepted once `closed` is set; write what raced in before it.
                let mut acks = vec![ack];
                loop {
                    let mut group = Vec::new();
                    while let Ok(m) = rx.try_recv() {
                        acks.extend(self.take(m, &mut group));
                    }
                    if group.is_empty() {
                        break;
                    }
                    self.commit_group(group);
                }
                self.final_sync();
                for ack in acks {
                    let _ = ack.send(());
                }
                return;
            }
        }
        self.final_sync();
    }

    fn take(&self, m: Msg, group: &mut Vec<Pending>) -> Option<oneshot::Sender<()>> {
        match m {
            Msg::Record(rec, ack) => {
                self.shared.pending.fetch_sub(1, Ordering::AcqRel);
                group.push(Pending { rec, ack });
                None
            }
            Msg::Shutdown(ack) => Some(ack),
        }
    }

    /// Encodes the group, writes it with one `write(2)` per file it lands in (rotating between
    /// them), syncs per the fsync mode, then answers every waiter.
    fn commit_group(&mut self, group: Vec<Pending>) {
        let mut written: Vec<Ack> = Vec::with_capacity(group.len());
        let mut segment: Vec<Ack> = Vec::with_capacity(group.len());
        let mut segment_first_seq: Option<u64> = None;
        let mut failure: Option<(AuditError, Vec<Ack>)> = None;
        self.buf.clear();
        let mut group = group.into_iter();
        while let Some(Pending { mut rec, ack }) = group.next() {
            let line_start = self.buf.len();
            let before = (self.next_seq, self.prev_hash.clone());
            if let Err(e) = self.encode(&mut rec) {
                self.shared.errors.fetch_add(1, Ordering::Relaxed);
                let _ = ack.send(Err(e));
                continue;
            }
            if self.must_rotate_before(line_start) {
                let line = self.buf.split_off(line_start);
                let result = self.write_segment(segment_first_seq).and_then(|()| {
                    self.committed = before;
                    written.append(&mut segment);
                    self.rotate()
                });
                if let Err(e) = result {
                    segment.push(ack);
                    segment.extend(group.by_ref().map(|p| p.ack));
                    failure = Some((e, std::mem::take(&mut segment)));
                    break;
                }
                self.buf = line;
                segment_first_seq = None;
            }
            segment_first_seq.get_or_insert(rec.seq);
            segment.push(ack);
        }
        if failure.is_none() && !segment.is_empty() {
            match self.write_segment(segment_first_seq) {
                Ok(()) => {
                    self.committed = (self.next_seq, self.prev_hash.clone());
                    written.append(&mut segment);
                }
                Err(e) => failure = Some((e, segment)),
            }
        }
        let failed_any = failure.is_some();
        if let Some((e, failed)) = failure {
            (self.next_seq, self.prev_hash) = self.committed.clone();
            self.shared.failed.store(true, Ordering::Release);
            self.shared
                .errors
                .fetch_add(failed.len() as u64, Ordering::Relaxed);
            tracing::error!(error = %e, records = failed.len(), "audit write failed");
            for ack in failed {
                let _ = ack.send(Err(e.clone()));
            }
        }
        if written.is_empty() {
            return;
        }
        self.dirty = true;
        let synced = match self.fsync {
            Fsync::Always => self.sync(),
            Fsync::Batch | Fsync::Never => Ok(()),
        };
        match synced {
            Ok(()) => {
                self.shared
                    .written
                    .fetch_add(written.len() as u64, Ordering::Relaxed);
                if !failed_any {
                    self.shared.failed.store(false, Ordering::Release);
                }
                for ack in written {
                    let _ = ack.send(Ok(()));
                }
            }
            Err(e) => {
                self.shared.failed.store(true, Ordering::Release);
                self.shared
                    .errors
                    .fetch_add(written.len() as u64, Ordering::Relaxed);
                tracing::error!(error = %e, records = written.len(), "audit fsync failed");
                for ack in written {
                    let _ = ack.send(Err(e.clone()));
                }
            }
        }
        if self.fsync == Fsync::Batch && self.last_sync.elapsed() >= self.batch_interval {
            self.periodic_sync();
        }
    }

    /// Assigns the chain position and appends the line to `buf`.
    fn encode(&mut self, rec: &mut AuditRecord) -> Result<(), AuditError> {
        rec.seq = self.next_seq;
        rec.prev_hash.clone_from(&self.prev_hash);
        if rec.ts.is_empty() {
            rec.ts = format_ts(OffsetDateTime::now_utc());
        }
        chain::normalize(rec);
        chain::canonical_into(rec, &mut self.canon)?;
        rec.hash = self.key.digest(&rec.prev_hash, &self.canon);
        chain::push_line(&self.canon, &rec.hash, &mut self.buf);
        self.buf.push(b'\n');
        self.next_seq = self.next_seq.saturating_add(1);
        self.prev_hash.clone_from(&rec.hash);
        Ok(())
    }

    /// Whether the line that starts at `line_start` in `buf` must go to a new file.
    fn must_rotate_before(&self, line_start: usize) -> bool {
        self.regular
            && self.rotate_bytes > 0
            && self.file_len + self.buf.len() as u64 > self.rotate_bytes
            && self.file_len + line_start as u64 > 0
    }

    /// Appends `buf` to the current file.
    fn write_segment(&mut self, first_seq: Option<u64>) -> Result<(), AuditError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if self.file.is_none() {
            self.open_current().map_err(|e| self.write_error(e))?;
        }
        let Some(file) = self.file.as_mut() else {
            return Err(AuditError::Write("no audit file".into()));
        };
        if self.needs_truncate && self.regular {
            file.set_len(self.file_len)
                .map_err(|e| AuditError::Write(format!("{}: {e}", self.base.display())))?;
        }
        self.needs_truncate = false;
        if let Err(e) = file.write_all(&self.buf) {
            self.needs_truncate = self.regular;
            return Err(self.write_error(e));
        }
        if self.file_len == 0 {
            self.file_first_seq = first_seq;
        }
        self.file_len += self.buf.len() as u64;
        self.dirty = true;
        Ok(())
    }

    fn write_error(&self, e: io::Error) -> AuditError {
        AuditError::Write(format!("{}: {e}", self.base.display()))
    }

    /// Renames the current file after its first seq and starts a new one.
    /// Syncs in every fsync mode: only the newest file is repaired after a crash, so a rotated
    /// file must be complete on disk.
    fn rotate(&mut self) -> Result<(), AuditError> {
        self.sync()?;
        let first = self.file_first_seq.unwrap_or(self.committed.0);
        let target = rotated_file_name(&self.base, first);
        if fs::symlink_metadata(&target).is_ok() {
            return Err(AuditError::Write(format!(
                "cannot rotate: {} already exists",
                target.display()
            )));
        }
        fs::rename(&self.base, &target).map_err(|e| {
            AuditError::Write(format!(
                "cannot rotate {} to {}: {e}",
                self.base.display(),
                target.display()
            ))
        })?;
        self.file = None;
        self.file_len = 0;
        self.file_first_seq = None;
        self.needs_truncate = false;
        self.open_current().map_err(|e| self.write_error(e))?;
        sync_dir(&self.base);
        Ok(())
    }

    fn open_current(&mut self) -> io::Result<()> {
        let existed = self.base.exists();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.base)?;
        let meta = file.metadata()?;
        self.regular = meta.is_file();
        self.file_len = if self.regular { meta.len() } else { 0 };
        if self.file_len == 0 {
            self.file_first_seq = None;
        }
        self.file = Some(file);
        if !existed {
            sync_dir(&self.base);
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), AuditError> {
        if !self.dirty {
            return Ok(());
        }
        let Some(file) = self.file.as_ref() else {
            // Only after a rotation, which synced the renamed file first.
            self.dirty = false;
            return Ok(());
        };
        file.sync_data()
            .map_err(|e| AuditError::Write(format!("fsync {}: {e}", self.base.display())))?;
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    fn periodic_sync(&mut self) {
        if let Err(e) = self.sync() {
            self.shared.failed.store(true, Ordering::Release);
            self.shared.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "audit fsync failed");
            // Do not spin on a failing disk: try again after the next write or interval.
            self.dirty = false;
            self.last_sync = Instant::now();
        }
    }

    fn final_sync(&mut self) {
        if let Err(e) = self.sync() {
            self.shared.failed.store(true, Ordering::Release);
            self.shared.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "audit fsync at shutdown failed");
        }
    }
}

/// Makes a created or renamed file name durable. Best effort: not every platform allows it.
fn sync_dir(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}
